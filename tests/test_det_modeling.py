"""Faster R-CNN parts (detection/modeling): agreement with torchvision's reference pieces,
hand-computed cases for sampling and post-processing, whole-detector smoke tests, and a tiny C4
detector overfitting four synthetic images."""
import math
import time

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torchvision.models.detection import _utils as tv_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import FrozenBatchNorm2d, batched_nms, box_iou, roi_align

from backbones import CheckpointError, backbone_checkpoint, build_resnet
from detection.modeling import (
    AnchorGenerator,
    BoxCoder,
    DetectorConfig,
    FastRCNNOutputLayers,
    Matcher,
    ROIPooler,
    RPN,
    RPNHead,
    Res5ROIHeads,
    assign_boxes_to_levels,
    build_detector,
    filter_proposals,
    sample_balanced,
)
from backbones.options import Norm
from detection.modeling.config import Neck, PoolerType, PredictorInit


def random_boxes(n, size=200.0, min_side=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size / 2 + min_side
    return torch.cat([xy, xy + wh], dim=1)


def slim_cfg(neck="none", **backbone):
    cfg = OmegaConf.structured(DetectorConfig)
    cfg.backbone.depth = 18
    cfg.backbone.base_width = 8
    for k, v in backbone.items():
        OmegaConf.update(cfg, f"backbone.{k}", v)  # a string for a fixed choice is converted
    cfg.neck = Neck(neck)
    cfg.fpn_channels = 16
    if neck == "fpn":
        cfg.rpn.anchor_sizes = [16.0, 32.0, 64.0, 128.0, 256.0]
        cfg.roi_heads.pooler_resolution = 7
        cfg.roi_heads.fc_dim = 32
    else:
        cfg.rpn.anchor_sizes = [16.0, 32.0, 64.0]
    cfg.rpn.pre_nms_topk_train, cfg.rpn.post_nms_topk_train = 200, 50
    cfg.rpn.pre_nms_topk_test, cfg.rpn.post_nms_topk_test = 200, 50
    cfg.roi_heads.batch_size_per_image = 32
    return cfg


def two_image_batch():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2, 3, 96, 128), dtype=torch.uint8, generator=g)
    images[1, :, 80:, :] = 0
    images[1, :, :, 100:] = 0
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0], [60.0, 20.0, 120.0, 90.0]]), "labels": torch.tensor([1, 3]),
         "crowd_boxes": torch.zeros(0, 4)},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
         "crowd_boxes": torch.tensor([[0.0, 0.0, 40.0, 40.0]])},
    ]
    return {"images": images, "image_sizes": [(96, 128), (80, 100)], "targets": targets}


# -- anchors, box coding, matching ---------------------------------------------------------------


