"""Batching for detection: padded collation and aspect-ratio grouped, DDP-sharded batch samplers.

Grouping landscape with landscape and portrait with portrait images keeps the zero padding (and so
wasted compute and memory) small when images of different shapes share a batch.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler


def collate_detection(batch: Sequence[dict | None], size_divisibility: int = 32) -> dict:
    """Stack images into one zero-padded uint8 tensor whose H and W are multiples of ``size_divisibility``
    (the backbone's stride, so feature maps align); drop the None items of undecodable images, counted in
    ``num_skipped``. Returns ``{"images", "image_sizes" (unpadded (h, w)), "targets", "num_skipped"}``."""
    items = [item for item in batch if item is not None]
    sizes = [tuple(int(s) for s in item["image"].shape[-2:]) for item in items]
    if items:
        height = padded_side(max(h for h, _ in sizes), size_divisibility)
        width = padded_side(max(w for _, w in sizes), size_divisibility)
        images = torch.zeros((len(items), items[0]["image"].shape[0], height, width), dtype=torch.uint8)
        for padded, item, (h, w) in zip(images, items, sizes):
            padded[:, :h, :w].copy_(item["image"])
    else:
        images = torch.zeros((0, 3, 0, 0), dtype=torch.uint8)
    return {
        "images": images,
        "image_sizes": sizes,
        "targets": [{k: v for k, v in item.items() if k != "image"} for item in items],
        "num_skipped": len(batch) - len(items),
    }


def padded_side(value: int, multiple: int) -> int:
    """An image side as the collate pads it: up to a multiple of ``size_divisibility``."""
    return -(-value // multiple) * multiple if multiple > 1 else value


class GroupedBatchSampler(Sampler[list[int]]):
    """Shuffled training batches, each holding only landscape (w >= h) or only portrait (w < h) images.

    Every rank draws the same permutation for an epoch (seeded by ``seed`` and the epoch), groups it
    into batches as images arrive, and takes every ``world_size``-th batch: the ranks' shards are
    disjoint and all ranks have the same number of batches, which DDP needs. That number is the same
    in every epoch (it only depends on the group sizes), so iteration counts map to epochs exactly.
    Without ``drop_last`` the incomplete batches are kept and, when the batch count does not divide by
    ``world_size``, the first batches are repeated to even out the ranks.
    """

    def __init__(self, aspect_ratios: Sequence[float], batch_size: int, seed: int = 0, drop_last: bool = True,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.groups = orientation_groups(aspect_ratios)
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        counts = np.bincount(self.groups, minlength=2)
        full = int(sum(c // batch_size for c in counts))
        partial = int(sum(c % batch_size > 0 for c in counts))
        self._num_batches = full // world_size if drop_last else math.ceil((full + partial) / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._num_batches

    def __iter__(self):
        batches = self._all_batches()
        if batches and len(batches) < self._num_batches * self.world_size:  # even out the ranks
            repeats = math.ceil(self._num_batches * self.world_size / len(batches))
            batches = (batches * repeats)[: self._num_batches * self.world_size]
        yield from batches[self.rank::self.world_size][: self._num_batches]

    def _all_batches(self) -> list[list[int]]:
        """This epoch's batches over the whole dataset, identical on every rank."""
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.groups))
        return batches_by_group(order, self.groups, self.batch_size, self.drop_last)


def orientation_groups(aspect_ratios: Sequence[float]) -> np.ndarray:
    """0 for a landscape image (w / h >= 1), 1 for a portrait one."""
    return np.array([0 if ar >= 1 else 1 for ar in aspect_ratios], dtype=np.int64)


def batches_by_group(order: Sequence[int], groups: np.ndarray, batch_size: int, drop_last: bool) -> list[list[int]]:
    """``order``'s indices in batches of one group each, a batch complete as soon as its group has
    ``batch_size`` indices; without ``drop_last`` the incomplete batches come last."""
    buckets: tuple[list[int], list[int]] = ([], [])
    batches = []
    for index in order:
        bucket = buckets[groups[index]]
        bucket.append(int(index))
        if len(bucket) == batch_size:
            batches.append(bucket.copy())
            bucket.clear()
    if not drop_last:
        batches.extend(bucket for bucket in buckets if bucket)
    return batches


class InferenceBatchSampler(Sampler[list[int]]):
    """Batches from this rank's contiguous share of the dataset, in order, each holding only landscape
    (w >= h) or only portrait images: every image is seen exactly once across the ranks (no padding
    duplicates), as evaluation needs. Without the grouping a batch padded to its widest and its tallest
    image computes the padding too: coco128 at 800/1333 in batches of 8 would compute 1.67x its images'
    pixels, grouped 1.15x (``bench/padded_shapes.py``). A group's last, incomplete batch comes at the end."""

    def __init__(self, aspect_ratios: Sequence[float], batch_size: int, drop_last: bool = False, rank: int = 0,
                 world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        num_samples = len(aspect_ratios)
        share = math.ceil(num_samples / world_size)
        indices = range(min(num_samples, rank * share), min(num_samples, (rank + 1) * share))
        self.batches = batches_by_group(indices, orientation_groups(aspect_ratios), batch_size, drop_last)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            yield list(batch)


def build_batch_sampler(dataset_aspect_ratios: Sequence[float], batch_size: int, shuffle: bool, seed: int,
                        distributed: bool, drop_last: bool, rank: int | None = None,
                        world_size: int | None = None) -> GroupedBatchSampler | InferenceBatchSampler:
    """Grouped, shuffled batches for training (``shuffle=True``); grouped, in-order ones for evaluation.

    ``batch_size`` is per rank. With ``distributed`` the shard comes from torch.distributed; ``rank``
    and ``world_size`` given explicitly take precedence (tests, custom launchers)."""
    rank, world_size = _shard(distributed, rank, world_size)
    if shuffle:
        return GroupedBatchSampler(dataset_aspect_ratios, batch_size, seed=seed, drop_last=drop_last,
                                   rank=rank, world_size=world_size)
    return InferenceBatchSampler(dataset_aspect_ratios, batch_size, drop_last=drop_last,
                                 rank=rank, world_size=world_size)


def _shard(distributed: bool, rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None or world_size is not None:
        if rank is None or world_size is None or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        return rank, world_size
    if not distributed:
        return 0, 1
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("build_batch_sampler(distributed=True) needs torch.distributed initialised "
                           "(backbones.engine.dist.init_distributed) or explicit rank and world_size")
    return dist.get_rank(), dist.get_world_size()
