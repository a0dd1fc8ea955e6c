"""Work every rank of a torchrun job needs the result of, done once: split across the ranks, and within a rank
over threads.

Before training, every image file is opened once (``data.verify_images``) and every XML annotation is read.
Each rank used to do all of it: under ``torchrun --nproc_per_node=8`` the same 1.28M ImageNet headers were
opened eight times over, and ``verify_images=decode`` decoded the whole set eight times, on CPUs the ranks
share. Here each rank takes every ``world_size``-th item and the ranks exchange their results (over the
host, gloo), so every rank ends with the same list as one process would, having done a ``1/world_size``
share of the work (the exchange, and what the caller does with the list, are every rank's).

Threads are for work that waits (a network file system's latency) or releases the GIL (image decoding).
Python-bound work on a local disk loses by them, cache warm or cold (the 2-core EPYC, 5,248 COCO JPEGs
and 50,000 ImageNet DET XML files): opening the JPEGs' headers takes 0.03 ms per image in one thread and
0.07 in eight (cold: 0.12 and 0.11), reading the XML files (``voc_to_coco_dict``) 3.4 s in one thread and
5.2 s in eight (cold: 7.2 and 9.6 s); decoding the JPEGs takes 1.8 ms per image in one thread, 0.9 in
threads. Items go to the threads in chunks: one task per item cost more than opening a warm header.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

from .dist import all_gather_object, get_rank, get_world_size

T = TypeVar("T")
R = TypeVar("R")


def default_threads() -> int:
    """Threads per rank for file-bound work: 4 per core, shared by the node's ranks, at most 32."""
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(32, 4 * (os.cpu_count() or 1) // max(1, ranks_here)))


def map_over_ranks(fn: Callable[[T], R], items: Sequence[T], threads: int = 1, desc: str | None = None) -> list[R]:
    """``[fn(x) for x in items]``, the items split over the ranks (every ``world_size``-th one each) and, in
    a rank, over ``threads`` threads; every rank gets every result, in the items' order.

    A collective: every rank calls it with the same items (a rank that calls it alone waits for the others).
    ``fn`` should return its problems as values; an exception on any rank is raised on every rank, so none
    is left waiting in the exchange. ``desc``: a progress bar of rank 0's share."""
    items = list(items)
    rank, world = get_rank(), get_world_size()
    mine = items[rank::world]
    try:
        results, failure = _map_threads(fn, mine, threads, desc), None
    except Exception as exc:  # noqa: BLE001 - handed to every rank below, then re-raised
        if world == 1:
            raise
        results, failure = None, exc
    if world == 1:
        return results
    gathered = all_gather_object((results, None if failure is None else f"{type(failure).__name__}: {failure}"))
    if failure is not None:
        raise failure
    failed = [(r, message) for r, (_, message) in enumerate(gathered) if message is not None]
    if failed:
        raise RuntimeError(f"rank {failed[0][0]} failed while the ranks shared out work ({desc or 'map_over_ranks'}): "
                           f"{failed[0][1]}")
    out: list = [None] * len(items)
    for r, (part, _) in enumerate(gathered):
        out[r::world] = part
    return out


def _map_threads(fn, items: list, threads: int, desc: str | None) -> list:
    from .run import progress_bar

    bar = progress_bar(total=len(items), desc=desc, disable=desc is None or not len(items) or get_rank() != 0)
    try:
        if threads <= 1 or len(items) < 2:
            results = []
            for x in items:
                results.append(fn(x))
                bar.update()
            return results
        size = max(1, min(256, len(items) // (4 * threads)))  # a few chunks per thread, for balance

        def run_chunk(chunk):
            return [fn(x) for x in chunk]

        results = []
        with ThreadPoolExecutor(threads) as pool:
            for part in pool.map(run_chunk, [items[i:i + size] for i in range(0, len(items), size)]):
                results.extend(part)
                bar.update(len(part))
        return results
    finally:
        bar.close()