@pytest.mark.parametrize("sizes,strides", [
    ([[16.0, 32.0, 64.0]], [16]),  # C4: one level, all sizes
    ([[32.0], [64.0], [128.0], [256.0], [512.0]], [4, 8, 16, 32, 64]),  # FPN: one size per level
])
def test_anchors_match_torchvision(sizes, strides):
    ratios = [[0.5, 1.0, 2.0]] * len(sizes)
    height, width = 128, 192
    fmaps = [torch.zeros(1, 4, height // s, width // s) for s in strides]
    ours = AnchorGenerator(sizes, ratios, strides)(fmaps)
    tv = TVAnchorGenerator(tuple(tuple(s) for s in sizes), tuple(tuple(r) for r in ratios))
    reference = tv(ImageList(torch.zeros(1, 3, height, width), [(height, width)]), fmaps)[0]
    assert torch.equal(torch.cat(ours), reference)
    assert [len(a) for a in ours] == [(height // s) * (width // s) * 3 * len(sz) for s, sz in zip(strides, sizes)]
    generator = AnchorGenerator(sizes, ratios, strides)
    assert generator(fmaps)[0] is generator(fmaps)[0]  # cached per feature size and device


def test_box_coder_matches_torchvision():
    proposals = random_boxes(300, seed=1)
    gt = random_boxes(300, seed=2)
    ours = BoxCoder((10.0, 10.0, 5.0, 5.0))
    tv = tv_utils.BoxCoder((10.0, 10.0, 5.0, 5.0))
    deltas = ours.encode(gt, proposals)
    torch.testing.assert_close(deltas, tv.encode_single(gt, proposals))
    # class-specific deltas (several boxes per row), including huge ones that must be clamped
    wild = torch.randn(300, 12) * 3
    torch.testing.assert_close(ours.decode(wild, proposals), tv.decode_single(wild, proposals))
    torch.testing.assert_close(ours.decode(deltas, proposals), gt, atol=1e-3, rtol=1e-4)
    rpn_coder = BoxCoder()
    torch.testing.assert_close(rpn_coder.decode(rpn_coder.encode(gt, proposals), proposals), gt, atol=1e-3, rtol=1e-4)


def _random_quality(num_gt, num_pred, seed):
    g = torch.Generator().manual_seed(seed)
    # quantised values: plenty of ties, between and across ground truths
    return (torch.rand(num_gt, num_pred, generator=g) * 10).floor() / 10


@pytest.mark.parametrize("low_quality", [True, False])
def test_matcher_matches_torchvision(low_quality):
    ours = Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=low_quality)
    tv = tv_utils.Matcher(0.7, 0.3, allow_low_quality_matches=low_quality)
    for seed in range(20):
        quality = _random_quality(1 + seed % 5, 50, seed) * (0.8 if seed % 2 else 1.0)
        idx, labels = ours(quality)
        ref = tv(quality)
        expected_labels = torch.where(ref >= 0, 1, torch.where(ref == -1, 0, -1)).to(torch.int8)
        assert torch.equal(labels, expected_labels), seed
        assert torch.equal(idx[ref >= 0], ref[ref >= 0])
        if low_quality:  # every ground truth owns at least one positive
            assert set(idx[labels == 1].tolist()) == set(range(quality.shape[0]))


def test_roi_matcher_matches_torchvision():
    ours = Matcher([0.5], [0, 1], allow_low_quality_matches=False)
    tv = tv_utils.Matcher(0.5, 0.5, allow_low_quality_matches=False)
    for seed in range(10):
        quality = _random_quality(3, 40, seed)
        idx, labels = ours(quality)
        ref = tv(quality)
        assert torch.equal(labels, (ref >= 0).to(torch.int8))
        assert torch.equal(idx[ref >= 0], ref[ref >= 0])
    idx, labels = ours(torch.zeros(0, 7))  # no ground truth: all background
    assert labels.tolist() == [0] * 7


def test_matcher_ignores_low_quality_match_at_zero_iou():
    # a degenerate ground truth (IoU 0 with everything) must not make every prediction positive
    quality = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.2, 0.6, 0.1, 0.0]])
    idx, labels = Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True)(quality)
    assert labels.tolist() == [0, 1, 0, 0] and idx[1] == 1


def test_sample_balanced():
    labels = torch.tensor([1] * 10 + [0] * 100 + [-1] * 50)
    g = torch.Generator().manual_seed(0)
    pos, neg = sample_balanced(labels, 64, 0.25, g)
    assert len(pos) == 10 and len(neg) == 54  # 16 positives wanted, only 10 exist: negatives fill up
    assert (labels[pos] == 1).all() and (labels[neg] == 0).all() and len(set(neg.tolist())) == 54
    pos, neg = sample_balanced(labels, 8, 0.25, g)
    assert len(pos) == 2 and len(neg) == 6


# -- proposals and pooling -----------------------------------------------------------------------


def test_filter_proposals_matches_batched_nms():
    boxes = torch.tensor([
        [10, 10, 50, 50], [12, 12, 52, 52], [11, 9, 49, 51],  # overlapping cluster, level 0
        [12, 12, 52, 52],  # the same box on level 1: kept, levels are independent
        [100, 100, 140, 150], [105, 102, 140, 150], [0, 0, 20, 20], [60, 60, 70, 90],
    ], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.95, 0.7, 0.6, 0.65, 0.1, 0.3])
    levels = torch.tensor([0, 0, 0, 1, 0, 0, 1, 1])
    kept, kept_scores = filter_proposals(boxes, scores, levels, (200, 200), nms_thresh=0.7, post_nms_topk=5)
    ref = batched_nms(boxes, scores, levels, 0.7)[:5]
    assert torch.equal(kept, boxes[ref]) and torch.equal(kept_scores, scores[ref])
    assert kept_scores.tolist() == sorted(kept_scores.tolist(), reverse=True)
    # clipping to the image and dropping empty boxes come first
    odd = torch.tensor([[-20.0, -5.0, 30.0, 40.0], [50.0, 50.0, 50.0, 80.0], [150.0, 10.0, 260.0, 40.0]])
    one_level = torch.zeros(3, dtype=torch.int64)
    kept, _ = filter_proposals(odd, torch.tensor([0.5, 0.9, 0.2]), one_level, (100, 200), 0.7, 10)
    assert kept.tolist() == [[0.0, 0.0, 30.0, 40.0], [150.0, 10.0, 200.0, 40.0]]


