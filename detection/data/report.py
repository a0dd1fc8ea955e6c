"""What a person should know about a detection dataset before spending GPU hours on it.

:func:`dataset_report` reads a set the way training does and measures: images, boxes, classes with
their counts, boxes per image, images without boxes, box sizes at the training scale, and how many
ground-truth boxes no anchor of the configured RPN reaches at IoU >= 0.7 (the RPN's positive threshold)
or >= 0.5 (those are trained only through "each object's best anchor", and are the first to be missed).
:func:`augmented_grid` draws training samples after augmentation with their boxes and class names, so
the boxes can be seen to land on the objects. ``tools/check_data.py`` prints and writes both.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torchvision.ops import box_iou

from ..visualize import draw_detections
from .transforms import resized_shape

SIZE_BINS = (0, 16, 32, 64, 128, 256, 512, math.inf)  # sqrt(area) in pixels of the training input


def _percentiles(values) -> dict:
    if not len(values):
        return {"min": 0, "median": 0, "max": 0}
    v = np.asarray(values)
    return {"min": int(v.min()), "median": float(np.median(v)), "max": int(v.max())}


def class_box_counts(dataset) -> dict[str, int]:
    """Class name -> number of (non-crowd) boxes in ``dataset``, in label order."""
    counts = [0] * len(dataset.class_names)
    for record in dataset.records:
        for label in record["labels"]:
            counts[int(label) - 1] += 1
    return dict(zip(dataset.class_names, counts))


def anchor_coverage(records, anchor_generator, short_side: int, max_size: int, max_images: int = 2000) -> dict:
    """Best IoU of each ground-truth box (at the training scale) with the anchors the RPN would place on
    that image; counts of boxes below 0.7 and below 0.5. At most ``max_images`` images (evenly spread)."""
    step = max(1, math.ceil(len(records) / max_images))
    best = []
    for record in records[::step]:
        if not len(record["boxes"]):
            continue
        h, w = resized_shape(record["height"], record["width"], short_side, max_size)
        scale = torch.tensor([w / record["width"], h / record["height"]] * 2)
        boxes = torch.as_tensor(record["boxes"], dtype=torch.float32) * scale
        maps = [torch.empty(0, 0, math.ceil(h / s), math.ceil(w / s)) for s in anchor_generator.strides]
        anchors = torch.cat(anchor_generator(maps))
        best.append(box_iou(boxes, anchors).max(dim=1).values)
    best_iou = torch.cat(best) if best else torch.zeros(0)
    return {"boxes_checked": int(best_iou.numel()), "images_checked": len(records[::step]),
            "below_0.7": int((best_iou < 0.7).sum()), "below_0.5": int((best_iou < 0.5).sum()),
            "median_best_iou": float(best_iou.median()) if best_iou.numel() else 0.0}


def dataset_report(dataset, anchor_generator=None, short_side: int = 600, max_size: int = 1000) -> dict:
    """The numbers above for one loaded :class:`~detection.data.coco.CocoDetection` (or VOC) set."""
    per_image = [len(r["boxes"]) for r in dataset.records]
    sizes = []
    for r in dataset.records:
        if len(r["boxes"]):
            h, w = resized_shape(r["height"], r["width"], short_side, max_size)
            sx, sy = w / r["width"], h / r["height"]
            b = r["boxes"]
            sizes.extend(np.sqrt((b[:, 2] - b[:, 0]) * sx * (b[:, 3] - b[:, 1]) * sy).tolist())
    hist = np.histogram(sizes, bins=SIZE_BINS)[0] if sizes else np.zeros(len(SIZE_BINS) - 1, np.int64)
    labels = [f"{int(a)}-{int(b)}" if b != math.inf else f">{int(a)}" for a, b in zip(SIZE_BINS[:-1], SIZE_BINS[1:])]
    report = {
        "images": len(dataset.records), "boxes": int(sum(per_image)),
        "crowd_boxes": int(sum(len(r["crowd_boxes"]) for r in dataset.records)),
        "images_without_boxes": int(sum(n == 0 for n in per_image)),
        "boxes_per_image": _percentiles(per_image),
        "classes": class_box_counts(dataset),
        "box_size_at_training_scale": dict(zip(labels, (int(x) for x in hist))),
        "training_scale": f"shorter side {short_side}, longer at most {max_size}",
        "problems": dict(dataset.stats.get("problems", {})),
    }
    if "blacklisted_pairs" in dataset.stats:  # ImageNet DET's val blacklist (detection/data/voc.py)
        report["blacklist"] = {"image_class_pairs": dataset.stats["blacklisted_pairs"],
                               "objects_left_out": dataset.stats["blacklisted_objects"]}
    if anchor_generator is not None:
        report["anchor_coverage"] = anchor_coverage(dataset.records, anchor_generator, short_side, max_size)
    return report


def format_report(name: str, report: dict) -> str:
    lines = [f"== {name}: {report['images']} images, {report['boxes']} boxes ({report['crowd_boxes']} crowd), "
             f"{report['images_without_boxes']} images without boxes",
             "boxes per image: min {min}, median {median:g}, max {max}".format(**report["boxes_per_image"]),
             "classes (boxes): " + ", ".join(f"{k} ({v})" for k, v in report["classes"].items())]
    empty = [k for k, v in report["classes"].items() if v == 0]
    if empty:
        lines.append(f"  no box at all: {', '.join(empty)} (these classes cannot be learned from this set)")
    lines.append(f"box size, sqrt(area) in pixels at the training scale ({report['training_scale']}): "
                 + ", ".join(f"{k}: {v}" for k, v in report["box_size_at_training_scale"].items()))
    if "anchor_coverage" in report:
        a = report["anchor_coverage"]
        lines.append(f"anchors: of {a['boxes_checked']} boxes ({a['images_checked']} images), {a['below_0.7']} have no "
                     f"anchor at IoU >= 0.7 and {a['below_0.5']} none at IoU >= 0.5 (median best IoU "
                     f"{a['median_best_iou']:.2f}); many below 0.5: add anchor sizes or ratios "
                     "(model.rpn.anchor_sizes / aspect_ratios) or change the image scale")
    if "blacklist" in report:
        lines.append(f"val blacklist: {report['blacklist']['image_class_pairs']} (image, class) pairs not scored, their "
                     f"{report['blacklist']['objects_left_out']} objects left out")
    if report["problems"]:
        lines.append("dropped at load: " + ", ".join(f"{k}: {v}" for k, v in report["problems"].items()))
    return "\n".join(lines)


def augmented_grid(dataset, indices, columns: int = 4, cell: int = 320) -> np.ndarray:
    """Training samples as the model sees them (resized, maybe flipped) with boxes and class names,
    tiled into one BGR image for cv2.imwrite. Crowd regions are labelled ``crowd``."""
    import cv2

    tiles = []
    for index in indices:
        item = dataset[index]
        if item is None:
            continue
        image = item["image"].permute(1, 2, 0).numpy()
        dets = [{"label": dataset.class_names[int(label) - 1], "box_xyxy": box.tolist()}
                for box, label in zip(item["boxes"], item["labels"])]
        dets += [{"label": "crowd", "box_xyxy": box.tolist()} for box in item["crowd_boxes"]]
        canvas = draw_detections(image, dets)
        scale = cell / max(canvas.shape[:2])
        canvas = cv2.resize(canvas, (max(1, round(canvas.shape[1] * scale)), max(1, round(canvas.shape[0] * scale))))
        tile = np.full((cell, cell, 3), 255, np.uint8)
        tile[:canvas.shape[0], :canvas.shape[1]] = canvas
        tiles.append(tile)
    if not tiles:
        return np.full((cell, cell, 3), 255, np.uint8)
    while len(tiles) % columns:
        tiles.append(np.full((cell, cell, 3), 255, np.uint8))
    rows = [np.concatenate(tiles[i:i + columns], axis=1) for i in range(0, len(tiles), columns)]
    return np.concatenate(rows, axis=0)
