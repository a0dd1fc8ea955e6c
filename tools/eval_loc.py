#!/usr/bin/env python
"""Localization and classification errors of a tools/train_loc.py run's checkpoint on its val images.

    python tools/eval_loc.py runs/loc_r18_imagenette                        # the run's eval.modes, last checkpoint
    python tools/eval_loc.py runs/loc_r101_imagenet eval.modes=[dense] eval.dense_scales=[224,256,384,480,640]
    python tools/eval_loc.py RUN checkpoint=PATH model.classifier=PATH      # another checkpoint / classifier file
    torchrun --nproc_per_node=8 tools/eval_loc.py runs/loc_r101_imagenet

Modes: ``center`` (the classification centre crop) and ``dense`` (fully convolutional over the whole
image at each of eval.dense_scales, boxes mapped back to the original image). Every mode reports
top-1/top-5 localization error with the classifier's classes, the ground-truth-class ("oracle")
localization error, the classification top-1/top-5 error, the fixed centre-box baseline and, for runs
with rcnn.enabled, the errors after the R-CNN stage. Written to <run>/eval_<checkpoint>/summary.json.
"""
import argparse
import os
import sys

import _bootstrap  # noqa: F401

from backbones.engine.cli import exit_tool
from backbones.engine.config import load_config
from backbones.engine.errors import ResdetError
from backbones.engine.dist import cleanup, is_main_process
from backbones.engine.run import write_json_atomic
from detection.localization.config import LocConfig
from detection.localization.evaluate import format_errors
from detection.localization.trainer import evaluate_run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run folder written by tools/train_loc.py")
    parser.add_argument("overrides", nargs="*", help="checkpoint=last|PATH and config key=value overrides")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the flags
    checkpoint, overrides = "last", []
    for o in args.overrides:
        if o.startswith("checkpoint="):
            checkpoint = o.split("=", 1)[1]
        else:
            overrides.append(o)
    try:
        cfg = load_config(LocConfig, os.path.join(args.run, "config.yaml"), overrides)
        result = evaluate_run(cfg, args.run, checkpoint)
    except ResdetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        cleanup()
    if int(os.environ.get("RANK", "0")) == 0 and is_main_process():
        name = os.path.splitext(os.path.basename(result["checkpoint"]))[0]
        out_dir = os.path.join(args.run, f"eval_{name}")
        os.makedirs(out_dir, exist_ok=True)
        write_json_atomic(os.path.join(out_dir, "summary.json"), result)
        for mode, m in result["val"].items():
            print(format_errors(mode, m))
        print(f"results in {out_dir}")
    return 0


if __name__ == "__main__":
    exit_tool(main())
