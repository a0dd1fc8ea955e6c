"""Balanced sampling of foreground and background examples for the RPN and the box head."""
from __future__ import annotations

import torch


def _random_subset(indices: torch.Tensor, count: int, generator: torch.Generator | None) -> torch.Tensor:
    if count >= indices.numel():
        return indices
    if generator is not None:
        perm = torch.randperm(indices.numel(), generator=generator, device=generator.device).to(indices.device)
    else:
        perm = torch.randperm(indices.numel(), device=indices.device)
    return indices[perm[:count]]


def sample_balanced(labels: torch.Tensor, num_samples: int, positive_fraction: float,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick up to ``num_samples`` examples, at most ``positive_fraction`` of them foreground.

    ``labels``: 1 (or any class > 0) foreground, 0 background, -1 ignored. When there are too few
    foreground examples, background fills the rest. Returns the indices of the chosen foreground
    and background examples.
    """
    positive = torch.nonzero(labels > 0, as_tuple=True)[0]
    negative = torch.nonzero(labels == 0, as_tuple=True)[0]
    num_pos = min(int(num_samples * positive_fraction), positive.numel())
    num_neg = min(num_samples - num_pos, negative.numel())
    return _random_subset(positive, num_pos, generator), _random_subset(negative, num_neg, generator)
