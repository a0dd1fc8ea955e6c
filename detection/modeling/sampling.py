"""Balanced sampling of foreground and background examples for the RPN and the box head.

Fixed-size and free of host synchronisation: Detectron2 and torchvision pick the examples with
``nonzero`` and ``randperm`` subsets, whose sizes are known only once the GPU has computed the labels,
so the host waits for it once per image and per draw. Here every example gets a uniform random key,
the ``k`` smallest keys among the foreground (or background) examples are the random subset (``topk``
with a size fixed by the arguments), and how many of them count is a tensor on the device. The draw is
the same distribution as before (a uniform random subset of the foreground up to the cap, background
filling the rest), not the same numbers.
"""
from __future__ import annotations

import torch


def uniform_keys(shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform random numbers from ``generator``, which may live on another device than the examples (a CPU
    generator for CUDA tensors): drawn where the generator is, then moved without waiting for the copy."""
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device, non_blocking=True)


def sample_balanced(labels: torch.Tensor, num_samples: int, positive_fraction: float,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick up to ``num_samples`` examples along the last dimension, at most ``positive_fraction`` of them
    foreground.

    ``labels`` (..., A): 1 (or any class > 0) foreground, 0 background, -1 ignored. When there are too few
    foreground examples, background fills the rest; with ``num_samples`` at least the number of
    candidates, every candidate is taken. Returns ``(indices, valid)``, both (..., S) with
    ``S = min(num_samples, A)``: the chosen examples, foreground first, and which of the S slots hold one
    (the valid slots come first; the others point at arbitrary examples and must be left out).
    """
    num_examples = labels.shape[-1]
    size = min(num_samples, num_examples)
    batch_shape = labels.shape[:-1]
    if size == 0:
        empty = torch.zeros(batch_shape + (0,), dtype=torch.int64, device=labels.device)
        return empty, empty.bool()
    keys = uniform_keys(labels.shape, generator, labels.device)
    positive, negative = labels > 0, labels == 0
    slots = torch.arange(size, device=labels.device)
    # the foreground with the smallest keys, then the background with the smallest keys (in key order)
    num_pos_wanted = min(int(num_samples * positive_fraction), num_examples)
    num_pos = positive.sum(dim=-1, keepdim=True).clamp(max=num_pos_wanted)
    neg_idx = keys.masked_fill(~negative, 2.0).topk(size, dim=-1, largest=False).indices
    num_neg = torch.minimum(negative.sum(dim=-1, keepdim=True), num_samples - num_pos)
    indices = neg_idx.gather(-1, (slots - num_pos).clamp(min=0))
    if num_pos_wanted > 0:
        pos_idx = keys.masked_fill(~positive, 2.0).topk(num_pos_wanted, dim=-1, largest=False).indices
        from_pos = pos_idx.gather(-1, slots.clamp(max=num_pos_wanted - 1).expand(batch_shape + (size,)))
        indices = torch.where(slots < num_pos, from_pos, indices)
    return indices, slots < num_pos + num_neg


def sampled_labels(labels: torch.Tensor, indices: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``labels`` (..., A) with every example that ``sample_balanced`` did not choose set to -1 (ignored)."""
    # the left-out slots write into one extra column that is then dropped, so no example is written twice
    # with different values (scatter_ is then deterministic)
    dump = labels.shape[-1]
    target = torch.where(valid, indices, dump)
    out = torch.full(labels.shape[:-1] + (dump + 1,), -1, dtype=labels.dtype, device=labels.device)
    out.scatter_(-1, target, labels.gather(-1, indices))
    return out[..., :dump]

