"""Detections from the network's frame back to the image file's pixels: the one place evaluation, the
Predictor and the benches do it (the exported graph does the same arithmetic symbolically, in
:mod:`detection.export`)."""
from __future__ import annotations

from .data.transforms import boxes_to_original
from .modeling.box_ops import clip_boxes


def to_original(det: dict, orig_size: tuple[int, int], scale: tuple[float, float], flipped: bool = False) -> dict:
    """One image's ``{"boxes", "scores", "labels"}`` in the resized (and maybe flipped) network input ->
    the same on the CPU, boxes in the original ``(height, width)`` image's pixels, clipped to it.
    ``scale`` is (network input / original) per axis, as the data pipeline records it."""
    h, w = orig_size
    boxes = boxes_to_original(det["boxes"].float().cpu(), scale, flipped, transformed_width=w * scale[1])
    return {"boxes": clip_boxes(boxes, (h, w)), "scores": det["scores"].float().cpu(), "labels": det["labels"].cpu()}


def target_to_original(det: dict, target: dict) -> dict:
    """:func:`to_original` with the frame a data-pipeline target records (``orig_size``, ``scale``, ``flipped``)."""
    return to_original(det, target["orig_size"], target["scale"], target["flipped"])

