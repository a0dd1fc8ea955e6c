"""PASCAL VOC detection AP with the official devkit's semantics, and ImageNet DET's variant of it.

Per class, over all evaluated images, the detections are sorted by score (descending; ties keep their
input order, as the devkit's stable sort does) and each is matched in turn:

* ``protocol="voc"`` (VOCdevkit ``VOCevaldet``): the ground truth box with the highest IoU with the
  detection is found among *all* boxes of its image and class (difficult and already matched ones
  included). If that IoU is >= 0.5: a difficult box makes the detection neither TP nor FP; an
  unmatched box makes it a TP (and the box matched); an already matched box makes it a FP (a
  duplicate). Below 0.5 it is a FP. Note the devkit does *not* fall back to a second-best unmatched
  box: a duplicate of a matched box is a FP even when it also overlaps another box by >= 0.5.
* ``protocol="imagenet"`` (ILSVRC devkit ``eval_detection``): the detection takes the *unmatched*
  ground truth box with the highest IoU among those reaching their own threshold
  ``min(0.5, w h / ((w + 10) (h + 10)))`` (w, h: the box's size in pixels), so tiny objects get a
  looser threshold. ImageNet DET has no difficult flag; one that is present is honoured as in VOC.

Difficult boxes never count in the number of positives (``npos``). Recall is TP / npos, precision
TP / (TP + FP) after each detection. Detections that match a difficult box are left out of the curve
(they repeat the point before them, so this changes no AP and avoids the devkit's 0/0 precision).

Two APs are computed from the same curve: ``AP_07``, the VOC2007 11-point AP (the mean over recall
thresholds t = 0, 0.1, ..., 1 of the highest precision at a recall >= t, 0 when none), and ``AP``,
the VOC2010+ (and ILSVRC) area under the precision envelope (precision made non-increasing in
recall, then summed over the recall steps). A class without non-difficult ground truth in the
evaluated images has an undefined AP, reported as -1 (as pycocotools does) and left out of the means;
a class with ground truth and no detection has AP 0.

Box convention: detections and ground truth are 0-based ``x1, y1, x2, y2`` with pixel ``c`` spanning
``[c, c + 1)``; VOC XML boxes are read as ``(xmin - 1, ymin - 1, xmax, ymax)`` (see
:mod:`detection.data.voc`). The devkit computes IoU on the 1-based inclusive coordinates with ``+ 1``
on every width and height; for a box so converted, ``xmax - (xmin - 1) = xmax - xmin + 1``, so the
plain IoU used here equals the devkit's exactly, for ground truth and for detections alike (a detection
``x1, y1, x2, y2`` is the devkit box ``x1 + 1, y1 + 1, x2, y2``, which is how the result files are
written). A box with no overlap has IoU 0 and is never matched.

:meth:`VOCEvaluator.evaluate` returns (fractions in [0, 1], -1 = undefined)::

    {"AP": the headline mAP at IoU 0.5: "mAP_07" when metric="voc07", else "mAP",
     "AP50": the same number (the headline AP is an AP at IoU 0.5),
     "AP75": the headline mAP with the IoU threshold 0.75 (imagenet: min(0.75, ...) per box),
     "mAP": area-under-curve (VOC2010+) mAP at 0.5, "mAP_07": 11-point (VOC2007) mAP at 0.5,
     "metric": "voc07" | "area" (which one "AP" is),
     "per_class_AP": {class name: headline AP at 0.5},
     "per_class": {class name: {"AP", "AP_07", "num_gt" (non-difficult), "num_difficult", "num_det"}},
     "num_images": images evaluated}
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch

from backbones.engine.dist import all_gather_object, get_rank
from backbones.engine.run import write_json_atomic

from .tables import format_voc_per_class_table

logger = logging.getLogger(__name__)

PROTOCOLS = ("voc", "imagenet")
METRICS = ("voc07", "area")
IMAGENET_PIXEL_TOLERANCE = 10.0


def box_iou(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    """IoU of each of ``boxes`` (N x 4) with ``box`` (4,), 0-based xyxy with exclusive ends."""
    iw = np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0])
    ih = np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1])
    inter = np.where((iw > 0) & (ih > 0), iw * ih, 0.0)
    union = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) + (box[2] - box[0]) * (box[3] - box[1]) - inter
    return np.where(inter > 0, inter / np.maximum(union, 1e-12), 0.0)


def imagenet_iou_thresholds(gt_boxes: np.ndarray, base: float = 0.5) -> np.ndarray:
    """ILSVRC's per-box threshold ``min(base, w h / ((w + 10) (h + 10)))``; ``w = x2 - x1`` here is the
    devkit's ``x2 - x1 + 1`` on inclusive coordinates."""
    w, h = gt_boxes[:, 2] - gt_boxes[:, 0], gt_boxes[:, 3] - gt_boxes[:, 1]
    t = IMAGENET_PIXEL_TOLERANCE
    return np.minimum(base, w * h / ((w + t) * (h + t)))


