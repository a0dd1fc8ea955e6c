"""The optional R-CNN stage of the localization entry (appendix C): RoI-centric re-scoring.

The trained per-class RPN proposes, on every training image, its top ``proposals_per_image`` boxes for
the image's class (one scale, NMS 0.7); with the ground-truth boxes added, each proposal is a training
RoI: positive when its IoU with a box of the image's class is >= ``fg_iou_thresh``. The image region
of a RoI is cropped, warped to ``crop_size`` squared and fed to a classification network (initialised
from the classifier) that ends in two sibling fc layers, per class: K logistic scores and K*4 box
deltas. Mini-batches are drawn RoI-centric (RoIs from many images) with a fixed positive fraction; the
loss is logistic on the RoI's class channel and smooth L1 on that class's regressor for positives.
At test time the RPN's top boxes for each guessed class are re-scored and re-regressed, and the best
re-scored box is the guess.
"""
from __future__ import annotations

import json
import os

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.ops import box_iou

from backbones import load_backbone_weights, read_backbone_checkpoint, resnet_from_arch
from backbones.engine.config import ConfigError, to_yaml
from backbones.engine.dist import all_gather_object, barrier, get_rank, get_world_size, is_main_process
from backbones.engine.imageio import read_image_rgb
from backbones.engine.precision import advance_schedule, optimizer_step
from backbones.engine.run import LossWindow, progress_bar
from backbones.engine.preemption import after_step
from backbones.engine.solver import scaled_lr
from backbones.engine.state import (should_resume, atomic_save, load_checkpoint, restore_training_state, rng_state,
                                    training_state)
from backbones.pretraining.evaluate import normalize
from detection.modeling.box_coder import BoxCoder
from detection.modeling.box_ops import clip_boxes, smooth_l1
from detection.modeling.rpn import filter_proposals

from .data import boxes_to_original, dense_view

CHECKPOINT = "rcnn_last.pth"
ROI_DIR = "rcnn_rois"
# pos / neg (the foreground and background RoIs' indices) follow from fg, but are stored so that no rank
# has to build them in its own memory at ILSVRC scale.
ROI_TABLE_FIELDS = ("record", "box", "fg", "target", "pos", "neg")


class RCNNNet(nn.Module):
    """A ResNet (global average pooling) with per-class cls (K) and reg (K*4) fc layers."""

    def __init__(self, resnet: nn.Module, num_classes: int):
        super().__init__()
        self.body = resnet
        self.cls_score = nn.Linear(resnet.num_features, num_classes)
        self.bbox_pred = nn.Linear(resnet.num_features, num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.body(x)
        return self.cls_score(f), self.bbox_pred(f).view(f.shape[0], -1, 4)


def build_rcnn_net(classifier_ckpt: dict, num_classes: int) -> RCNNNet:
    resnet = resnet_from_arch(dict(classifier_ckpt["arch"], num_classes=0), norm="bn")
    load_backbone_weights(resnet, classifier_ckpt, source="model.classifier")
    return RCNNNet(resnet, num_classes)


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
        self.records, self.table, self.crop_size, self.box_coder = records, table, crop_size, box_coder

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
            crop = crop[:, ::-1]
            deltas = deltas * torch.tensor([-1.0, 1.0, 1.0, 1.0])
        return (torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).contiguous(), r.label,
                bool(self.table["fg"][index]), deltas)


def collate_rois(batch):
    return (torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch]),
            torch.tensor([b[2] for b in batch]), torch.stack([b[3] for b in batch]))


def rcnn_losses(logits, deltas, classes, fg, targets, beta: float = 1.0) -> dict[str, torch.Tensor]:
    """Logistic loss on each RoI's class channel; smooth L1 on that class's regressor for the positives,
    both over the number of RoIs."""
    rows = torch.arange(len(classes), device=logits.device)
    loss_cls = F.binary_cross_entropy_with_logits(logits[rows, classes].float(), fg.float())
    loss_loc = smooth_l1(deltas[rows, classes][fg], targets[fg], beta).sum() / max(len(classes), 1)
    return {"loss_rcnn_cls": loss_cls, "loss_rcnn_loc": loss_loc}


