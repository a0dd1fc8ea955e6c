"""An evaluation a person can look at: precision-recall curves, per-class AP, and the best and worst val
images with detections beside ground truth, gathered in one ``index.html`` next to the metrics.

The curves are pycocotools' own accumulated precision (101 recall points, all areas, 100 detections),
saved by the evaluator that scored the run (``pr_curves.npz``), so they are the curves behind the AP printed
in the table and nothing is evaluated twice. Images are ranked by their own AP at IoU 0.5
(every class pooled, detections of any score), which points at what the detector gets wrong.
"""
from __future__ import annotations

import html
import os

import numpy as np
import torch
from torchvision.ops import box_iou

from ..visualize import draw_detections
from .coco_eval import PR_CURVES_FILE
from .tables import METRIC_NAMES

RECALL = np.linspace(0, 1, 101)


def _mean_precision(precision: np.ndarray) -> np.ndarray:
    """(R,) mean over the entries that are defined (> -1) along the first axis; -1 where none is."""
    valid = precision > -1
    total = np.where(valid, precision, 0).sum(axis=0)
    count = valid.sum(axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), -1)


def plot_pr_curves(precision: np.ndarray, cats, class_names: dict[int, str], path: str) -> None:
    """``precision`` [IoU .50:.95, 101 recall points, class] for the categories ``cats`` (-1: undefined)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(cats)
    cols = min(5, n)
    rows = 1 + -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    ax = axes[0, 0]
    for t, label in ((0, "IoU 0.50"), (5, "IoU 0.75")):
        ax.plot(RECALL, np.clip(_mean_precision(precision[t].T), 0, None), label=label)
    ax.plot(RECALL, np.clip(_mean_precision(precision.transpose(0, 2, 1).reshape(-1, len(RECALL))), 0, None),
            label="IoU .50:.95")
    ax.set_title("all classes (mean)")
    ax.legend(fontsize=7)
    for a in axes[0, 1:]:
        a.axis("off")
    for k, cat in enumerate(cats):
        a = axes[1 + k // cols, k % cols]
        for t, label in ((0, "0.50"), (5, "0.75")):
            p = precision[t, :, k]
            if (p > -1).any():
                a.plot(RECALL, np.clip(p, 0, None), label=label)
        a.set_title(class_names.get(cat, str(cat)), fontsize=9)
    for a in axes[1:].flat[n:]:
        a.axis("off")
    for a in axes.flat:
        if a.has_data():
            a.set_xlim(0, 1), a.set_ylim(0, 1.02), a.tick_params(labelsize=7)
            a.set_xlabel("recall", fontsize=7), a.set_ylabel("precision", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_per_class_ap(per_class_ap: dict[str, float], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    items = sorted(((v, k) for k, v in per_class_ap.items() if v >= 0), reverse=True)
    fig, ax = plt.subplots(figsize=(7, 0.25 * len(items) + 1))
    ax.barh([k for _, k in items][::-1], [100 * v for v, _ in items][::-1], color="#4878b0")
    ax.set_xlabel("AP (IoU .50:.95), %")
    ax.set_xlim(0, 100)
    ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def image_ap50(gt_boxes, gt_labels, det_boxes, det_scores, det_labels) -> float:
    """AP at IoU 0.5 of one image's detections, every class pooled (greedy matching by score); 1.0 for an
    image with neither ground truth nor detections, 0.0 with detections but no ground truth."""
    if not len(gt_boxes):
        return 1.0 if not len(det_boxes) else 0.0
    order = np.argsort(-np.asarray(det_scores), kind="stable")
    iou = box_iou(torch.as_tensor(np.asarray(det_boxes, np.float32)[order]).reshape(-1, 4),
                  torch.as_tensor(np.asarray(gt_boxes, np.float32))).numpy() if len(det_boxes) else np.zeros((0, 0))
    used = np.zeros(len(gt_boxes), bool)
    tp = []
    for i, d in enumerate(order):
        same = np.asarray(gt_labels) == det_labels[d]
        cand = np.where(same & ~used, iou[i], -1)
        j = int(cand.argmax()) if len(cand) else -1
        hit = j >= 0 and cand[j] >= 0.5
        if hit:
            used[j] = True
        tp.append(hit)
    tp = np.asarray(tp, float)
    if not len(tp):
        return 0.0
    recall = np.cumsum(tp) / len(gt_boxes)
    precision = np.cumsum(tp) / np.arange(1, len(tp) + 1)
    return float(np.mean([precision[recall >= r].max() if (recall >= r).any() else 0.0 for r in RECALL]))


def _side_by_side(image_rgb, gt, dets) -> np.ndarray:
    import cv2

    left = draw_detections(image_rgb, gt)
    right = draw_detections(image_rgb, dets)
    cv2.putText(left, "ground truth", (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 2, cv2.LINE_AA)
    cv2.putText(right, "detections >= 0.3", (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 2, cv2.LINE_AA)
    return np.concatenate([left, np.full((left.shape[0], 6, 3), 255, np.uint8), right], axis=1)


def write_report(out_dir: str, dataset, results: list[dict], metrics: dict, examples: int = 4) -> str:
    """Write ``pr_curves.png``, ``per_class_ap.png``, ``examples/*.jpg`` and ``index.html`` into
    ``out_dir`` for a COCO-format ``dataset`` and its COCO ``results``; returns the page's path."""
    import cv2

    from backbones.engine.imageio import CorruptImageError, read_image_rgb
    os.makedirs(os.path.join(out_dir, "examples"), exist_ok=True)
    coco = dataset.coco
    names = {c["id"]: c["name"] for c in coco.dataset["categories"]}
    figures = []
    curves_file = os.path.join(out_dir, PR_CURVES_FILE)  # written by the COCOEvaluator that scored them
    if results and os.path.isfile(curves_file):
        with np.load(curves_file) as curves:
            plot_pr_curves(curves["precision"], curves["cat_ids"].tolist(), names,
                           os.path.join(out_dir, "pr_curves.png"))
        figures.append(("Precision-recall (pycocotools' accumulated precision)", "pr_curves.png"))
    if metrics.get("per_class_AP"):
        plot_per_class_ap(metrics["per_class_AP"], os.path.join(out_dir, "per_class_ap.png"))
        figures.append(("AP per class", "per_class_ap.png"))

    by_image: dict[int, list[dict]] = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    scored = []
    for record in dataset.records:
        dets = by_image.get(record["image_id"], [])
        gt_labels = [dataset.contiguous_to_cat_id[int(k)] for k in record["labels"]]
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in dets)]
        ap = image_ap50(record["boxes"], gt_labels, boxes, [d["score"] for d in dets],
                        np.asarray([d["category_id"] for d in dets]))
        if not len(record["boxes"]) and not any(d["score"] >= 0.3 for d in dets):
            continue  # nothing to see: no object and no confident false positive
        scored.append((ap, record, dets, boxes))
    scored.sort(key=lambda s: (s[0], -len(s[1]["boxes"])))  # ties: the images with more objects first
    chosen = [("worst", s) for s in scored[:examples]] + [("best", s) for s in scored[::-1][:examples]]
    example_rows = []
    for kind, (ap, record, dets, boxes) in chosen:
        try:
            image = read_image_rgb(dataset.image_path(record))
        except CorruptImageError:
            continue
        gt = [{"label": dataset.class_names[int(k) - 1], "box_xyxy": list(map(float, b))}
              for b, k in zip(record["boxes"], record["labels"])]
        shown = [{"label": names.get(d["category_id"], str(d["category_id"])), "score": d["score"], "box_xyxy": b}
                 for d, b in zip(dets, boxes) if d["score"] >= 0.3]
        name = f"examples/{kind}_{record['image_id']}.jpg"
        cv2.imwrite(os.path.join(out_dir, name), _side_by_side(image, gt, shown))
        example_rows.append((kind, ap, record["file_name"], name))

    def pct(v):
        return f"{100 * v:.1f}" if isinstance(v, (int, float)) and v >= 0 else "n/a"

    table = "".join(f"<th>{k}</th>" for k in METRIC_NAMES)
    values = "".join(f"<td>{pct(metrics.get(k, -1))}</td>" for k in METRIC_NAMES)
    scored_line = f"{metrics.get('num_images', len(dataset.records))} images scored"
    if metrics.get("num_unprocessed"):
        scored_line += f", {metrics['num_unprocessed']} of them unreadable (scored as no detections)"
    parts = ["<!doctype html><meta charset='utf-8'><title>resdet evaluation</title>",
             "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
             "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}img{max-width:100%}</style>",
             f"<h1>Evaluation: {html.escape(str(dataset.ann_file))}</h1>",
             f"<p>{html.escape(scored_line)}; COCO metrics in %.</p>",
             f"<table><tr>{table}</tr><tr>{values}</tr></table>"]
    for title, src in figures:
        parts.append(f"<h2>{html.escape(title)}</h2><img src='{src}'>")
    if example_rows:
        parts.append("<h2>Val images, worst and best by their own AP at IoU 0.5</h2>")
        for kind, ap, file_name, src in example_rows:
            parts.append(f"<h3>{kind}: {html.escape(str(file_name))} (AP50 {100 * ap:.0f})</h3><img src='{src}'>")
    page = os.path.join(out_dir, "index.html")
    with open(page, "w", encoding="utf-8") as f:
        f.write("\n".join(parts) + "\n")
    return page
