#!/usr/bin/env python
"""Does the localization entry's R-CNN stage keep its network fed? Its RoI-centric batches draw each RoI from
another image (appendix C), so every RoI decodes a whole photo; this measures the stage's own loader
(``RoIDataset`` + ``RoIBatchSampler`` through the run's loader) in RoIs/s against the R-CNN network's training
steps alone on the same device, side by side in one run.

    python bench/roi_loader_speed.py                                          # CPU: ResNet-18, 4 batches
    python bench/roi_loader_speed.py --device cuda --depth 101 --amp bf16 --workers 0 8 16 --batches 40

The images are ImageNet-sized JPEGs (500x375) written once under ``--images-dir``: the real Imagenette photos
in ``../shared/data/imagenette-loc`` upscaled when they are there, synthetic shapes otherwise (faster to
decode than photos). RoIs: random boxes, a quarter foreground, as the stage's table holds them.
"""
import argparse
import glob
import os
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from backbones import build_resnet  # noqa: E402
from backbones.engine.loader import run_loader  # noqa: E402
from backbones.pretraining.synthetic import render_classification_image  # noqa: E402
from detection.localization.rcnn import RCNNNet, rcnn_losses  # noqa: E402
from detection.localization.rcnn_data import RoIBatchSampler, RoIDataset, collate_rois  # noqa: E402
from detection.modeling.box_coder import BoxCoder  # noqa: E402
from trainer_speed import timed  # noqa: E402

IMAGENETTE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                          "imagenette-loc", "images")
WIDTH, HEIGHT = 500, 375


def write_images(folder: str, n: int) -> tuple[list[str], str]:
    os.makedirs(folder, exist_ok=True)
    photos = sorted(glob.glob(os.path.join(IMAGENETTE, "*", "*.JPEG")))
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"{i:05d}.jpg")
        if not os.path.isfile(path):
            if photos:
                image = cv2.resize(cv2.imread(photos[i % len(photos)]), (WIDTH, HEIGHT), interpolation=cv2.INTER_CUBIC)
            else:
                image = cv2.resize(render_classification_image(rng, "star", 128), (WIDTH, HEIGHT))[:, :, ::-1]
            cv2.imwrite(path, image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(path)
    return paths, "Imagenette photos" if photos else "synthetic shapes"


def roi_table(n_images: int, n_rois: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    x1, y1 = rng.uniform(0, WIDTH - 60, n_rois), rng.uniform(0, HEIGHT - 60, n_rois)
    w, h = rng.uniform(40, WIDTH, n_rois), rng.uniform(40, HEIGHT, n_rois)
    box = np.stack([x1, y1, np.minimum(x1 + w, WIDTH), np.minimum(y1 + h, HEIGHT)], 1).astype(np.float32)
    fg = rng.random(n_rois) < 0.25
    return {"record": rng.integers(0, n_images, n_rois).astype(np.int32), "box": box, "fg": fg,
            "target": box + rng.normal(0, 5, box.shape).astype(np.float32), "pos": np.flatnonzero(fg),
            "neg": np.flatnonzero(~fg)}


def loader_rate(records, table, args, workers: int, device) -> float:
    """RoIs/s of the stage's loader, batches copied to the device, after the first batch (worker start-up)."""
    sampler = RoIBatchSampler(table["pos"], table["neg"], args.batch, 0.25, seed=0, start=0, stop=args.batches + 1)
    loader = run_loader(RoIDataset(records, table, args.crop, BoxCoder([1.0, 1.0, 1.0, 1.0])), sampler, collate_rois,
                        workers, device, torch.Generator().manual_seed(0))
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    for crops, *_ in it:
        crops.to(device, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.batches * args.batch / (time.perf_counter() - start)


def model_rate(args, device, amp_dtype) -> float:
    """RoIs/s of the R-CNN network's training steps on one batch held on the device."""
    net = RCNNNet(build_resnet(args.depth, num_classes=0), 1000).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(args.batch, 3, args.crop, args.crop, device=device).to(memory_format=torch.channels_last)
    classes = torch.randint(0, 1000, (args.batch,), device=device)
    fg = torch.rand(args.batch, device=device) < 0.25
    targets = torch.randn(args.batch, 4, device=device)

    def step():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits, deltas = net(x)
        loss = sum(rcnn_losses(logits.float(), deltas.float(), classes, fg, targets).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    steps = max(2, args.batches // 2)
    return steps * args.batch / timed(step, steps, 2, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--depth", type=int, default=18, help="the R-CNN network's ResNet (the paper: 101)")
    parser.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    parser.add_argument("--batch", type=int, default=64, help="RoIs per batch (the paper's stage: 256 over 8 GPUs)")
    parser.add_argument("--batches", type=int, default=4, help="timed batches per loader")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--images-dir", default="datasets/roi_bench_jpegs")
    args = parser.parse_args()
    device = torch.device(args.device)
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    paths, source = write_images(args.images_dir, args.images)
    records = [types.SimpleNamespace(path=p, width=WIDTH, height=HEIGHT, label=0) for p in paths]
    table = roi_table(len(records), 200 * len(records))
    rows = [(f"loader, {w} worker{'s' * (w != 1)}" if w else "loader, in the main process",
             loader_rate(records, table, args, w, device)) for w in args.workers]
    rows.append((f"R-CNN network ResNet-{args.depth} alone (training steps, amp {args.amp})",
                 model_rate(args, device, amp_dtype)))
    print(f"\n{len(records)} {WIDTH}x{HEIGHT} JPEGs ({source}), crops {args.crop} px, batch {args.batch}, "
          f"device {device}, torch {torch.__version__}, {os.cpu_count()} CPUs")
    print("| what | RoIs/s |\n|---|---|")
    for what, rate in rows:
        print(f"| {what} | {rate:.0f} |")


if __name__ == "__main__":
    main()
