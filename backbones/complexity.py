"""Parameter and multiply-add counts, to check the nets against the paper's Table 1."""
from __future__ import annotations

import torch
from torch import nn


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_multiply_adds(model: nn.Module, input_size=(1, 3, 224, 224)) -> int:
    """Multiply-adds of convolutions and fully connected layers for one forward pass.

    This is what the paper calls FLOPs (Table 1: ResNet-50 3.8 x 10^9); BN, ReLU, pooling and
    additions are left out, as there.
    """
    total = 0

    def conv_hook(module: nn.Conv2d, inputs, output):
        nonlocal total
        kh, kw = module.kernel_size
        total += output.numel() * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module: nn.Linear, inputs, output):
        nonlocal total
        total += output.numel() * module.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(input_size))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total // input_size[0]
