"""Localization testing: centre crop, or dense (the paper's fully-convolutional testing over the whole
image at several scales). The classifier guesses the classes (softmax averaged over the views); the
per-class RPN's boxes for each guessed class (and for the true class, for the oracle error) are mapped
back to the original image from every view, merged, NMS-ed, and the best one is the guess; with an
R-CNN stage, the top boxes are re-scored and re-regressed first. A fixed centre box with the same
class guesses (its size the best on the training boxes) is scored alongside as the baseline.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from backbones.engine.errors import ConfigError
from backbones.engine.dist import get_rank, get_world_size, is_main_process, reduce_sum
from backbones.engine.imageio import CorruptImageError, read_image_rgb
from backbones.engine.loader import packed, worker_loader
from backbones.engine.preemption import ignore_stop_signals, interruptible
from backbones.engine.run import progress_bar
from backbones.imagedata import ShardedSampler, normalize
from detection.modeling.rpn import filter_proposals
from torchvision.ops import box_iou

from .data import LocRecord, boxes_to_original, center_view, dense_view, image_boxes
from .metrics import COUNTS, centre_box, errors_from_counts, image_hits

MODES = ("center", "dense")


class LocEvalDataset(Dataset):
    def __init__(self, records: Sequence[LocRecord]):
        self.records = packed(records)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        record = self.records[index]
        try:
            image = read_image_rgb(record.path)
        except CorruptImageError:
            return index, None, None
        return index, image, image_boxes(record, image)


def _first(batch):
    return batch[0]


def make_views(image: np.ndarray, mode: str, eval_cfg, crop_size: int):
    if mode == "center":
        return [center_view(image, eval_cfg.test_resize, crop_size)]
    if mode == "dense":
        return [dense_view(image, s) for s in eval_cfg.dense_scales]
    raise ValueError(f"eval mode must be one of {MODES}, got {mode!r}")


@torch.no_grad()
def localize_image(loc_net, classifier, image: np.ndarray, mode: str, eval_cfg, crop_size: int, device, mean_t,
                   std_t, extra_classes: Sequence[int] = (), keep: int = 1, amp_dtype=None):
    """Class probabilities (K,) averaged over the views, the top-k classes, and for each of them and of
    ``extra_classes`` the merged (boxes, scores) in original pixels, best first (``keep`` per class)."""
    h0, w0 = image.shape[:2]
    views = make_views(image, mode, eval_cfg, crop_size)
    probs, per_view = 0.0, []
    for view_image, view in views:
        x = torch.from_numpy(view_image).permute(2, 0, 1)[None].to(device)
        x = normalize(x, mean_t, std_t)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            probs = probs + F.softmax(classifier(x).float(), dim=1)[0]
            features = loc_net.features(x)
        per_view.append((features, view, view_image.shape[:2]))
    probs = probs / len(views)
    top = probs.topk(min(eval_cfg.topk, probs.numel())).indices.tolist()
    classes = list(dict.fromkeys(top + [int(c) for c in extra_classes]))
    merged_boxes = {c: [] for c in classes}
    merged_scores = {c: [] for c in classes}
    for features, view, size in per_view:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            cands = loc_net.rpn.class_candidates(features, classes, tuple(size), eval_cfg.pre_nms_topk)
        for c, (boxes, scores) in zip(classes, cands):
            merged_boxes[c].append(boxes_to_original(boxes.float(), view, (h0, w0)))
            merged_scores[c].append(scores.float())
    result = {}
    for c in classes:
        boxes, scores = torch.cat(merged_boxes[c]), torch.cat(merged_scores[c])
        if eval_cfg.merge == "vote":
            boxes, scores = vote(boxes, scores, len(views), eval_cfg.iou_thresh)
        elif eval_cfg.merge != "max":
            raise ConfigError(f"eval.merge must be max or vote, got {eval_cfg.merge!r}")
        result[c] = filter_proposals(boxes, scores, torch.zeros(len(scores), dtype=torch.long, device=scores.device),
                                     (h0, w0), eval_cfg.nms_thresh, keep)
    return probs, top, result


def vote(boxes: torch.Tensor, scores: torch.Tensor, num_views: int, iou_thresh: float = 0.5
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates pooled over views and anchors, re-scored by agreement: each box's new score is the sum of
    the scores of the candidates that overlap it (IoU >= ``iou_thresh``, itself included) over the number of
    views, and its coordinates their score-weighted mean ("box voting"). A lone confident box from one
    scale then loses to a box that several scales and anchors agree on."""
    if len(boxes) == 0:
        return boxes, scores
    overlap = (box_iou(boxes, boxes) >= iou_thresh).float() * scores[None, :]  # (M, M): row i's voters
    weight = overlap.sum(1)
    return (overlap @ boxes) / weight[:, None], weight / num_views


