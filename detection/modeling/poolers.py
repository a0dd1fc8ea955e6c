"""RoI feature extraction: a fixed-size feature map per box, from one level or from an FPN pyramid.

Pooler types: ``ROIPool`` (max pooling over quantised bins, the paper's), ``ROIAlign`` (bilinear
sampling, Mask R-CNN, without the half-pixel shift) and ``ROIAlignV2`` (RoIAlign with
``aligned=True``: pixel centres at +0.5, what Detectron2 uses by default).

With several levels, a box of side ``s = sqrt(area)`` goes to level
``floor(canonical_level + log2(s / canonical_box_size))`` (FPN paper, eq. 1: a 224-pixel box to P4),
clamped to the available levels.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torchvision.ops import roi_align, roi_pool

POOLER_TYPES = ("ROIAlignV2", "ROIAlign", "ROIPool")


def boxes_to_rois(boxes: Sequence[torch.Tensor]) -> torch.Tensor:
    """List of per-image (K_i, 4) boxes -> (sum K_i, 5) rows ``(image index, x1, y1, x2, y2)``."""
    rois = [torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(b.float() for b in boxes)]
    return torch.cat(rois, dim=0)


def assign_boxes_to_levels(boxes: torch.Tensor, min_level: int, max_level: int, canonical_box_size: float = 224,
                           canonical_level: int = 4) -> torch.Tensor:
    """Index (0 = ``min_level``) of the pyramid level each (K, 4) box is pooled from."""
    sizes = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    levels = torch.floor(canonical_level + torch.log2(sizes / canonical_box_size + 1e-8))
    return (levels.clamp(min=min_level, max=max_level) - min_level).to(torch.int64)


class ROIPooler(nn.Module):
    def __init__(self, output_size: int = 14, scales: Sequence[float] = (1.0 / 16,), sampling_ratio: int = 0,
                 pooler_type: str = "ROIAlignV2", canonical_box_size: float = 224, canonical_level: int = 4):
        super().__init__()
        if pooler_type not in POOLER_TYPES:
            raise ValueError(f"pooler_type must be one of {POOLER_TYPES}, got {pooler_type!r}")
        self.output_size = (int(output_size), int(output_size))
        self.scales = [float(s) for s in scales]
        self.sampling_ratio = int(sampling_ratio)
        self.pooler_type = pooler_type
        self.canonical_box_size = canonical_box_size
        self.canonical_level = canonical_level
        levels = [-math.log2(s) for s in self.scales]
        if any(abs(lv - round(lv)) > 1e-6 for lv in levels) or any(
                round(b) - round(a) != 1 for a, b in zip(levels[:-1], levels[1:])):
            raise ValueError(f"ROIPooler scales must be 1/2^k for consecutive k (finest first), got {list(scales)}")
        self.min_level, self.max_level = round(levels[0]), round(levels[-1])

    def pool(self, features: torch.Tensor, rois: torch.Tensor, scale: float) -> torch.Tensor:
        if self.pooler_type == "ROIPool":
            return roi_pool(features, rois, self.output_size, scale)
        return roi_align(features, rois, self.output_size, scale, self.sampling_ratio,
                         aligned=self.pooler_type == "ROIAlignV2")

    def forward(self, features: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor]) -> torch.Tensor:
        """``features``: one (N, C, H, W) map per level (finest first); ``boxes``: per image (K_i, 4)
        in input pixels. Returns (sum K_i, C, S, S), rows in the order of the concatenated boxes."""
        if len(features) != len(self.scales):
            raise ValueError(f"ROIPooler: {len(features)} feature maps for {len(self.scales)} scales")
        rois = boxes_to_rois(boxes).to(features[0].device)
        if len(features) == 1:
            return self.pool(features[0], rois, self.scales[0])
        levels = assign_boxes_to_levels(rois[:, 1:], self.min_level, self.max_level, self.canonical_box_size,
                                        self.canonical_level)
        channels = features[0].shape[1]
        out = features[0].new_zeros((rois.shape[0], channels) + self.output_size)
        for level, (fmap, scale) in enumerate(zip(features, self.scales)):
            idx = torch.nonzero(levels == level, as_tuple=True)[0]
            out[idx] = self.pool(fmap, rois[idx], scale).to(out.dtype)
        return out
