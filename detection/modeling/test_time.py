"""The ResNet paper's test-time additions to Faster R-CNN (appendix B), each a switch:

* **box refinement**: the box each RoI regresses to (for its best class) is pooled again and scored
  and regressed a second time; the second predictions join the first, NMS runs on the union at IoU 0.3
  and every kept box is then replaced by the score-weighted vote of its class's overlapping boxes;
* **multi-scale testing**: the trunk runs at several input scales (paper: shorter side 200..1000).
  Following SPP-net, each RoI is pooled at the two adjacent scales where it comes closest to the
  pooling grid's canonical size; both go through the post-RoI layers and are merged by maxout
  (element-wise max). Proposals come from the single base scale;
* **horizontal flip**: the mirrored image is a second view: its proposals join the union and its head
  scores every proposal (deltas mirrored back);
* **ensembles**: the union of every member's proposals, scored by every member's head.

Scores (softmax) and decoded boxes are averaged over views and members. With every switch off and one
model, ``TestTimeDetector`` gives exactly ``model(batch)``'s detections.

Images are rescaled from the batch (already at the base test scale) by bilinear interpolation, and a
scale's factor is ``scale / base_size`` for every image, so a batch stays one tensor per scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from backbones.engine.errors import ConfigError

from .box_ops import clip_boxes, nonempty
from .graphed import GraphedDetector
from .meta_arch import GeneralizedRCNN
from .postprocessing import detections_to_image
from .roi_heads import postprocess_detections


@dataclass
class TestTimeOptions:
    __test__ = False  # not a pytest test class
    box_refinement: bool = False
    refinement_nms_thresh: float = 0.3
    box_voting_iou: float = 0.5  # with box refinement; 0 = no voting
    scales: tuple[int, ...] = ()  # shorter sides for multi-scale testing; () = the base scale only
    flip: bool = False

    @property
    def enabled(self) -> bool:
        return self.box_refinement or len(self.scales) > 0 or self.flip


def flip_images(images: torch.Tensor, image_sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Mirror each image inside its own (unpadded) area; the padding stays where it is."""
    out = images.clone()
    for i, (h, w) in enumerate(image_sizes):
        out[i, :, :h, :w] = images[i, :, :h, :w].flip(-1)
    return out


def flip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """Mirror ``(..., 4)`` xyxy boxes in an image ``width`` pixels wide."""
    flipped = boxes.clone()
    flipped[..., 0] = width - boxes[..., 2]
    flipped[..., 2] = width - boxes[..., 0]
    return flipped


