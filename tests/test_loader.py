"""The run's one data loader (backbones/engine/loader.py): the spanning batch sampler walks the epochs as
the per-epoch loaders did, from the start or from a mid-epoch resume point, and an item's augmentation
depends on (seed, epoch, index) alone, not on the worker that loads it; forked workers share the dataset's
records instead of copying them."""
import multiprocessing
import os

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader

from backbones.engine.loader import PackedList, SpanningBatchSampler, run_loader, worker_loader
from backbones.engine.state import keyed_generator
from backbones.imagedata import ShardedSampler, scan_image_folder
from backbones.pretraining.data import ImageFolderDataset, collate_skip_none, train_transform
from backbones.pretraining.synthetic import make_synthetic_shapes
from detection.data import build_batch_sampler

ASPECTS = [1.5, 0.7, 1.2, 0.5, 1.0, 2.0, 0.8, 1.1, 0.6, 1.3, 0.9, 1.4]
EPOCHS = 3


def per_epoch_batches(sampler, batches):
    """What the per-epoch loaders drew: ``sampler.set_epoch``, then one pass over ``batches``, epoch after epoch."""
    out = []
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        out += [[(epoch, i) for i in batch] for batch in batches]
    return out


@pytest.mark.parametrize("kind", ["detection", "pretraining"])
def test_spanning_sampler_yields_the_per_epoch_batches_from_any_resume_point(kind):
    if kind == "detection":  # a batch sampler
        sampler, batch_size = build_batch_sampler(ASPECTS, 2, shuffle=True, seed=3, distributed=False,
                                                  drop_last=True), None
        expected = per_epoch_batches(sampler, sampler)
    else:  # a sampler of indices, cut into batches (pretraining's and localization's)
        sampler, batch_size = ShardedSampler(len(ASPECTS), shuffle=True, seed=3, rank=1, world_size=2), 2
        reference = ShardedSampler(len(ASPECTS), shuffle=True, seed=3, rank=1, world_size=2)
        expected = per_epoch_batches(reference, BatchSampler(reference, 2, drop_last=True))
    iters_per_epoch = len(expected) // EPOCHS
    max_iter = EPOCHS * iters_per_epoch - 1  # the run ends one batch before its last epoch does
    for start in (0, 1, iters_per_epoch, iters_per_epoch + 1):
        spanning = SpanningBatchSampler(sampler, iters_per_epoch, *divmod(start, iters_per_epoch), max_iter,
                                        batch_size)
        assert len(spanning) == max_iter - start
        assert list(spanning) == expected[start:max_iter], start


def test_spanning_sampler_stops_at_an_epoch_shorter_than_counted():
    sampler = build_batch_sampler(ASPECTS, 2, shuffle=True, seed=0, distributed=False, drop_last=True)
    short = SpanningBatchSampler(sampler, len(sampler) + 1, 0, 0, 4 * len(sampler))
    assert len(list(short)) == len(sampler)  # no silent slide into the next epoch: the trainer reports it


def test_augmentation_depends_on_seed_epoch_and_index_not_on_the_worker(tmp_path):
    make_synthetic_shapes(str(tmp_path / "train"), str(tmp_path / "val"), 2, 1, 24, seed=0)
    classes, samples = scan_image_folder(str(tmp_path / "train"))
    dataset = ImageFolderDataset(samples, classes, train_transform([24, 36], 24, True, 0.1), seed=5)
    sampler = ShardedSampler(len(dataset), shuffle=True, seed=5)
    iters_per_epoch = len(dataset) // 4
    # from one batch into the first epoch to one into the third: the loader crosses two epoch boundaries
    spanning = SpanningBatchSampler(sampler, iters_per_epoch, 0, 1, 2 * iters_per_epoch + 1, batch_size=4)

    def images(workers):
        loader = run_loader(dataset, spanning, collate_skip_none, workers, torch.device("cpu"), keyed_generator(5, 0))
        return torch.cat([images for images, _, _ in loader])

    single = images(0)
    assert len(single) == 4 * len(spanning)
    assert torch.equal(single, images(2))


class _RecordsReader(torch.utils.data.Dataset):
    """Many small records, as a detection set's: an item reads every record (as an epoch does), runs a full
    garbage collection in the worker (as a long run eventually does) and returns the worker's private memory
    in MB."""

    def __init__(self, records):
        self.records = records

    def __len__(self):
        return 1

    def __getitem__(self, index):
        import gc
        for record in self.records:
            assert record["boxes"]
        gc.collect()
        with open("/proc/self/smaps_rollup") as f:
            fields = dict(line.split(":", 1) for line in f.read().splitlines()[1:])
        return int(fields["Private_Dirty"].split()[0]) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup") or multiprocessing.get_start_method() != "fork",
                    reason="needs Linux's smaps_rollup and forked workers")
def test_forked_workers_share_the_records_instead_of_copying_them():
    """Forked workers share the parent's pages until they write to them, and reading a list's item writes to it
    (its reference count), as does Python's collector to every object it tracks: a plain DataLoader's worker
    copies the records (300k dicts with their lists, ~55 MB of pages here) in one epoch. Packed (PackedList)
    and loaded by worker_loader (the heap frozen while the workers fork), the worker copies next to nothing."""
    import gc
    records = [{"image_id": i, "file_name": f"{i:012d}.jpg", "size": (480, 640), "boxes": [[1.0, 2.0, 3.0, 4.0]]}
               for i in range(300_000)]
    as_packed = PackedList(records)
    assert len(as_packed) == len(records) and as_packed[7] == records[7] and as_packed[-1] == records[-1]
    assert as_packed[2:4] == records[2:4] and list(as_packed)[:3] == records[:3]
    plain = next(iter(DataLoader(_RecordsReader(records), batch_size=None, num_workers=1)))
    shared = next(iter(worker_loader(_RecordsReader(as_packed), 1, batch_size=None)))
    assert gc.get_freeze_count() == 0  # frozen for the fork only: this process collects its garbage as before
    # measured on the 2-core EPYC: 60-160 MB private in the plain worker (with what else the test process holds),
    # 7 MB packed
    assert plain - shared > 25 and shared < plain / 4, (plain, shared)
