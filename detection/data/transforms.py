"""Detection transforms: shorter-side resize capped by a longer-side maximum, and horizontal flip.

The target size is computed here rather than with ``A.SmallestMaxSize`` + ``A.LongestMaxSize``,
because those two applied in sequence do not give "shorter side = s unless the longer side would
exceed max_size" (the second can undo the first and they round separately). The image and every box
then go through one albumentations pipeline (``A.Resize`` with the exact size, then ``A.HorizontalFlip``),
so boxes and crowd boxes stay consistent with the pixels. The scale factors and the flip flag are
returned so detections can be mapped back to the original image
(:func:`detection.modeling.postprocessing.boxes_to_image`).
"""
from __future__ import annotations

import os
import random
from collections.abc import Sequence

import numpy as np
import torch

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network request on import
import albumentations as A  # noqa: E402

_BBOX_PARAMS = A.BboxParams(format="pascal_voc", label_fields=["labels", "is_crowd"], clip=True)


def resized_shape(height, width, short_side: int, max_size: int):
    """(h, w) with the shorter side equal to ``short_side``, unless the longer side would then exceed
    ``max_size``, in which case the longer side equals ``max_size``. Aspect ratio is kept up to rounding
    (half up) of the side that is not pinned.

    Written without a branch on the sizes (``torch.sym_min``/``sym_max`` are plain ``min``/``max`` on
    ints), so the exported detector (:mod:`detection.export`) computes the same size from a symbolic
    image shape as the data pipeline does from a real one."""
    scale = torch.sym_min(short_side / torch.sym_min(height, width), max_size / torch.sym_max(height, width))
    return (torch.sym_max(1, torch.sym_int(height * scale + 0.5)),
            torch.sym_max(1, torch.sym_int(width * scale + 0.5)))


class DetectionTransform:
    """Callable like an albumentations pipeline: ``t(image=..., bboxes=..., labels=..., crowd_boxes=...)``.

    Returns ``{"image": HxWx3 uint8, "bboxes": float32 Nx4, "labels": int64 N, "crowd_boxes": float32 Mx4,
    "scale": (sy, sx), "flipped": bool}`` where ``scale`` is transformed size / original size.
    Randomness (scale choice, flip) uses Python's ``random``, which the DataLoader seeds per worker.
    """

    def __init__(self, min_size: Sequence[int], max_size: int, flip_prob: float, train: bool):
        if not min_size or any(int(s) <= 0 for s in min_size) or max_size <= 0:
            raise ValueError(f"build_transform: sizes must be positive, got min_size={min_size}, max_size={max_size}")
        self.min_sizes = tuple(int(s) for s in min_size)
        self.max_size = int(max_size)
        self.flip_prob = float(flip_prob) if train else 0.0
        self.train = train

    def __repr__(self) -> str:
        return (f"DetectionTransform(min_size={self.min_sizes}, max_size={self.max_size}, "
                f"flip_prob={self.flip_prob}, train={self.train})")

    def __call__(self, image: np.ndarray, bboxes=(), labels=(), crowd_boxes=None) -> dict:
        h, w = image.shape[:2]
        short_side = random.choice(self.min_sizes) if self.train else self.min_sizes[0]
        new_h, new_w = resized_shape(h, w, short_side, self.max_size)
        flipped = self.flip_prob > 0 and random.random() < self.flip_prob

        boxes = _as_boxes(bboxes)
        crowd = _as_boxes(crowd_boxes if crowd_boxes is not None else ())
        steps = [A.Resize(new_h, new_w)] + ([A.HorizontalFlip(p=1.0)] if flipped else [])
        out = A.Compose(steps, bbox_params=_BBOX_PARAMS)(
            image=image,
            bboxes=np.concatenate([boxes, crowd]),
            labels=np.concatenate([np.asarray(labels, dtype=np.int64).reshape(-1), np.zeros(len(crowd), np.int64)]),
            is_crowd=np.concatenate([np.zeros(len(boxes), bool), np.ones(len(crowd), bool)]),
        )
        all_boxes = _as_boxes(out["bboxes"])
        is_crowd = np.asarray(out["is_crowd"], dtype=bool).reshape(-1)
        return {
            "image": out["image"],
            "bboxes": all_boxes[~is_crowd],
            "labels": np.asarray(out["labels"], dtype=np.int64).reshape(-1)[~is_crowd],
            "crowd_boxes": all_boxes[is_crowd],
            "scale": (new_h / h, new_w / w),
            "flipped": bool(flipped),
        }


def _as_boxes(boxes) -> np.ndarray:
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def build_transform(min_size: tuple[int, ...], max_size: int, flip_prob: float, train: bool) -> DetectionTransform:
    """Train: one shorter side sampled from ``min_size`` per image (multi-scale) and a flip with ``flip_prob``.
    Test: the first ``min_size``, no flip."""
    return DetectionTransform(min_size, max_size, flip_prob, train)
