#!/usr/bin/env python
"""Check a detection dataset before training on it: read the train and val sets exactly as
tools/train_det.py would (same config, same overrides), list every problem, print what the sets hold,
and draw training images after augmentation with their boxes.

    python tools/check_data.py configs/frcnn_demo.yaml
    python tools/check_data.py configs/frcnn_r50_c4_coco.yaml data.coco.train_images=my/images \\
        data.coco.train_annotations=my/train.json data.coco.val_images=my/images data.coco.val_annotations=my/val.json

Prints per set: images, boxes, classes with counts, boxes per image, box sizes at the training scale,
how many boxes no anchor reaches (IoU 0.7 / 0.5), images without boxes and the problems found (then
dropped, so the rest can be measured). Writes ``report.json`` and ``train_grid.jpg`` (and
``val_grid.jpg``) to ``--out`` (default ``runs/<config name>/check_data``). Exits 1 when a set has
problems that would stop training (``data.strict_train`` / ``strict_val``), else 0.
"""
import argparse
import json
import os
import sys

import _bootstrap  # noqa: F401

import cv2

from backbones.engine.config import config_name, load_config
from backbones.engine.errors import ResdetError
from detection.config import DetConfig
from detection.data.report import augmented_grid, dataset_report, format_report
from detection.data.build import build_datasets, prepare_data_paths
from detection.modeling.build import build_anchor_generator


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="the training config, e.g. configs/frcnn_demo.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as for tools/train_det.py")
    parser.add_argument("--out", default="", help="output folder (default runs/<config name>/check_data)")
    parser.add_argument("--images", type=int, default=16, help="training images drawn in the grid")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the flags
    try:
        cfg = load_config(DetConfig, args.config, args.overrides)
        strict = {"train": cfg.data.strict_train, "val": cfg.data.strict_val}
        # measure everything: problems are listed and dropped here, whatever training would do with them
        cfg.data.strict_train = cfg.data.strict_val = False
        prepare_data_paths(cfg)
        train_set, val_set = build_datasets(cfg)
    except ResdetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = args.out or os.path.join(cfg.output_dir or os.path.join("runs", config_name(args.config, "det")), "check_data")
    os.makedirs(out, exist_ok=True)
    anchors = build_anchor_generator(cfg.model)
    d = cfg.data
    reports, fatal = {}, False
    for name, dataset, short, longest in (("train", train_set, d.min_size_train[0], d.max_size_train),
                                          ("val", val_set, d.min_size_test, d.max_size_test)):
        reports[name] = dataset_report(dataset, anchors, short, longest)
        print(format_report(f"{name} set ({dataset.ann_file})", reports[name]))
        if dataset.problems:
            print(dataset.problems.report())
            fatal |= strict[name]
        print()
        step = max(1, len(dataset) // args.images) if name == "train" else max(1, len(dataset) // 8)
        count = args.images if name == "train" else 8
        grid = augmented_grid(dataset, list(range(0, len(dataset), step))[:count])
        cv2.imwrite(os.path.join(out, f"{name}_grid.jpg"), grid)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(reports, f, indent=1)
    print(f"wrote {out}/report.json, train_grid.jpg (after augmentation), val_grid.jpg")
    if fatal:
        print("training with this config would stop on the problems above (strict); fix them or set "
              "data.strict_train=false / data.strict_val=false", file=sys.stderr)
    return 1 if fatal else 0


if __name__ == "__main__":
    sys.exit(main())
