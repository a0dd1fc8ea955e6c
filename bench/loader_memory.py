#!/usr/bin/env python
"""How much of the dataset a forked loader worker copies: its private memory after reading every record once
(an epoch) and one full garbage collection (which a long run's workers all reach), for the records as a plain
list in a plain DataLoader (before), as a list with the heap frozen at the fork (SharingDataLoader), and packed
(PackedList, as the datasets hold them now) with the frozen heap. Linux only (reads /proc/<pid>/smaps_rollup).

    python bench/loader_memory.py                    # ImageNet's 1.28M samples and COCO train2017's 118k records
    python bench/loader_memory.py --samples 100000 --images 10000
"""
import argparse
import gc
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from backbones.engine.loader import PackedList, worker_loader  # noqa: E402


def private_mb() -> float:
    with open("/proc/self/smaps_rollup") as f:
        fields = dict(line.split(":", 1) for line in f.read().splitlines()[1:])
    return int(fields["Private_Dirty"].split()[0]) / 1024


class ReadAll(Dataset):
    """One item: read every record's fields, collect garbage, return the worker's private memory (MB)."""

    def __init__(self, records):
        self.records = records

    def __len__(self):
        return 1

    def __getitem__(self, index):
        for record in self.records:  # each field taken up, as a dataset's __getitem__ does
            for _ in record.values() if isinstance(record, dict) else record:
                pass
        gc.collect()
        return private_mb()


def imagenet_samples(n: int) -> list:
    return [(f"/data/imagenet/train/n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG", i % 1000) for i in range(n)]


def coco_records(n_images: int, boxes_per_image: float) -> list:
    """Records as CocoDetection makes them: per image its ids, file, size and numpy boxes / labels."""
    rng = np.random.default_rng(0)
    counts = rng.poisson(boxes_per_image, n_images)
    return [{"image_id": i + 1, "file_name": f"{i:012d}.jpg", "height": 480, "width": 640,
             "boxes": rng.uniform(0, 400, (k, 4)).astype(np.float32), "labels": rng.integers(1, 81, k),
             "crowd_boxes": np.zeros((0, 4), np.float32)} for i, k in enumerate(counts)]


def measure(records) -> list[tuple[str, float]]:
    packed = PackedList(records)
    return [("list, DataLoader (before)", next(iter(DataLoader(ReadAll(records), batch_size=None, num_workers=1)))),
            ("list, SharingDataLoader (heap frozen at the fork)",
             next(iter(worker_loader(ReadAll(records), 1, batch_size=None)))),
            ("PackedList, SharingDataLoader (now)", next(iter(worker_loader(ReadAll(packed), 1, batch_size=None))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1_281_167, help="ImageNet-style (path, label) samples")
    parser.add_argument("--images", type=int, default=118_287, help="COCO-style image records")
    parser.add_argument("--boxes-per-image", type=float, default=7.3)
    args = parser.parse_args()
    rows = []
    for what, make in ((f"{args.samples:,} (path, label) samples", lambda: imagenet_samples(args.samples)),
                       (f"{args.images:,} detection records", lambda: coco_records(args.images, args.boxes_per_image))):
        records = make()
        rows += [(what, how, mb) for how, mb in measure(records)]
        del records
        gc.collect()
    print(f"\n| records | held as | worker's private memory (MB) |\n|---|---|---|")
    for what, how, mb in rows:
        print(f"| {what} | {how} | {mb:.0f} |")


if __name__ == "__main__":
    main()
