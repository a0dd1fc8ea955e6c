"""Feature Pyramid Network (Lin et al. 2017) on top of res2..res5.

Each stage gets a 1x1 lateral convolution to ``out_channels``; starting from the coarsest, the
running map is upsampled 2x (nearest) and added to the next finer lateral; a 3x3 convolution then
smooths each sum into P2..P5. P6, used by the RPN only, is P5 max-pooled with stride 2.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class FPN(nn.Module):
    def __init__(self, in_channels_per_stage: dict[str, int], out_channels: int = 256, top_block: str = "maxpool"):
        super().__init__()
        if top_block not in ("maxpool", "none"):
            raise ValueError(f"FPN top_block must be 'maxpool' or 'none', got {top_block!r}")
        self.in_features = list(in_channels_per_stage)  # finest first, e.g. res2..res5
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels_per_stage.values())
        self.output = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in self.in_features)
        for conv in [*self.lateral, *self.output]:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)
        self.top_block = top_block
        first_level = int(self.in_features[0][-1]) if self.in_features[0][-1].isdigit() else 2
        self.out_features = [f"p{first_level + i}" for i in range(len(self.in_features) + (top_block == "maxpool"))]
        self.out_channels = out_channels

    def forward(self, features: dict[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
        inputs = [features[f] for f in self.in_features]
        running = self.lateral[-1](inputs[-1])
        outputs = [self.output[-1](running)]
        for i in range(len(inputs) - 2, -1, -1):
            lateral = self.lateral[i](inputs[i])
            running = lateral + F.interpolate(running, size=lateral.shape[-2:], mode="nearest")
            outputs.insert(0, self.output[i](running))
        if self.top_block == "maxpool":
            outputs.append(F.max_pool2d(outputs[-1], kernel_size=1, stride=2))
        return OrderedDict(zip(self.out_features, outputs))
