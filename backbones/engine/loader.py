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

import gc
import multiprocessing
import operator
import pickle
from collections.abc import Sequence
from itertools import islice
from typing import Callable, Iterator

import numpy as np
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


class PackedList(Sequence):
    """A dataset's records (samples, image records: anything picklable) as one byte buffer and an offset
    array, read back one item at a time; read-only, and each access returns a new copy of the item.

    A forked worker that reads an item of a Python list writes to it (the item's reference count), so the
    page it lies on becomes the worker's own copy: over an epoch each worker copies the whole list. Two
    objects instead of millions are never copied. Measured with ImageNet's 1.28M (path, label) samples and
    one worker reading each once and collecting garbage (``bench/loader_memory.py``, 2-core EPYC): 331 MB of
    the worker's memory private as a list, 252 MB with the heap frozen at the fork (:class:`SharingDataLoader`),
    6 MB packed and frozen; at 16 workers on each of 8 ranks the list alone held 42 GB of a node's memory.
    Reading an item back costs a few microseconds (unpickling), far below decoding its image. The same
    remedy as Detectron2's ``DatasetFromList(serialize=True)``."""

    def __init__(self, items):
        blobs = [pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL) for item in items]
        self._ends = np.cumsum([len(b) for b in blobs], dtype=np.int64)
        self._blob = b"".join(blobs)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = operator.index(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"PackedList index {index} out of range for {len(self)} items")
        start = int(self._ends[i - 1]) if i else 0
        return pickle.loads(memoryview(self._blob)[start:int(self._ends[i])])


def packed(items) -> PackedList:
    """``items`` as a :class:`PackedList` (as they are when they already are one)."""
    return items if isinstance(items, PackedList) else PackedList(items)


class SharingDataLoader(DataLoader):
    """A ``DataLoader`` whose forked workers keep sharing the parent's memory instead of each copying it.

    A forked worker shares its parent's pages until it writes to one, and Python's cyclic garbage collector
    writes to every object it tracks whenever a full collection runs, which over a long run every worker
    does: each then holds its own copy of the heap, the dataset's records included. Measured with records of
    COCO train2017's size (118k images, 860k boxes), each read once, then one collection
    (``bench/loader_memory.py``, 2-core EPYC): 137 MB of the worker's memory private with the records as a
    list, 59 MB with the heap frozen first, 6 MB frozen and packed (:class:`PackedList`, which the datasets
    use); at 14 workers on each of 8 ranks, 15 GB of a node's memory against under 1 (more where the parent
    holds more: the json, an evaluation index). So the workers are forked from a frozen heap
    (``gc.freeze``: their collector skips what existed then), and the parent's heap is unfrozen as soon as
    they are started, so that its own garbage is collected as before."""

    def __iter__(self):
        if not self._forks_workers():
            return super().__iter__()
        gc.collect()
        gc.freeze()
        try:
            return super().__iter__()  # starts the workers (persistent ones: the first time only)
        finally:
            gc.unfreeze()

    def _forks_workers(self) -> bool:
        context = self.multiprocessing_context or multiprocessing.get_context()
        return self.num_workers > 0 and context.get_start_method() == "fork"


def worker_loader(dataset, workers: int, **kwargs) -> SharingDataLoader:
    """A :class:`SharingDataLoader` with ``workers`` processes (``kwargs`` as DataLoader's)."""
    return SharingDataLoader(dataset, num_workers=workers, **kwargs)


def run_loader(dataset, batch_sampler, collate_fn: Callable, workers: int, device: torch.device,
               generator: torch.Generator) -> DataLoader:
    """The run's one loader over ``batch_sampler``. ``generator`` (a keyed one) gives the workers' base
    seed, so that building the loader draws nothing from the global generators a checkpoint restores."""
    return worker_loader(dataset, workers, batch_sampler=batch_sampler, collate_fn=collate_fn,
                         pin_memory=device.type == "cuda", prefetch_factor=PREFETCH_FACTOR if workers else None,
                         generator=generator, worker_init_fn=ignore_stop_signals)