class Rescorer:
    """Test time: the R-CNN's scores and refined boxes for one image's boxes of one class."""

    def __init__(self, net: RCNNNet, crop_size: int, box_coder: BoxCoder, mean, std, device, topk: int,
                 amp_dtype=None, chunk: int = 64):
        self.net, self.crop_size, self.box_coder, self.device = net, crop_size, box_coder, device
        self.mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.topk, self.amp_dtype, self.chunk = topk, amp_dtype, chunk

    @torch.no_grad()
    def __call__(self, image: np.ndarray, cls: int, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.net.eval()
        out_boxes, out_scores = [], []
        for start in range(0, len(boxes), self.chunk):
            b = boxes[start:start + self.chunk].float()
            crops = torch.from_numpy(warp_crops(image, b.cpu().numpy(), self.crop_size)).permute(0, 3, 1, 2)
            x = normalize(crops.to(self.device), self.mean_t, self.std_t)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                logits, deltas = self.net(x)
            out_scores.append(logits[:, cls].float().sigmoid())
            refined = self.box_coder.decode(deltas[:, cls].float(), b.to(self.device))
            out_boxes.append(clip_boxes(refined, image.shape[:2]))
        return torch.cat(out_boxes), torch.cat(out_scores)


def _lr_factor(it: int, r) -> float:
    factor = 0.1 ** sum(it >= s for s in r.steps)
    if it < r.warmup_iters:
        factor *= 0.001 + 0.999 * it / r.warmup_iters
    return factor


def train_rcnn(cfg, run, loc_model, train_records, class_names, mean, std, device, amp_dtype):
    """Proposals, RoI table, RoI-centric training (resumable from checkpoints/rcnn_last.pth); returns the
    test-time rescorer and a summary."""
    r, log = cfg.rcnn, run.logger
    world_size, rank = get_world_size(), get_rank()
    if r.batch_size % world_size:
        raise ValueError(f"rcnn.batch_size={r.batch_size} must be divisible by the {world_size} processes")
    table = build_roi_table(loc_model, train_records, cfg, mean, std, device, amp_dtype, run.checkpoint_dir)
    box_coder = BoxCoder(list(r.bbox_reg_weights))
    clf_ckpt = read_backbone_checkpoint(cfg.model.classifier)
    net = build_rcnn_net(clf_ckpt, len(class_names)).to(device)
    ddp_net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None) \
        if world_size > 1 else net
    lr = scaled_lr(r)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=cfg.solver.momentum,
                                weight_decay=cfg.solver.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: _lr_factor(it, r))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.solver.amp == "fp16")
    checkpoint = os.path.join(run.checkpoint_dir, CHECKPOINT)
    start = 0
    if should_resume(cfg.resume, checkpoint, required=False):  # the RPN stage may be all there is
        start = restore_training_state(checkpoint, net, optimizer, scheduler, scaler, rank)["iteration"]
        log.info("R-CNN stage resumed from %s at iteration %d", checkpoint, start)
    log.info("R-CNN stage: %d RoIs (%.1f%% foreground) from %d images, batch %d, lr %.4f, %d iterations",
             len(table["fg"]), 100 * table["fg"].mean(), len(train_records), r.batch_size, lr, r.max_iter)

    def save(iteration):
        rngs = all_gather_object(rng_state())
        if is_main_process():
            atomic_save(training_state(net, optimizer, scheduler, scaler, iteration, rngs, config=to_yaml(cfg),
                                       class_names=list(class_names)), checkpoint)

    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    sampler = RoIBatchSampler(table["pos"], table["neg"], r.batch_size // world_size, r.positive_fraction, cfg.seed,
                              start, r.max_iter)
    loader = DataLoader(RoIDataset(train_records, table, r.crop_size, box_coder), batch_sampler=sampler,
                        num_workers=cfg.data.workers, collate_fn=collate_rois, pin_memory=device.type == "cuda")
    net.train()
    iteration, window = start, LossWindow()
    progress = progress_bar(total=r.max_iter, initial=start, desc="train_rcnn")
    for crops, classes, fg, targets in loader:
        x = normalize(crops.to(device, non_blocking=True), mean_t, std_t)
        classes, fg, targets = classes.to(device), fg.to(device), targets.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits, deltas = ddp_net(x)
        losses = rcnn_losses(logits, deltas, classes, fg, targets)
        optimizer_step(sum(losses.values()), optimizer, scaler, None, iteration=iteration, losses=losses,
                       hint="R-CNN stage: lower rcnn.base_lr")
        advance_schedule(scheduler)
        iteration += 1
        progress.update(1)
        window.add(losses, len(crops))
        # the R-CNN stage's iterations count on from the RPN's for debug_stop_at_iter
        after_step(iteration, device, save, checkpoint, cfg.debug_stop_at_iter, cfg.solver.max_iter + iteration)
        if iteration % cfg.log_period == 0 or iteration == r.max_iter:
            avg, rois_s = window.flush(device)
            progress.set_postfix(loss=f"{avg['loss']:.3f}", rois_s=f"{rois_s:.0f}")
            run.log_metrics(iteration, dict(avg, lr=optimizer.param_groups[0]["lr"], rois_per_s=rois_s),
                            prefix="train_rcnn/")
        if (cfg.checkpoint_period and iteration % cfg.checkpoint_period == 0) or iteration == r.max_iter:
            save(iteration)
    progress.close()
    if start >= r.max_iter:
        log.info("the R-CNN stage finished training earlier (%s)", checkpoint)
    rescorer = Rescorer(net, r.crop_size, box_coder, mean, std, device, r.test_topk or r.proposals_per_image, amp_dtype)
    summary = {"iterations": iteration, "rois": int(len(table["fg"])), "foreground_fraction": float(table["fg"].mean()),
               "checkpoint": checkpoint}
    return rescorer, summary


def load_rescorer(cfg, run_dir, classifier_ckpt, num_classes, mean, std, device, amp_dtype) -> Rescorer:
    path = os.path.join(run_dir, "checkpoints", CHECKPOINT)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: the run has rcnn.enabled but no R-CNN checkpoint; finish training with "
                                "tools/train_loc.py <config> resume=true, or evaluate without it: rcnn.enabled=false")
    net = build_rcnn_net(classifier_ckpt, num_classes)
    net.load_state_dict(load_checkpoint(path)["model"])
    net.to(device)
    return Rescorer(net, cfg.rcnn.crop_size, BoxCoder(list(cfg.rcnn.bbox_reg_weights)), mean, std, device,
                    cfg.rcnn.test_topk or cfg.rcnn.proposals_per_image, amp_dtype)
