"""Anchors: a fixed set of reference boxes at every position of every feature map.

Each level has its own sizes (square root of the area, in pixels), aspect ratios (height / width)
and stride. A "cell" holds the level's anchors centred on (0, 0); the grid shifts that cell to
``(x * stride, y * stride)`` for each feature-map position. The anchors of a level are ordered
(y, x, anchor), which is how the RPN head's outputs are flattened too.

Cell anchors are rounded to whole pixels, and shifts start at 0 rather than at half a stride, the
conventions of the original Faster R-CNN code that torchvision kept.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> torch.Tensor:
    """(len(ratios) * len(sizes), 4) boxes centred on the origin, ratio-major, rounded to pixels."""
    sizes_t = torch.as_tensor(sizes, dtype=torch.float32)
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1.0 / h_ratios
    widths = (w_ratios[:, None] * sizes_t[None, :]).reshape(-1)
    heights = (h_ratios[:, None] * sizes_t[None, :]).reshape(-1)
    return (torch.stack([-widths, -heights, widths, heights], dim=1) / 2).round()


class AnchorGenerator(nn.Module):
    """``forward(feature_maps)`` gives one ``(H * W * A, 4)`` anchor tensor (xyxy, pixels) per level.

    ``sizes`` and ``aspect_ratios`` hold one list per level; a single ``aspect_ratios`` list is used
    for every level. Results are cached per (level, feature size, device).
    """

    def __init__(self, sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[Sequence[float]],
                 strides: Sequence[int]):
        super().__init__()
        sizes = [list(s) for s in sizes]
        aspect_ratios = [list(r) for r in aspect_ratios]
        if len(aspect_ratios) == 1 and len(sizes) > 1:
            aspect_ratios = aspect_ratios * len(sizes)
        if not (len(sizes) == len(aspect_ratios) == len(strides)):
            raise ValueError(f"AnchorGenerator: {len(sizes)} size lists, {len(aspect_ratios)} aspect-ratio lists "
                             f"and {len(strides)} strides; give one of each per feature level")
        self.sizes, self.aspect_ratios, self.strides = sizes, aspect_ratios, [int(s) for s in strides]
        self.cell_anchors = [cell_anchors(s, r) for s, r in zip(sizes, aspect_ratios)]
        self._cache: dict[tuple, torch.Tensor] = {}

    @property
    def num_anchors_per_level(self) -> list[int]:
        return [len(c) for c in self.cell_anchors]

    def grid_anchors(self, level: int, height, width, device: torch.device) -> torch.Tensor:
        stride = self.strides[level]
        shifts_x = torch.arange(width, dtype=torch.float32, device=device) * stride
        shifts_y = torch.arange(height, dtype=torch.float32, device=device) * stride
        shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
        shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
        shifts = torch.stack([shift_x, shift_y, shift_x, shift_y], dim=1)
        cell = self.cell_anchors[level].to(device)
        return (shifts[:, None, :] + cell[None, :, :]).reshape(-1, 4)

    def forward(self, feature_maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(feature_maps) != len(self.strides):
            raise ValueError(f"AnchorGenerator: got {len(feature_maps)} feature maps for {len(self.strides)} levels")
        anchors = []
        for level, fmap in enumerate(feature_maps):
            height, width = fmap.shape[-2:]
            if torch.compiler.is_exporting():  # symbolic sizes: no cache, and no int() that would fix them
                anchors.append(self.grid_anchors(level, height, width, fmap.device))
                continue
            key = (level, int(height), int(width), str(fmap.device))
            if key not in self._cache:
                if len(self._cache) >= 64:  # many input sizes (multi-scale training): keep memory bounded
                    self._cache.clear()
                self._cache[key] = self.grid_anchors(level, int(height), int(width), fmap.device)
            anchors.append(self._cache[key])
        return anchors