def resize_images(images: torch.Tensor, image_sizes: Sequence[tuple[int, int]], factor: float,
                  size_divisibility: int = 32) -> torch.Tensor:
    """Rescale each image's own area by ``factor`` (bilinear, antialiased when shrinking), zero-padded to
    a common size divisible by ``size_divisibility``."""
    sizes = [(max(1, round(h * factor)), max(1, round(w * factor))) for h, w in image_sizes]
    div = max(1, size_divisibility)
    height = math.ceil(max(h for h, _ in sizes) / div) * div
    width = math.ceil(max(w for _, w in sizes) / div) * div
    out = images.new_zeros((images.shape[0], images.shape[1], height, width))
    for i, ((h, w), (nh, nw)) in enumerate(zip(image_sizes, sizes)):
        out[i, :, :nh, :nw] = F.interpolate(images[i: i + 1, :, :h, :w], size=(nh, nw), mode="bilinear",
                                            align_corners=False, antialias=factor < 1)[0]
    if images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def select_scale_pairs(boxes: torch.Tensor, factors: Sequence[float], canonical_size: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each (N, 4) box, the indices of the two adjacent ``factors`` (ascending) at which its side
    ``sqrt(area) * factor`` comes closest to ``canonical_size``: the closest, and its neighbour on the
    other side of the canonical size (the inner neighbour at either end of the range)."""
    n = len(factors)
    f = torch.as_tensor(list(factors), dtype=torch.float32, device=boxes.device)
    side = ((boxes[:, 2] - boxes[:, 0]).clamp(min=1e-3) * (boxes[:, 3] - boxes[:, 1]).clamp(min=1e-3)).sqrt()
    log_ratio = torch.log(side[:, None] * f[None, :] / canonical_size)  # (N, S): > 0 when larger than canonical
    first = log_ratio.abs().argmin(dim=1)
    if n == 1:
        return first, first
    too_big = log_ratio.gather(1, first[:, None])[:, 0] > 0
    second = torch.where(too_big, first - 1, first + 1)
    second = torch.where(second < 0, first + 1, second)
    second = torch.where(second >= n, first - 1, second)
    return first, second


class _View:
    """One member on one version of the image (mirrored or not) and its feature maps, by scale factor
    (1.0, the base scale, always: the RPN and the global context run there)."""

    def __init__(self, model: GeneralizedRCNN, flipped: bool, features: dict[float, dict[str, torch.Tensor]]):
        self.model, self.flipped, self.features = model, flipped, features


class TestTimeDetector(nn.Module):
    """Wraps one or more trained detectors (same classes) with the test-time options; ``forward(batch)``
    returns per image ``{"boxes", "scores", "labels"}`` in the frame the detector's would be in (the
    original image's pixels where the batch's targets carry them)."""

    __test__ = False  # not a pytest test class

    def __init__(self, members: Sequence[GeneralizedRCNN], options: TestTimeOptions, base_size: int,
                 size_divisibility: int = 32):
        super().__init__()
        if not members:
            raise ValueError("TestTimeDetector needs at least one detector")
        classes = {m.roi_heads.box_predictor.num_classes for m in members}
        if len(classes) != 1:
            raise ValueError(f"ensemble members predict different numbers of classes: {sorted(classes)}")
        self.members = nn.ModuleList(members)
        self.options = options
        self.base_size = base_size
        self.size_divisibility = size_divisibility
        # RoI pooling happens at these factors of the base scale (ascending)
        self.pool_factors = sorted({float(s) / base_size for s in options.scales}) or [1.0]
        self.train(members[0].training)  # a wrapper must not flip its members' mode

    @torch.no_grad()
    def prepare(self, batch: dict) -> tuple[list[_View], list[torch.Tensor], list[tuple[int, int]]]:
        """Feature maps of every (member, mirrored or not) view at every scale, and per image the union
        of the views' proposals (in the batch's unmirrored pixels)."""
        image_sizes = [(int(h), int(w)) for h, w in batch["image_sizes"]]
        views, proposals = [], [[] for _ in image_sizes]
        for model in self.members:
            images = model.preprocess(batch["images"], image_sizes)
            for flipped in ((False, True) if self.options.flip else (False,)):
                x = flip_images(images, image_sizes) if flipped else images
                features = {f: model.features(x) if f == 1.0 else
                            model.features(resize_images(x, image_sizes, f, self.size_divisibility))
                            for f in sorted({1.0, *self.pool_factors})}
                view = _View(model, flipped, features)
                view_proposals, _ = model.rpn(model.rpn_inputs(features[1.0]), image_sizes)
                for i, p in enumerate(view_proposals):
                    p = p[nonempty(p)]  # without the RPN's padding (a host synchronisation: evaluation only)
                    proposals[i].append(flip_boxes(p, image_sizes[i][1]) if flipped else p)
                views.append(view)
        return views, [torch.cat(p) if len(p) > 1 else p[0] for p in proposals], image_sizes

    @torch.no_grad()
    def forward(self, batch: dict) -> list[dict[str, torch.Tensor]]:
        views, proposals, image_sizes = self.prepare(batch)
        scores, boxes = self.score(views, proposals, image_sizes)
        head = self.members[0].roi_heads.box_predictor
        nms_thresh, voting_iou = head.nms_thresh, 0.0
        if self.options.box_refinement:
            counts = [len(p) for p in proposals]
            best = scores[:, 1:].argmax(dim=1)
            refined = boxes[torch.arange(len(boxes), device=boxes.device), best].split(counts)
            scores2, boxes2 = self.score(views, list(refined), image_sizes)
            scores = [torch.cat(pair) for pair in zip(scores.split(counts), scores2.split(counts))]
            boxes = [torch.cat(pair) for pair in zip(boxes.split(counts), boxes2.split(counts))]
            nms_thresh, voting_iou = self.options.refinement_nms_thresh, self.options.box_voting_iou
        else:
            counts = [len(p) for p in proposals]
            scores, boxes = scores.split(counts), boxes.split(counts)
        detections = [postprocess_detections(b, s[:, 1:], head.score_thresh, nms_thresh, head.detections_per_img,
                                             voting_iou) for b, s in zip(boxes, scores)]
        return detections_to_image(detections, batch.get("targets"))

    def score(self, views: list[_View], proposals: list[torch.Tensor], image_sizes: list[tuple[int, int]]
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax scores (N, K+1) and per-class boxes (N, K, 4), clipped, for the concatenated
        proposals of all images, averaged over the views."""
        counts = [len(p) for p in proposals]
        total_scores, total_boxes = 0.0, 0.0
        for view in views:
            heads = view.model.roi_heads
            boxes = [flip_boxes(p, size[1]) if view.flipped else p for p, size in zip(proposals, image_sizes)]
            x = self.region_features(view, boxes)
            if heads.global_context:
                x = heads.attach_context(x, heads.context_features(view.features[1.0], image_sizes), counts)
            logits, deltas = heads.box_predictor(x)
            predictor = heads.box_predictor
            decoded = predictor.box_coder.decode(deltas, torch.cat(boxes)).view(len(deltas), predictor.num_classes, 4)
            per_image = []
            for d, size in zip(decoded.split(counts), image_sizes):
                d = clip_boxes(d, size)
                per_image.append(flip_boxes(d, size[1]) if view.flipped else d)
            total_scores = total_scores + F.softmax(logits.float(), dim=1)
            total_boxes = total_boxes + torch.cat(per_image)
        return total_scores / len(views), total_boxes / len(views)

    def region_features(self, view: _View, boxes: list[torch.Tensor]) -> torch.Tensor:
        """Post-RoI features of every box: at the one pooling scale, or the maxout of two adjacent ones."""
        heads = view.model.roi_heads
        factors = self.pool_factors
        if len(factors) == 1:
            return heads.box_features(view.features[factors[0]], [b * factors[0] for b in boxes])
        flat = torch.cat(boxes)
        image_idx = torch.cat([torch.full((len(b),), i, device=flat.device) for i, b in enumerate(boxes)])
        first, second = select_scale_pairs(flat, factors, heads.canonical_box_size)
        out = None
        for s, factor in enumerate(factors):
            rows = torch.nonzero((first == s) | (second == s), as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            # the pooler takes boxes per image: group the rows by image (stable), remember where they go
            order = torch.cat([rows[image_idx[rows] == i] for i in range(len(boxes))])
            feats = heads.box_features(view.features[factor],
                                       [flat[rows[image_idx[rows] == i]] * factor for i in range(len(boxes))])
            if out is None:
                out = feats.new_full((len(flat), feats.shape[1]), float("-inf"))
            out[order] = torch.maximum(out[order], feats)
        return out


def options_from_config(eval_cfg) -> TestTimeOptions:
    """The ``eval:`` section of a detection config (``detection.config.DetEvalConfig``) -> options."""
    return TestTimeOptions(box_refinement=bool(eval_cfg.box_refinement),
                           refinement_nms_thresh=float(eval_cfg.refinement_nms_thresh),
                           box_voting_iou=float(eval_cfg.box_voting_iou),
                           scales=tuple(int(s) for s in eval_cfg.test_scales), flip=bool(eval_cfg.flip))


def paper_test_scales(base_size: int) -> tuple[int, ...]:
    """The paper's multi-scale testing pyramid {200, 400, 600, 800, 1000} for its base scale 600,
    rescaled to another base scale."""
    return tuple(round(base_size * s / 600) for s in (200, 400, 600, 800, 1000))


def for_testing(members: Sequence[GeneralizedRCNN], options: TestTimeOptions, base_size: int,
                size_divisibility: int = 32, cuda_graphs: bool = False) -> nn.Module:
    """The module to evaluate: the detector itself when there is one and no option is on, replayed from CUDA
    graphs with ``cuda_graphs`` (``eval.cuda_graphs``: a loaded model's, whose weights do not change)."""
    if len(members) == 1 and not options.enabled:
        return GraphedDetector(members[0]) if cuda_graphs else members[0]
    if cuda_graphs:
        raise ConfigError("eval.cuda_graphs replays the plain detector; the test-time options (eval.box_refinement, "
                          "eval.test_scales, eval.flip) and ensembles run eagerly: turn one or the other off")
    return TestTimeDetector(members, options, base_size, size_divisibility)
