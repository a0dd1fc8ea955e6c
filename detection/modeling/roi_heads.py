"""The second stage of Faster R-CNN: classify each proposal and refine its box, per class.

``ROIHeads`` holds what both designs share:

* training targets: the ground-truth boxes are added to the proposals; each proposal is matched to
  its best ground truth (IoU >= 0.5 foreground with that object's class, below background, label 0;
  classes are 1..K); background proposals >= 0.7 inside a crowd box (intersection over the
  proposal's area) are left out; 512 RoIs per image are sampled with at most 25% foreground; box
  targets are encoded with weights (10, 10, 5, 5);
* ``FastRCNNOutputLayers``: the sibling classifier (K + 1 scores) and class-specific box regressor
  (4K), their losses and the inference post-processing.

``Res5ROIHeads`` is the ResNet paper's C4 head: 14x14 RoI features from res4, the backbone's res5
(whose first block halves them to 7x7), global average pooling. ``StandardROIHeads`` is the FPN head:
7x7 features from P2..P5, two 1024-d fully connected layers.

``global_context`` (appendix B of the ResNet paper): the whole image is pooled as one more RoI and run
through the same post-RoI layers; its feature is concatenated with every region's before the
sibling layers (which then take twice the features), trained end to end.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou

from backbones.resnet import is_channels_last

from .box_coder import BoxCoder
from .box_ops import (ImageSizes, batched_nms, box_iou_batched, clip_boxes, crowd_mask, nonempty, pad_stack,
                      sizes_follow_data, smooth_l1)
from .matcher import Matcher
from .nms_triton import NMS_KERNELS, nms_ranks_triton, takes_triton_nms
from .poolers import ROIPooler
from .sampling import sample_balanced


class FastRCNNOutputLayers(nn.Module):
    def __init__(self, in_features: int, num_classes: int, box_coder: BoxCoder | None = None,
                 smooth_l1_beta: float = 0.0, score_thresh: float = 0.05, nms_thresh: float = 0.5,
                 detections_per_img: int = 100, init: str = "normal", nms_kernel: str = "auto"):
        super().__init__()
        self.num_classes = num_classes
        self.cls_score = nn.Linear(in_features, num_classes + 1)  # index 0: background
        self.bbox_pred = nn.Linear(in_features, 4 * num_classes)  # class c (1..K) at columns 4(c-1)..4c-1
        if init == "normal":  # small, so the first steps start from uniform scores and zero deltas
            nn.init.normal_(self.cls_score.weight, std=0.01)
            nn.init.normal_(self.bbox_pred.weight, std=0.001)
            nn.init.zeros_(self.cls_score.bias)
            nn.init.zeros_(self.bbox_pred.bias)
        elif init != "linear_default":  # "linear_default": nn.Linear's own initialisation, as torchvision's
            raise ValueError(f"predictor init {init!r}: expected 'normal' or 'linear_default'")
        self.box_coder = box_coder or BoxCoder((10.0, 10.0, 5.0, 5.0))
        self.smooth_l1_beta = smooth_l1_beta
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        if nms_kernel not in NMS_KERNELS:
            raise ValueError(f"FastRCNNOutputLayers: nms_kernel must be one of {NMS_KERNELS}, got {nms_kernel!r}")
        self.nms_kernel = nms_kernel
        self.detections_per_img = detections_per_img

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.flatten(x, 1)
        return self.cls_score(x), self.bbox_pred(x)

    def losses(self, class_logits: torch.Tensor, box_deltas: torch.Tensor, labels: torch.Tensor,
               regression_targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-entropy over the sampled RoIs; box loss on foreground RoIs for their class, divided by
        the number of sampled RoIs. RoIs labelled -1 (sampling's padding) count nowhere. The foreground
        is weighted, not gathered with ``nonzero`` as in Detectron2, so the host never waits for the GPU."""
        loss_cls = F.cross_entropy(class_logits.float(), labels, ignore_index=-1)
        num_sampled = (labels >= 0).sum().clamp(min=1)
        fg = labels > 0
        rows = torch.arange(box_deltas.shape[0], device=box_deltas.device)
        deltas = box_deltas.view(box_deltas.shape[0], self.num_classes, 4)[rows, (labels - 1).clamp(min=0)]
        loss_box = smooth_l1(deltas, regression_targets, self.smooth_l1_beta)
        loss_box = torch.where(fg[:, None], loss_box, 0.0).sum() / num_sampled
        return {"loss_cls": loss_cls, "loss_box_reg": loss_box}

    def candidates(self, class_logits: torch.Tensor, box_deltas: torch.Tensor, proposals: Sequence[torch.Tensor],
                   image_sizes: ImageSizes) -> dict:
        """Post-processing's input: per-class decoded and clipped boxes (R, K, 4), foreground softmax scores
        (R, K), RoIs per image, and which RoIs are proposals (the RPN's padding has no area)."""
        counts = [p.shape[0] for p in proposals]  # not len(): a symbolic size under torch.export
        scores = F.softmax(class_logits.float(), dim=1)
        all_proposals = torch.cat(list(proposals))
        boxes = self.box_coder.decode(box_deltas.float(), all_proposals).view(-1, self.num_classes, 4)
        boxes = torch.cat([clip_boxes(b, size) for b, size in zip(boxes.split(counts), image_sizes)])
        return {"boxes": boxes, "scores": scores[:, 1:], "counts": counts, "score_thresh": self.score_thresh,
                "nms_thresh": self.nms_thresh, "detections_per_img": self.detections_per_img,
                "valid": nonempty(all_proposals)}

    @torch.no_grad()
    def inference(self, class_logits: torch.Tensor, box_deltas: torch.Tensor, proposals: Sequence[torch.Tensor],
                  image_sizes: ImageSizes) -> list[dict[str, torch.Tensor]]:
        """Per image: softmax scores, per-class decoded and clipped boxes, scores > ``score_thresh``,
        NMS per class, the ``detections_per_img`` best. Labels are 1..K. All images at once
        (``postprocess_batch``, or ``postprocess_padded`` with the Triton NMS); proposals without area (the
        RPN's padding) give no detection."""
        candidates = self.candidates(class_logits, box_deltas, proposals, image_sizes)
        if takes_triton_nms(self.nms_kernel):
            return postprocess_padded(**candidates).unpad()
        return postprocess_batch(**candidates)


