"""The run's one data loader (backbones/engine/loader.py): the spanning batch sampler walks the epochs as
the per-epoch loaders did, from the start or from a mid-epoch resume point, and an item's augmentation
depends on (seed, epoch, index) alone, not on the worker that loads it."""
import pytest
import torch
from torch.utils.data import BatchSampler

from backbones.engine.loader import SpanningBatchSampler, run_loader
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
