#!/usr/bin/env python
"""The real trainers against their model alone, side by side in one run: does the trainer keep the device fed?

* ``det``: ``tools/train_det.py`` on real COCO images (coco128 by default), its steady-state img/s from
  ``metrics.jsonl``, against training steps of the same detector on batches of the same images, built once
  and held on the device (the model-only rate). GPU utilisation is sampled while the trainer is past its
  first logged window.
* ``pretrain``: ``tools/pretrain_backbone.py`` on ImageNet-sized JPEGs written here (500x375), against the
  same network's training steps on one batch held on the device.

Both also time the input pipeline alone: the trainer's loader (same dataset, sampler, collation, workers and
pinning), each batch copied to the device and nothing else, past its first batch. Of the three rates the
trainer's is at best the smaller of the other two; which one it falls short of says where a missing
share went (the model's step, the workers, or the trainer between them).

    python bench/trainer_speed.py det --config configs/frcnn_r18_coco128_cpu.yaml --iters 40 --workers 1
                                        # CPU smoke test, under a minute (the default R50-C4 at 608 px
                                        # takes minutes per 10 steps on 2 cores)
    python bench/trainer_speed.py det --device cuda --iters 120 model.backbone.norm=frozen_bn
    python bench/trainer_speed.py pretrain --device cuda --images 1900 --epochs 3 --decode workers,device

Extra ``key=value`` arguments go to the tool and to the model-only side alike.
"""
import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


class UtilisationSampler(threading.Thread):
    """``torch.cuda.utilization()`` every 0.2 s while ``busy()`` holds (needs NVML; none on the CPU)."""

    def __init__(self, busy):
        super().__init__(daemon=True)
        self.busy, self.samples, self.stop = busy, [], threading.Event()

    def run(self):
        while not self.stop.wait(0.2):
            try:
                if self.busy():
                    self.samples.append(torch.cuda.utilization())
            except Exception:  # no NVML: no figure
                return

    def mean(self) -> str:
        return f"{statistics.mean(self.samples):.0f}%" if self.samples else "n/a"


def train_lines(metrics: str) -> list[dict]:
    if not os.path.exists(metrics):
        return []
    with open(metrics) as f:
        return [r for r in map(json.loads, f) if "train/img_per_s" in r]


def run_trainer(cmd: list[str], metrics: str, device: torch.device, timeout: float, batch_size: int
                ) -> tuple[float, str, float]:
    """Run a training tool; its steady-state img/s, the mean GPU utilisation past the first logged window,
    and the wall time. The rate is the images of the steps between the first logged line and the last over
    the time between them: the start-up before the first line is left out, and the windows weigh by their
    length (an epoch's end cuts one short: pretraining's 7-iteration epochs log windows of 1 to 7 steps,
    whose median said little)."""
    lines = lambda: len(train_lines(metrics))  # noqa: E731
    sampler = UtilisationSampler(lambda: lines() >= 1 and proc.poll() is None)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if device.type == "cuda":
        sampler.start()
    out, _ = proc.communicate(timeout=timeout)
    sampler.stop.set()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    logged = [r for r in train_lines(metrics) if r["train/img_per_s"] is not None]
    if len(logged) < 2 or logged[-1]["time"] <= logged[0]["time"]:
        sys.exit(f"{' '.join(cmd)}: fewer than two timed log lines in {metrics}; train longer or log more often")
    first, last = logged[0], logged[-1]
    rate = batch_size * (last["step"] - first["step"]) / (last["time"] - first["time"])
    return rate, sampler.mean(), time.perf_counter() - start


