#!/usr/bin/env python
"""The whole chain on a fresh machine, no download: pretrain a slim ResNet on synthetic shapes ->
train the Faster R-CNN (C4) on a synthetic COCO-format dataset -> COCO evaluation -> a picture of
detections -> a results table (runs/demo_results.md).

Each step is the same command a user would type; they are printed as they run.
"""
import json
import os
import subprocess
import sys
import time

import _bootstrap

ROOT = _bootstrap.ROOT
PRETRAIN_RUN = "runs/pretrain_demo"
DET_RUN = "runs/frcnn_demo"


def step(title: str, args: list[str]) -> float:
    cmd = [sys.executable, *args]
    print(f"\n=== {title}\n$ python {' '.join(args)}", flush=True)
    start = time.time()
    if subprocess.call(cmd, cwd=ROOT) != 0:
        sys.exit(f"demo stopped: '{' '.join(args)}' failed")
    return time.time() - start


def main() -> int:
    times = {}
    times["pretrain"] = step("1/4 pretrain a ResNet-18 (width 16) on synthetic shapes",
                             ["tools/pretrain_backbone.py", f"output_dir={PRETRAIN_RUN}"])
    backbone = f"{PRETRAIN_RUN}/checkpoints/backbone.pth"
    times["detect"] = step("2/4 train Faster R-CNN (C4) on synthetic COCO-format shapes",
                           ["tools/train_det.py", "configs/frcnn_demo.yaml", f"model.backbone.weights={backbone}",
                            f"output_dir={DET_RUN}"])
    times["eval"] = step("3/4 COCO evaluation of the trained detector", ["tools/eval_det.py", DET_RUN])
    with open(os.path.join(ROOT, DET_RUN, "config.yaml")) as f:
        import yaml

        val_images = yaml.safe_load(f)["data"]["coco"]["val_images"]
    times["infer"] = step("4/4 detections drawn on validation images",
                          ["tools/infer.py", DET_RUN, val_images, "--limit", "8", "--out", f"{DET_RUN}/infer"])

    with open(os.path.join(ROOT, PRETRAIN_RUN, "summary.json")) as f:
        pre = json.load(f)
    with open(os.path.join(ROOT, DET_RUN, "eval_last", "summary.json")) as f:
        det = json.load(f)["val"]
    rows = [
        "| step | data | metric | value | wall time |",
        "|---|---|---|---|---|",
        f"| pretrain ResNet-18 w16 | synthetic shapes, {len(pre['classes'])} classes | val top-1 (centre crop) | "
        f"{100 * pre['val']['center']['top1']:.1f}% | {times['pretrain'] / 60:.1f} min |",
        f"| Faster R-CNN R18-C4 w16 | synthetic COCO shapes (val) | COCO AP / AP50 / AP75 | "
        f"{100 * det['AP']:.1f} / {100 * det['AP50']:.1f} / {100 * det['AP75']:.1f} | {times['detect'] / 60:.1f} min |",
    ]
    table = "\n".join(rows)
    with open(os.path.join(ROOT, "runs", "demo_results.md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table)
    print(f"\ntotal {sum(times.values()) / 60:.1f} min; pictures: {DET_RUN}/infer/*_det.jpg; "
          f"table: runs/demo_results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
