"""The run folder every training writes, on rank 0 only.

    <output_dir>/config.yaml          resolved config
    <output_dir>/log.txt              the console log
    <output_dir>/metrics.jsonl        one JSON object per logged step / evaluation
    <output_dir>/events.out.tfevents.* TensorBoard
    <output_dir>/checkpoints/last.pth full training state (atomic), best.pth
    <output_dir>/summary.json         final figures and the checkpoint paths
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time

from omegaconf import DictConfig

from .config import to_yaml
from .dist import is_main_process, reduce_mean, reduce_sum

LOGGER_NAME = "resdet"


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def setup_logging(log_file: str | None) -> logging.Logger:
    logger = get_logger()
    logger.setLevel(logging.INFO if is_main_process() else logging.WARNING)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if log_file and is_main_process():
        fh = logging.FileHandler(log_file, mode="a", encoding="utf-8")
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_json_safe(obj), f, indent=2)
    os.replace(tmp, path)


class RunFolder:
    """Owns the files of one run. Methods are no-ops on ranks other than 0."""

    def __init__(self, output_dir: str, cfg: DictConfig):
        self.dir = os.path.abspath(output_dir)
        self.checkpoint_dir = os.path.join(self.dir, "checkpoints")
        self.main = is_main_process()
        self._tb = None
        if self.main:
            os.makedirs(self.checkpoint_dir, exist_ok=True)
            with open(os.path.join(self.dir, "config.yaml"), "w", encoding="utf-8") as f:
                f.write(to_yaml(cfg))
        self.logger = setup_logging(os.path.join(self.dir, "log.txt") if self.main else None)
        self.started = time.time()

    @property
    def last_checkpoint(self) -> str:
        return os.path.join(self.checkpoint_dir, "last.pth")

    @property
    def best_checkpoint(self) -> str:
        return os.path.join(self.checkpoint_dir, "best.pth")

    @property
    def tensorboard(self):
        if self._tb is None and self.main:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(self.dir)
        return self._tb

    def log_metrics(self, step: int, metrics: dict, prefix: str = "") -> None:
        """Append to metrics.jsonl and TensorBoard; ``prefix`` groups them (``train/``, ``val/``)."""
        if not self.main:
            return
        record = {"step": int(step), "time": round(time.time() - self.started, 2)}
        record.update({f"{prefix}{k}": v for k, v in metrics.items()})
        with open(os.path.join(self.dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(_json_safe(record)) + "\n")
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.tensorboard.add_scalar(f"{prefix}{k}", v, step)

    def write_image_grid(self, name: str, images, per_row: int = 8) -> str | None:
        """``images`` (uint8 Nx3xHxW RGB, any device) as one JPEG ``name`` in the run folder (rank 0); its path."""
        if not self.main:
            return None
        import cv2
        from torchvision.utils import make_grid

        grid = make_grid(images.detach().cpu(), nrow=per_row, padding=2).permute(1, 2, 0).numpy()
        path = os.path.join(self.dir, name)
        cv2.imwrite(path, grid[:, :, ::-1])
        return path

    def write_summary(self, summary: dict) -> dict:
        """Write summary.json (rank 0) and return the summary with the run folder and wall time added."""
        summary = dict(summary, output_dir=self.dir, wall_time_s=round(time.time() - self.started, 1))
        if self.main:
            write_json_atomic(os.path.join(self.dir, "summary.json"), summary)
        return summary

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def progress_bar(**kwargs):
    """tqdm on rank 0 (it/s, ETA, and the postfix we set: loss, img/s). Redrawn every 2 s on a terminal,
    every 30 s into a log file or CI, so logs stay readable."""
    from tqdm import tqdm

    interactive = sys.stdout.isatty()
    kwargs.setdefault("disable", not is_main_process())
    return tqdm(file=sys.stdout, dynamic_ncols=interactive, mininterval=2.0 if interactive else 30.0, **kwargs)


class LossWindow:
    """The loss terms and samples of the steps since the last log line. ``flush`` returns the terms
    averaged over those steps and over ranks (plus their sum, ``loss``) and the samples per second of all
    ranks together, then starts a new window. Every rank must call ``flush`` (it reduces).

    The rate leaves out the window's first step when it is the run's first: that step waits for the
    loader's workers to start and fill their queues (and for the device's first-call set-up), so counted
    it would measure start-up instead of the steady state the rate is there to show. A first window of
    that one step alone has no rate (NaN)."""

    def __init__(self):
        self._reset()
        self.warming_up = True  # until the run's first step has ended

    def _reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps, self.samples, self.start = 0, 0, time.time()
        self.only_untimed = False  # the window holds the run's first step alone

    def add(self, losses: dict, samples: int) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.steps += 1
        if self.warming_up:
            self.warming_up, self.only_untimed, self.start = False, True, time.time()
        else:
            self.samples += samples
            self.only_untimed = False

    def flush(self, device) -> tuple[dict[str, float], float]:
        avg = reduce_mean({k: v / max(self.steps, 1) for k, v in self.sums.items()}, device)
        avg["loss"] = sum(avg.values())
        samples = reduce_sum({"n": self.samples}, device)["n"]
        per_second = math.nan if self.only_untimed else samples / max(time.time() - self.start, 1e-9)
        self._reset()
        return avg, per_second
