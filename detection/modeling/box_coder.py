"""The box parametrisation of R-CNN: centre offsets in units of the reference box's size and log
size ratios, each scaled by a weight (1 for the RPN, (10, 10, 5, 5) for the box head).

Widths are ``x2 - x1`` (no "+1"). Decoding clamps the log size ratios at ``scale_clamp`` so a wild
prediction cannot overflow ``exp``. Arithmetic is float32 whatever the input dtype (autocast).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def _centers_and_sizes(boxes: torch.Tensor):
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    return boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights, widths, heights


class BoxCoder:
    def __init__(self, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), scale_clamp: float = DEFAULT_SCALE_CLAMP):
        if len(weights) != 4:
            raise ValueError(f"BoxCoder weights must be 4 numbers (wx, wy, ww, wh), got {list(weights)}")
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = scale_clamp

    def encode(self, reference_boxes: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
        """Deltas ``(N, 4)`` that turn each of ``proposals`` into the matching ``reference_boxes`` (targets)."""
        wx, wy, ww, wh = self.weights
        gt = reference_boxes.float()
        src = proposals.float()
        src_cx, src_cy, src_w, src_h = _centers_and_sizes(src)
        gt_cx, gt_cy, gt_w, gt_h = _centers_and_sizes(gt)
        dx = wx * (gt_cx - src_cx) / src_w
        dy = wy * (gt_cy - src_cy) / src_h
        dw = ww * torch.log(gt_w / src_w)
        dh = wh * torch.log(gt_h / src_h)
        return torch.stack([dx, dy, dw, dh], dim=1)

    def decode(self, deltas: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Apply ``deltas`` ``(N, 4k)`` (k boxes per row, e.g. one per class) to ``boxes`` ``(N, 4)``.

        Returns ``(N, 4k)`` boxes in xyxy.
        """
        wx, wy, ww, wh = self.weights
        deltas = deltas.float()
        boxes = boxes.float()
        cx, cy, widths, heights = _centers_and_sizes(boxes)
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = (deltas[:, 2::4] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[:, 3::4] / wh).clamp(max=self.scale_clamp)
        pred_cx = dx * widths[:, None] + cx[:, None]
        pred_cy = dy * heights[:, None] + cy[:, None]
        half_w = 0.5 * torch.exp(dw) * widths[:, None]
        half_h = 0.5 * torch.exp(dh) * heights[:, None]
        out = torch.stack([pred_cx - half_w, pred_cy - half_h, pred_cx + half_w, pred_cy + half_h], dim=2)
        return out.reshape(deltas.shape[0], deltas.shape[1])