def match_detections(gt: dict, image_ids: np.ndarray, scores: np.ndarray, boxes: np.ndarray,
                     iou_thresh: float = 0.5, protocol: str = "voc") -> tuple[np.ndarray, np.ndarray, int]:
    """Label one class's detections, in descending score order: returns ``(tp, fp, npos)`` where ``tp``
    and ``fp`` are 0/1 arrays over the sorted detections (both 0 for a detection matching a difficult
    box) and ``npos`` counts the non-difficult ground truth.

    ``gt``: image id -> ``(boxes K x 4, difficult K bool)`` of this class, for every evaluated image."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    npos = int(sum(int((~np.asarray(d, bool)).sum()) for _, d in gt.values()))
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    tp, fp = np.zeros(len(order)), np.zeros(len(order))
    matched = {image_id: np.zeros(len(b), bool) for image_id, (b, _) in gt.items()}
    thresholds = {}
    for rank, d in enumerate(order):
        image_id = image_ids[d]
        gt_boxes, difficult = gt.get(image_id, (np.zeros((0, 4)), np.zeros(0, bool)))
        if len(gt_boxes) == 0:
            fp[rank] = 1
            continue
        ious = box_iou(np.asarray(gt_boxes, np.float64), np.asarray(boxes[d], np.float64))
        if protocol == "voc":
            j = int(np.argmax(ious))  # the first of equal maxima, as the devkit's strict ">" keeps it
            if ious[j] < iou_thresh:
                fp[rank] = 1
            elif difficult[j]:
                pass  # neither: difficult objects are not scored
            elif matched[image_id][j]:
                fp[rank] = 1  # a duplicate of a detected object
            else:
                tp[rank], matched[image_id][j] = 1, True
            continue
        if image_id not in thresholds:
            thresholds[image_id] = imagenet_iou_thresholds(np.asarray(gt_boxes, np.float64), iou_thresh)
        candidates = np.where(~matched[image_id] & (ious >= thresholds[image_id]) & (ious > 0))[0]
        if len(candidates) == 0:
            fp[rank] = 1
            continue
        j = int(candidates[np.argmax(ious[candidates])])
        matched[image_id][j] = True
        if not difficult[j]:
            tp[rank] = 1
    return tp, fp, npos


def precision_recall(tp: np.ndarray, fp: np.ndarray, npos: int) -> tuple[np.ndarray, np.ndarray]:
    """Recall and precision after each scored detection (those matching a difficult box dropped)."""
    scored = (tp + fp) > 0
    tp_cum, fp_cum = np.cumsum(tp[scored]), np.cumsum(fp[scored])
    return tp_cum / max(npos, 1), tp_cum / np.maximum(tp_cum + fp_cum, 1e-12)


def voc07_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2007's 11-point AP: mean over t in {0, 0.1, .., 1} of max(precision at recall >= t), 0 if none.
    ``k / 10`` and ``tp / npos`` are both correctly rounded, so an exact tie (3/10 vs 0.3) compares equal."""
    total = 0.0
    for k in range(11):
        reached = precision[recall >= k / 10]
        total += float(reached.max()) if reached.size else 0.0
    return total / 11


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2010+ AP: the area under the precision envelope (at each recall, the best precision at that or
    any higher recall), integrated over the recall steps from 0 to the last recall reached."""
    if recall.size == 0:
        return 0.0
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(steps * envelope))


def ground_truth_from_coco(data, cat_id_to_contiguous: dict[int, int]) -> dict[int, dict]:
    """Per image id: ``{"boxes": K x 4 xyxy, "labels": K (1..K), "difficult": K bool, "unscored": labels}``
    from a COCO-style dict (or pycocotools ``COCO``) as :func:`detection.data.voc.voc_to_coco_dict` makes
    it. Annotations without a ``difficult`` key use ``iscrowd`` instead (a crowd region is scored like a
    difficult box). ``unscored``: the labels not scored in that image (its ``unscored_category_ids``,
    ImageNet DET's validation blacklist)."""
    data = getattr(data, "dataset", data)
    per_image: dict[int, dict[str, list]] = {img["id"]: {"boxes": [], "labels": [], "difficult": []}
                                            for img in data["images"]}
    unscored = {img["id"]: {cat_id_to_contiguous[c] for c in img.get("unscored_category_ids", ())}
                for img in data["images"]}
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        entry = per_image[ann["image_id"]]
        entry["boxes"].append([x, y, x + w, y + h])
        entry["labels"].append(cat_id_to_contiguous[ann["category_id"]])
        entry["difficult"].append(bool(ann.get("difficult", ann.get("iscrowd", 0))))
    return {image_id: {"boxes": np.asarray(e["boxes"], np.float64).reshape(-1, 4),
                       "labels": np.asarray(e["labels"], np.int64), "difficult": np.asarray(e["difficult"], bool),
                       "unscored": unscored[image_id]}
            for image_id, e in per_image.items()}


class VOCEvaluator:
    """Collects detections with :meth:`process` on every rank; :meth:`evaluate` scores them on rank 0.

    ``ground_truth``: image id -> ``{"boxes", "labels" (1..K), "difficult"}`` (see
    :func:`ground_truth_from_coco`); ``class_names[k - 1]`` names label k. ``metric`` picks which mAP
    is the headline ``"AP"`` (``voc07``: VOC2007 test's 11-point; ``area``: VOC2010+ and ImageNet DET).
    ``image_names``: image id -> the dataset's image name, for the devkit result files.
    A label in an image's ``unscored`` set is left out of that image's scoring, ground truth and detections
    alike (ILSVRC's ``eval_detection`` with its validation blacklist).
    Every image of ``ground_truth`` is scored; one never processed (unreadable) counts as an image
    without detections (``num_unprocessed`` says how many). ``only_processed=True`` scores just the
    processed images, for a deliberate subset.
    """

    name = "voc"

    def __init__(self, ground_truth: dict[int, dict], class_names: list[str], protocol: str = "voc",
                 metric: str = "voc07", output_dir: str | None = None, image_names: dict[int, str] | None = None,
                 only_processed: bool = False):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        self.ground_truth, self.class_names = ground_truth, list(class_names)
        self.protocol, self.metric, self.output_dir = protocol, metric, output_dir
        self.image_names = image_names or {}
        self.only_processed = only_processed
        self.reset()

    def reset(self) -> None:
        self._results: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # id -> boxes, scores, labels

    def process(self, targets: list[dict], detections: list[dict]) -> None:
        """Record one batch: ``detections[i]`` (``boxes`` xyxy in original pixels, ``scores``, ``labels``
        1..K) for the image ``targets[i]["image_id"]``; images without detections count too."""
        for target, det in zip(targets, detections):
            self._results[int(target["image_id"])] = (
                _to_numpy(det["boxes"]).reshape(-1, 4).astype(np.float64),
                _to_numpy(det["scores"]).reshape(-1).astype(np.float64),
                _to_numpy(det["labels"]).reshape(-1).astype(np.int64))

    def evaluate(self) -> dict:
        """Gather every rank's detections and score them on rank 0 (other ranks return {})."""
        merged: dict[int, tuple] = {}
        for part in all_gather_object(self._results):
            merged.update(part)
        if get_rank() != 0:
            return {}
        unknown = sorted(set(merged) - set(self.ground_truth))
        if unknown:
            raise KeyError(f"VOCEvaluator: detections for image ids {unknown[:5]} that have no ground truth")
        unprocessed = 0
        if not self.only_processed:
            unprocessed = len(set(self.ground_truth) - set(merged))
            if unprocessed:
                logger.warning("VOCEvaluator: %d of the %d images scored were not processed (unreadable?); they "
                               "count as images without detections", unprocessed, len(self.ground_truth))
            nothing = (np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64))
            merged = {image_id: merged.get(image_id, nothing) for image_id in self.ground_truth}
        metrics = self.score(merged)
        metrics["num_unprocessed"] = unprocessed
        if self.output_dir:
            self._write(merged, metrics)
        return metrics

    def score(self, results: dict[int, tuple]) -> dict:
        """The metrics dict (see the module docstring) of ``results``: image id -> (boxes, scores, labels)."""
        image_ids = sorted(results)
        if not image_ids:
            logger.warning("VOCEvaluator: no image was processed; every metric is -1")
        per_class, headline_75 = {}, []
        for label, name in enumerate(self.class_names, start=1):
            gt, ids, scores, boxes = self._class_inputs(results, image_ids, label)
            tp, fp, npos = match_detections(gt, ids, scores, boxes, 0.5, self.protocol)
            recall, precision = precision_recall(tp, fp, npos)
            defined = npos > 0
            per_class[name] = {"AP": voc_ap(recall, precision) if defined else -1.0,
                               "AP_07": voc07_ap(recall, precision) if defined else -1.0,
                               "num_gt": npos, "num_difficult": int(sum(int(d.sum()) for _, d in gt.values())),
                               "num_det": int(len(scores))}
            if defined:
                r75, p75 = precision_recall(*match_detections(gt, ids, scores, boxes, 0.75, self.protocol)[:2], npos)
                headline_75.append(voc07_ap(r75, p75) if self.metric == "voc07" else voc_ap(r75, p75))
        key = "AP_07" if self.metric == "voc07" else "AP"
        m_area, m_07 = _mean([c["AP"] for c in per_class.values()]), _mean([c["AP_07"] for c in per_class.values()])
        headline = m_07 if self.metric == "voc07" else m_area
        return {"AP": headline, "AP50": headline, "AP75": _mean(headline_75), "mAP": m_area, "mAP_07": m_07,
                "format": "voc", "metric": self.metric, "per_class_AP": {name: c[key] for name, c in per_class.items()},
                "per_class": per_class, "num_images": len(image_ids)}

    def _class_inputs(self, results: dict, image_ids: list[int], label: int):
        gt = {}
        ids, scores, boxes = [], [], []
        for image_id in image_ids:
            g = self.ground_truth[image_id]
            if label in g.get("unscored", ()):  # the devkit's blacklist: neither positives nor detections
                continue
            keep = g["labels"] == label
            gt[image_id] = (g["boxes"][keep], g["difficult"][keep])
            det_boxes, det_scores, det_labels = results[image_id]
            mine = det_labels == label
            ids.extend([image_id] * int(mine.sum()))
            scores.append(det_scores[mine])
            boxes.append(det_boxes[mine])
        return (gt, np.asarray(ids, np.int64), np.concatenate(scores) if scores else np.zeros(0),
                np.concatenate(boxes) if boxes else np.zeros((0, 4)))

    def _write(self, results: dict, metrics: dict) -> None:
        """voc_metrics.json, per_class_ap.txt, and (protocol voc) one devkit result file per class,
        ``voc_results/comp4_det_test_<class>.txt``: ``<image> <score> <xmin> <ymin> <xmax> <ymax>`` in
        the devkit's 1-based inclusive convention (``x1 + 1, y1 + 1, x2, y2``)."""
        os.makedirs(self.output_dir, exist_ok=True)
        write_json_atomic(os.path.join(self.output_dir, "voc_metrics.json"), metrics)
        _write_text(os.path.join(self.output_dir, "per_class_ap.txt"), format_voc_per_class_table(metrics) + "\n")
        if self.protocol != "voc":
            return
        folder = os.path.join(self.output_dir, "voc_results")
        os.makedirs(folder, exist_ok=True)
        for label, name in enumerate(self.class_names, start=1):
            lines = []
            for image_id in sorted(results):
                boxes, scores, labels = results[image_id]
                image_name = self.image_names.get(image_id, str(image_id))
                for (x1, y1, x2, y2), score in zip(boxes[labels == label], scores[labels == label]):
                    lines.append(f"{image_name} {score:.6f} {x1 + 1:.1f} {y1 + 1:.1f} {x2:.1f} {y2:.1f}\n")
            _write_text(os.path.join(folder, f"comp4_det_test_{name}.txt"), "".join(lines))


def _mean(values) -> float:
    defined = [v for v in values if v >= 0]
    return float(np.mean(defined)) if defined else -1.0


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
