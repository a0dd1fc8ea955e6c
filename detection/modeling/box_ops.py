"""Small box utilities the heads share (xyxy boxes in pixels); IoU itself is torchvision.ops.box_iou."""
from __future__ import annotations

import torch
import torchvision


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_thresh: float) -> torch.Tensor:
    """NMS within each group (level, class, image x level, image x class): one ``torchvision.ops.nms`` over
    boxes shifted apart per group, indices sorted by decreasing score.

    Departs from ``torchvision.ops.batched_nms``, which above 4000 (CPU) or 20000 (CUDA) box coordinates
    runs one NMS per group, each after a ``unique`` and a ``where`` the host waits for. The shift is the
    same coordinate trick, but in float64, so that the shifted coordinates of float32 boxes stay exact even
    with thousands of groups (float32 would round them by up to 1/8 pixel at 1280 groups of 1333 pixels):
    the IoUs are those of the boxes themselves, computed in higher precision (a decision can differ only
    for an IoU within about 1e-7 of the threshold). Under ``torch.export`` the shift stays float32, the
    type an exported NMS (ONNX) takes. The shift is also defined for no boxes at all. One NMS for a whole
    batch costs the square of its size in IoUs: (N x boxes)^2 where per image it was N x boxes^2."""
    dtype = boxes.dtype if torch.compiler.is_exporting() else torch.float64
    boxes = boxes.to(dtype)
    extent = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)]).abs().max() + 1
    return torchvision.ops.nms(boxes + (groups.to(dtype) * extent)[:, None], scores.to(dtype), iou_thresh)


def clip_boxes(boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Clip ``(..., 4)`` boxes to an ``(height, width)`` image."""
    h, w = image_size
    x = boxes[..., 0::2].clamp(min=0, max=w)
    y = boxes[..., 1::2].clamp(min=0, max=h)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def nonempty(boxes: torch.Tensor, min_size: float = 0.0) -> torch.Tensor:
    """Mask of boxes whose sides are both longer than ``min_size`` pixels."""
    return ((boxes[:, 2] - boxes[:, 0]) > min_size) & ((boxes[:, 3] - boxes[:, 1]) > min_size)


def pairwise_ioa(regions: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(M, N) intersection of ``regions[m]`` and ``boxes[n]`` divided by the area of ``boxes[n]``.

    Used for crowd regions: a box this much inside a crowd box is neither clearly background nor a
    single object.
    """
    lt = torch.max(regions[:, None, :2], boxes[None, :, :2])
    rb = torch.min(regions[:, None, 2:], boxes[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=1e-6)
    return inter / area[None, :]


def crowd_mask(crowd_boxes: torch.Tensor | None, boxes: torch.Tensor, thresh: float) -> torch.Tensor:
    """Mask of ``boxes`` that lie ``>= thresh`` inside some crowd box (all False without crowd boxes)."""
    if crowd_boxes is None or crowd_boxes.numel() == 0 or boxes.numel() == 0:
        return torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    ioa = pairwise_ioa(crowd_boxes.to(device=boxes.device, dtype=torch.float32), boxes.float())
    return ioa.max(dim=0).values >= thresh


def smooth_l1(input: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """Element-wise smooth L1 (Huber / beta); ``beta`` 0 is plain L1. Not reduced."""
    diff = (input.float() - target.float()).abs()
    if beta < 1e-5:
        return diff
    return torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)
