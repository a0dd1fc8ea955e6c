#!/usr/bin/env python
"""resdet's CPU shortcuts against the torchvision kernels they stand in for, side by side on the same
inputs, and whether the detector's pooler picks the shortcut there:

* RoIAlign: ``torchvision.ops.roi_align`` against ``poolers.roi_align_separable`` (two matrix products),
  forward alone and forward + backward, at the demo's sizes and at COCO's (res4 of an 800x1216 image), and
  for the C4 head in the paper's layout, which pools only every second bin (torchvision's op pools all
  and the pooler keeps a quarter, the products compute the quarter);
* NMS: ``torchvision.ops.nms`` over every candidate against ``box_ops.batched_nms_first`` (stops once
  ``count`` boxes are kept), per batch of images, for spread-out and for crowded candidates.

Every row also checks that both give the same result (max difference, or equal indices).

    python bench/cpu_kernels.py              # the threads torch picks (on the 2-core CI machine: 2)
    python bench/cpu_kernels.py --repeats 10
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torchvision.ops import roi_align  # noqa: E402

from detection.modeling.box_ops import batched_nms, batched_nms_first  # noqa: E402
from detection.modeling.poolers import (keep_every, kept_bins, roi_align_separable,  # noqa: E402
                                       separable_roi_align_is_cheaper)

# (label, images, channels, map height, map width, RoIs per image, bins, image side in pixels, bin step)
ROI_CASES = [("demo train: 8 x 64 RoIs, 16x16x64 map, 10x10 bins", 8, 64, 16, 16, 64, 10, 256, 1),
             ("demo test: 8 x 100 RoIs, 20x20x64 map, 10x10 bins", 8, 64, 20, 20, 100, 10, 320, 1),
             ("COCO C4: 2 x 256 RoIs, 50x76x1024 map, 14x14 bins", 2, 1024, 50, 76, 256, 14, 1216, 1),
             ("COCO C4, paper's layout: the same, every second bin (7x7)", 2, 1024, 50, 76, 256, 14, 1216, 2)]
# (label, images, candidates per image, kept per image, IoU threshold, side in pixels of the candidates)
NMS_CASES = [("RPN train: 8 x 1000 -> 300, spread out", 8, 1000, 300, 0.7, 40.0),
             ("RPN train: 8 x 1000 -> 300, crowded", 8, 1000, 300, 0.7, 120.0),
             ("RPN test: 8 x 600 -> 100, spread out", 8, 600, 100, 0.7, 40.0)]


def timed(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1000 * (time.perf_counter() - start) / repeats


def roi_inputs(images, channels, height, width, per_image, side, g):
    features = torch.randn(images, channels, height, width, generator=g)
    corner = torch.rand(images * per_image, 2, generator=g) * side * 0.8
    size = torch.rand(images * per_image, 2, generator=g) * side * 0.4 + 8
    index = torch.arange(images).repeat_interleave(per_image)[:, None].float()
    return features, torch.cat([index, corner, corner + size], 1)


def roi_rows(repeats: int, g: torch.Generator) -> list[str]:
    rows = []
    for label, images, channels, height, width, per_image, bins, side, step in ROI_CASES:
        features, rois = roi_inputs(images, channels, height, width, per_image, side, g)
        args = ((bins, bins), 1 / 16, 0, True, step)
        grad = torch.randn(rois.shape[0], channels, *kept_bins((bins, bins), step), generator=g)

        def kernel(feats, rois, *args):  # what the pooler does with torchvision's op
            return keep_every(roi_align(feats, rois, *args[:-1]), args[-1])

        cells = []
        for fn in (kernel, roi_align_separable):
            with torch.no_grad():
                forward = timed(lambda: fn(features, rois, *args), repeats)
            leaf = features.clone().requires_grad_()
            both = timed(lambda: fn(leaf, rois, *args).backward(grad), repeats)
            cells += [forward, both]
        with torch.no_grad():
            diff = (kernel(features, rois, *args) - roi_align_separable(features, rois, *args)).abs().max()
            picked_test = separable_roi_align_is_cheaper(features, rois, *args)
        picked_train = separable_roi_align_is_cheaper(features.clone().requires_grad_(), rois, *args)
        rows.append(f"| {label} | {cells[0]:.1f} / {cells[1]:.1f} | {cells[2]:.1f} / {cells[3]:.1f} | "
                    f"{cells[1] / cells[3]:.1f}x | {diff:.1e} | {'yes' if picked_train else 'no'} / "
                    f"{'yes' if picked_test else 'no'} |")
    return rows


def nms_inputs(images, candidates, side, g):
    centre = torch.rand(images, candidates, 2, generator=g) * 256
    size = (torch.rand(images, candidates, 2, generator=g) * 0.5 + 0.75) * side
    return torch.cat([centre - size / 2, centre + size / 2], 2), torch.rand(images, candidates, generator=g)


def nms_rows(repeats: int, g: torch.Generator) -> list[str]:
    rows = []
    for label, images, candidates, count, thresh, side in NMS_CASES:
        boxes, scores = nms_inputs(images, candidates, side, g)
        groups = torch.zeros(candidates, dtype=torch.int64)

        def whole():
            return [batched_nms(b, s, groups, thresh)[:count] for b, s in zip(boxes, scores)]

        def first():
            return [batched_nms_first(b, s, groups, thresh, count) for b, s in zip(boxes, scores)]

        same = all(torch.equal(a, b) for a, b in zip(whole(), first()))
        kept = sum(len(batched_nms(b, s, groups, thresh)) for b, s in zip(boxes, scores)) / images
        t_whole, t_first = timed(whole, repeats), timed(first, repeats)
        rows.append(f"| {label} (NMS keeps {kept:.0f}) | {t_whole:.1f} | {t_first:.1f} | "
                    f"{t_whole / t_first:.1f}x | {'yes' if same else 'NO'} |")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; ms per call, mean of {args.repeats}\n")
    print("| RoIAlign | torchvision forward / +backward | separable forward / +backward | speed-up (+backward) "
          "| max difference | pooler takes it: train / test |\n|---|---|---|---|---|---|")
    print("\n".join(roi_rows(args.repeats, g)))
    print("\n| NMS per batch | torchvision, all candidates | stopped at the count | speed-up | same indices |"
          "\n|---|---|---|---|---|")
    print("\n".join(nms_rows(args.repeats, g)))


if __name__ == "__main__":
    main()
