#!/usr/bin/env python
"""COCO mAP of a trained detector: AP, AP50, AP75, APs/m/l, AR and per-class AP (pycocotools).

    python tools/eval_det.py runs/frcnn_demo                       # the run's config and last checkpoint
    python tools/eval_det.py runs/frcnn_r101_coco checkpoint=best data.val_annotations=...
    torchrun --nproc_per_node=8 tools/eval_det.py runs/frcnn_r101_coco

Writes coco_results.json, coco_metrics.json and per_class_ap.txt into <run>/eval_<checkpoint>/.
"""
import argparse
import os
import sys

import _bootstrap  # noqa: F401
import torch

from backbones.engine.config import ConfigError, load_config
from backbones.engine.dist import cleanup, init_distributed, is_main_process
from backbones.engine.run import write_json_atomic
from detection.config import DetConfig
from backbones.engine.precision import AMP_DTYPES
from detection.engine import build_datasets, evaluate, prepare_data_paths, val_loader
from detection.evaluation.coco_eval import format_metrics_table
from detection.predictor import load_trained_detector


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run folder written by tools/train_det.py")
    parser.add_argument("overrides", nargs="*", help="checkpoint=last|best|PATH and config key=value overrides")
    args = parser.parse_args(argv)
    checkpoint = "last"
    overrides = []
    for o in args.overrides:
        if o.startswith("checkpoint="):
            checkpoint = o.split("=", 1)[1]
        else:
            overrides.append(o)
    try:
        cfg = load_config(DetConfig, os.path.join(args.run, "config.yaml"), overrides)
        _, _, device = init_distributed()
        if cfg.device == "cpu":
            device = torch.device("cpu")
        prepare_data_paths(cfg)
        _, val_set = build_datasets(cfg, train=False)
        model, ckpt_path, class_names = load_trained_detector(args.run, cfg, checkpoint, device)
        if class_names != val_set.class_names:
            raise ValueError(f"{ckpt_path} was trained on classes {class_names[:5]}..., but "
                             f"{cfg.data.val_annotations} has {val_set.class_names[:5]}...")
        out_dir = os.path.join(args.run, f"eval_{os.path.splitext(os.path.basename(ckpt_path))[0]}")
        if is_main_process():
            os.makedirs(out_dir, exist_ok=True)
        metrics = evaluate(model, val_loader(cfg, val_set), val_set, device, out_dir if is_main_process() else None,
                           AMP_DTYPES[cfg.solver.amp])
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        cleanup()
    if is_main_process():
        print(format_metrics_table(metrics))
        write_json_atomic(os.path.join(out_dir, "summary.json"), {"checkpoint": ckpt_path, "coco_val": metrics})
        print(f"results in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
