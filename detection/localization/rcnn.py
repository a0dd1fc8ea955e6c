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

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from backbones.engine.errors import CheckpointError, ConfigError
from backbones import load_backbone_weights, read_backbone_checkpoint, resnet_from_arch
from backbones.engine.config import to_yaml
from backbones.engine.loader import run_loader
from backbones.engine.dist import all_gather_object, get_rank, get_world_size, is_main_process
from backbones.engine.solver import lr_multiplier, scaled_lr
from backbones.engine.trainer import Trainer, distribute, sgd
from backbones.engine.state import (should_resume, atomic_save, keyed_generator, load_checkpoint, restore_training_state,
                                    rng_state, training_state)
from backbones.imagedata import normalize
from detection.modeling.box_coder import BoxCoder
from detection.modeling.box_ops import clip_boxes, smooth_l1

from .rcnn_data import RoIBatchSampler, RoIDataset, build_roi_table, collate_rois, warp_crops

CHECKPOINT = "rcnn_last.pth"
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


def train_rcnn(cfg, run, loc_model, train_records, class_names, mean, std, device, amp_dtype):
    """Proposals, RoI table, RoI-centric training (resumable from checkpoints/rcnn_last.pth); returns the
    test-time rescorer and a summary."""
    r, log = cfg.rcnn, run.logger
    world_size, rank = get_world_size(), get_rank()
    if r.batch_size % world_size:
        raise ConfigError(f"rcnn.batch_size={r.batch_size} must be divisible by the {world_size} processes")
    table = build_roi_table(loc_model, train_records, cfg, mean, std, device, amp_dtype, run.checkpoint_dir)
    box_coder = BoxCoder(list(r.bbox_reg_weights))
    clf_ckpt = read_backbone_checkpoint(cfg.model.classifier)
    net = build_rcnn_net(clf_ckpt, len(class_names)).to(device)
    ddp_net = distribute(net, device, world_size, compile=cfg.solver.compile)
    lr = scaled_lr(r)
    optimizer, scheduler, scaler = sgd(net.parameters(), lr, cfg.solver.momentum, cfg.solver.weight_decay,
                                       lambda it: lr_multiplier(it, r.steps, 0.1, r.warmup_iters), device, cfg.solver.amp)
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
    def loader(epoch: int, offset: int) -> DataLoader:  # one sampler for the whole stage, from `offset` on
        sampler = RoIBatchSampler(table["pos"], table["neg"], r.batch_size // world_size, r.positive_fraction,
                                  cfg.seed, offset, r.max_iter)
        return run_loader(RoIDataset(train_records, table, r.crop_size, box_coder), sampler, collate_rois,
                          cfg.data.workers, device, keyed_generator(cfg.seed, offset, rank))

    def prepare(batch, iteration: int):
        crops, classes, fg, targets = batch
        x = normalize(crops.to(device, non_blocking=True), mean_t, std_t)
        return (x, classes.to(device), fg.to(device), targets.to(device)), len(crops), 0

    def forward(inputs) -> dict:
        x, classes, fg, targets = inputs
        logits, deltas = ddp_net(x)
        with torch.autocast(device.type, enabled=False):  # the losses outside autocast, as they always were
            return rcnn_losses(logits, deltas, classes, fg, targets)

    trainer = Trainer(model=net, optimizer=optimizer, scheduler=scheduler, scaler=scaler, device=device,
                      amp_dtype=amp_dtype, run=run, max_iter=r.max_iter, iters_per_epoch=r.max_iter, loader=loader,
                      prepare=prepare, forward=forward, save_state=save, checkpoint=checkpoint,
                      log_period=cfg.log_period, checkpoint_period=cfg.checkpoint_period, sync_empty_batches=False,
                      # the R-CNN stage's iterations count on from the RPN's for debug_stop_at_iter
                      debug_stop_at_iter=cfg.debug_stop_at_iter, debug_iteration_offset=cfg.solver.max_iter,
                      metrics_prefix="train_rcnn/", rate_name="rois_per_s", desc="train_rcnn",
                      hint="R-CNN stage: lower rcnn.base_lr")
    iteration = trainer.train(start)
    if start >= r.max_iter:
        log.info("the R-CNN stage finished training earlier (%s)", checkpoint)
    rescorer = Rescorer(net, r.crop_size, box_coder, mean, std, device, r.test_topk or r.proposals_per_image, amp_dtype)
    summary = {"iterations": iteration, "rois": int(len(table["fg"])), "foreground_fraction": float(table["fg"].mean()),
               "checkpoint": checkpoint}
    return rescorer, summary


def load_rescorer(cfg, run_dir, classifier_ckpt, num_classes, mean, std, device, amp_dtype) -> Rescorer:
    path = os.path.join(run_dir, "checkpoints", CHECKPOINT)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: the run has rcnn.enabled but no R-CNN checkpoint; finish training with "
                                "tools/train_loc.py <config> resume=true, or evaluate without it: rcnn.enabled=false")
    net = build_rcnn_net(classifier_ckpt, num_classes)
    net.load_state_dict(load_checkpoint(path)["model"])
    net.to(device)
    return Rescorer(net, cfg.rcnn.crop_size, BoxCoder(list(cfg.rcnn.bbox_reg_weights)), mean, std, device,
                    cfg.rcnn.test_topk or cfg.rcnn.proposals_per_image, amp_dtype)
