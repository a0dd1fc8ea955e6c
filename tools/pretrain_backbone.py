#!/usr/bin/env python
"""Pretrain a ResNet backbone on ImageNet or any ImageFolder.

    python tools/pretrain_backbone.py                                  # embedded demo, no download
    python tools/pretrain_backbone.py configs/pretrain/resnet50_imagenet.yaml data.train_dir=/data/imagenet/train
    torchrun --nproc_per_node=8 tools/pretrain_backbone.py configs/pretrain/resnet101_imagenet.yaml
    python tools/pretrain_backbone.py CONFIG resume=true               # continue a killed run
"""
import argparse
import sys

import _bootstrap  # noqa: F401

from backbones.engine.config import ConfigError, config_name, load_config
from backbones.engine.dist import cleanup
from backbones.checkpoint import CheckpointError
from backbones.pretraining.config import PretrainConfig
from backbones.pretraining.data import DatasetError
from backbones.pretraining.trainer import train


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="YAML config (default: the embedded synthetic demo)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. solver.epochs=10")
    args = parser.parse_args(argv)
    if args.config and "=" in args.config:  # only overrides were given
        args.overrides.insert(0, args.config)
        args.config = None
    try:
        cfg = load_config(PretrainConfig, args.config, args.overrides)
        summary = train(cfg, config_name(args.config, "pretrain_demo"))
    except (ConfigError, DatasetError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        cleanup()
    if summary:
        top1 = summary["val"]["center"]["top1"]
        print(f"\nval top-1 (centre crop): {100 * top1:.2f}%")
        print(f"backbone checkpoint: {summary['backbone_checkpoint']}")
        print(f"run folder: {summary['output_dir']}")
        print("next: python tools/train_det.py configs/frcnn_demo.yaml "
              f"model.backbone.weights={summary['backbone_checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
