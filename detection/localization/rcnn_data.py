"""The R-CNN stage's data (appendix C): proposals of the trained per-class RPN on every training image,
the RoI table built from them once (memory-mapped by every rank), RoI-centric batches of warped crops.
The network, its losses and its training are in :mod:`detection.localization.rcnn`."""
from __future__ import annotations

import json
import os

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torchvision.ops import box_iou

from backbones.engine.config import ConfigError
from backbones.engine.dist import barrier, get_rank, get_world_size, is_main_process
from backbones.engine.imageio import chw_tensor, read_image_rgb
from backbones.engine.loader import packed
from backbones.engine.run import progress_bar
from backbones.imagedata import normalize
from detection.modeling.box_coder import BoxCoder
from detection.modeling.rpn import filter_proposals

from .data import boxes_to_original, dense_view

ROI_DIR = "rcnn_rois"
# pos / neg (the foreground and background RoIs' indices) follow from fg, but are stored so that no rank
# has to build them in its own memory at ILSVRC scale.
ROI_TABLE_FIELDS = ("record", "box", "fg", "target", "pos", "neg")


def warp_crops(image: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """(n, size, size, 3): each box's region (at least one pixel) resized to a square, as R-CNN warps."""
    h, w = image.shape[:2]
    out = np.empty((len(boxes), size, size, 3), np.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        x1, y1 = int(np.clip(np.floor(x1), 0, w - 1)), int(np.clip(np.floor(y1), 0, h - 1))
        x2, y2 = int(np.clip(np.ceil(x2), x1 + 1, w)), int(np.clip(np.ceil(y2), y1 + 1, h))
        out[i] = cv2.resize(image[y1:y2, x1:x2], (size, size), interpolation=cv2.INTER_LINEAR)
    return out


@torch.no_grad()
def propose(loc_model, records, cfg, mean, std, device, amp_dtype) -> dict[int, np.ndarray]:
    """The per-class RPN's top proposals for each record's own class, for this rank's share of the records
    (record index -> boxes)."""
    loc_model.eval()
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    mine = {}
    indices = list(range(get_rank(), len(records), get_world_size()))
    for i in progress_bar(iterable=indices, desc="rcnn proposals"):
        r = records[i]
        image = read_image_rgb(r.path)
        view_image, view = dense_view(image, cfg.rcnn.proposal_scale)
        x = normalize(torch.from_numpy(view_image).permute(2, 0, 1)[None].to(device), mean_t, std_t)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            (boxes, scores), = loc_model.rpn.class_candidates(loc_model.features(x), [r.label], view_image.shape[:2],
                                                             cfg.eval.pre_nms_topk)
        boxes = boxes_to_original(boxes.float(), view, image.shape[:2])
        boxes, _ = filter_proposals(boxes, scores.float(), torch.zeros(len(scores), dtype=torch.long, device=device),
                                    image.shape[:2], cfg.eval.nms_thresh, cfg.rcnn.proposals_per_image)
        # In the XML's pixels, like the records' boxes.
        boxes = boxes.cpu().numpy() * np.array([r.width / image.shape[1], r.height / image.shape[0]] * 2, np.float32)
        mine[i] = boxes.astype(np.float32)
    return mine


def roi_table(records, proposals, fg_iou_thresh: float) -> dict[str, np.ndarray]:
    """Every (image, box) RoI with its foreground flag and matched ground-truth box (gt boxes included)."""
    rec, boxes, fg, targets = [], [], [], []
    for i, (r, props) in enumerate(zip(records, proposals)):
        gt = r.boxes[r.box_labels == r.label]
        cand = np.concatenate([props.reshape(-1, 4), gt])
        iou = box_iou(torch.from_numpy(cand), torch.from_numpy(gt)).numpy()
        best = iou.argmax(1)
        rec.append(np.full(len(cand), i, np.int32))
        boxes.append(cand)
        fg.append(iou.max(1) >= fg_iou_thresh)
        targets.append(gt[best])
    fg = np.concatenate(fg)
    return {"record": np.concatenate(rec), "box": np.concatenate(boxes).astype(np.float32), "fg": fg,
            "target": np.concatenate(targets).astype(np.float32), "pos": np.flatnonzero(fg), "neg": np.flatnonzero(~fg)}


def _save_npy(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.tmp.{os.getpid()}.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def build_roi_table(loc_model, records, cfg, mean, std, device, amp_dtype,
                    checkpoint_dir: str) -> dict[str, np.ndarray]:
    """The RoI table of the R-CNN stage, made once per run and stored as .npy files in
    ``<checkpoint_dir>/rcnn_rois`` that every rank and loader worker memory-maps.

    At ILSVRC scale (about 544k images x 200 proposals) the table is ~5 GB: gathering it through
    collectives and holding a copy per rank would not fit, so each rank writes its share of the
    proposals to a file, rank 0 assembles the table, and all ranks map the same pages. A resumed run
    finds the table complete and reads it back instead of proposing again."""
    root = os.path.join(checkpoint_dir, ROI_DIR)
    complete = os.path.join(root, "complete.json")
    made_with = {"records": len(records), "rcnn.proposals_per_image": cfg.rcnn.proposals_per_image,
                 "rcnn.proposal_scale": cfg.rcnn.proposal_scale, "rcnn.fg_iou_thresh": cfg.rcnn.fg_iou_thresh}
    if os.path.isfile(complete):
        with open(complete) as f:
            stored = json.load(f)
        if stored != made_with:
            changed = ", ".join(f"{k}: {stored.get(k)} -> {v}" for k, v in made_with.items() if stored.get(k) != v)
            raise ConfigError(f"{root}: the stored RoI table was made with other settings ({changed}); keep the "
                             f"run's settings, or delete {root} to propose again")
    else:
        os.makedirs(root, exist_ok=True)
        mine = propose(loc_model, records, cfg, mean, std, device, amp_dtype)
        order = sorted(mine)
        shard = os.path.join(root, f"proposals.rank{get_rank()}.npz")
        with open(shard + ".tmp", "wb") as f:
            np.savez(f, index=np.array(order, np.int64), counts=np.array([len(mine[i]) for i in order], np.int64),
                     boxes=np.concatenate([mine[i].reshape(-1, 4) for i in order] or [np.zeros((0, 4), np.float32)]))
        os.replace(shard + ".tmp", shard)
        barrier()
        if is_main_process():
            proposals: list[np.ndarray | None] = [None] * len(records)
            for rank in range(get_world_size()):
                part = os.path.join(root, f"proposals.rank{rank}.npz")
                with np.load(part) as z:
                    for i, chunk in zip(z["index"], np.split(z["boxes"], np.cumsum(z["counts"])[:-1])):
                        proposals[i] = chunk
                os.remove(part)
            for name, array in roi_table(records, proposals, cfg.rcnn.fg_iou_thresh).items():
                _save_npy(os.path.join(root, f"{name}.npy"), array)
            with open(complete + ".tmp", "w") as f:
                json.dump(made_with, f)
            os.replace(complete + ".tmp", complete)
        barrier()
    return {name: np.load(os.path.join(root, f"{name}.npy"), mmap_mode="r") for name in ROI_TABLE_FIELDS}


class RoIBatchSampler(Sampler[list[int]]):
    """RoI-centric batches: ``positive_fraction`` foreground RoIs, the rest background, drawn anew for every
    iteration from a generator seeded by (seed, iteration, rank), so resuming at any iteration is exact."""

    def __init__(self, pos: np.ndarray, neg: np.ndarray, batch_size: int, positive_fraction: float, seed: int,
                 start: int, stop: int):
        self.pos, self.neg = pos, neg  # indices of the foreground and background RoIs
        self.batch_size, self.positive_fraction, self.seed = batch_size, positive_fraction, seed
        self.start, self.stop, self.rank = start, stop, get_rank()

    def __len__(self):
        return max(0, self.stop - self.start)

    def __iter__(self):
        for it in range(self.start, self.stop):
            g = np.random.default_rng([self.seed, it, self.rank])
            n_pos = min(len(self.pos), int(round(self.batch_size * self.positive_fraction)))
            if not len(self.neg):
                n_pos = self.batch_size
            pos = g.choice(self.pos, n_pos, replace=n_pos > len(self.pos)) if n_pos else np.empty(0, np.int64)
            n_neg = self.batch_size - len(pos)
            neg = g.choice(self.neg, n_neg, replace=n_neg > len(self.neg)) if n_neg else np.empty(0, np.int64)
            flips = g.random(self.batch_size) < 0.5
            yield [(int(i), bool(f)) for i, f in zip(np.concatenate([pos, neg]), flips)]


class RoIDataset(Dataset):
    """(warped crop uint8 CxSxS, class, foreground, regression target (4,)) of one RoI, maybe mirrored."""

    def __init__(self, records, table, crop_size: int, box_coder: BoxCoder):
        self.records, self.table, self.crop_size, self.box_coder = packed(records), table, crop_size, box_coder

    def __len__(self):
        return len(self.table["box"])

    def __getitem__(self, item):
        index, flip = item
        r = self.records[int(self.table["record"][index])]
        image = read_image_rgb(r.path)
        sx, sy = image.shape[1] / r.width, image.shape[0] / r.height
        scale = np.array([sx, sy, sx, sy], np.float32)
        box, target = self.table["box"][index] * scale, self.table["target"][index] * scale
        crop = warp_crops(image, box[None], self.crop_size)[0]
        deltas = self.box_coder.encode(torch.from_numpy(target[None]), torch.from_numpy(box[None]))[0]
        if flip:  # a mirrored crop: the centre offset changes sign
            crop = cv2.flip(crop, 1)  # a new mirrored array (a reversed view would cost a slow strided copy)
            deltas = deltas * torch.tensor([-1.0, 1.0, 1.0, 1.0])
        return chw_tensor(crop), r.label, bool(self.table["fg"][index]), deltas


def collate_rois(batch):
    return (torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch]),
            torch.tensor([b[2] for b in batch]), torch.stack([b[3] for b in batch]))
