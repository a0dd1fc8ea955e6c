"""The RPN and the RoI heads (detection/modeling): losses, proposals, sampling and post-processing on
hand-made cases."""
import math

import pytest
import torch
from omegaconf import OmegaConf
from torchvision.ops import box_iou

from detection.modeling import (
    AnchorGenerator,
    DetectorConfig,
    FastRCNNOutputLayers,
    RPN,
    RPNHead,
    build_detector,
)
from detection.modeling.config import PredictorInit
from det_helpers import random_boxes, tiny_res5_head


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


def test_roi_sampler_hand_made_case(monkeypatch):
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

    # background proposals inside a crowd region are not sampled: on a GPU the RoIs are padded to a fixed count
    # with label -1, which the losses leave out; on the CPU the padding is dropped
    head.batch_size_per_image = 100
    crowd = torch.tensor([[95.0, 0.0, 160.0, 45.0]])
    for gpu_path in (True, False):
        monkeypatch.setattr("detection.modeling.roi_heads.sizes_follow_data", lambda device: not gpu_path)
        boxes, labels, _ = head.label_and_sample_proposals(
            [torch.tensor(bg)], [{"boxes": gt, "labels": torch.tensor([1]), "crowd_boxes": crowd}])
        # >= 0.7 of the box inside the crowd box: x1 = 100..130 (x1 = 130: 30/40 = 0.75), not 135..145 (<= 0.625)
        assert len(boxes[0]) == (1 + len(bg) if gpu_path else 5) and (labels[0] == -1).sum() == (7 if gpu_path else 0)
        assert sorted(boxes[0][labels[0] >= 0][:, 0].tolist()) == [10, 30, 135, 140, 145]


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