@torch.no_grad()
def evaluate_localization(loc_net, classifier, records: Sequence[LocRecord], mode: str, eval_cfg, crop_size: int,
                          device, mean, std, *, baseline_fraction=(0.5, 0.5), rescorer: Callable | None = None,
                          workers: int = 2, amp_dtype=None, limit: int = 0, progress: bool = True) -> dict:
    """Localization and classification errors over ``records`` (sharded over ranks, counts summed).

    ``rescorer(image, cls, boxes) -> (boxes, scores)``: the R-CNN stage; its errors come under "rcnn".
    """
    was_training = loc_net.training
    loc_net.eval()
    classifier.eval()
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    records = list(records)[:limit] if limit else list(records)
    sampler = ShardedSampler(len(records), shuffle=False, rank=get_rank(), world_size=get_world_size(), pad=False)
    loader = worker_loader(LocEvalDataset(records), workers, batch_size=1, sampler=sampler, collate_fn=_first,
                           worker_init_fn=ignore_stop_signals)
    counts = {f"{p}{k}": 0 for p in ("", "baseline_", "rcnn_") for k in COUNTS}
    images = loc_images = skipped = 0
    keep = max(1, getattr(rescorer, "topk", 1)) if rescorer else 1
    # inside a training run, a stop signal ends the evaluation at the next image (the trainer checkpoints)
    for index, image, gt_boxes in progress_bar(iterable=interruptible(loader), total=len(loader),
                                               desc=f"eval {mode}",
                                               disable=not (progress and is_main_process())):
        if image is None:
            skipped += 1
            continue
        record = records[index]
        gt_boxes = torch.as_tensor(gt_boxes, device=device)
        gt_labels = torch.as_tensor(record.box_labels, device=device)
        _, top, per_class = localize_image(loc_net, classifier, image, mode, eval_cfg, crop_size, device, mean_t,
                                           std_t, [record.label], keep=keep, amp_dtype=amp_dtype)
        h, w = image.shape[:2]
        best = {c: (b[0] if len(b) else torch.zeros(4, device=device)) for c, (b, _) in per_class.items()}
        hits = image_hits(top, best, record.label, gt_boxes, gt_labels, eval_cfg.iou_thresh, eval_cfg.topk)
        base = centre_box(w, h, baseline_fraction).to(device)
        base_hits = image_hits(top, {c: base for c in per_class}, record.label, gt_boxes, gt_labels,
                               eval_cfg.iou_thresh, eval_cfg.topk)
        scored = [k for k in COUNTS if record.loc_scored or k.startswith("cls")]  # the blacklist: cls only
        for k in scored:
            counts[k] += hits[k]
            counts[f"baseline_{k}"] += base_hits[k]
        if rescorer is not None and record.loc_scored:
            refined = {}
            for c, (boxes, _) in per_class.items():
                if len(boxes):
                    new_boxes, scores = rescorer(image, c, boxes)
                    refined[c] = new_boxes[int(scores.argmax())]
                else:
                    refined[c] = best[c]
            r_hits = image_hits(top, refined, record.label, gt_boxes, gt_labels, eval_cfg.iou_thresh, eval_cfg.topk)
            for k in COUNTS:
                counts[f"rcnn_{k}"] += r_hits[k]
        images += 1
        loc_images += record.loc_scored
    totals = reduce_sum(dict(counts, images=images, loc_images=loc_images, skipped=skipped), device)
    n, m = int(totals["images"]), int(totals["loc_images"])
    out = errors_from_counts(totals, n, m)
    out["skipped_corrupt"] = int(totals["skipped"])

    def loc_errors(prefix: str) -> dict:  # the localization errors of another guesser's boxes
        errors = errors_from_counts({k: totals[f"{prefix}{k}"] for k in COUNTS}, n, m)
        return {k: v for k, v in errors.items() if k.endswith("_err") and not k.startswith("cls")}

    out["baseline_center_box"] = loc_errors("baseline_")
    out["baseline_center_box"]["box_fraction_wh"] = [round(float(f), 4) for f in baseline_fraction]
    if rescorer is not None:
        out["rcnn"] = loc_errors("rcnn_")
    loc_net.train(was_training)
    return out


