"""The ILSVRC localization metric: a guess (class, box) is right when the class is one of the image's
ground-truth classes and the box overlaps a ground-truth box of that class with IoU >= 0.5.

Top-k localization error: no right guess among the first k (class, box) guesses. The ground-truth
class ("oracle") error: the box guessed for the true class is wrong. Classification top-k error: the
true class is not among the first k guessed classes.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torchvision.ops import box_iou

COUNTS = ("cls_top1", "cls_top5", "loc_top1", "loc_top5", "oracle")


def guess_is_right(cls: int, box: torch.Tensor, gt_boxes: torch.Tensor, gt_box_labels: torch.Tensor,
                   iou_thresh: float = 0.5) -> bool:
    same = gt_box_labels == cls
    if not bool(same.any()):
        return False
    return bool(box_iou(box.view(1, 4).float(), gt_boxes[same].float()).max() >= iou_thresh)


def image_hits(guessed_classes: Sequence[int], class_boxes: dict[int, torch.Tensor], label: int,
               gt_boxes: torch.Tensor, gt_box_labels: torch.Tensor, iou_thresh: float = 0.5, topk: int = 5) -> dict:
    """Right (1) or wrong (0) for each count of one image. ``class_boxes`` maps each guessed class and
    the true ``label`` to the box guessed for it."""
    guesses = list(guessed_classes)[:topk]
    right = [guess_is_right(c, class_boxes[c], gt_boxes, gt_box_labels, iou_thresh) for c in guesses]
    return {
        "cls_top1": int(bool(guesses) and guesses[0] == label),
        "cls_top5": int(label in guesses),
        "loc_top1": int(bool(right) and right[0]),
        "loc_top5": int(any(right)),
        "oracle": int(guess_is_right(label, class_boxes[label], gt_boxes, gt_box_labels, iou_thresh)),
    }


def errors_from_counts(counts: dict, images: int, loc_images: int | None = None) -> dict:
    """Errors from right-guess counts: the classification ones over ``images``, the localization ones over
    ``loc_images`` (the images whose boxes are scored: all but the CLS-LOC blacklist's; default all)."""
    loc_images = images if loc_images is None else loc_images
    n, m = max(images, 1), max(loc_images, 1)
    return {"images": int(images), "loc_images": int(loc_images),
            **{f"{k}_err": 1.0 - counts.get(k, 0) / (n if k.startswith("cls") else m) for k in COUNTS}}


def centre_box(width: int, height: int, fraction: tuple[float, float]) -> torch.Tensor:
    """The fixed baseline guess: a box of ``fraction`` (w, h) of the image, centred."""
    fw, fh = fraction
    return torch.tensor([width * (1 - fw) / 2, height * (1 - fh) / 2, width * (1 + fw) / 2, height * (1 + fh) / 2])
