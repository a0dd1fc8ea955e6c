#!/usr/bin/env python
"""Where a training step and an inference of resdet's detector spend their time, from ``torch.profiler``:
wall time against GPU busy time, kernel launches, blocking host calls, and the costliest operators.

    python bench/profile_step.py --device cuda --model r101c4 --variant fast    # bs 8, 800x1216, bf16
    python bench/profile_step.py --device cpu --batch 1 --height 128 --width 160 --amp none   # a dry run
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from det_speed import LAUNCH_CALLS, SYNC_CALLS, calm_residual_branches, make_inputs, ours  # noqa: E402

MODELS = {"r50c4": (50, "none"), "r101c4": (101, "none"), "r50fpn": (50, "fpn")}


def summarise(prof, steps: int, wall: float, label: str, top: int) -> None:
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_ms = sum(e.device_time for e in kernels) / 1000 / steps  # overlapping kernels would count twice
    launches = sum(e.name in LAUNCH_CALLS for e in events) / steps
    syncs = sum(e.name in SYNC_CALLS for e in events) / steps
    print(f"\n== {label}: {1000 * wall / steps:.1f} ms wall per step, GPU kernels {busy_ms:.1f} ms "
          f"({100 * busy_ms / (1000 * wall / steps):.0f}% busy), {launches:.0f} kernel launches, "
          f"{syncs:.0f} blocking host calls per step")
    sort = "cuda_time_total" if kernels else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=top, max_name_column_width=60))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="r101c4", choices=sorted(MODELS))
    parser.add_argument("--variant", default="fast", choices=["plain", "fast", "compile", "compile-ro"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1216)
    parser.add_argument("--amp", default="bf16", choices=["none", "bf16"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    device = torch.device(args.device)
    amp = torch.bfloat16 if args.amp == "bf16" else None
    depth, neck = MODELS[args.model]
    torch.manual_seed(0)
    mode = {"compile": "default", "compile-ro": "reduce-overhead"}.get(args.variant)
    model = calm_residual_branches(ours(depth, neck, args.variant != "plain", mode)).to(device)
    images, targets = make_inputs(args.batch, args.height, args.width, device)
    batch = {"images": images, "image_sizes": [tuple(images.shape[-2:])] * len(images), "targets": targets}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train_step():
        torch.compiler.cudagraph_mark_step_begin()  # a new iteration for CUDA graphs (compile-ro); else a no-op
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = sum(model(batch).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    one = {"images": images[:1], "image_sizes": batch["image_sizes"][:1]}

    def infer():
        with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            model(one)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for label, mode, fn in (("training step", True, train_step), ("inference, 1 image", False, infer)):
        model.train(mode)
        for _ in range(3):
            fn()
        sync()
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(args.steps):
                fn()
            sync()
            wall = time.perf_counter() - start
        summarise(prof, args.steps, wall, f"{args.model} {args.variant} {label}", args.top)


if __name__ == "__main__":
    main()