def test_pooler_level_assignment_and_scatter():
    def square(side, x=0.0):
        return [x, 0.0, x + side, side]

    boxes = torch.tensor([square(224), square(112), square(32), square(448), square(1000), square(223.9), square(10)])
    # floor(4 + log2(side / 224)), clamped to P2..P5, minus 2
    expected = [2, 1, 0, 3, 3, 1, 0]
    assert assign_boxes_to_levels(boxes, 2, 5).tolist() == expected

    g = torch.Generator().manual_seed(0)
    features = [torch.randn(2, 3, 256 // s, 256 // s, generator=g) for s in (4, 8, 16, 32)]
    per_image = [torch.tensor([square(60, 10), square(200, 5)]), torch.tensor([square(120, 3), square(20, 40)])]
    pooler = ROIPooler(7, [1 / 4, 1 / 8, 1 / 16, 1 / 32], pooler_type="ROIAlignV2")
    out = pooler(features, per_image)
    assert out.shape == (4, 3, 7, 7)
    rois = torch.cat([torch.cat([torch.full((2, 1), float(i)), b], 1) for i, b in enumerate(per_image)])
    levels = assign_boxes_to_levels(rois[:, 1:], 2, 5)
    assert levels.tolist() == [0, 1, 1, 0]
    for r in range(4):
        lv = int(levels[r])
        ref = roi_align(features[lv], rois[r:r + 1], 7, 1 / 2 ** (lv + 2), 0, aligned=True)
        torch.testing.assert_close(out[r:r + 1], ref)
    for kind in ("ROIAlign", "ROIPool"):
        assert ROIPooler(14, [1 / 16], pooler_type=kind)(features[2:3], per_image).shape == (4, 3, 14, 14)


# -- RPN -------------------------------------------------------------------------------------------


def tiny_rpn(**kwargs):
    anchors = AnchorGenerator([[16.0, 32.0]], [[0.5, 1.0, 2.0]], [16])
    return RPN(RPNHead(8, 6), anchors, **kwargs)


def test_rpn_losses_and_proposals():
    torch.manual_seed(0)
    rpn = tiny_rpn(pre_nms_topk_train=100, post_nms_topk_train=20)
    features = [torch.randn(2, 8, 6, 8)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 40.0, 44.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    proposals, losses = rpn(features, [(96, 128), (80, 100)], targets)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    assert losses["loss_rpn_cls"].item() == pytest.approx(math.log(2), abs=0.05)  # small init: p ~ 0.5
    sum(losses.values()).backward()
    assert rpn.head.conv.weight.grad is not None
    assert len(proposals) == 2 and all(len(p) <= 20 and not p.requires_grad for p in proposals)
    assert proposals[1][:, 2].max() <= 100 and proposals[1][:, 3].max() <= 80  # clipped to the image
    rpn.eval()
    proposals, losses = rpn(features, [(96, 128), (80, 100)])
    assert losses == {}


def test_rpn_l1_loss_and_box_loss_normalisation():
    rpn = tiny_rpn(loss="l1", batch_size_per_image=16)
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 20.0, 20.0], [5.0, 5.0, 15.0, 15.0]])
    labels = torch.tensor([[1, 0, -1]], dtype=torch.int8)
    matched = torch.tensor([[[1.0, 1.0, 11.0, 11.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    logits = torch.zeros(1, 3)
    deltas = torch.zeros(1, 3, 4)
    losses = rpn.losses(anchors, logits, deltas, labels, matched)
    # one positive with targets (0.1, 0.1, 0, 0), two sampled anchors
    assert losses["loss_rpn_loc"].item() == pytest.approx(0.2 / 2)
    assert losses["loss_rpn_cls"].item() == pytest.approx(math.log(2))


def test_rpn_crowd_anchors_are_ignored():
    rpn = tiny_rpn(batch_size_per_image=100000)  # sample everything: labels show the matching itself
    anchors = torch.cat(rpn.anchor_generator([torch.zeros(1, 8, 8, 8)]))
    crowd = torch.tensor([[0.0, 0.0, 60.0, 60.0]])
    gt = torch.tensor([[80.0, 80.0, 120.0, 120.0]])
    target = {"boxes": gt, "labels": torch.tensor([1]), "crowd_boxes": crowd}
    labels, _ = rpn.label_and_sample_anchors(anchors, [target])
    labels = labels[0]
    inter = (torch.min(anchors[:, 2:], crowd[:, 2:]) - torch.max(anchors[:, :2], crowd[:, :2])).clamp(min=0).prod(1)
    inside = inter / ((anchors[:, 2:] - anchors[:, :2]).prod(1)) >= 0.7
    assert inside.sum() > 5
    assert (labels[inside] == -1).all()
    assert (labels[~inside] >= 0).sum() > 0 and (labels == 1).sum() > 0
    # without the crowd box those anchors are ordinary negatives
    labels, _ = rpn.label_and_sample_anchors(anchors, [{"boxes": gt, "labels": torch.tensor([1])}])
    assert (labels[0][inside] == 0).all()


# -- RoI heads -------------------------------------------------------------------------------------


def tiny_res5_head(num_classes=3, **kwargs):
    resnet = build_resnet(18, num_classes=0, base_width=8)
    predictor = FastRCNNOutputLayers(resnet.stage_channels["res5"], num_classes)
    return Res5ROIHeads(resnet.res5, ROIPooler(14, [1 / 16]), predictor, "res4", **kwargs)


def test_roi_sampler_hand_made_case():
    head = tiny_res5_head(batch_size_per_image=8, positive_fraction=0.25)
    head.generator = torch.Generator().manual_seed(0)
    gt = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
    fg = [[10.0, 10.0, 50.0, 52.0], [12.0, 10.0, 50.0, 50.0], [8.0, 8.0, 50.0, 50.0], [10.0, 10.0, 45.0, 45.0],
          [10.0, 10.0, 40.0, 40.0]]  # IoU >= 0.5 with gt
    bg = [[100.0 + 5 * i, 0.0, 140.0 + 5 * i, 40.0] for i in range(10)] + [[30.0, 30.0, 70.0, 70.0]]
    proposals = torch.tensor(fg + bg)
    assert (box_iou(gt, proposals)[0, :5] >= 0.5).all() and (box_iou(gt, proposals)[0, 5:] < 0.5).all()
    boxes, labels, targets = head.label_and_sample_proposals([proposals], [{"boxes": gt, "labels": torch.tensor([2])}])
    boxes, labels, targets = boxes[0], labels[0], targets[0]
    assert len(boxes) == 8
    assert (labels > 0).sum() == 2 and (labels[labels > 0] == 2).all()  # 25% of 8
    assert (box_iou(gt, boxes[labels > 0])[0] >= 0.5).all() and (box_iou(gt, boxes[labels == 0])[0] < 0.5).all()
    expected = head.box_predictor.box_coder.encode(gt.expand(2, 4), boxes[labels > 0])
    torch.testing.assert_close(targets[labels > 0], expected)
    assert (targets[labels == 0] == 0).all()

    # only background proposals: the ground-truth box itself is added as the foreground RoI
    head.batch_size_per_image, head.positive_fraction = 4, 0.5
    target = {"boxes": gt, "labels": torch.tensor([1])}
    boxes, labels, targets = head.label_and_sample_proposals([torch.tensor(bg)], [target])
    assert labels[0].tolist().count(1) == 1 and len(labels[0]) == 4
    assert torch.equal(boxes[0][labels[0] == 1], gt) and (targets[0][labels[0] == 1] == 0).all()

    # background proposals inside a crowd region are not sampled
    head.batch_size_per_image = 100
    crowd = torch.tensor([[95.0, 0.0, 160.0, 45.0]])
    boxes, labels, _ = head.label_and_sample_proposals(
        [torch.tensor(bg)], [{"boxes": gt, "labels": torch.tensor([1]), "crowd_boxes": crowd}])
    # >= 0.7 of the box inside the crowd box: x1 = 100..130 (x1 = 130: 30/40 = 0.75), not 135..145 (<= 0.625)
    assert len(boxes[0]) == 1 + len(bg) - 7 and sorted(boxes[0][:, 0].tolist()) == [10, 30, 135, 140, 145]


def test_roi_head_losses_finite():
    torch.manual_seed(0)
    head = tiny_res5_head(batch_size_per_image=16)
    features = {"res4": torch.randn(2, 32, 6, 8)}
    proposals = [random_boxes(20, size=90, seed=3), random_boxes(10, size=60, seed=4)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([3])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    dets, losses = head(features, proposals, [(96, 128), (96, 128)], targets)
    assert dets == [] and set(losses) == {"loss_cls", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_cls"].item() == pytest.approx(math.log(4), abs=0.1)
    sum(losses.values()).backward()
    head.eval()
    dets, losses = head(features, proposals, [(96, 128), (96, 128)])
    assert losses == {} and len(dets) == 2 and set(dets[0]) == {"boxes", "scores", "labels"}


def test_box_loss_hand_computed():
    layers = FastRCNNOutputLayers(4, 2, smooth_l1_beta=0.0)
    logits = torch.zeros(4, 3)
    deltas = torch.zeros(4, 8)
    deltas[0, 4:8] = torch.tensor([1.0, 0.0, 0.0, -1.0])  # RoI 0 is class 2: its columns 4..7
    deltas[0, 0:4] = 100.0  # the other class's prediction does not count
    labels = torch.tensor([2, 0, 0, 0])
    targets = torch.zeros(4, 4)
    losses = layers.losses(logits, deltas, labels, targets)
    assert losses["loss_box_reg"].item() == pytest.approx(2.0 / 4)
    assert losses["loss_cls"].item() == pytest.approx(math.log(3))


def test_predictor_init_choices():
    """'normal' (Detectron2's): small weights, zero biases; 'linear_default' (torchvision's): nn.Linear's
    uniform fill within 1/sqrt(fan_in), biases too. The config key reaches the layers."""
    cfg = OmegaConf.merge(OmegaConf.structured(DetectorConfig), {"backbone": {"depth": 18, "base_width": 8,
                                                                              "weights": ""}})
    torch.manual_seed(0)
    normal = build_detector(cfg, num_classes=3).roi_heads.box_predictor
    assert 0.005 < normal.cls_score.weight.std() < 0.02 and 0.0005 < normal.bbox_pred.weight.std() < 0.002
    assert not normal.cls_score.bias.any() and not normal.bbox_pred.bias.any()
    cfg.roi_heads.predictor_init = PredictorInit.linear_default
    default = build_detector(cfg, num_classes=3).roi_heads.box_predictor
    bound = 1 / math.sqrt(default.cls_score.in_features)
    for layer in (default.cls_score, default.bbox_pred):
        assert layer.weight.abs().max() <= bound and layer.weight.std() > 0.8 * bound / math.sqrt(3)
        assert layer.bias.abs().max() <= bound and layer.bias.any()
    with pytest.raises(ValueError, match="expected 'normal' or 'linear_default'"):
        FastRCNNOutputLayers(8, 2, init="xavier")


def test_inference_postprocessing_hand_computed():
    layers = FastRCNNOutputLayers(4, 2, score_thresh=0.05, nms_thresh=0.5, detections_per_img=100)
    proposals = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0],
                              [50.0, 50.0, 90.0, 70.0]])
    probs = torch.tensor([[0.10, 0.80, 0.10],  # A
                          [0.31, 0.60, 0.09],  # B: IoU 0.81 with A
                          [0.50, 0.04, 0.46],  # C: class 1 under the threshold
                          [0.90, 0.03, 0.07]])  # D: box reaches out of the image: clipped
    deltas = torch.zeros(4, 8)
    logits = probs.log()
    (det,) = layers.inference(logits, deltas, [proposals], [(64, 80)])
    # class 1: A (0.8) suppresses B (0.6); class 2: C 0.46, A 0.10, B 0.09 suppressed by A, D 0.07
    assert det["labels"].tolist() == [1, 2, 2, 2]
    torch.testing.assert_close(det["scores"], torch.tensor([0.80, 0.46, 0.10, 0.07]))
    assert det["boxes"].tolist() == [[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10], [50, 50, 80, 64]]
    layers.detections_per_img = 2
    (det,) = layers.inference(logits, deltas, [proposals], [(64, 80)])
    assert det["labels"].tolist() == [1, 2] and det["scores"].tolist() == pytest.approx([0.8, 0.46])
    layers.score_thresh = 0.5
    (det,) = layers.inference(logits, deltas, [proposals], [(64, 80)])
    assert det["labels"].tolist() == [1]


# -- the whole detector ------------------------------------------------------------------------------


@pytest.mark.parametrize("neck", ["none", "fpn"])
def test_build_detector_train_and_eval(neck):
    torch.manual_seed(0)
    model = build_detector(slim_cfg(neck), num_classes=3)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # frozen_bn by default
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert not any(p.requires_grad for p in model.trunk.stem.parameters())
    assert not any(p.requires_grad for p in model.trunk.res2.parameters())
    assert all(p.requires_grad for p in model.trunk.res3.parameters())
    batch = two_image_batch()
    model.train()
    losses = model(batch)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)  # every trainable weight is used (DDP without unused params)
    model.eval()
    with torch.no_grad():
        detections = model(batch)
    assert len(detections) == 2
    for det, (h, w) in zip(detections, batch["image_sizes"]):
        assert det["boxes"].shape[1] == 4 and len(det["boxes"]) == len(det["scores"]) == len(det["labels"]) <= 100
        if len(det["boxes"]):
            assert det["boxes"][:, 2].max() <= w and det["boxes"][:, 3].max() <= h
            assert det["labels"].min() >= 1 and det["labels"].max() <= 3
    # channels_last gives the same detections
    model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        again = model(batch)
    torch.testing.assert_close(again[0]["scores"], detections[0]["scores"], atol=1e-4, rtol=1e-4)


def torchvision_twin(model, cfg, num_classes):
    """torchvision's ``FasterRCNN`` holding ``model``'s very modules and weights (trunk, RPN head, res5,
    predictor): the independent reference for everything around them (anchors, matching, losses,
    proposals, pooling, decoding, post-processing)."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchors
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.models.detection.rpn import RPNHead as TVRPNHead
    from torchvision.ops import MultiScaleRoIAlign

    class Res4(torch.nn.Module):
        def __init__(self, trunk):
            super().__init__()
            self.trunk, self.out_channels = trunk, trunk.out_channels["res4"]

        def forward(self, x):
            return self.trunk(x)["res4"]

    r, h = cfg.rpn, cfg.roi_heads
    ours_rpn, ours_pred = model.rpn.head, model.roi_heads.box_predictor
    rpn_head = TVRPNHead(ours_rpn.conv.in_channels, ours_rpn.objectness.out_channels)
    predictor = FastRCNNPredictor(ours_pred.cls_score.in_features, num_classes + 1)
    with torch.no_grad():
        for mine, theirs in ((ours_rpn.conv, rpn_head.conv[0][0]), (ours_rpn.objectness, rpn_head.cls_logits),
                             (ours_rpn.anchor_deltas, rpn_head.bbox_pred), (ours_pred.cls_score, predictor.cls_score)):
            theirs.weight.copy_(mine.weight)
            theirs.bias.copy_(mine.bias)
        predictor.bbox_pred.weight.zero_()  # torchvision also regresses the background class (rows 0..3)
        predictor.bbox_pred.bias.zero_()
        predictor.bbox_pred.weight[4:].copy_(ours_pred.bbox_pred.weight)
        predictor.bbox_pred.bias[4:].copy_(ours_pred.bbox_pred.bias)
    return FasterRCNN(
        Res4(model.trunk), num_classes=None, min_size=96, max_size=100000,  # no resizing: scale 1
        image_mean=(model.pixel_mean.flatten() / 255).tolist(), image_std=(model.pixel_std.flatten() / 255).tolist(),
        rpn_anchor_generator=TVAnchors((tuple(r.anchor_sizes),), (tuple(r.aspect_ratios),)), rpn_head=rpn_head,
        rpn_pre_nms_top_n_train=r.pre_nms_topk_train, rpn_post_nms_top_n_train=r.post_nms_topk_train,
        rpn_pre_nms_top_n_test=r.pre_nms_topk_test, rpn_post_nms_top_n_test=r.post_nms_topk_test,
        rpn_batch_size_per_image=r.batch_size_per_image, rpn_positive_fraction=r.positive_fraction,
        box_roi_pool=MultiScaleRoIAlign(["0"], h.pooler_resolution, h.pooler_sampling_ratio),
        box_head=torch.nn.Sequential(model.roi_heads.res5, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()),
        box_predictor=predictor, box_batch_size_per_image=h.batch_size_per_image,
        box_positive_fraction=h.positive_fraction, box_score_thresh=h.score_thresh,
        box_detections_per_img=h.detections_per_img)


def test_c4_detector_equals_torchvision_faster_rcnn_with_the_same_weights():
    """With torchvision's choices (RoIAlign without the half-pixel shift, smooth-L1 beta 1/9 box loss) and
    sampling made exhaustive (every anchor and proposal used, so no random draw differs), every loss and
    every detection equals torchvision's: whatever resdet does differently is the options, not the code."""
    torch.manual_seed(0)
    cfg = slim_cfg()
    cfg.roi_heads.pooler_type, cfg.roi_heads.smooth_l1_beta = PoolerType.ROIAlign, 1.0 / 9
    cfg.rpn.batch_size_per_image, cfg.rpn.positive_fraction = 10 ** 6, 1.0
    cfg.roi_heads.batch_size_per_image, cfg.roi_heads.positive_fraction = 10 ** 6, 1.0
    cfg.roi_heads.score_thresh = 0.0
    model = build_detector(cfg, num_classes=3)
    with torch.no_grad():  # heads away from their near-zero initialisation, so boxes and scores differ
        for layer in (model.rpn.head.objectness, model.rpn.head.anchor_deltas, model.roi_heads.box_predictor.cls_score,
                      model.roi_heads.box_predictor.bbox_pred):
            layer.weight.normal_(0, 0.05)
            layer.bias.normal_(0, 0.1)
    twin = torchvision_twin(model, cfg, 3)
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (2, 3, 96, 128), dtype=torch.uint8, generator=g)
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0], [60.0, 20.0, 120.0, 90.0]]), "labels": torch.tensor([1, 3])},
               {"boxes": torch.tensor([[30.0, 5.0, 70.0, 90.0]]), "labels": torch.tensor([2])}]
    batch = {"images": images, "image_sizes": [(96, 128)] * 2, "targets": targets}
    tv_images = [img.float() / 255 for img in images]
    model.train(), twin.train()
    ours, theirs = model(batch), twin(tv_images, targets)
    names = {"loss_rpn_cls": "loss_objectness", "loss_rpn_loc": "loss_rpn_box_reg", "loss_cls": "loss_classifier",
             "loss_box_reg": "loss_box_reg"}
    for mine, reference in names.items():
        torch.testing.assert_close(ours[mine], theirs[reference], rtol=1e-5, atol=1e-6, msg=mine)
    model.eval(), twin.eval()
    with torch.no_grad():
        ours, theirs = model(batch), twin(tv_images)
    for a, b in zip(ours, theirs):
        assert len(a["boxes"]) == len(b["boxes"]) > 20
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1e-3)
        torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=1e-5)
        assert torch.equal(a["labels"], b["labels"])


