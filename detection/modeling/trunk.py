"""The part of a ResNet that runs on the whole image, returning its stage outputs by name."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class ResNetTrunk(nn.Module):
    """Stages ``stem`` .. the last of ``out_stages`` of ``resnet`` (shared modules, not copies).

    C4 uses ``("res4",)`` and hands res5 to the RoI head; FPN uses ``("res2", "res3", "res4", "res5")``.
    """

    def __init__(self, resnet: nn.Module, out_stages: Sequence[str]):
        super().__init__()
        names = list(resnet.stage_names)
        last = max(names.index(s) for s in out_stages)
        self.stage_names = names[: last + 1]
        for name in self.stage_names:
            self.add_module(name, getattr(resnet, name))
        self.out_stages = list(out_stages)
        self.out_channels = {s: resnet.stage_channels[s] for s in out_stages}
        self.out_strides = {s: resnet.stage_strides[s] for s in out_stages}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = {}
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self.out_stages:
                outputs[name] = x
        return outputs
