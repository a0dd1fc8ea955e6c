#!/usr/bin/env python
"""How many CUDA graphs a COCO-style set asks of ``eval.cuda_graphs``: the images resized to the test size as the
data pipeline resizes them (``data.min_size_test``, ``max_size_test``), batched as evaluation batches them (in
the file's order, landscape and portrait apart: ``InferenceBatchSampler``) and padded to multiples of
``data.size_divisibility`` as the collate pads them; beside it the pixels of batches that mix the two. One
graph serves each padded batch shape (the images' own sizes are an input of the graph); ``GraphedDetector``
records the first ``max_graphs`` shapes it meets and runs the others eagerly. Reads the annotation file only.

    python bench/padded_shapes.py ../shared/data/coco128/annotations/instances_train2017.json
    python bench/padded_shapes.py ANNOTATIONS.json --batch 2 --min-size 600 --max-size 1000
"""
import argparse
import collections
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detection.data.batching import InferenceBatchSampler, padded_side  # noqa: E402
from detection.data.transforms import resized_shape  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("annotations", help="a COCO instances json")
    parser.add_argument("--min-size", type=int, default=800, help="data.min_size_test")
    parser.add_argument("--max-size", type=int, default=1333, help="data.max_size_test")
    parser.add_argument("--divisibility", type=int, default=32, help="data.size_divisibility")
    parser.add_argument("--batch", type=int, default=1, help="eval.batch_size")
    parser.add_argument("--max-graphs", type=int, default=16, help="GraphedDetector.max_graphs")
    args = parser.parse_args()
    with open(args.annotations) as f:
        images = json.load(f)["images"]
    sizes = [tuple(int(s) for s in resized_shape(im["height"], im["width"], args.min_size, args.max_size))
             for im in images]

    def padded(batch: list[int]) -> tuple[int, int, int]:
        return (len(batch), padded_side(max(sizes[i][0] for i in batch), args.divisibility),
                padded_side(max(sizes[i][1] for i in batch), args.divisibility))

    shapes = collections.Counter()  # padded batch shape -> images, in the order first met
    padded_pixels = 0
    for batch in InferenceBatchSampler([im["width"] / im["height"] for im in images], args.batch):
        shape = padded(batch)
        shapes[shape] += len(batch)
        padded_pixels += math.prod(shape)
    graphed = sum(shapes[s] for s in list(shapes)[:args.max_graphs])
    best = sum(n for _, n in shapes.most_common(args.max_graphs))
    print(f"{len(images)} images, {len(set(sizes))} sizes at {args.min_size}/{args.max_size}, "
          f"{len(shapes)} padded batch shapes at batch {args.batch} (multiples of {args.divisibility})")
    print(f"the first {args.max_graphs} shapes met (what GraphedDetector records) hold {graphed} images; "
          f"the {args.max_graphs} most frequent, {best}")
    mixed = sum(math.prod(padded(list(range(start, min(start + args.batch, len(sizes))))))
                for start in range(0, len(sizes), args.batch))
    own = sum(h * w for h, w in sizes)
    print(f"pixels the network computes, padding included: {padded_pixels / own:.2f}x the images' own "
          f"(batches of consecutive images, landscape and portrait mixed: {mixed / own:.2f}x)")
    for (b, h, w), n in shapes.most_common(10):
        print(f"  {b} x {h}x{w}: {n} images")


if __name__ == "__main__":
    main()
