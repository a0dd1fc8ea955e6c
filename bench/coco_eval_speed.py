#!/usr/bin/env python
"""COCO box scoring (pycocotools' evaluate + accumulate) in one process against the categories shared out
over worker processes (``detection.evaluation.coco_eval.score_by_category``, what ``COCOEvaluator`` does
with ``data.workers`` > 1), on a generated set of COCO val2017's size; every row checks that the precision,
recall and score arrays and the summary equal pycocotools' own to the bit.

The set: ``--images`` 640x480 images with 1-14 boxes each of 80 categories (with ``--skew``, person-like:
the first category takes that share of the boxes), each box detected with a jitter and 90 background
detections per image (COCO's 100 per image).

    python bench/coco_eval_speed.py                      # 5,000 images, workers 2 and the CPU count
    python bench/coco_eval_speed.py --images 1000 --workers 2,4 --skew 0.28
"""
import argparse
import contextlib
import io
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from detection.evaluation.coco_eval import score_by_category  # noqa: E402


def generated_set(images: int, skew: float, seed: int = 0) -> tuple[COCO, COCO]:
    rng = np.random.default_rng(seed)
    records, annotations, detections = [], [], []

    def category() -> int:
        return 1 if skew and rng.random() < skew else int(rng.integers(1, 81))

    for i in range(1, images + 1):
        records.append({"id": i, "width": 640, "height": 480, "file_name": f"{i}.jpg"})
        for _ in range(int(rng.integers(1, 15))):
            x, y, w, h = rng.uniform(0, 500), rng.uniform(0, 380), rng.uniform(5, 140), rng.uniform(5, 100)
            c = category()
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": c, "bbox": [x, y, w, h],
                                "area": w * h, "iscrowd": 0})
            detections.append({"image_id": i, "category_id": c, "score": float(rng.random()),
                               "bbox": [x + rng.normal(0, 3), y + rng.normal(0, 3), w, h]})
        for _ in range(90):
            x, y, w, h = rng.uniform(0, 500), rng.uniform(0, 380), rng.uniform(5, 140), rng.uniform(5, 100)
            detections.append({"image_id": i, "category_id": category(), "bbox": [x, y, w, h],
                               "score": float(rng.random() * 0.5)})
    gt = COCO()
    gt.dataset = {"images": records, "annotations": annotations,
                  "categories": [{"id": c, "name": str(c)} for c in range(1, 81)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        return gt, gt.loadRes(detections)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--workers", default=f"2,{os.cpu_count()}", help="comma-separated process counts")
    parser.add_argument("--skew", type=float, default=0.0, help="share of the boxes in category 1 (0: uniform)")
    args = parser.parse_args()
    gt, dt = generated_set(args.images, args.skew)
    quiet = contextlib.redirect_stdout(io.StringIO())
    reference = COCOeval(gt, dt, "bbox")
    start = time.perf_counter()
    with quiet:
        reference.evaluate()
        reference.accumulate()
    one = time.perf_counter() - start
    with contextlib.redirect_stdout(io.StringIO()):
        reference.summarize()
    rows = [("pycocotools, one process", one, "reference")]
    for workers in sorted({int(w) for w in args.workers.split(",")}):
        shared = COCOeval(gt, dt, "bbox")
        start = time.perf_counter()
        score_by_category(shared, workers)
        elapsed = time.perf_counter() - start
        with contextlib.redirect_stdout(io.StringIO()):
            shared.summarize()
        same = all(np.array_equal(shared.eval[k], reference.eval[k]) for k in ("precision", "recall", "scores"))
        rows.append((f"by category, {workers} processes", elapsed,
                     "identical" if same and np.array_equal(shared.stats, reference.stats) else "DIFFERENT"))
    print(f"\n{args.images} images, {len(gt.anns)} boxes, {len(dt.anns)} detections, skew {args.skew}, "
          f"{os.cpu_count()} CPUs; AP {reference.stats[0]:.3f}")
    print("| scoring | evaluate + accumulate (s) | speed-up | arrays and summary |\n|---|---|---|---|")
    for name, seconds, check in rows:
        print(f"| {name} | {seconds:.1f} | {one / seconds:.2f}x | {check} |")


if __name__ == "__main__":
    main()
