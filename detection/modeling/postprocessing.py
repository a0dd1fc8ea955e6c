"""Detections from the network's input frame back to the image file's pixels: the detector's last step.

The data pipeline resizes each image (and in training may mirror it) and records in its target the frame
it came from: ``orig_size`` ``(h, w)``, ``scale`` ``(sy, sx)`` = network input / original, ``flipped``.
In evaluation ``GeneralizedRCNN`` and ``TestTimeDetector`` end with :func:`detections_to_image`: an image
whose target carries that frame gets its boxes in the original image's pixels, clipped to it; a batch
without targets (a bare tensor batch, the speed benches) keeps the network input's pixels. The exported
graph (:mod:`detection.export`) calls :func:`boxes_to_image` with symbolic sizes, so there is one copy of
this arithmetic.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .box_ops import clip_boxes


def boxes_to_image(boxes: torch.Tensor, orig_size, scale, flipped: bool = False) -> torch.Tensor:
    """xyxy ``(N, 4)`` boxes in the (resized, maybe mirrored) network input -> float32 boxes in the
    original ``orig_size = (h, w)`` image, clipped to it. The mirror is undone within the resized width
    (``w * sx``), then each axis is divided by its scale. Sizes may be symbolic (``torch.export``)."""
    height, width = orig_size
    sy, sx = scale
    x1, y1, x2, y2 = boxes.float().unbind(dim=-1)
    if flipped:
        resized_width = width * sx
        x1, x2 = resized_width - x2, resized_width - x1
    return clip_boxes(torch.stack([x1 / sx, y1 / sy, x2 / sx, y2 / sy], dim=-1), (height, width))


def detections_to_image(detections: list[dict], targets: Sequence[dict] | None) -> list[dict]:
    """Per image ``{"boxes", "scores", "labels"}``: boxes mapped with :func:`boxes_to_image` and scores as
    float32 where ``targets[i]`` carries ``orig_size`` and ``scale``; the others unchanged."""
    if not targets:
        return detections
    if len(targets) != len(detections):
        raise ValueError(f"{len(detections)} images of detections but {len(targets)} targets")
    out = []
    for det, target in zip(detections, targets):
        if "orig_size" in target and "scale" in target:
            det = {**det, "boxes": boxes_to_image(det["boxes"], target["orig_size"], target["scale"],
                                                  bool(target.get("flipped", False))),
                   "scores": det["scores"].float()}
        out.append(det)
    return out