def test_preprocess_zeroes_padding():
    model = build_detector(slim_cfg(), num_classes=2)
    batch = two_image_batch()
    batch["images"][1, :, 80:, :] = 255  # whatever sits in the padding is ignored
    x = model.preprocess(batch["images"], batch["image_sizes"])
    assert (x[1, :, 80:, :] == 0).all() and (x[1, :, :, 100:] == 0).all()
    mean = torch.tensor([0.485, 0.456, 0.406]) * 255
    std = torch.tensor([0.229, 0.224, 0.225]) * 255
    torch.testing.assert_close(x[0, :, 5, 7], (batch["images"][0, :, 5, 7].float() - mean) / std)


def test_backbone_weights_load_and_mismatches(tmp_path):
    resnet = build_resnet(18, num_classes=10, base_width=8)
    with torch.no_grad():
        resnet.stem.bn.running_mean.uniform_(-1, 1)
        resnet.res3[0].bn1.running_var.uniform_(0.5, 2)
    path = tmp_path / "backbone.pth"
    torch.save(backbone_checkpoint(resnet, [0.5, 0.4, 0.3], [0.2, 0.2, 0.2], [str(i) for i in range(10)]), path)

    model = build_detector(slim_cfg(weights=str(path)), num_classes=2)
    torch.testing.assert_close(model.trunk.stem.bn.running_mean, resnet.stem.bn.running_mean)
    torch.testing.assert_close(model.trunk.res3[0].bn1.running_var, resnet.res3[0].bn1.running_var)
    torch.testing.assert_close(model.roi_heads.res5[0].conv1.weight, resnet.res5[0].conv1.weight)
    assert isinstance(model.trunk.res3[0].bn1, FrozenBatchNorm2d)
    torch.testing.assert_close(model.pixel_mean.flatten(), torch.tensor([127.5, 102.0, 76.5]))
    torch.testing.assert_close(model.pixel_std.flatten(), torch.tensor([51.0, 51.0, 51.0]))

    # norm: bn keeps trainable BatchNorm with the loaded statistics
    model = build_detector(slim_cfg(weights=str(path), norm="bn", freeze_at=0), num_classes=2)
    assert isinstance(model.trunk.res3[0].bn1, torch.nn.BatchNorm2d)
    torch.testing.assert_close(model.trunk.res3[0].bn1.running_var, resnet.res3[0].bn1.running_var)

    with pytest.raises(CheckpointError, match=r"base_width: config 16 vs checkpoint 8") as err:
        build_detector(slim_cfg(weights=str(path), base_width=16), num_classes=2)
    assert str(path) in str(err.value)
    with pytest.raises(CheckpointError, match=r"depth: config 34 vs checkpoint depth 18"):
        build_detector(slim_cfg(weights=str(path), depth=34), num_classes=2)
    with pytest.raises(CheckpointError, match="stride_in_1x1"):
        build_detector(slim_cfg(weights=str(path), stride_in_1x1=False), num_classes=2)

    broken = backbone_checkpoint(resnet, [0.5] * 3, [0.2] * 3, [])
    del broken["state_dict"]["res4.1.conv2.weight"]
    broken["state_dict"]["res4.1.extra.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"missing keys: res4\.1\.conv2\.weight.*unexpected keys: res4\.1\.extra"):
        build_detector(slim_cfg(weights=str(tmp_path / "broken.pth")), num_classes=2)


# -- learning ------------------------------------------------------------------------------------------


def synthetic_shapes(seed=0, sizes=((96, 128), (128, 96), (112, 112), (128, 128))):
    """Rectangles (class 1) and ellipses (class 2) of random colours on noise, padded to 128x128."""
    rng = np.random.default_rng(seed)
    images, targets = [], []
    for h, w in sizes:
        img = rng.normal(110, 30, (h, w, 3)).clip(0, 255)
        yy, xx = np.mgrid[:h, :w]
        boxes, labels = [], []
        wanted = int(rng.integers(1, 4))
        for _ in range(100):
            if len(boxes) == wanted:
                break
            bh = int(rng.integers(24, 56))
            bw = bh if rng.random() < 0.5 else int(bh * rng.uniform(0.6, 1.0))
            x1, y1 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            box = [x1, y1, x1 + bw, y1 + bh]
            if boxes and box_iou(torch.tensor([box]).float(), torch.tensor(boxes).float()).max() > 0.1:
                continue  # keep the shapes apart
            cls, color = int(rng.integers(1, 3)), rng.integers(0, 256, 3)
            if cls == 1:
                img[y1:y1 + bh, x1:x1 + bw] = color
            else:
                inside = ((xx + 0.5 - x1 - bw / 2) / (bw / 2)) ** 2 + ((yy + 0.5 - y1 - bh / 2) / (bh / 2)) ** 2 <= 1
                img[inside] = color
            boxes.append(box)
            labels.append(cls)
        images.append(img.astype(np.uint8))
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
                        "crowd_boxes": torch.zeros(0, 4)})
    batch = torch.zeros(len(images), 3, 128, 128, dtype=torch.uint8)
    for i, im in enumerate(images):
        batch[i, :, : im.shape[0], : im.shape[1]] = torch.from_numpy(im).permute(2, 0, 1)
    return {"images": batch, "image_sizes": [im.shape[:2] for im in images], "targets": targets}


