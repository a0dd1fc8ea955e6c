#!/usr/bin/env python
"""What an exported detector costs a server: the time to write it, to read it back in a fresh process (the
start-up before the first request), and per image after that, for each config and format.

    python bench/export_speed.py                                   # demo, R101-C4, R50-FPN; onnx and .pt2
    python bench/export_speed.py --configs configs/frcnn_r50_fpn_coco.yaml --formats torch_export

The detectors are randomly initialised at the config's test size (the graph, not the weights, sets these
times); each file is read back with ``detection.export.load_exported`` in a new Python process and run on a
480x640 image. Runs on the CPU (onnxruntime's CPU provider, ``torch.export`` on the CPU).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from backbones.engine.config import load_config  # noqa: E402
from detection.config import DetConfig  # noqa: E402
from detection.export import EXPORT_FORMATS, SUFFIXES, DeployableDetector, export_program, save_exported  # noqa: E402
from detection.modeling import build_detector  # noqa: E402

# run in a fresh interpreter: a server's start-up includes the imports
READ_BACK = """
import json, sys, time
start = time.time()
sys.path.insert(0, {root!r})
import numpy as np
from detection.export import load_exported
imported = time.time()
run, _ = load_exported({path!r})
loaded = time.time()
image = np.random.default_rng(0).integers(0, 256, (3, 480, 640), dtype=np.uint8)
run(image)
first = time.time()
times = []
for _ in range(3):
    t = time.time()
    run(image)
    times.append(time.time() - t)
print(json.dumps({{"import_s": imported - start, "load_s": loaded - imported, "first_s": first - loaded,
                  "image_ms": 1000 * sorted(times)[1]}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["configs/frcnn_demo.yaml", "configs/frcnn_r101_coco.yaml",
                                                         "configs/frcnn_r50_fpn_coco.yaml"])
    parser.add_argument("--formats", nargs="+", choices=EXPORT_FORMATS, default=list(EXPORT_FORMATS))
    args = parser.parse_args()
    os.chdir(ROOT)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs:
            cfg = load_config(DetConfig, config, ["model.backbone.weights="])
            torch.manual_seed(0)
            deployable = DeployableDetector.from_config(build_detector(cfg.model, 80), cfg)
            example = torch.randint(0, 256, (3, 480, 640), dtype=torch.uint8)
            start = time.time()
            program = export_program(deployable, example)
            traced_s = time.time() - start
            for fmt in args.formats:
                path = os.path.join(tmp, "model" + SUFFIXES[fmt])
                start = time.time()
                save_exported(program, example, path, fmt, {})
                written_s = traced_s + time.time() - start
                proc = subprocess.run([sys.executable, "-c", READ_BACK.format(root=ROOT, path=path)],
                                      capture_output=True, text=True, check=True)
                read = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append((os.path.basename(config), fmt, written_s, read))
                print(f"{rows[-1][0]} {fmt}: written in {written_s:.1f} s, read back in {read['load_s']:.1f} s",
                      flush=True)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads; 480x640 image; times in a fresh process\n")
    print("| config | format | write (s) | import (s) | read back (s) | first image (s) | per image (ms) |")
    print("|---|---|---|---|---|---|---|")
    for config, fmt, written_s, r in rows:
        print(f"| {config} | {fmt} | {written_s:.1f} | {r['import_s']:.1f} | {r['load_s']:.1f} | "
              f"{r['first_s']:.2f} | {r['image_ms']:.0f} |")


if __name__ == "__main__":
    main()
