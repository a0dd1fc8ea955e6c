#!/usr/bin/env python
"""Export a trained detector as one file: an RGB uint8 image (3, H, W) of any size in; boxes (N, 4) xyxy in
that image's pixels, scores (N,) and labels (N,) out (pre- and post-processing inside the graph).

    python tools/export.py runs/frcnn_demo                                  # -> runs/frcnn_demo/export/model.onnx
    python tools/export.py runs/frcnn_demo checkpoint=best --format torch_export   # -> .../model.pt2
    python tools/export.py runs/frcnn_demo data.min_size_test=800 data.max_size_test=1333 --out det.onnx

Formats: ``onnx`` (run with onnxruntime; needs ``pip install 'resdet[export]'``) and ``torch_export``
(a ``torch.export`` program, ``torch.export.load``). The class names travel inside the file. After
writing, the tool runs the file on up to ``--check`` val images (or a random image when the val set is
not on this machine) beside the PyTorch model and prints the largest box and score difference.
Using the file: see the README ("Deploy") or ``detection.export.load_exported``.
"""
import argparse
import os
import sys
import time

import _bootstrap  # noqa: F401
import numpy as np
import torch

from backbones.engine.cli import split_checkpoint
from backbones.engine.config import load_config
from backbones.engine.errors import ResdetError
from detection.config import DetConfig
from detection.export import (EXPORT_FORMATS, SUFFIXES, DeployableDetector, export_program, load_exported,
                              sample_val_images, save_exported)
from detection.modeling.test_time import options_from_config
from detection.predictor import load_trained_detector


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run folder written by tools/train_det.py")
    parser.add_argument("overrides", nargs="*", help="checkpoint=last|best|PATH and config key=value overrides")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="onnx")
    parser.add_argument("--out", default=None, help="output file (default: <run>/export/model.onnx|.pt2)")
    parser.add_argument("--check", type=int, default=4, help="val images to compare on after export (0 = a random one)")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the flags
    if args.out and not args.out.endswith(SUFFIXES[args.format]):  # torch.export.load and load_exported go by it
        print(f"error: --out {args.out}: a {args.format} file's name must end in {SUFFIXES[args.format]} "
              f"(or pass the other --format)", file=sys.stderr)
        return 2
    checkpoint, overrides = split_checkpoint(args.overrides)
    try:
        cfg = load_config(DetConfig, os.path.join(args.run, "config.yaml"), overrides)
        model, path, class_names = load_trained_detector(args.run, cfg, checkpoint, "cpu")
    except ResdetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = args.out or os.path.join(args.run, "export", "model" + SUFFIXES[args.format])
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    d = cfg.data
    deployable = DeployableDetector.from_config(model, cfg)
    if options_from_config(cfg.eval).enabled:  # e.g. configs/frcnn_r101_coco_full.yaml: its AP counts on them
        e = cfg.eval
        print(f"note: the file holds the plain detector; this run's test-time options (eval.box_refinement="
              f"{e.box_refinement}, eval.test_scales={list(e.test_scales)}, eval.flip={e.flip}) are not in the graph "
              f"(tools/infer.py and Predictor apply them). The file's AP is that of: python tools/eval_det.py "
              f"{args.run} eval.box_refinement=false eval.test_scales=[] eval.flip=false", file=sys.stderr)
    images = sample_val_images(cfg, args.check)
    example = torch.from_numpy(images[0][1]).permute(2, 0, 1).contiguous()
    start = time.time()
    print(f"exporting {path} ({args.format}, test size {d.min_size_test}/{d.max_size_test}) ...", flush=True)
    program = export_program(deployable, example)
    metadata = {"class_names": class_names, "checkpoint": os.path.abspath(path), "min_size": d.min_size_test,
                "max_size": d.max_size_test, "input": "image: uint8 (3, H, W) RGB",
                "outputs": "boxes: float32 (N, 4) xyxy image pixels; scores: float32 (N,); labels: int64 (N,) "
                           "1-based index into class_names"}
    save_exported(program, example, out, args.format, metadata)
    print(f"wrote {out} ({os.path.getsize(out) / 2**20:.1f} MiB) in {time.time() - start:.0f} s")

    start = time.time()
    run_file, _ = load_exported(out)
    loaded_s = time.time() - start
    worst_box = worst_score = 0.0
    compared = 0
    for name, image in images:
        tensor = torch.from_numpy(image).permute(2, 0, 1).contiguous()
        with torch.no_grad():
            expected = [t.numpy() for t in deployable(tensor)]
        got = run_file(tensor.numpy())
        if len(got[0]) != len(expected[0]) or not np.array_equal(got[2], expected[2]):
            print(f"warning: {name}: {len(got[0])} detections from the file, {len(expected[0])} from PyTorch "
                  "(scores near the threshold or tied)", file=sys.stderr)
            continue
        compared += len(got[0])
        if len(got[0]):
            worst_box = max(worst_box, float(np.abs(got[0] - expected[0]).max()))
            worst_score = max(worst_score, float(np.abs(got[1] - expected[1]).max()))
    print(f"read back in {loaded_s:.1f} s (a server's start-up); checked on {len(images)} image(s) ({images[0][0]}"
          f"{', ...' if len(images) > 1 else ''}), {compared} detections: largest difference from PyTorch "
          f"{worst_box:.2g} px (boxes), {worst_score:.2g} (scores)")
    if not compared:
        print("warning: no detections to compare (an untrained model, or a score threshold above every score): "
              "the check says only that the file runs", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
