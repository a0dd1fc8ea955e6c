#!/usr/bin/env python
"""Train a Faster R-CNN (C4 or FPN) on COCO-format data, evaluate with the COCO metric.

    python tools/train_det.py configs/frcnn_demo.yaml          # synthetic shapes, no download
    python tools/train_det.py configs/frcnn_r101_coco.yaml model.backbone.weights=runs/resnet101_imagenet/checkpoints/backbone.pth
    torchrun --nproc_per_node=8 tools/train_det.py configs/frcnn_r101_coco.yaml
    python tools/train_det.py CONFIG resume=true               # continue a killed run
"""
import argparse
import sys

import _bootstrap  # noqa: F401

from backbones.checkpoint import CheckpointError
from backbones.engine.config import ConfigError, config_name, load_config
from backbones.engine.dist import cleanup
from detection.config import DetConfig
from detection.data.coco import DatasetError
from detection.engine import DataNotFoundError, train


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config, e.g. configs/frcnn_r101_coco.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. solver.max_iter=1000")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(DetConfig, args.config, args.overrides)
        summary = train(cfg, config_name(args.config, "det"))
    except (ConfigError, DatasetError, CheckpointError, DataNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        cleanup()
    if summary.get("coco_val"):
        m = summary["coco_val"]
        # the full table is in the log above; VOC / ImageNet DET dicts have these three keys too
        print(f"\n{cfg.data.format.upper()} val: AP {100 * m['AP']:.1f}  AP50 {100 * m['AP50']:.1f}  "
              f"AP75 {100 * m['AP75']:.1f}")
        print(f"run folder: {summary['output_dir']}")
        print(f"next: python tools/eval_det.py {summary['output_dir']}   |   "
              f"python tools/infer.py {summary['output_dir']} IMAGE_OR_FOLDER")
    return 0


if __name__ == "__main__":
    sys.exit(main())
