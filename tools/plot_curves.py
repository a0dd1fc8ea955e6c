#!/usr/bin/env python
"""Training curves of one or more runs, from each run's metrics.jsonl.

    python tools/plot_curves.py runs/cifar_plain20_shapes runs/cifar_resnet20_shapes --out curves.png
    python tools/plot_curves.py runs/frcnn_demo --out det_curves.png

Classification (pretraining) runs: validation top-1 error and training loss against iterations (the
paper's Fig. 4/6). Detection runs: validation AP / AP50 / AP75, the total training loss and each of
Faster R-CNN's four loss terms (log scale).
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


# Detection runs (tools/train_det.py): the four loss terms of Faster R-CNN and the COCO metrics.
DET_LOSSES = ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg")
DET_METRICS = (("AP", "-"), ("AP50", "--"), ("AP75", ":"))


def is_detection(records: list[dict]) -> bool:
    return any("val/AP" in r or "train/loss_rpn_cls" in r for r in records)


def series(records: list[dict], key: str, scale: float = 1.0) -> list[tuple[int, float]]:
    return [(r["step"], scale * r[key]) for r in records if key in r and r[key] is not None and r[key] >= 0]


def plot_classification(runs: dict[str, list[dict]], out: str) -> None:
    fig, (ax_err, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, records) in enumerate(runs.items()):
        val, train = series(records, "val/top1_err", 100), series(records, "train/loss")
        if val:
            ax_err.plot(*zip(*val), color=f"C{i}", linewidth=2, label=f"{name} (val)")
        if train:
            ax_loss.plot(*zip(*train), color=f"C{i}", linewidth=1, label=f"{name} (train)")
    ax_err.set(xlabel="iterations", ylabel="top-1 error (%)", title="validation error")
    ax_loss.set(xlabel="iterations", ylabel="training loss", title="training loss")
    finish(fig, (ax_err, ax_loss), out)


def plot_detection(runs: dict[str, list[dict]], out: str) -> None:
    """Left: val AP / AP50 / AP75 (%) at each evaluation; middle: total training loss; right: each loss
    term (log scale), so a stalled RPN or box regressor shows apart from the classifier."""
    fig, (ax_ap, ax_loss, ax_terms) = plt.subplots(1, 3, figsize=(16, 4.3), sharex=True)  # one iteration axis
    for i, (name, records) in enumerate(runs.items()):
        color = f"C{i}"
        for key, style in DET_METRICS:
            points = series(records, f"val/{key}", 100)
            if points:
                ax_ap.plot(*zip(*points), style, color=color, marker="o", markersize=3, label=f"{name} {key}")
        total = series(records, "train/loss")
        if total:
            ax_loss.plot(*zip(*total), color=color, linewidth=1, label=name)
        for j, term in enumerate(DET_LOSSES):
            points = series(records, f"train/{term}")
            if points:
                ax_terms.plot(*zip(*points), color=color, linestyle=("-", "--", "-.", ":")[j], linewidth=1,
                              label=f"{name} {term}" if len(runs) > 1 else term)
    ax_ap.set(xlabel="iterations", ylabel="%", title="validation AP (COCO)")
    ax_ap.set_ylim(bottom=0, top=min(100, ax_ap.get_ylim()[1]) + 2)
    ax_loss.set(xlabel="iterations", ylabel="loss", title="training loss (sum)")
    ax_terms.set(xlabel="iterations", ylabel="loss", title="training loss terms", yscale="log")
    finish(fig, (ax_ap, ax_loss, ax_terms), out)


def finish(fig, axes, out: str) -> None:
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out", default="curves.png")
    args = parser.parse_args(argv)
    runs = {}
    try:
        for run in args.runs:
            runs[os.path.basename(os.path.normpath(run))] = read_metrics(run)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    kinds = {is_detection(records) for records in runs.values()}
    if len(kinds) > 1:
        print("error: give either detection runs or classification runs, not both (their curves differ)",
              file=sys.stderr)
        return 2
    (plot_detection if kinds.pop() else plot_classification)(runs, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