def score_candidates(boxes: torch.Tensor, scores: torch.Tensor, score_thresh: float,
                     valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(roi_idx, cls_idx)`` of the (RoI, class) pairs above ``score_thresh``, among the RoIs whose boxes and
    scores are finite (and ``valid`` ones): post-processing's one ``nonzero``."""
    rows = torch.isfinite(boxes).all(dim=(1, 2)) & torch.isfinite(scores).all(dim=1)
    if valid is not None:
        rows = rows & valid
    return torch.nonzero(rows[:, None] & (scores > score_thresh), as_tuple=True)


def postprocess_batch(boxes: torch.Tensor, scores: torch.Tensor, counts: Sequence[int], score_thresh: float,
                      nms_thresh: float, detections_per_img: int, valid: torch.Tensor | None = None
                      ) -> list[dict[str, torch.Tensor]]:
    """The per-class boxes ``(R, K, 4)`` and foreground scores ``(R, K)`` of several images' RoIs (``counts``
    per image, concatenated) -> each image's detections: finite rows (and ``valid`` ones) with scores >
    ``score_thresh``, NMS per class, the ``detections_per_img`` best, sorted by decreasing score. Labels are
    1..K.

    Detectron2 and torchvision post-process one image at a time, each with a ``nonzero`` and an NMS the
    host waits for. Here the host waits three times per batch whatever its size: the candidates above the
    threshold (one ``nonzero``: the NMS's input size; feeding all R x K boxes instead would cost NMS the
    square of that), one NMS grouped by (image, class), and the number of detections per image, read once
    to split the result."""
    num_rois, num_classes = scores.shape
    device = scores.device
    roi_idx, cls_idx = score_candidates(boxes, scores, score_thresh, valid)
    image_ids = torch.cat([torch.full((c,), i, dtype=torch.int64, device=device) for i, c in enumerate(counts)])
    boxes, scores, images = boxes[roi_idx, cls_idx], scores[roi_idx, cls_idx], image_ids[roi_idx]
    keep = batched_nms(boxes, scores, images * num_classes + cls_idx, nms_thresh)
    if len(counts) == 1:  # (also what torch.export traces: one image, no split)
        per_image = [keep[:detections_per_img]]
    else:  # group the kept boxes by image, keeping NMS's order (decreasing score) within each
        by_image, order = torch.sort(images[keep], stable=True)
        keep = keep[order]
        kept_per_image = (by_image[None, :] == torch.arange(len(counts), device=device)[:, None]).sum(dim=1)
        per_image, start = [], 0
        for n in kept_per_image.tolist():
            per_image.append(keep[start:start + min(n, detections_per_img)])
            start += n
    return [{"boxes": boxes[k], "scores": scores[k], "labels": cls_idx[k] + 1} for k in per_image]


class PaddedDetections(NamedTuple):
    """Each image's detections as fixed-size tensors: ``boxes`` (B, D, 4), ``scores`` (B, D), ``labels``
    (B, D) 1..K, best first, of which the first ``counts`` (B,) are detections and the rest padding."""
    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    counts: torch.Tensor

    def unpad(self, copy: bool = False) -> list[dict[str, torch.Tensor]]:
        """Per image ``{"boxes", "scores", "labels"}`` of its detections: reading ``counts`` makes the host wait
        for the device, once. ``copy``: tensors of their own, not views (of a CUDA graph's outputs, which
        its next replay overwrites)."""
        take = (lambda t: t.clone()) if copy else (lambda t: t)
        return [{"boxes": take(b[:n]), "scores": take(s[:n]), "labels": take(lbl[:n])}
                for b, s, lbl, n in zip(self.boxes, self.scores, self.labels, self.counts.tolist())]


def postprocess_padded(boxes: torch.Tensor, scores: torch.Tensor, counts: Sequence[int], score_thresh: float,
                       nms_thresh: float, detections_per_img: int, valid: torch.Tensor | None = None
                       ) -> PaddedDetections:
    """:func:`postprocess_batch` without a host wait, its detections padded to a fixed size (the host waits
    once, when ``PaddedDetections.unpad`` reads their count, where ``postprocess_batch`` waits three times):
    every (image, class) pair's RoIs go through the Triton NMS (``nms_triton``, CUDA) at once, the pairs as
    its images, the boxes at or below the threshold scored -inf (the greedy pass keeps them last; they are
    then left out), and each image's ``detections_per_img`` best come from a top-k over its kept boxes. The
    same detections; equal scores may come in another order."""
    num_classes = scores.shape[1]
    rows = torch.isfinite(boxes).all(dim=(1, 2)) & torch.isfinite(scores).all(dim=1)
    if valid is not None:
        rows = rows & valid
    candidate = rows[:, None] & (scores > score_thresh)
    scores = scores.masked_fill(~candidate, float("-inf"))
    boxes = torch.where(candidate[..., None], boxes, 0.0)  # finite
    boxes, _ = pad_stack(boxes.split(list(counts)))  # (B, R, K, 4); padding rows (0, 0, 0, 0)
    scores, real = pad_stack(scores.split(list(counts)))
    scores = scores.masked_fill(~real[..., None], float("-inf"))
    num_images, num_rois = scores.shape[:2]
    per_pair_boxes = boxes.permute(0, 2, 1, 3).reshape(num_images * num_classes, num_rois, 4)
    per_pair_scores = scores.permute(0, 2, 1).reshape(num_images * num_classes, num_rois)
    one_group = torch.zeros(num_rois, dtype=torch.int64, device=scores.device)
    ranks = nms_ranks_triton(per_pair_boxes, per_pair_scores, one_group, nms_thresh, detections_per_img)
    kept_scores = per_pair_scores.masked_fill(ranks == num_rois, float("-inf")).view(num_images, -1)
    top_scores, idx = kept_scores.topk(min(detections_per_img, kept_scores.shape[1]), dim=1)  # (class, RoI) order
    top_boxes = per_pair_boxes.reshape(num_images, -1, 4).gather(1, idx[..., None].expand(-1, -1, 4))
    return PaddedDetections(top_boxes, top_scores, torch.div(idx, num_rois, rounding_mode="floor") + 1,
                            (top_scores > float("-inf")).sum(dim=1))


def postprocess_detections(boxes: torch.Tensor, scores: torch.Tensor, score_thresh: float, nms_thresh: float,
                           detections_per_img: int, box_voting_iou: float = 0.0) -> dict[str, torch.Tensor]:
    """One image's per-class boxes ``(N, K, 4)`` and foreground scores ``(N, K)`` -> its detections:
    scores > ``score_thresh``, NMS per class, optionally box voting, the ``detections_per_img`` best.
    Labels are 1..K."""
    det = postprocess_batch(boxes, scores, [boxes.shape[0]], score_thresh, nms_thresh, detections_per_img)[0]
    if box_voting_iou > 0:  # every candidate votes: the same selection as postprocess_batch's
        roi_idx, cls_idx = score_candidates(boxes, scores, score_thresh)
        det["boxes"] = box_voting(det["boxes"], det["labels"] - 1, boxes[roi_idx, cls_idx], scores[roi_idx, cls_idx],
                                  cls_idx, box_voting_iou)
    return det


def box_voting(kept_boxes: torch.Tensor, kept_labels: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor,
               labels: torch.Tensor, iou_thresh: float = 0.5) -> torch.Tensor:
    """Box voting (Gidaris & Komodakis 2015, used by the ResNet paper's COCO entry): each box NMS kept
    becomes the score-weighted mean of all candidates of its class (before NMS, itself included) that
    overlap it by IoU >= ``iou_thresh``. Scores are unchanged."""
    if kept_boxes.numel() == 0:
        return kept_boxes
    iou = box_iou(kept_boxes, boxes)
    weights = ((iou >= iou_thresh) & (kept_labels[:, None] == labels[None, :])).double() * scores[None, :].double()
    # a kept box always votes for itself (IoU 1), so the weights never sum to zero for scores > 0. In float64:
    # a float32 mean of clipped boxes can land a rounding error past the image border.
    voted = (weights @ boxes.double()) / weights.sum(dim=1, keepdim=True).clamp(min=1e-12)
    return voted.to(boxes.dtype)


class ROIHeads(nn.Module):
    """Proposal sampling + a box-feature extractor (``box_features``, subclasses) + output layers."""

    def __init__(self, box_predictor: FastRCNNOutputLayers, batch_size_per_image: int = 512,
                 positive_fraction: float = 0.25, fg_iou_thresh: float = 0.5, crowd_ioa_thresh: float = 0.7,
                 proposal_append_gt: bool = True, global_context: bool = False):
        super().__init__()
        self.box_predictor = box_predictor
        self.global_context = global_context
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.matcher = Matcher([fg_iou_thresh], [0, 1], allow_low_quality_matches=False)
        self.crowd_ioa_thresh = crowd_ioa_thresh
        self.proposal_append_gt = proposal_append_gt
        self.generator: torch.Generator | None = None  # set for reproducible sampling in tests

    @torch.no_grad()
    def label_and_sample_proposals(self, proposals: Sequence[torch.Tensor], targets: Sequence[dict]
                                   ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Per image: the sampled RoIs (foreground first), their class labels (0 = background) and their box
        regression targets (meaningful for foreground only).

        Every image gets ``min(batch_size_per_image, proposals + ground truth)`` RoIs, counted with the
        batch's longest lists, a size known without waiting for the GPU. Where fewer examples can be sampled
        (ignored proposals: crowd regions, RPN padding), the remaining RoIs are padding with label -1: the
        losses leave them out, sums and normalisers alike, but they do pass through the box head (a trainable
        BatchNorm there would see them). On the CPU they are dropped instead (``box_ops.sizes_follow_data``).
        Proposals without area are the RPN's padding (see ``rpn.select_proposals``) and are ignored.

        The images are labelled together, their proposals and ground truth padded to the batch's longest
        (``pad_stack``): on a GPU this runs after the RPN's NMS has made the host wait, so the GPU idles
        while the host launches it, and per image it was about 80 operators, 640 at batch 8. The labels are
        those of each image on its own (tests/test_det_syncfree.py keeps that implementation as the
        reference); the random draw covers the padded lists, so its numbers differ from one image at a
        time, not its distribution."""
        device = proposals[0].device
        boxes, _ = pad_stack([p.float() for p in proposals])  # padded with (0, 0, 0, 0): ignored below
        gt_boxes, gt_valid = pad_stack([t["boxes"].to(device=device, dtype=torch.float32) for t in targets])
        gt_labels, _ = pad_stack([t["labels"].to(device) for t in targets])
        padding = ~nonempty(boxes)
        if self.proposal_append_gt:
            boxes = torch.cat([boxes, gt_boxes], dim=1)
            padding = torch.cat([padding, ~gt_valid], dim=1)
        if gt_boxes.shape[1] == 0:
            matched_idx = torch.zeros(boxes.shape[:2], dtype=torch.int64, device=device)
            classes = torch.zeros(boxes.shape[:2], dtype=torch.int64, device=device)
        else:
            iou = box_iou_batched(gt_boxes, boxes).masked_fill(~gt_valid[..., None], -1.0)  # padding matches nothing
            matched_idx, match_labels = self.matcher(iou)
            classes = gt_labels.gather(1, matched_idx).masked_fill(match_labels == 0, 0)
            classes = classes.masked_fill(match_labels == -1, -1)
        crowd = [t.get("crowd_boxes") for t in targets]
        if any(c is not None and len(c) for c in crowd):
            crowd_boxes, crowd_valid = pad_stack([boxes.new_zeros(0, 4) if c is None else c.to(device) for c in crowd])
            in_crowd = crowd_mask(crowd_boxes, boxes, self.crowd_ioa_thresh, crowd_valid)
            padding |= (classes == 0) & in_crowd
        classes = classes.masked_fill(padding, -1)
        idx, valid = sample_balanced(classes, self.batch_size_per_image, self.positive_fraction, self.generator)
        labels = classes.gather(1, idx).masked_fill(~valid, -1)
        sampled = boxes.gather(1, idx[..., None].expand(-1, -1, 4))
        foreground = (labels > 0)[..., None]
        matched = sampled  # background and padding RoIs: their own box, zero deltas, nothing undefined
        if gt_boxes.shape[1]:
            matched_gt = gt_boxes.gather(1, matched_idx.gather(1, idx)[..., None].expand(-1, -1, 4))
            matched = torch.where(foreground, matched_gt, sampled)
        box_targets = self.box_predictor.box_coder.encode(matched.view(-1, 4), sampled.view(-1, 4)).view_as(sampled)
        box_targets = torch.where(foreground, box_targets, 0.0)
        if sizes_follow_data(device):  # the valid slots come first
            counts = valid.sum(dim=1).tolist()
            return ([x[:n] for x, n in zip(sampled, counts)], [x[:n] for x, n in zip(labels, counts)],
                    [x[:n] for x, n in zip(box_targets, counts)])
        return list(sampled.unbind(0)), list(labels.unbind(0)), list(box_targets.unbind(0))

    def box_features(self, features: dict[str, torch.Tensor], proposals: Sequence[torch.Tensor]) -> torch.Tensor:
        """(sum K_i, C): one feature vector per box (RoI pooling + the post-RoI layers)."""
        raise NotImplementedError

    def dense_layers(self) -> nn.Module:
        """The post-RoI layers, which see a fixed-size tensor per RoI (what ``compile_parts`` compiles)."""
        raise NotImplementedError

    def context_features(self, features: dict[str, torch.Tensor], image_sizes: ImageSizes) -> torch.Tensor:
        """(B, C): each whole image pooled as one RoI through the same post-RoI layers (the ResNet paper's
        global context, appendix B)."""
        device = next(iter(features.values())).device
        if isinstance(image_sizes, torch.Tensor):  # on the device (padded_detections)
            whole = torch.cat([torch.zeros_like(image_sizes), image_sizes.flip(1)], dim=1).float()
        elif all(isinstance(side, int) for size in image_sizes for side in size):
            whole = torch.tensor([[0.0, 0.0, w, h] for h, w in image_sizes]).to(device, non_blocking=True)
        else:  # sizes are symbols of an exported graph (detection/export.py), which torch.tensor cannot hold
            whole = torch.stack([torch.scalar_tensor(side, dtype=torch.float32, device=device)
                                 for h, w in image_sizes for side in (0, 0, w, h)]).view(-1, 4)
        return self.box_features(features, list(whole.split(1)))

    @staticmethod
    def attach_context(region_features: torch.Tensor, context: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Concatenate each region's feature with its image's context feature: (N, C) -> (N, 2C)."""
        # expanded per image, not repeat_interleave with a tensor of counts (whose output size the host
        # would wait for)
        per_roi = torch.cat([context[i:i + 1].expand(n, -1) for i, n in enumerate(counts)])
        return torch.cat([region_features, per_roi.to(region_features.dtype)], dim=1)

    def predict(self, features: dict[str, torch.Tensor], boxes: Sequence[torch.Tensor],
                image_sizes: ImageSizes) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits (N, K+1) and per-class box deltas (N, 4K) for the boxes of each image."""
        x = self.box_features(features, boxes)
        if self.global_context:
            # shape[0], not len(): a symbol in the exported graph (len() needs a Python int)
            x = self.attach_context(x, self.context_features(features, image_sizes), [b.shape[0] for b in boxes])
        return self.box_predictor(x)

    def forward(self, features: dict[str, torch.Tensor], proposals: Sequence[torch.Tensor],
                image_sizes: ImageSizes, targets: Sequence[dict] | None = None
                ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("ROIHeads: targets are needed in training mode")
            proposals, labels, regression_targets = self.label_and_sample_proposals(proposals, targets)
        class_logits, box_deltas = self.predict(features, proposals, image_sizes)
        if self.training:
            return [], self.box_predictor.losses(class_logits, box_deltas, torch.cat(labels),
                                                 torch.cat(regression_targets))
        return self.box_predictor.inference(class_logits, box_deltas, proposals, image_sizes), {}


class Res5ROIHeads(ROIHeads):
    """C4: pool from res4 (14x14), run the backbone's res5 on each RoI (-> 7x7), average-pool.

    In the paper's layout (stride in the first 1x1) res5's first block reads only every other row and column
    of the 14x14 grid (``input_read_step``): only those 7x7 bins are pooled, a quarter of RoIAlign's work and
    of the pooled features' memory, and the block takes them with unit stride (``take_subsampled_input``,
    which changes ``res5`` in place; same outputs, same parameters and state_dict)."""

    def __init__(self, res5: nn.Module, pooler: ROIPooler, box_predictor: FastRCNNOutputLayers,
                 in_feature: str = "res4", **kwargs):
        super().__init__(box_predictor, **kwargs)
        self.in_feature = in_feature
        self.pooler = pooler
        self.res5 = res5
        first = res5[0]
        self.bin_step = first.input_read_step() if hasattr(first, "input_read_step") else 1
        if self.bin_step > 1:
            first.take_subsampled_input()

    @property
    def canonical_box_size(self) -> float:
        """The box side (input pixels) whose RoI covers exactly the pooling grid (14 cells x stride 16)."""
        return self.pooler.output_size[0] / self.pooler.scales[0]

    def box_features(self, features, proposals):
        x = self.pooler([features[self.in_feature]], proposals, bin_step=self.bin_step)
        # RoIAlign writes float32 NCHW (autocast keeps it in float32). res5's first convolution would cast
        # that to the autocast type and then, with channels-last weights, convert it to NHWC: two passes
        # over (RoIs x 1024 x 14 x 14) values, forward and backward. One copy does both.
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        layout = torch.channels_last if is_channels_last(self.res5) else torch.preserve_format
        x = x.to(dtype=dtype, memory_format=layout)
        return self.res5(x).mean(dim=(2, 3))

    def dense_layers(self) -> nn.Module:
        return self.res5


class StandardROIHeads(ROIHeads):
    """FPN: pool 7x7 from the level each box belongs to, then two fully connected layers + ReLU."""

    def __init__(self, pooler: ROIPooler, box_predictor: FastRCNNOutputLayers, in_features: Sequence[str],
                 in_channels: int, fc_dim: int = 1024, num_fc: int = 2, **kwargs):
        super().__init__(box_predictor, **kwargs)
        self.in_features = list(in_features)
        self.pooler = pooler
        layers: list[nn.Module] = [nn.Flatten()]
        dim = in_channels * pooler.output_size[0] * pooler.output_size[1]
        for _ in range(num_fc):
            fc = nn.Linear(dim, fc_dim)
            nn.init.kaiming_uniform_(fc.weight, a=1)  # "Xavier" fill of Caffe2 / Detectron2
            nn.init.zeros_(fc.bias)
            layers += [fc, nn.ReLU(inplace=True)]
            dim = fc_dim
        self.box_head = nn.Sequential(*layers)

    @property
    def canonical_box_size(self) -> float:
        """The box side (input pixels) FPN maps to P4 (its eq. 1)."""
        return self.pooler.canonical_box_size

    def box_features(self, features, proposals):
        x = self.pooler([features[f] for f in self.in_features], proposals)
        return self.box_head(x)

    def dense_layers(self) -> nn.Module:
        return self.box_head
