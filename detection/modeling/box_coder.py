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


def _centers_and_sizes(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, 2)`` centres and ``(N, 2)`` sizes (x, y each) of ``(N, 4)`` boxes: each coordinate pair in one
    operator, where one per coordinate was twice as many launches on a GPU (the arithmetic per element is
    the same: ``x1 + 0.5 * (x2 - x1)``)."""
    sizes = boxes[:, 2:] - boxes[:, :2]
    return boxes[:, :2] + 0.5 * sizes, sizes


class BoxCoder:
    def __init__(self, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), scale_clamp: float = DEFAULT_SCALE_CLAMP):
        if len(weights) != 4:
            raise ValueError(f"BoxCoder weights must be 4 numbers (wx, wy, ww, wh), got {list(weights)}")
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = scale_clamp

    def weight_pairs(self, like: torch.Tensor) -> tuple:
        """``(wx, wy)`` and ``(ww, wh)``, each a number where its two are equal (as in (10, 10, 5, 5): no tensor
        to make), else a float32 tensor on ``like``'s device."""
        wx, wy, ww, wh = self.weights
        return tuple(a if a == b else like.new_tensor([a, b], dtype=torch.float32) for a, b in ((wx, wy), (ww, wh)))

    def encode(self, reference_boxes: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
        """Deltas ``(N, 4)`` that turn each of ``proposals`` into the matching ``reference_boxes`` (targets)."""
        w_center, w_size = self.weight_pairs(proposals)
        src_ctr, src_size = _centers_and_sizes(proposals.float())
        gt_ctr, gt_size = _centers_and_sizes(reference_boxes.float())
        return torch.cat([w_center * (gt_ctr - src_ctr) / src_size, w_size * torch.log(gt_size / src_size)], dim=1)

    def decode(self, deltas: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Apply ``deltas`` ``(N, 4k)`` (k boxes per row, e.g. one per class) to ``boxes`` ``(N, 4)``.

        Returns ``(N, 4k)`` boxes in xyxy.
        """
        w_center, w_size = self.weight_pairs(boxes)
        ctr, sizes = _centers_and_sizes(boxes.float())
        num_boxes, per_row = deltas.shape[0], deltas.shape[1] // 4
        deltas = deltas.float().reshape(num_boxes, per_row, 4)
        pred_ctr = deltas[..., :2] / w_center * sizes[:, None] + ctr[:, None]
        half = 0.5 * torch.exp((deltas[..., 2:] / w_size).clamp(max=self.scale_clamp)) * sizes[:, None]
        return torch.cat([pred_ctr - half, pred_ctr + half], dim=2).view(num_boxes, 4 * per_row)
