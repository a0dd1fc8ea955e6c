"""Detection batching (detection/data/batching.py): padded collation, grouped and sharded batch samplers."""
import random

import pytest
import torch

from detection.data import build_batch_sampler, collate_detection


def fake_item(h, w, image_id):
    return {"image": torch.full((3, h, w), 7, dtype=torch.uint8), "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.int64), "crowd_boxes": torch.zeros(0, 4), "image_id": image_id,
            "orig_size": (h, w), "scale": (1.0, 1.0), "flipped": False}


def test_collate_pads_to_multiple_and_drops_none():
    batch = collate_detection([fake_item(50, 70, 1), None, fake_item(64, 33, 2)], size_divisibility=32)
    assert batch["images"].shape == (2, 3, 64, 96) and batch["images"].dtype == torch.uint8
    assert batch["image_sizes"] == [(50, 70), (64, 33)] and batch["num_skipped"] == 1
    assert [t["image_id"] for t in batch["targets"]] == [1, 2] and "image" not in batch["targets"][0]
    assert (batch["images"][0, :, :50, :70] == 7).all() and batch["images"][0, :, 50:].sum() == 0
    assert batch["images"][0, :, :, 70:].sum() == 0 and batch["images"][1, :, :, 33:].sum() == 0
    empty = collate_detection([None, None])
    assert empty["images"].shape[0] == 0 and empty["targets"] == [] and empty["num_skipped"] == 2


ASPECTS = [1.5] * 23 + [0.7] * 14  # 23 landscape, 14 portrait
random.Random(0).shuffle(ASPECTS)


def orientation(i):
    return ASPECTS[i] >= 1


def test_grouped_sampler_single_group_batches_each_index_once():
    sampler = build_batch_sampler(ASPECTS, 4, shuffle=True, seed=3, distributed=False, drop_last=False)
    sampler.set_epoch(0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 6 + 4  # ceil(23/4) + ceil(14/4)
    assert all(len({orientation(i) for i in b}) == 1 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(len(ASPECTS)))
    assert list(sampler) == batches  # deterministic for an epoch
    sampler.set_epoch(1)
    assert list(sampler) != batches and len(list(sampler)) == len(sampler)


def test_grouped_sampler_drop_last_has_full_batches():
    sampler = build_batch_sampler(ASPECTS, 4, shuffle=True, seed=0, distributed=False, drop_last=True)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 5 + 3 and all(len(b) == 4 for b in batches)
    assert len({i for b in batches for i in b}) == 32


@pytest.mark.parametrize("drop_last", [False, True])
def test_grouped_sampler_shards_are_disjoint_and_cover(drop_last):
    shards = []
    for rank in range(2):
        s = build_batch_sampler(ASPECTS, 4, shuffle=True, seed=5, distributed=True, drop_last=drop_last,
                                rank=rank, world_size=2)
        s.set_epoch(2)
        shards.append([i for b in s for i in b])
        assert len(list(s)) == len(s) == (4 if drop_last else 5)  # equal on every rank, as DDP needs
    assert not set(shards[0]) & set(shards[1])
    covered = set(shards[0]) | set(shards[1])
    assert covered == set(range(len(ASPECTS))) if not drop_last else len(covered) == 32


def test_grouped_sampler_uneven_ranks_get_equal_lengths():
    lengths = []
    seen = set()
    for rank in range(3):  # 10 batches over 3 ranks: the first two batches are repeated
        s = build_batch_sampler(ASPECTS, 4, shuffle=True, seed=5, distributed=True, drop_last=False,
                                rank=rank, world_size=3)
        batches = list(s)
        lengths.append(len(batches))
        seen.update(i for b in batches for i in b)
    assert lengths == [4, 4, 4] and seen == set(range(len(ASPECTS)))


def test_eval_sampler_sequential_and_sharded():
    shards = [list(build_batch_sampler([1.0] * 37, 4, shuffle=False, seed=0, distributed=True, drop_last=False,
                                       rank=r, world_size=2)) for r in range(2)]
    flat = [i for shard in shards for b in shard for i in b]
    assert flat == list(range(37))  # each image exactly once, in order
    assert shards[0][0] == [0, 1, 2, 3] and len(shards[1]) == 5


def test_eval_sampler_keeps_landscape_and_portrait_apart_in_order():
    """Evaluation's batches hold one orientation each (a mixed batch pads to a square: coco128 at batch 8
    would compute 1.67x its pixels), in the data's order within each, every image once across the ranks."""
    aspects = [1.5, 0.7, 1.5, 1.0, 0.7, 1.5, 0.7, 1.5]  # 1.0 (square) counts as landscape
    assert list(build_batch_sampler(aspects, 2, shuffle=False, seed=0, distributed=False, drop_last=False)) == [
        [0, 2], [1, 4], [3, 5], [7], [6]]  # each batch when complete, the incomplete ones last
    assert list(build_batch_sampler(aspects, 2, shuffle=False, seed=0, distributed=False, drop_last=True)) == [
        [0, 2], [1, 4], [3, 5]]
    shards = [build_batch_sampler(ASPECTS, 4, shuffle=False, seed=0, distributed=True, drop_last=False, rank=r,
                                  world_size=3) for r in range(3)]
    batches = [b for shard in shards for b in shard]
    assert sorted(i for b in batches for i in b) == list(range(len(ASPECTS)))  # each image exactly once
    assert all(len({ASPECTS[i] for i in b}) == 1 for b in batches) and all(b == sorted(b) for b in batches)
    assert [len(s) for s in shards] == [len(list(s)) for s in shards]
    for shard in shards:  # a rank's share is contiguous, and each orientation keeps its order there
        for orientation in (1.5, 0.7):
            seen = [i for b in shard for i in b if ASPECTS[i] == orientation]
            assert seen == sorted(seen)


def test_distributed_sampler_needs_process_group():
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        build_batch_sampler(ASPECTS, 4, shuffle=True, seed=0, distributed=True, drop_last=True)
