"""COCO box evaluation with pycocotools, gathered over DDP ranks.

pycocotools is the judge: detections are converted to COCO results (xywh, original category ids) and
scored by ``COCOeval`` exactly as the COCO leaderboard does; metrics are returned as fractions in [0, 1]
with pycocotools' -1 for "undefined" (no ground truth in that area range or class).
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import io
import logging
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from backbones.engine.dist import all_gather_object, get_rank
from backbones.engine.preemption import ignore_stop_signals
from backbones.engine.run import write_json_atomic

from .tables import METRIC_NAMES, format_per_class_table

logger = logging.getLogger(__name__)

PR_CURVES_FILE = "pr_curves.npz"  # precision [IoU .50:.05:.95, 101 recall points, class], and cat_ids
# COCOeval.stats, in its order


class COCOEvaluator:
    """Collects detections with :meth:`process` on every rank; :meth:`evaluate` scores them on rank 0.

    ``coco_gt`` is a pycocotools ``COCO`` (e.g. ``CocoDetection.coco``) or the path of the instances json.
    ``contiguous_to_cat_id`` maps the model's labels 1..K back to the json's category ids.

    Every image of ``coco_gt`` is scored: one that was never processed (it could not be read) counts as
    an image with no detections, so its objects are misses and the AP is the AP of the whole set; the
    metrics say how many there were (``num_unprocessed``). ``only_processed=True`` scores just the
    images handed to :meth:`process`, for a deliberate subset.

    ``class_agnostic=True`` also scores the boxes with every class merged (pycocotools' ``useCats=0``),
    under ``metrics["class_agnostic"]``: how well objects are found and boxed whatever their label, which
    tells box errors from classification errors.

    An image's ``unscored_category_ids`` (ImageNet DET's validation blacklist, :mod:`detection.data.voc`)
    are classes not scored in it: its detections of them are dropped (their ground truth is not in the set).

    ``workers`` > 1 scores the categories in that many forked processes (:func:`score_by_category`): the
    same numbers, to the bit, in a fraction of the time that pycocotools takes alone on a large set.
    """

    name = "coco"  # the key its metrics take when it runs beside another evaluator

    def __init__(self, coco_gt, contiguous_to_cat_id: dict[int, int], class_names: list[str],
                 output_dir: str | None = None, only_processed: bool = False, class_agnostic: bool = False,
                 workers: int = 1):
        self.coco_gt = coco_gt if isinstance(coco_gt, COCO) else _quiet(COCO, os.fspath(coco_gt))
        _complete_ground_truth(self.coco_gt)
        self.contiguous_to_cat_id = {int(k): int(v) for k, v in contiguous_to_cat_id.items()}
        self.cat_id_to_name = {self.contiguous_to_cat_id[label]: name for label, name in enumerate(class_names, 1)}
        self.output_dir = output_dir
        self.only_processed = only_processed
        self.class_agnostic = class_agnostic
        self.workers = workers
        self.unscored = {img_id: set(img["unscored_category_ids"]) for img_id, img in self.coco_gt.imgs.items()
                         if img.get("unscored_category_ids")}
        self.reset()

    def reset(self) -> None:
        self._results: dict[int, list[dict]] = {}  # image id -> its COCO results; keyed so repeats count once
        self._curves: dict | None = None

    def process(self, targets: list[dict], detections: list[dict]) -> None:
        """Record one batch. ``detections[i]`` has ``boxes`` (xyxy, original image pixels), ``scores`` and
        ``labels`` (1..K) for the image ``targets[i]["image_id"]``; images without detections count too."""
        for target, det in zip(targets, detections):
            image_id = int(target["image_id"])
            boxes = _to_numpy(det["boxes"]).reshape(-1, 4).astype(np.float64)
            scores, labels = _to_numpy(det["scores"]).reshape(-1), _to_numpy(det["labels"]).reshape(-1)
            cat_ids = [self.contiguous_to_cat_id[int(label)] for label in labels]
            unscored = self.unscored.get(image_id, ())
            self._results[image_id] = [
                {"image_id": image_id, "category_id": cat_id,
                 "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], "score": float(score)}
                for (x1, y1, x2, y2), score, cat_id in zip(boxes, scores, cat_ids) if cat_id not in unscored
            ]

    def evaluate(self) -> dict:
        """Gather every rank's results and score them on rank 0 (other ranks return {}): every image of
        the annotation file, or with ``only_processed`` the processed ones."""
        merged: dict[int, list[dict]] = {}
        for part in all_gather_object(self._results):
            merged.update(part)
        if get_rank() != 0:
            return {}
        results = [r for image_results in merged.values() for r in image_results]
        image_ids = sorted(merged) if self.only_processed else sorted(self.coco_gt.getImgIds())
        unprocessed = len(set(image_ids) - set(merged))
        if unprocessed:
            logger.warning("COCOEvaluator: %d of the %d images scored were not processed (unreadable?); they "
                           "count as images without detections", unprocessed, len(image_ids))
        metrics = self._score(results, image_ids)
        metrics.update(num_images=len(image_ids), num_unprocessed=unprocessed)
        if self.output_dir:
            self._write(results, metrics)
        return metrics

    def _score(self, results: list[dict], image_ids: list[int]) -> dict:
        if not image_ids:
            logger.warning("COCOEvaluator: no image was processed; every metric is -1")
            return {**{name: -1.0 for name in METRIC_NAMES},
                    "per_class_AP": {name: -1.0 for name in self.cat_id_to_name.values()}}
        # loadRes adds area, id and segmentation to the dicts it is given: hand it copies
        coco_dt = _quiet(self.coco_gt.loadRes, [dict(r) for r in results]) if results else _empty_results(self.coco_gt)
        coco_eval = self._cocoeval(coco_dt, image_ids, use_categories=True)
        metrics = {name: float(v) for name, v in zip(METRIC_NAMES, coco_eval.stats)}
        metrics["per_class_AP"] = self._per_class_ap(coco_eval)
        if self.class_agnostic:
            agnostic = self._cocoeval(coco_dt, image_ids, use_categories=False)
            metrics["class_agnostic"] = {name: float(v) for name, v in zip(METRIC_NAMES, agnostic.stats)}
        # the PR curves behind those numbers (all areas, 100 detections), for the evaluation page
        self._curves = {"precision": coco_eval.eval["precision"][:, :, :, 0, -1],
                        "cat_ids": np.asarray(coco_eval.params.catIds)}
        return metrics

    def _cocoeval(self, coco_dt: COCO, image_ids: list[int], use_categories: bool) -> COCOeval:
        coco_eval = COCOeval(self.coco_gt, coco_dt, iouType="bbox")
        coco_eval.params.imgIds = image_ids
        coco_eval.params.useCats = int(use_categories)
        score_by_category(coco_eval, self.workers)
        _quiet(coco_eval.summarize)
        return coco_eval

    def _per_class_ap(self, coco_eval: COCOeval) -> dict[str, float]:
        """AP at IoU .50:.95, all areas, 100 detections, per category (-1 for one without ground truth)."""
        precision = coco_eval.eval["precision"]  # [IoU thresholds, recall points, categories, areas, max dets]
        per_class = {}
        for k, cat_id in enumerate(coco_eval.params.catIds):
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            per_class[self.cat_id_to_name.get(cat_id, str(cat_id))] = float(p.mean()) if p.size else -1.0
        return per_class

    def _write(self, results: list[dict], metrics: dict) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        write_json_atomic(os.path.join(self.output_dir, "coco_results.json"), results)
        write_json_atomic(os.path.join(self.output_dir, "coco_metrics.json"), metrics)
        if self._curves is not None:
            np.savez(os.path.join(self.output_dir, PR_CURVES_FILE), **self._curves)
        path = os.path.join(self.output_dir, "per_class_ap.txt")
        with open(f"{path}.tmp.{os.getpid()}", "w", encoding="utf-8") as f:
            f.write(format_per_class_table(metrics["per_class_AP"]) + "\n")
        os.replace(f"{path}.tmp.{os.getpid()}", path)


_SHARED: COCOeval | None = None  # the evaluation a forked scoring process reads (inherited, not pickled)


def score_by_category(coco_eval: COCOeval, workers: int) -> None:
    """``coco_eval.evaluate()`` and ``accumulate()`` with the categories shared out over ``workers`` forked
    processes; ``coco_eval.eval`` then holds what one process would have computed, bit for bit.

    pycocotools matches and accumulates every category on its own (a category's precision and recall read
    only its own detections and ground truth), so each process scores some categories over all images and
    sends back its slices of the precision, recall and score arrays (about 0.2 MB a category; the per-image
    match records, ``evalImgs``, stay in the processes and are not kept). Categories go out largest first to
    whichever process is free, since their sizes differ widely (COCO's person has about a quarter of the
    boxes, which bounds the gain). Forked processes on Linux only (elsewhere forking a process that holds
    CUDA or the Objective-C runtime is unsafe or impossible): there, with one worker, and for the
    class-agnostic scoring (``useCats=0``: one category), it scores in this process.
    """
    p = coco_eval.params
    p.imgIds, p.catIds = list(np.unique(p.imgIds)), list(np.unique(p.catIds))  # as evaluate() does
    if workers < 2 or not p.useCats or len(p.catIds) < 2 or not sys.platform.startswith("linux"):
        _quiet(coco_eval.evaluate)
        _quiet(coco_eval.accumulate)
        return
    images = set(p.imgIds)
    size = {c: 0 for c in p.catIds}
    for coco in (coco_eval.cocoGt, coco_eval.cocoDt):
        for ann in coco.anns.values():
            if ann["category_id"] in size and ann["image_id"] in images:
                size[ann["category_id"]] += 1
    order = sorted(p.catIds, key=lambda c: -size[c])
    T, R, K, A, M = len(p.iouThrs), len(p.recThrs), len(p.catIds), len(p.areaRng), len(p.maxDets)
    precision, scores = -np.ones((T, R, K, A, M)), -np.ones((T, R, K, A, M))
    recall = -np.ones((T, K, A, M))
    column = {c: k for k, c in enumerate(p.catIds)}
    global _SHARED
    _SHARED = coco_eval
    try:
        # processes that leave stop signals to this one (it checkpoints), so none is sent to end them: the
        # executor's shutdown tells them to exit once the queued categories are done, which takes seconds
        with ProcessPoolExecutor(min(workers, K), mp_context=multiprocessing.get_context("fork"),
                                 initializer=ignore_stop_signals) as pool:
            for done in as_completed([pool.submit(_score_category, cat_id) for cat_id in order]):
                cat_id, part = done.result()
                k = column[cat_id]
                precision[:, :, k], recall[:, k], scores[:, :, k] = part
    finally:
        _SHARED = None
    coco_eval._paramsEval = copy.deepcopy(p)
    coco_eval.eval = {"params": p, "counts": [T, R, K, A, M], "precision": precision, "recall": recall,
                      "scores": scores, "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")}


def _score_category(cat_id: int):
    """In a forked process: one category's precision [T, R, A, M], recall [T, A, M], scores [T, R, A, M]."""
    one = COCOeval(_SHARED.cocoGt, _SHARED.cocoDt, iouType="bbox")
    one.params = copy.deepcopy(_SHARED.params)
    one.params.catIds = [cat_id]
    _quiet(one.evaluate)
    _quiet(one.accumulate)
    e = one.eval
    return cat_id, (e["precision"][:, :, 0], e["recall"][:, 0], e["scores"][:, :, 0])


def _complete_ground_truth(coco: COCO) -> None:
    """COCOeval needs ``area`` and ``iscrowd`` on every annotation; COCO-format files from other tools
    sometimes omit them. Fill in the box area and "not crowd" where missing."""
    for ann in coco.dataset.get("annotations", []):
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
        ann.setdefault("iscrowd", 0)


def _empty_results(coco_gt: COCO) -> COCO:
    """A results object with no detection (``loadRes`` rejects an empty list)."""
    coco_dt = COCO()
    coco_dt.dataset = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
                       "annotations": []}
    _quiet(coco_dt.createIndex)
    return coco_dt


def _quiet(fn, *args):
    """Run a pycocotools call without its progress prints."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def _to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
