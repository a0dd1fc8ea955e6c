#!/usr/bin/env python
"""The operators a detector's training step launches, counted on the CPU along CUDA's code paths: no GPU
needed, and on a GPU each one is a kernel launch the host pays for.

Where they fall matters as much as how many there are. The RPN's NMS makes the host wait for the GPU (the
size of its output); the GPU has drained its queue by then and idles while the host launches whatever
comes next, until the RoI head's first large kernel. So besides the whole step (forward, backward and a
multi-tensor SGD step, as on CUDA) the table gives the forward's operators and those after the RPN's last
NMS. resdet's CPU shortcuts (NMS stopped in chunks, the separable RoIAlign, RoI samples and proposals
without their padding) are switched off, as tests/test_det_syncfree.py does; torchvision's rows run its
code as it is on the CPU (its batched NMS takes another branch on CUDA, so their counts are close, not
exact). Views are not counted (they launch nothing).

    python bench/host_ops.py                       # R50-C4 and R50-FPN, batch 2 and 8, 160x224: 11 min on
                                                   # 2 cores, nearly all torchvision's C4 at full width
    python bench/host_ops.py --variants fast       # resdet alone: about a minute
    python bench/host_ops.py --models r101c4 --batch 8 --variants fast
"""
import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import detection.modeling.box_ops as box_ops  # noqa: E402
import detection.modeling.poolers as poolers  # noqa: E402
import detection.modeling.roi_heads as roi_heads  # noqa: E402
import detection.modeling.rpn as rpn  # noqa: E402
from det_speed import (OpCounter, calm_residual_branches, make_inputs, ours, run_ours, run_tv,  # noqa: E402
                       torchvision_c4, torchvision_fpn)

MODELS = {"r50c4": (50, "none", "R50-C4"), "r101c4": (101, "none", "R101-C4"), "r50fpn": (50, "fpn", "R50-FPN")}


def cuda_code_paths() -> None:
    """resdet's CPU-only shortcuts off, for the rest of the process."""
    poolers.separable_roi_align_is_cheaper = lambda *args: False
    rpn.sizes_follow_data = roi_heads.sizes_follow_data = poolers.sizes_follow_data = lambda device: False
    box_ops.batched_nms_first = (lambda boxes, scores, groups, iou_thresh, count:
                                 box_ops.batched_nms(boxes, scores, groups, iou_thresh)[:count])


def count(model, runner, images, targets) -> tuple[int, int, int]:
    """(training step, forward, forward after the last NMS) operators, after one step to warm up."""
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9,
                                foreach=True)  # CUDA's default

    def step(log: OpCounter | None = None) -> list[str]:
        """One SGD step; the operators ``log`` holds once the forward is done."""
        loss = runner(model, images, targets, True)
        forward = list(log.names) if log is not None else []
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return forward

    step()
    with OpCounter() as log:
        forward = step(log)
    after = forward[::-1].index("nms") if "nms" in forward else len(forward)
    return len(log.names), len(forward), after


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="r50c4,r50fpn")
    parser.add_argument("--variants", default="fast,torchvision", help="fast (resdet's default), torchvision")
    parser.add_argument("--batch", default="2,8", help="batch sizes, comma-separated")
    parser.add_argument("--height", type=int, default=160)
    parser.add_argument("--width", type=int, default=224)
    parser.add_argument("--resdet-width", type=int, default=16,
                        help="resdet's trunk channels (base_width): its operators are the same at any width, and "
                             "narrow they take seconds on a CPU (torchvision's parts have ResNet's own)")
    args = parser.parse_args()
    cuda_code_paths()
    print("| model | batch | training step | forward | forward after the RPN's NMS |\n|---|---|---|---|---|")
    for key in args.models.split(","):
        depth, neck, label = MODELS[key]
        makers = {"fast": (f"resdet {label}, fast (default)",
                           functools.partial(ours, depth, neck, True, base_width=args.resdet_width), run_ours),
                  "torchvision": (f"torchvision {'fasterrcnn_resnet50_fpn' if neck == 'fpn' else 'parts ' + label}",
                                  functools.partial(torchvision_fpn, args.height, args.width) if neck == "fpn" else
                                  functools.partial(torchvision_c4, depth, args.height, args.width), run_tv)}
        for variant in args.variants.split(","):
            name, make, runner = makers[variant]
            for batch in map(int, args.batch.split(",")):
                torch.manual_seed(0)
                images, targets = make_inputs(batch, args.height, args.width, torch.device("cpu"))
                step, forward, after = count(calm_residual_branches(make()), runner, images, targets)
                print(f"| {name} | {batch} | {step} | {forward} | {after} |", flush=True)
    print(f"\n{args.height}x{args.width} images, 8 objects each, 80 classes; torch {torch.__version__}")


if __name__ == "__main__":
    main()
