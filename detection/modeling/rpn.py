"""Region Proposal Network (Ren et al. 2015): objectness and box deltas for every anchor.

Training labels each anchor by IoU with the ground truth (Matcher: < 0.3 negative, >= 0.7 positive,
plus each object's best anchors), samples 256 anchors per image with up to half positives, and
computes a binary cross-entropy and a smooth-L1 box loss, both divided by the number of sampled
anchors (the box loss too, as in Detectron2, so its scale does not depend on how many positives
there are).

Crowd regions: an anchor that is not positive and whose area lies >= ``crowd_ioa_thresh`` (0.7)
inside a crowd box (intersection over the anchor's area) is ignored (label -1), neither positive nor
negative. Anchors crossing the image border are kept (Detectron2's default, not the paper's).

Proposals: per image and level, the ``pre_nms_topk`` highest-scoring anchors are decoded, clipped to
the image, stripped of empty boxes, and NMS-ed (levels kept apart); the ``post_nms_topk`` best per
image survive. They carry no gradient. Each image gets ``min(post_nms_topk, candidates)`` rows, a size
the host knows without waiting for the GPU: when fewer proposals survive, the rest are padding boxes
(0, 0, 0, 0), which no proposal can be (proposals are never empty) and the RoI heads leave out.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou

from .anchor_generator import AnchorGenerator
from .box_coder import BoxCoder
from .box_ops import (ImageSizes, batched_nms_per_image, clip_boxes, crowd_mask, nonempty, sizes_follow_data,
                      smooth_l1)
from .matcher import Matcher
from .nms_triton import NMS_KERNELS, nms_ranks_triton, takes_triton_nms
from .sampling import sample_balanced, sampled_labels


class RPNHead(nn.Module):
    """A shared 3x3 conv + ReLU, then sibling 1x1 convs: A objectness logits and 4A box deltas."""

    def __init__(self, in_channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.objectness = nn.Conv2d(in_channels, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(in_channels, 4 * num_anchors, 1)
        for layer in (self.conv, self.objectness, self.anchor_deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        logits, deltas = [], []
        for x in features:
            t = F.relu(self.conv(x), inplace=True)
            logits.append(self.objectness(t))
            deltas.append(self.anchor_deltas(t))
        return logits, deltas


def flatten_logits(x: torch.Tensor) -> torch.Tensor:
    """(N, A, H, W) -> (N, H*W*A), in the anchors' (y, x, anchor) order."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)


def flatten_deltas(x: torch.Tensor) -> torch.Tensor:
    """(N, 4A, H, W) -> (N, H*W*A, 4)."""
    n, _, h, w = x.shape
    return x.view(n, -1, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)


