#!/usr/bin/env python
"""Train a Faster R-CNN (C4 or FPN) on COCO-format data, evaluate with the COCO metric.

    python tools/train_det.py configs/frcnn_demo.yaml          # synthetic shapes, no download
    python tools/train_det.py configs/frcnn_r101_coco.yaml model.backbone.weights=runs/resnet101_imagenet/checkpoints/backbone.pth
    torchrun --nproc_per_node=8 tools/train_det.py configs/frcnn_r101_coco.yaml
    python tools/train_det.py CONFIG resume=true               # continue a killed run
    python tools/train_det.py CONFIG resume=auto               # continue if there is a checkpoint, else start (job scripts)
"""

import _bootstrap  # noqa: F401

from backbones.engine.cli import exit_tool, run_training, training_arguments
from detection.config import DetConfig
from detection.engine import train


def main(argv=None) -> int:
    args = training_arguments(__doc__, config_required=True, argv=argv)
    code, cfg, summary = run_training(DetConfig, train, args, "det")
    if code:
        return code
    if summary.get("val"):
        m = summary["val"]
        # the full table is in the log above; VOC / ImageNet DET dicts have these three keys too
        print(f"\n{cfg.data.format.upper()} val: AP {100 * m['AP']:.1f}  AP50 {100 * m['AP50']:.1f}  "
              f"AP75 {100 * m['AP75']:.1f}")
        print(f"run folder: {summary['output_dir']}")
        print(f"next: python tools/eval_det.py {summary['output_dir']}   |   "
              f"python tools/infer.py {summary['output_dir']} IMAGE_OR_FOLDER")
    return 0


if __name__ == "__main__":
    exit_tool(main())