def best_centre_fraction(records: Sequence[LocRecord], max_records: int = 20000) -> tuple[float, float]:
    """The fixed centre-box baseline's size: of centred boxes with width and height in 0.1 .. 1.0 of the
    image, the one that localizes the most training images (true class, IoU >= 0.5). IoU does not change
    when both boxes are scaled along an axis, so it is computed in image-relative coordinates."""
    step = max(1, len(records) // max_records)
    rel, owner = [], []
    for i, r in enumerate(records[::step]):
        b = r.boxes[r.box_labels == r.label] / np.array([r.width, r.height, r.width, r.height], np.float32)
        rel.append(b)
        owner.append(np.full(len(b), i))
    if not rel:
        return 0.5, 0.5
    rel, owner = np.concatenate(rel), np.concatenate(owner)
    n = int(owner.max()) + 1
    area = (rel[:, 2] - rel[:, 0]) * (rel[:, 3] - rel[:, 1])
    best, best_hits = (0.5, 0.5), -1
    grid = np.round(np.arange(1, 11) / 10, 2)
    for fw in grid:
        for fh in grid:
            c = np.array([(1 - fw) / 2, (1 - fh) / 2, (1 + fw) / 2, (1 + fh) / 2], np.float32)
            iw = (np.minimum(rel[:, 2], c[2]) - np.maximum(rel[:, 0], c[0])).clip(0)
            ih = (np.minimum(rel[:, 3], c[3]) - np.maximum(rel[:, 1], c[1])).clip(0)
            iou = iw * ih / (area + fw * fh - iw * ih)
            hit = np.zeros(n, bool)
            np.logical_or.at(hit, owner, iou >= 0.5)
            if hit.sum() > best_hits:
                best, best_hits = (float(fw), float(fh)), int(hit.sum())
    return best


def format_errors(mode: str, m: dict) -> str:
    lines = [f"{mode:>6}: loc err top-1 {100 * m['loc_top1_err']:.2f}%  top-5 {100 * m['loc_top5_err']:.2f}%  "
             f"GT-class {100 * m['oracle_err']:.2f}%  | cls err top-1 {100 * m['cls_top1_err']:.2f}%  "
             f"top-5 {100 * m['cls_top5_err']:.2f}%  ({m['images']} images"
             + (f"; boxes scored on {m['loc_images']}, the rest blacklisted"
                if m.get("loc_images", m["images"]) != m["images"] else "")
             + ")"]
    b = m["baseline_center_box"]
    lines.append(f"{'':>6}  centre-box baseline: loc err top-1 {100 * b['loc_top1_err']:.2f}%  top-5 "
                 f"{100 * b['loc_top5_err']:.2f}%  GT-class {100 * b['oracle_err']:.2f}%")
    if "rcnn" in m:
        r = m["rcnn"]
        lines.append(f"{'':>6}  with R-CNN: loc err top-1 {100 * r['loc_top1_err']:.2f}%  top-5 "
                     f"{100 * r['loc_top5_err']:.2f}%  GT-class {100 * r['oracle_err']:.2f}%")
    return "\n".join(lines)
