#!/usr/bin/env python
"""Train the paper's ImageNet localization entry (per-class RPN, optional R-CNN stage) from a pretrained
classifier, then report top-1/top-5/ground-truth-class localization error and classification error.

    python tools/pretrain_backbone.py && python tools/train_loc.py   # synthetic shapes, the demo classifier
    python tools/train_loc.py configs/loc_r18_imagenette.yaml        # the real 10-class sample, CPU
    torchrun --nproc_per_node=8 tools/train_loc.py configs/loc_r101_imagenet.yaml
    python tools/train_loc.py CONFIG resume=true                     # continue a killed run
    python tools/train_loc.py CONFIG resume=auto                     # continue if there is a checkpoint, else start
"""
import os

import _bootstrap  # noqa: F401

from backbones.engine.cli import exit_tool, run_training, training_arguments
from detection.localization.config import LocConfig
from detection.localization.trainer import train


def main(argv=None) -> int:
    args = training_arguments(__doc__, config_required=False, argv=argv)
    code, cfg, summary = run_training(LocConfig, train, args, "loc_demo")
    if code:
        return code
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return 0
    for mode, m in summary["val"].items():
        line = (f"{mode}: top-5 loc err {100 * m['loc_top5_err']:.2f}%  top-1 {100 * m['loc_top1_err']:.2f}%  "
                f"GT-class {100 * m['oracle_err']:.2f}%  (centre-box baseline top-5 "
                f"{100 * m['baseline_center_box']['loc_top5_err']:.2f}%)")
        if "rcnn" in m:
            line += f"  with R-CNN top-5 {100 * m['rcnn']['loc_top5_err']:.2f}%"
        print(line)
    print(f"run folder: {summary['output_dir']}")
    return 0


if __name__ == "__main__":
    exit_tool(main())
