#!/usr/bin/env python
"""Evaluation's inference time with its batches as they are now (in order, landscape and portrait apart:
``InferenceBatchSampler``) against batches of consecutive images (how they were: a mixed batch pads to a
square), the same trained detector on the same val images, alternating, each ``--repeats`` times; the
pixels each computes (padding included) beside it. The data pipeline runs before the timing (decoded,
resized and collated once), so the rows time the detector only.

    python bench/eval_batching.py runs/frcnn_demo                        # its val set at its test size
    python bench/eval_batching.py runs/frcnn_demo data.format=coco data.coco.val_images=... \\
        data.coco.val_annotations=... data.min_size_test=800 data.max_size_test=1333 --limit 64
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from backbones.engine.config import load_config  # noqa: E402
from detection.config import DetConfig  # noqa: E402
from detection.data.batching import InferenceBatchSampler, collate_detection  # noqa: E402
from detection.data.build import build_datasets, prepare_data_paths  # noqa: E402
from detection.predictor import load_trained_detector  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a tools/train_det.py run folder")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (the val set, its sizes)")
    parser.add_argument("--limit", type=int, default=0, help="the first N val images only (0: all)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = load_config(DetConfig, os.path.join(args.run, "config.yaml"), args.overrides)
    prepare_data_paths(cfg)
    _, val_set = build_datasets(cfg, train=False)
    count = min(len(val_set), args.limit) if args.limit else len(val_set)
    model, _, _ = load_trained_detector(args.run, cfg, "last", "cpu")
    items = [val_set[i] for i in range(count)]
    size = cfg.eval.batch_size
    layouts = {"grouped (now)": list(InferenceBatchSampler(val_set.aspect_ratios()[:count], size)),
               "consecutive (before)": [list(range(s, min(s + size, count))) for s in range(0, count, size)]}
    batches = {name: [collate_detection([items[i] for i in b], cfg.data.size_divisibility) for b in layout]
               for name, layout in layouts.items()}
    own = sum(int(h) * int(w) for b in batches["grouped (now)"] for h, w in b["image_sizes"])
    times = {name: [] for name in batches}
    with torch.no_grad():
        for name in batches:  # warm-up: oneDNN's kernels for each shape
            model(batches[name][0])
        for _ in range(args.repeats):
            for name, layout in batches.items():
                start = time.perf_counter()
                for batch in layout:
                    model(batch)
                times[name].append(time.perf_counter() - start)
    print(f"{count} images, batch {size}, test size {cfg.data.min_size_test}/{cfg.data.max_size_test}, "
          f"{torch.get_num_threads()} threads")
    print("| batches | pixels computed / images' pixels | seconds (median) | runs |\n|---|---|---|---|")
    for name, layout in batches.items():
        pixels = sum(b["images"].shape[0] * b["images"].shape[2] * b["images"].shape[3] for b in layout)
        print(f"| {name} | {pixels / own:.2f} | {statistics.median(times[name]):.2f} | "
              f"{', '.join(f'{t:.2f}' for t in times[name])} |")


if __name__ == "__main__":
    main()