def timed(step, iters: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def loader_rate(loader, device: torch.device, images_of, batches: int) -> float:
    """Images/s of ``loader`` alone, each batch's images copied to ``device``, from its first batch (workers
    started, queues filling) to its ``batches``-th: the rate a trainer could at most be fed at."""
    it = iter(loader)
    to_device(next(it), device)
    start, images = time.perf_counter(), 0
    for _, batch in zip(range(batches - 1), it):
        images += images_of(to_device(batch, device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def to_device(batch, device: torch.device):
    """The batch with its image tensor on ``device`` (as the trainers' ``prepare`` copies it)."""
    if isinstance(batch, dict):
        batch["images"] = batch["images"].to(device, non_blocking=True)
    elif batch[0] is not None:
        batch = (batch[0].to(device, non_blocking=True), *batch[1:])
    return batch


def detection(args, overrides: list[str], out: str) -> list[tuple[str, str]]:
    from backbones.engine.config import load_config
    from backbones.engine.loader import SpanningBatchSampler, run_loader
    from backbones.engine.state import keyed_generator
    from backbones.engine.trainer import distribute
    from detection.config import DetConfig
    from detection.data.batching import build_batch_sampler, collate_detection
    from detection.data.build import build_datasets, prepare_data_paths
    from detection.engine import EpochSeeded
    from detection.modeling.build import build_detector

    coco = args.coco128
    data = [f"data.coco.train_images={coco}/train2017", f"data.coco.val_images={coco}/train2017",
            f"data.coco.train_annotations={coco}/annotations/instances_train2017.json",
            f"data.coco.val_annotations={coco}/annotations/instances_train2017.json"]
    settings = data + [f"device={args.device}", f"data.workers={args.workers}", "eval.period=0",
                       f"solver.max_iter={args.iters}", f"solver.steps=[{args.iters * 10}]", "checkpoint_period=0",
                       f"log_period={args.log_period}", f"output_dir={out}/det_run"] + overrides
    metrics = os.path.join(out, "det_run", "metrics.jsonl")
    cfg = load_config(DetConfig, os.path.join(ROOT, args.config), settings)
    trainer_ips, util, wall = run_trainer([sys.executable, "tools/train_det.py", args.config, *settings], metrics,
                                          torch.device(args.device), args.timeout, cfg.solver.batch_size)

    device = torch.device(args.device)
    prepare_data_paths(cfg)
    train_set, _ = build_datasets(cfg)
    sampler = build_batch_sampler(train_set.aspect_ratios(), cfg.solver.batch_size, shuffle=True, seed=0,
                                  distributed=False, drop_last=True)
    collate = functools.partial(collate_detection, size_divisibility=cfg.data.size_divisibility)
    batches = []
    for indices in sampler:  # a few real batches at the trainer's sizes, decoded and moved once
        batch = collate([train_set[i] for i in indices])
        batch["images"] = batch["images"].to(device)
        for t in batch["targets"]:
            for key in ("boxes", "labels", "crowd_boxes"):
                t[key] = t[key].to(device)
        batches.append(batch)
        if len(batches) == 8:
            break
    model = build_detector(cfg.model, num_classes=len(train_set.class_names)).to(device).train()
    model = distribute(model, device, 1, cfg.solver.channels_last, compile=cfg.solver.compile)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[str(cfg.solver.amp)]
    turn = iter(range(10**9))

    def step():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = sum(model(batches[next(turn) % len(batches)]).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    iters = max(len(batches), args.iters // 2)
    model_ips = cfg.solver.batch_size * iters / timed(step, iters, args.warmup, device)
    del model, optimizer, batches

    # the trainer's loader (detection/engine.py's), alone
    sampler = build_batch_sampler(train_set.aspect_ratios(), cfg.solver.batch_size, shuffle=True, seed=cfg.seed,
                                  distributed=False, drop_last=True)
    spanning = SpanningBatchSampler(sampler, len(sampler), 0, 0, args.iters)
    loader = run_loader(EpochSeeded(train_set, cfg.seed), spanning, collate, args.workers, device,
                        keyed_generator(cfg.seed, 0, 0))
    loader_ips = loader_rate(loader, device, lambda b: len(b["targets"]), args.iters)
    return [("trainer (tools/train_det.py, workers %d)" % args.workers, f"{trainer_ips:.1f}", util),
            ("model only (same batches, on the device)", f"{model_ips:.1f}", ""),
            ("loader only (the trainer's, workers %d, to the device)" % args.workers, f"{loader_ips:.1f}", ""),
            ("trainer / model only", f"{trainer_ips / model_ips:.0%}", f"trainer wall {wall:.0f} s"),
            ("trainer / min(model only, loader only)", f"{trainer_ips / min(model_ips, loader_ips):.0%}", "")]


def write_jpegs(root: str, n: int, classes: int = 10) -> None:
    """``n`` 500x375 JPEGs of photo-like entropy (blurred noise), ImageFolder layout."""
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = os.path.join(root, f"class{i % classes}")
        os.makedirs(folder, exist_ok=True)
        img = cv2.GaussianBlur(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8), (0, 0), 3)
        cv2.imwrite(os.path.join(folder, f"{i}.jpg"), img)


def pretraining(args, overrides: list[str], out: str) -> list[tuple[str, str]]:
    from omegaconf import OmegaConf

    from backbones.engine.config import load_config
    from backbones.engine.loader import SpanningBatchSampler, run_loader
    from backbones.engine.state import keyed_generator
    from backbones.pretraining.config import PretrainConfig
    from backbones.pretraining.data import ShardedSampler, collate_skip_none
    from backbones.pretraining.trainer import build_classifier, build_train_set, prepare_data
    from pretrain_speed import train_speed

    images = os.path.join(out, "jpegs")
    write_jpegs(images, args.images)
    settings = [f"data.train_dir={images}", "data.val_dir=", "data.val_fraction=0.05", "data.synthetic=false",
                f"data.workers={args.workers}", f"device={args.device}", f"solver.epochs={args.epochs}",
                "eval.period=0", "eval.ten_crop=false", "eval.multiscale_sizes=[]",
                f"log_period={args.log_period}"] + overrides
    cfg = load_config(PretrainConfig, os.path.join(ROOT, args.pretrain_config), settings)
    trainer_rows = []
    for decode in args.decode.split(","):
        run = os.path.join(out, f"pretrain_{decode}")
        trainer_ips, util, wall = run_trainer(
            [sys.executable, "tools/pretrain_backbone.py", args.pretrain_config, *settings, f"data.decode={decode}",
             f"output_dir={run}"], os.path.join(run, "metrics.jsonl"), torch.device(args.device), args.timeout,
            cfg.solver.batch_size)
        trainer_rows.append((decode, trainer_ips, util, wall))
    device = torch.device(args.device)
    s = cfg.solver
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as the trainer
    model = build_classifier(cfg.model, 1000)  # the class count hardly matters to the rate
    if s.compile:
        model.compile()
    model_ips = train_speed(model, device, s.batch_size, cfg.data.crop_size, max(3, args.iters // 4), args.warmup,
                            {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[str(s.amp)], s.channels_last)
    del model

    # the trainer's loader for data.decode=workers (backbones/pretraining/trainer.py's), alone
    classes, train_samples, _ = prepare_data(cfg)
    train_set = build_train_set(OmegaConf.merge(cfg, {"data": {"decode": "workers"}}), classes, train_samples)
    sampler = ShardedSampler(len(train_set), shuffle=True, seed=cfg.seed)
    iters_per_epoch = len(sampler) // s.batch_size
    batches = max(2, args.epochs * iters_per_epoch)  # as many as the trainer runs
    spanning = SpanningBatchSampler(sampler, iters_per_epoch, 0, 0, batches, s.batch_size)
    loader = run_loader(train_set, spanning, collate_skip_none, args.workers, device, keyed_generator(cfg.seed, 0, 0))
    loader_ips = loader_rate(loader, device, lambda b: len(b[1]) if b[1] is not None else 0, batches)

    rows = [(f"trainer (tools/pretrain_backbone.py, workers {args.workers}, data.decode={decode})", f"{ips:.1f}", util)
            for decode, ips, util, _ in trainer_rows]
    rows.append(("model only (one batch, on the device)", f"{model_ips:.1f}", ""))
    rows.append((f"loader only (the trainer's, workers {args.workers}, data.decode=workers, to the device)",
                 f"{loader_ips:.1f}", ""))
    rows += [(f"trainer / model only, data.decode={decode}", f"{ips / model_ips:.0%}", f"trainer wall {wall:.0f} s")
             for decode, ips, _, wall in trainer_rows]
    rows += [(f"trainer / min(model only, loader only), data.decode={decode}",
              f"{ips / min(model_ips, loader_ips):.0%}", "") for decode, ips, _, _ in trainer_rows]
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=["det", "pretrain"])
    parser.add_argument("overrides", nargs="*", help="key=value, for the tool and the model-only side")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", default="configs/frcnn_r50_c4_coco128.yaml")
    parser.add_argument("--pretrain-config", default="configs/pretrain/resnet50_imagenet.yaml")
    parser.add_argument("--coco128", default=os.path.join(ROOT, "..", "shared", "data", "coco128"))
    parser.add_argument("--iters", type=int, default=60, help="detection: trainer iterations")
    parser.add_argument("--epochs", type=int, default=3, help="pretraining: trainer epochs")
    parser.add_argument("--images", type=int, default=1900, help="pretraining: JPEGs to write")
    parser.add_argument("--decode", default="workers",
                        help="pretraining: data.decode values to run the trainer with, comma-separated (workers,device)")
    parser.add_argument("--workers", type=int, default=min(14, os.cpu_count() or 1))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--log-period", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_intermixed_args()
    from backbones.engine.hostmem import keep_freed_host_memory
    keep_freed_host_memory()  # the model-only side gets the allocator setting the trainer runs under
    with tempfile.TemporaryDirectory() as out:
        rows = (detection if args.task == "det" else pretraining)(args, args.overrides, out)
    device = torch.device(args.device)
    print(f"\n{args.task}: device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
          f"{os.cpu_count()} CPU cores, torch {torch.__version__}, overrides: {' '.join(args.overrides) or 'none'}")
    print("| what | img/s | GPU utilisation |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
