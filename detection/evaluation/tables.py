"""The metric tables printed to the log and written beside the metrics: COCO's twelve numbers and
per-class AP, the VOC / ImageNet DET mAPs and per-class table. The evaluators compute, this module
formats; ``metrics["format"]`` ("coco" or "voc") says which table a dict gets."""
from __future__ import annotations

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def format_metrics_table(metrics: dict) -> str:
    """The twelve COCO numbers (in percent, "n/a" for -1) and, when present, the per-class AP table.
    A VOC evaluator's dict (``metrics["format"] == "voc"``) gets the VOC table instead."""
    if metrics.get("format") == "voc":
        return format_voc_metrics_table(metrics)

    def pct(v: float) -> str:
        return f"{100 * v:6.2f}" if v >= 0 else "   n/a"

    header = " ".join(f"{name:>6}" for name in METRIC_NAMES[:6])
    lines = [_images_line(metrics)] if "num_images" in metrics else []
    lines += [header, " ".join(pct(metrics[name]) for name in METRIC_NAMES[:6]),
             " ".join(f"{name:>6}" for name in METRIC_NAMES[6:]),
             " ".join(pct(metrics[name]) for name in METRIC_NAMES[6:])]
    if metrics.get("per_class_AP"):
        lines += ["", format_per_class_table(metrics["per_class_AP"])]
    return "\n".join(lines)


def _images_line(metrics: dict) -> str:
    """``images 200`` plus, when some could not be read, how many of them scored as "no detections"."""
    line = f"images {metrics['num_images']}"
    if metrics.get("num_unprocessed"):
        line += f" ({metrics['num_unprocessed']} not processed, e.g. unreadable: scored as no detections)"
    return line


def format_per_class_table(per_class_ap: dict[str, float], columns: int = 3) -> str:
    """Per-class AP (percent) in ``columns`` side-by-side (class, AP) pairs, for the 80 COCO classes."""
    width = max([len("class")] + [len(name) for name in per_class_ap])
    cells = [f"{name:<{width}} {100 * ap:6.2f}" if ap >= 0 else f"{name:<{width}}    n/a"
             for name, ap in per_class_ap.items()]
    header = "  |  ".join([f"{'class':<{width}} {'AP':>6}"] * min(columns, max(1, len(cells))))
    rows = ["  |  ".join(cells[i:i + columns]) for i in range(0, len(cells), columns)]
    return "\n".join([header, "-" * len(header)] + rows)


def format_voc_metrics_table(metrics: dict) -> str:
    """The VOC mAPs (percent) and the per-class table; the COCO table too when ``metrics["coco"]`` is there."""
    def pct(v: float) -> str:
        return f"{100 * v:.2f}" if v >= 0 else "n/a"

    headline = "11-point (VOC2007)" if metrics.get("metric") == "voc07" else "area (VOC2010+)"
    lines = [f"mAP@0.5 {pct(metrics['AP'])} [{headline}]   11-point {pct(metrics['mAP_07'])}   "
             f"area {pct(metrics['mAP'])}   AP75 {pct(metrics['AP75'])}   images {metrics.get('num_images', '?')}"
             + (f" ({metrics['num_unprocessed']} not processed, e.g. unreadable: scored as no detections)"
                if metrics.get("num_unprocessed") else "")]
    if metrics.get("per_class"):
        lines += ["", format_voc_per_class_table(metrics)]
    if metrics.get("coco"):
        lines += ["", "COCO metrics on the same images (difficult objects as crowd regions):",
                  format_metrics_table({k: v for k, v in metrics["coco"].items() if k != "per_class_AP"})]
    return "\n".join(lines)


def format_voc_per_class_table(metrics: dict) -> str:
    """class | AP (area) | AP_07 | ground truth (non-difficult) | difficult | detections, percent for APs."""
    per_class = metrics.get("per_class", {})
    width = max([len("class")] + [len(n) for n in per_class])

    def pct(v: float) -> str:
        return f"{100 * v:7.2f}" if v >= 0 else "    n/a"

    header = f"{'class':<{width}} {'AP':>7} {'AP_07':>7} {'gt':>6} {'diff':>6} {'dets':>7}"
    rows = [f"{name:<{width}} {pct(c['AP'])} {pct(c['AP_07'])} {c['num_gt']:6d} {c['num_difficult']:6d} "
            f"{c['num_det']:7d}" for name, c in per_class.items()]
    return "\n".join([header, "-" * len(header)] + rows)
