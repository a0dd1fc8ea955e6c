#!/usr/bin/env python
"""Run a trained detector on an image, several, or a folder.

    python tools/infer.py runs/frcnn_demo datasets/synthetic_coco/val --out runs/frcnn_demo/infer
    python tools/infer.py runs/frcnn_demo photo.jpg checkpoint=best eval.flip=true

Writes detections.json (boxes in each file's pixel coordinates, class names, scores) and one
image per input with the boxes drawn. The run's ``eval:`` test-time settings apply (box refinement,
multi-scale, flip); change them with ``key=value`` overrides after the images (``--set key=value`` too).
"""
import argparse
import json
import os
import sys

import _bootstrap  # noqa: F401

import cv2

from backbones.engine.cli import split_checkpoint
from backbones.engine.errors import DataNotFoundError, ResdetError
from backbones.engine.imageio import CorruptImageError, is_image_file, read_image_rgb
from detection.predictor import Predictor
from detection.visualize import draw_detections


def list_images(inputs: list[str]) -> list[str]:
    files = []
    for item in inputs:
        if os.path.isdir(item):
            files += sorted(os.path.join(item, f) for f in os.listdir(item) if is_image_file(f))
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise DataNotFoundError(f"no such image or folder: {item}")
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run folder written by tools/train_det.py")
    parser.add_argument("inputs", nargs="+", help="image files and/or folders, then checkpoint=last|best|PATH and "
                                                  "key=value config overrides")
    parser.add_argument("--out", default=None, help="output folder (default: <run>/infer)")
    parser.add_argument("--checkpoint", default="last", help="last | best | PATH (or checkpoint=...)")
    parser.add_argument("--score-thresh", type=float, default=0.5)
    parser.add_argument("--limit", type=int, default=0, help="at most this many images (0 = all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set eval.box_refinement=true --set eval.flip=true")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the flags
    # the shared grammar: key=value (a config key, never an existing file) after the inputs
    overrides = [a for a in args.inputs if "=" in a and not os.path.exists(a)]
    checkpoint, overrides = split_checkpoint(overrides, args.checkpoint)
    try:
        files = list_images([a for a in args.inputs if "=" not in a or os.path.exists(a)])
        if args.limit:
            files = files[: args.limit]
        predictor = Predictor.from_run(args.run, checkpoint, args.device, args.score_thresh, [*overrides, *args.set])
    except ResdetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out_dir = args.out or os.path.join(args.run, "infer")
    os.makedirs(out_dir, exist_ok=True)
    results = []
    for path in files:
        try:
            image = read_image_rgb(path)  # read once: for the detector and for the drawing
        except CorruptImageError as exc:
            print(f"skipping: {exc}", file=sys.stderr)
            continue
        result = dict(predictor(image), file=path)
        results.append(result)
        drawn = draw_detections(image, result["detections"])
        cv2.imwrite(os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + "_det.jpg"), drawn)
    with open(os.path.join(out_dir, "detections.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"{len(results)} images, {sum(len(r['detections']) for r in results)} detections -> {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