def select_proposals(boxes: torch.Tensor, scores: torch.Tensor, level_ids: torch.Tensor,
                     image_sizes: ImageSizes, nms_thresh: float, post_nms_topk: int,
                     min_size: float = 0.0, nms_kernel: str = "auto"
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidate boxes ``(N, C, 4)``, scores ``(N, C)`` and the level of each candidate ``(C,)`` -> each
    image's proposals: clip, leave out empty/non-finite boxes, NMS per (image, level), the
    ``post_nms_topk`` best.

    Returns ``(boxes, scores, valid)``, ``(N, P, 4)``, ``(N, P)``, ``(N, P)`` with
    ``P = min(post_nms_topk, C)``: per image its proposals sorted by decreasing score, then padding (boxes
    (0, 0, 0, 0), scores -inf, valid False) when fewer survive. The valid rows are exactly what NMS per
    image and per level would keep (Detectron2's ``find_top_rpn_proposals``), but without a host
    synchronisation besides the NMS's own: the left-out boxes are not removed (boolean indexing waits for
    the GPU) but pushed behind every valid box by their score, and each image's best ``P`` come from a
    top-k over a fixed size, ranked by their position in its NMS's output. NMS runs once per image, not
    once for the batch: its cost grows with the square of its input, so 8 images of 12000 candidates in
    one call would cost 8 times the IoUs and the greedy pass of 8 calls; on a GPU the 8 calls overlap
    (``batched_nms_per_image``). ``nms_kernel="triton"`` (CUDA): one launch for every image, which gives the
    positions without the NMS's own synchronisation (``nms_triton``).
    """
    num_images, num_candidates = scores.shape
    boxes = torch.stack([clip_boxes(boxes[i], image_sizes[i]) for i in range(num_images)])
    valid = (nonempty(boxes.view(-1, 4), min_size).view(num_images, num_candidates)
             & torch.isfinite(boxes).all(dim=2) & torch.isfinite(scores))
    boxes = torch.where(valid[..., None], boxes, 0.0)  # finite, so NMS's coordinate shift stays finite
    scores = scores.masked_fill(~valid, float("-inf"))
    # each candidate's position in its image's NMS output (sorted by decreasing score); dropped, invalid: last
    last = num_candidates
    top = min(post_nms_topk, num_candidates)
    if takes_triton_nms(nms_kernel):
        position = nms_ranks_triton(boxes, scores, level_ids.to(scores.device), nms_thresh, top)
    else:
        position = torch.full((num_images, num_candidates), last, dtype=torch.int64, device=scores.device)
        for i, keep in enumerate(batched_nms_per_image(boxes, scores, level_ids.to(scores.device), nms_thresh,
                                                       top)):
            position[i].scatter_(0, keep, torch.arange(keep.shape[0], device=scores.device))
    position = position.masked_fill(~valid, last)
    position, idx = position.topk(top, dim=1, largest=False)
    kept = position < last
    boxes = torch.where(kept[..., None], boxes.gather(1, idx[..., None].expand(-1, -1, 4)), 0.0)
    return boxes, scores.gather(1, idx).masked_fill(~kept, float("-inf")), kept


def filter_proposals(boxes: torch.Tensor, scores: torch.Tensor, level_ids: torch.Tensor, image_size: tuple[int, int],
                     nms_thresh: float, post_nms_topk: int, min_size: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's candidate boxes -> its proposals (``select_proposals`` without the padding, which costs
    a host synchronisation: for tools outside the training and inference hot path).

    Returns ``(boxes, scores)`` sorted by decreasing score.
    """
    boxes, scores, valid = select_proposals(boxes[None], scores[None], level_ids, [image_size], nms_thresh,
                                            post_nms_topk, min_size)
    return boxes[0][valid[0]], scores[0][valid[0]]


class RPN(nn.Module):
    def __init__(
        self,
        head: RPNHead,
        anchor_generator: AnchorGenerator,
        box_coder: BoxCoder | None = None,
        matcher: Matcher | None = None,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        pre_nms_topk_train: int = 12000,
        post_nms_topk_train: int = 2000,
        pre_nms_topk_test: int = 6000,
        post_nms_topk_test: int = 1000,
        nms_thresh: float = 0.7,
        nms_kernel: str = "auto",
        min_size: float = 0.0,
        loss: str = "smooth_l1",
        smooth_l1_beta: float = 1.0 / 9,
        crowd_ioa_thresh: float = 0.7,
    ):
        super().__init__()
        if loss not in ("smooth_l1", "l1"):
            raise ValueError(f"RPN box loss must be 'smooth_l1' or 'l1', got {loss!r}")
        self.head = head
        self.anchor_generator = anchor_generator
        self.box_coder = box_coder or BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.matcher = matcher or Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True)
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.pre_nms_topk = {True: pre_nms_topk_train, False: pre_nms_topk_test}
        self.post_nms_topk = {True: post_nms_topk_train, False: post_nms_topk_test}
        if nms_kernel not in NMS_KERNELS:
            raise ValueError(f"RPN: nms_kernel must be one of {NMS_KERNELS}, got {nms_kernel!r}")
        self.nms_thresh = nms_thresh
        self.nms_kernel = nms_kernel
        self.min_size = min_size
        self.smooth_l1_beta = 0.0 if loss == "l1" else smooth_l1_beta
        self.crowd_ioa_thresh = crowd_ioa_thresh
        self.generator: torch.Generator | None = None  # set for reproducible sampling in tests

    def forward(self, features: Sequence[torch.Tensor], image_sizes: ImageSizes,
                targets: Sequence[dict] | None = None) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        features = list(features)
        anchors = self.anchor_generator(features)
        logits, deltas = self.head(features)
        logits = [flatten_logits(x) for x in logits]
        deltas = [flatten_deltas(x) for x in deltas]
        losses: dict[str, torch.Tensor] = {}
        if self.training:  # before the proposals: see below
            if targets is None:
                raise ValueError("RPN: targets are needed in training mode")
            all_anchors = torch.cat(anchors)
            labels, matched_boxes = self.label_and_sample_anchors(all_anchors, targets)
            losses = self.losses(all_anchors, torch.cat(logits, dim=1), torch.cat(deltas, dim=1), labels, matched_boxes)
        # NMS makes the host wait for the GPU, which then idles while the host launches what comes after it;
        # the anchors' labels and losses (a few hundred small operators at batch 8) are launched before it,
        # while the GPU is still busy with the backbone. Nothing they compute depends on the proposals.
        proposals = self.predict_proposals(anchors, logits, deltas, image_sizes)
        return proposals, losses

    # -- proposals ------------------------------------------------------------------------------

    @torch.no_grad()
    def predict_proposals(self, anchors: list[torch.Tensor], logits: list[torch.Tensor], deltas: list[torch.Tensor],
                          image_sizes: ImageSizes) -> list[torch.Tensor]:
        num_images = logits[0].shape[0]
        pre_nms_topk = self.pre_nms_topk[self.training]
        batch_idx = torch.arange(num_images, device=logits[0].device)[:, None]
        cand_deltas, cand_anchors, cand_scores, cand_levels = [], [], [], []
        for level, (anchors_l, logits_l, deltas_l) in enumerate(zip(anchors, logits, deltas)):
            k = min(pre_nms_topk, logits_l.shape[1])
            scores, idx = logits_l.float().topk(k, dim=1)  # (N, k)
            cand_deltas.append(deltas_l[batch_idx, idx])
            cand_anchors.append(anchors_l[idx])
            cand_scores.append(scores)
            cand_levels.append(torch.full((k,), level, dtype=torch.int64, device=idx.device))
        # one decode for every level's candidates: its two dozen element-wise kernels run once, not per level
        # (each is a launch the host pays for on a GPU)
        boxes = self.box_coder.decode(torch.cat(cand_deltas, dim=1).reshape(-1, 4),
                                      torch.cat(cand_anchors, dim=1).reshape(-1, 4)).view(num_images, -1, 4)
        scores = torch.cat(cand_scores, dim=1)
        levels = torch.cat(cand_levels)
        boxes, _, valid = select_proposals(boxes, scores, levels, image_sizes, self.nms_thresh,
                                           self.post_nms_topk[self.training], self.min_size, self.nms_kernel)
        if not self.training and sizes_follow_data(boxes.device):
            return [b[:n] for b, n in zip(boxes, valid.sum(dim=1).tolist())]
        return list(boxes.unbind(0))

    # -- training -------------------------------------------------------------------------------

    @torch.no_grad()
    def label_and_sample_anchors(self, anchors: torch.Tensor, targets: Sequence[dict]
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image: labels (A,) with 1 sampled positive, 0 sampled negative, -1 unused, and each
        anchor's matched ground-truth box (A, 4). Returned stacked over images; sampled for all images at
        once, without a host synchronisation (``sample_balanced``)."""
        all_labels, all_matched = [], []
        for target in targets:
            gt_boxes = target["boxes"].to(device=anchors.device, dtype=torch.float32)
            if gt_boxes.numel() == 0:
                labels = torch.zeros(anchors.shape[0], dtype=torch.int8, device=anchors.device)
                matched = torch.zeros_like(anchors)
            else:
                matched_idx, labels = self.matcher(box_iou(gt_boxes, anchors))
                matched = gt_boxes[matched_idx]
            labels = labels.masked_fill((labels == 0) & crowd_mask(target.get("crowd_boxes"), anchors,
                                                                   self.crowd_ioa_thresh), -1)
            all_labels.append(labels)
            all_matched.append(matched)
        labels = torch.stack(all_labels)
        indices, valid = sample_balanced(labels, self.batch_size_per_image, self.positive_fraction, self.generator)
        return sampled_labels(labels, indices, valid), torch.stack(all_matched)

    def losses(self, anchors: torch.Tensor, logits: torch.Tensor, deltas: torch.Tensor, labels: torch.Tensor,
               matched_boxes: torch.Tensor) -> dict[str, torch.Tensor]:
        """``logits`` (N, A), ``deltas`` (N, A, 4), ``labels`` (N, A), ``matched_boxes`` (N, A, 4).

        Over all anchors with the unsampled ones weighted 0 (``torch.where``, so that a non-finite target
        of an unused anchor cannot reach the sum or the gradient) instead of Detectron2's boolean
        indexing, which makes the host wait for the GPU: the same sums, in another order."""
        sampled = labels >= 0
        positive = labels == 1
        num_sampled = sampled.sum().clamp(min=1)
        loss_cls = F.binary_cross_entropy_with_logits(logits.float(), positive.float(), reduction="none")
        loss_cls = torch.where(sampled, loss_cls, 0.0).sum() / num_sampled
        targets = self.box_coder.encode(matched_boxes.reshape(-1, 4), anchors.repeat(labels.shape[0], 1))
        targets = torch.where(positive[..., None], targets.view_as(matched_boxes), 0.0)
        loss_loc = smooth_l1(deltas, targets, self.smooth_l1_beta)
        loss_loc = torch.where(positive[..., None], loss_loc, 0.0).sum() / num_sampled
        return {"loss_rpn_cls": loss_cls, "loss_rpn_loc": loss_loc}
