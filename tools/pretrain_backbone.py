#!/usr/bin/env python
"""Pretrain a ResNet backbone on ImageNet or any ImageFolder.

    python tools/pretrain_backbone.py                                  # embedded demo, no download
    python tools/pretrain_backbone.py configs/pretrain/resnet50_imagenet.yaml data.train_dir=/data/imagenet/train
    torchrun --nproc_per_node=8 tools/pretrain_backbone.py configs/pretrain/resnet101_imagenet.yaml
    python tools/pretrain_backbone.py CONFIG resume=true               # continue a killed run
    python tools/pretrain_backbone.py CONFIG resume=auto               # continue if there is a checkpoint, else start
"""

import _bootstrap  # noqa: F401

from backbones.engine.cli import exit_tool, run_training, training_arguments
from backbones.pretraining.config import PretrainConfig
from backbones.pretraining.trainer import train


def main(argv=None) -> int:
    args = training_arguments(__doc__, config_required=False, argv=argv)
    code, cfg, summary = run_training(PretrainConfig, train, args, "pretrain_demo")
    if code:
        return code
    if summary:
        top1 = summary["val"]["center"]["top1"]
        print(f"\nval top-1 (centre crop): {100 * top1:.2f}%")
        print(f"backbone checkpoint: {summary['backbone_checkpoint']}")
        print(f"run folder: {summary['output_dir']}")
        print("next: python tools/train_det.py configs/frcnn_demo.yaml "
              f"model.backbone.weights={summary['backbone_checkpoint']}")
    return 0


if __name__ == "__main__":
    exit_tool(main())
