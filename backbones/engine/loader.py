"""One data loader for a whole training run.

A loader built anew every epoch restarts its worker processes every epoch: on a small dataset (a few
dozen iterations an epoch) the device then idles while the workers start and fill their queues. A
training task instead builds one loader from its start (or resume) point to ``max_iter``, over a
:class:`SpanningBatchSampler` that walks the epochs itself.

The epoch travels with each index, as ``(epoch, index)`` pairs: an attribute set on the dataset in
the main process would not reach worker processes that live across epochs, and each item's
augmentation is seeded by (seed, epoch, index), so it does not depend on workers or ranks and a
resumed run sees exactly the images an uninterrupted one would have.
"""
from __future__ import annotations

from itertools import islice
from typing import Callable, Iterator

import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler

from .preemption import ignore_stop_signals

# Batches each worker keeps ready: enough to ride out an occasional slow image (a large JPEG, a heavy
# crop) without holding many batches of full-size detection images in shared memory.
PREFETCH_FACTOR = 4


def epoch_and_index(key: int | tuple[int, int]) -> tuple[int, int]:
    """A dataset key as ``(epoch, index)``: training loaders give ``(epoch, index)`` pairs, evaluation
    and inspection plain indices (epoch 0)."""
    return key if isinstance(key, tuple) else (0, key)


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one item's augmentation in one epoch: a function of the run's seed, the epoch and the
    index alone, so no worker, rank or resume changes what an item sees."""
    return hash((seed, epoch, index)) % 2**32


class SpanningBatchSampler(Sampler[list[tuple[int, int]]]):
    """The batches of a run from batch ``offset`` of ``start_epoch`` up to iteration ``max_iter``, each a
    list of ``(epoch, index)`` pairs.

    ``sampler`` orders one epoch and is a deterministic function of its ``set_epoch(epoch)``, which this
    sampler calls in the main process before each epoch; with ``batch_size`` its indices are cut into
    full batches (the rest dropped), without it it yields batches already. An epoch gives at most
    ``iters_per_epoch`` batches, so iterations map to epochs as the trainer counts them; one that gives
    fewer ends the iteration (the trainer reports the loader ran dry)."""

    def __init__(self, sampler, iters_per_epoch: int, start_epoch: int, offset: int, max_iter: int,
                 batch_size: int | None = None):
        self.sampler, self.iters_per_epoch = sampler, iters_per_epoch
        self.batches = BatchSampler(sampler, batch_size, drop_last=True) if batch_size else sampler
        self.start_epoch, self.offset = start_epoch, offset
        self.num_batches = max(0, max_iter - (start_epoch * iters_per_epoch + offset))

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, offset, left = self.start_epoch, self.offset, self.num_batches
        while left:
            self.sampler.set_epoch(epoch)
            batches = list(islice(self.batches, offset, min(self.iters_per_epoch, offset + left)))
            yield from ([(epoch, i) for i in batch] for batch in batches)
            left -= len(batches)
            if offset + len(batches) < self.iters_per_epoch:
                return
            epoch, offset = epoch + 1, 0


def run_loader(dataset, batch_sampler, collate_fn: Callable, workers: int, device: torch.device,
               generator: torch.Generator) -> DataLoader:
    """The run's one loader over ``batch_sampler``. ``generator`` (a keyed one) gives the workers' base
    seed, so that building the loader draws nothing from the global generators a checkpoint restores."""
    return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate_fn, num_workers=workers,
                      pin_memory=device.type == "cuda", prefetch_factor=PREFETCH_FACTOR if workers else None,
                      generator=generator, worker_init_fn=ignore_stop_signals)
