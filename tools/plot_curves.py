#!/usr/bin/env python
"""Training and validation error against iterations for one or more runs (the paper's Fig. 4/6).

    python tools/plot_curves.py runs/cifar_plain20_shapes runs/cifar_resnet20_shapes --out curves.png

Left: validation top-1 error; right: training loss (from each run's metrics.jsonl).
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not a run folder (no metrics.jsonl)")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out", default="curves.png")
    args = parser.parse_args(argv)
    fig, (ax_err, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for i, run in enumerate(args.runs):
        try:
            records = read_metrics(run)
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        color = f"C{i}"
        name = os.path.basename(os.path.normpath(run))
        val = [(r["step"], 100 * r["val/top1_err"]) for r in records if "val/top1_err" in r]
        train = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
        if val:
            ax_err.plot(*zip(*val), color=color, linewidth=2, label=f"{name} (val)")
        if train:
            ax_loss.plot(*zip(*train), color=color, linewidth=1, label=f"{name} (train)")
    ax_err.set(xlabel="iterations", ylabel="top-1 error (%)", title="validation error")
    ax_loss.set(xlabel="iterations", ylabel="training loss", title="training loss")
    for ax in (ax_err, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