def test_tiny_c4_detector_overfits_synthetic_shapes():
    torch.manual_seed(0)
    cfg = OmegaConf.structured(DetectorConfig)
    cfg.backbone.depth, cfg.backbone.base_width = 18, 16
    cfg.backbone.norm, cfg.backbone.freeze_at = Norm.bn, 0  # from scratch: BN statistics must adapt
    cfg.rpn.anchor_sizes = [16.0, 32.0, 64.0]
    cfg.rpn.pre_nms_topk_train, cfg.rpn.post_nms_topk_train = 300, 100
    cfg.rpn.pre_nms_topk_test, cfg.rpn.post_nms_topk_test = 300, 50
    cfg.rpn.batch_size_per_image = 64
    cfg.roi_heads.batch_size_per_image = 32
    model = build_detector(cfg, num_classes=2)
    batch = synthetic_shapes()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.02, momentum=0.9,
                                weight_decay=1e-4)
    start, history = time.time(), []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine, 2 threads can run 10x slower than 1
    try:
        model.train()
        for _ in range(150):
            loss = sum(model(batch).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    elapsed = time.time() - start
    first, last = np.mean(history[:5]), np.mean(history[-5:])
    assert last < 0.5 * first, (first, last)

    model.eval()
    with torch.no_grad():
        detections = model(batch)
    hits, total = 0, 0
    for det, target in zip(detections, batch["targets"]):
        for box, label in zip(target["boxes"], target["labels"]):
            total += 1
            iou = box_iou(box[None], det["boxes"])[0] if len(det["boxes"]) else torch.zeros(0)
            near = torch.nonzero(iou > 0.1, as_tuple=True)[0]
            if len(near):  # the top-scoring detection on this object
                best = near[det["scores"][near].argmax()]
                hits += int(iou[best] > 0.5 and det["labels"][best] == label)
    assert total >= 5 and hits >= 0.7 * total, (hits, total, elapsed)
