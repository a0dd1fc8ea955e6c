"""Faster R-CNN's parts (detection/modeling): anchors, box coding, matching, sampling, NMS and the RoI
pooler, each against torchvision's reference piece or a hand-computed case."""

import itertools
import os
import re
import subprocess
import sys

import pytest
import torch
from torchvision.models.detection import _utils as tv_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import batched_nms, roi_align, roi_pool

from detection.modeling import (
    AnchorGenerator,
    BoxCoder,
    Matcher,
    ROIPooler,
    assign_boxes_to_levels,
    filter_proposals,
    sample_balanced,
)
from detection.modeling.box_ops import batched_nms_first
from detection.modeling.poolers import roi_align_separable, separable_roi_align_is_cheaper
from detection.modeling.sampling import sampled_labels
from conftest import ROOT
from det_helpers import compile_for_h100, random_boxes


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



def reference_encode(weights, gt, src):
    """BoxCoder.encode one coordinate at a time, as before x and y went through each operator together."""
    wx, wy, ww, wh = weights
    src_w, src_h = src[:, 2] - src[:, 0], src[:, 3] - src[:, 1]
    gt_w, gt_h = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    src_cx, src_cy = src[:, 0] + 0.5 * src_w, src[:, 1] + 0.5 * src_h
    gt_cx, gt_cy = gt[:, 0] + 0.5 * gt_w, gt[:, 1] + 0.5 * gt_h
    return torch.stack([wx * (gt_cx - src_cx) / src_w, wy * (gt_cy - src_cy) / src_h,
                        ww * torch.log(gt_w / src_w), wh * torch.log(gt_h / src_h)], dim=1)


def reference_decode(weights, scale_clamp, deltas, boxes):
    wx, wy, ww, wh = weights
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx, cy = boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights
    dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
    dw, dh = (deltas[:, 2::4] / ww).clamp(max=scale_clamp), (deltas[:, 3::4] / wh).clamp(max=scale_clamp)
    pred_cx, pred_cy = dx * widths[:, None] + cx[:, None], dy * heights[:, None] + cy[:, None]
    half_w, half_h = 0.5 * torch.exp(dw) * widths[:, None], 0.5 * torch.exp(dh) * heights[:, None]
    out = torch.stack([pred_cx - half_w, pred_cy - half_h, pred_cx + half_w, pred_cy + half_h], dim=2)
    return out.reshape(deltas.shape[0], deltas.shape[1])


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), (10.0, 20.0, 5.0, 2.5)])
def test_box_coder_equals_the_per_coordinate_arithmetic_to_the_bit(weights):
    """x and y go through each operator together (half the launches on a GPU): the same values to the bit as
    one coordinate at a time, for equal and unequal weight pairs, one box per row or one per class, deltas
    that need clamping, bf16 deltas (autocast) and no rows."""
    coder = BoxCoder(weights)
    proposals, gt = random_boxes(200, seed=3), random_boxes(200, seed=4)
    assert torch.equal(coder.encode(gt, proposals), reference_encode(weights, gt, proposals))
    g = torch.Generator().manual_seed(5)
    for deltas in (torch.randn(200, 4, generator=g), torch.randn(200, 4 * 7, generator=g) * 30,
                   (torch.randn(200, 8, generator=g) * 3).bfloat16(), torch.zeros(0, 4)):
        boxes = proposals[:len(deltas)]
        expected = reference_decode(weights, coder.scale_clamp, deltas.float(), boxes)
        assert torch.equal(coder.decode(deltas, boxes), expected)


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
    idx, valid = sample_balanced(labels, 64, 0.25, g)
    assert idx.shape == valid.shape == (64,) and valid.all()
    pos, neg = idx[:10], idx[10:]  # 16 positives wanted, only 10 exist: negatives fill up
    assert (labels[pos] == 1).all() and (labels[neg] == 0).all() and len(set(neg.tolist())) == 54
    idx, valid = sample_balanced(labels, 8, 0.25, g)
    assert valid.all() and (labels[idx] == 1).sum() == 2 and (labels[idx[2:]] == 0).all()
    # fewer candidates than slots: the valid slots come first, the rest are left out
    idx, valid = sample_balanced(torch.tensor([0, -1, 1, -1, 0]), 4, 0.5, g)
    assert valid.tolist() == [True, True, True, False] and idx[0] == 2 and sorted(idx[1:3].tolist()) == [0, 4]
    # exhaustive: everything is taken; batched over the leading dimension, one row at a time
    rows = torch.tensor([[1, 0, 0, -1, 1], [-1, -1, 0, 0, 0]])
    idx, valid = sample_balanced(rows, 10 ** 6, 1.0, g)
    assert idx.shape == (2, 5) and valid.sum(1).tolist() == [4, 3]
    assert sorted(idx[0, :4].tolist()) == [0, 1, 2, 4] and sorted(idx[1, :3].tolist()) == [2, 3, 4]
    assert sampled_labels(rows, idx, valid).tolist() == rows.tolist()
    assert sample_balanced(torch.zeros(0, dtype=torch.int64), 8, 0.5, g)[0].shape == (0,)


def test_sample_balanced_is_uniform_up_to_the_cap():
    """Each positive is chosen with probability cap / positives, each negative with (size - cap) / negatives."""
    labels = torch.tensor([1] * 6 + [0] * 12 + [-1] * 4)
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(len(labels))
    draws = 3000
    for _ in range(draws):
        idx, valid = sample_balanced(labels, 8, 0.25, g)
        counts[idx[valid]] += 1
    freq = counts / draws
    assert (freq[:6] - 2 / 6).abs().max() < 0.04 and (freq[6:18] - 6 / 12).abs().max() < 0.04
    assert (freq[18:] == 0).all()


# -- proposals and pooling -----------------------------------------------------------------------


@pytest.mark.parametrize("count,size", [(30, 400.0), (30, 20.0), (300, 400.0), (0, 400.0), (7, 400.0)])
def test_first_kept_boxes_are_those_of_the_whole_nms(count, size):
    """NMS stopped after ``count`` kept boxes, in chunks: the same indices as torchvision's NMS over all
    of them, for spread-out boxes (few suppressed), a cluster (``size`` 20: most suppressed, every chunk
    runs), too few boxes, and ties in score (chunk borders fall inside runs of equal scores)."""
    boxes = random_boxes(200, size=size, min_side=40.0, seed=1)
    scores = torch.rand(200, generator=torch.Generator().manual_seed(2))
    scores[5] = float("-inf")  # an invalid candidate, as the RPN marks them
    if count == 7:
        scores = (scores * 4).round() / 4  # five distinct scores
    levels = torch.randint(0, 2, (200,), generator=torch.Generator().manual_seed(3))
    whole = batched_nms(boxes.double(), scores.double(), levels, 0.5)
    assert torch.equal(batched_nms_first(boxes, scores, levels, 0.5, count), whole[:count])
    assert whole.shape[0] < 30 if size == 20.0 else whole.shape[0] > 30


def test_first_kept_boxes_keep_an_overlap_of_exactly_the_threshold():
    """A box overlapping a box kept in an earlier chunk by exactly the threshold (IoU 100/200) stays, as
    in torchvision's kernel (suppression is IoU > threshold); one more pixel of overlap suppresses it."""
    far = [[300.0 + 30 * i, 300.0, 320.0 + 30 * i, 320.0] for i in range(4)]
    for second, kept in (([0.0, 0.0, 10.0, 20.0], True), ([0.0, 0.0, 10.0, 19.0], False)):
        # chunk 1 (count boxes): the first and a near copy it suppresses; chunk 2 starts with `second`
        boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.5], second] + far)
        scores = torch.tensor([0.9, 0.85, 0.8, 0.4, 0.3, 0.2, 0.1])
        groups = torch.zeros(7, dtype=torch.int64)
        first = batched_nms_first(boxes, scores, groups, 0.5, 2)
        assert torch.equal(first, batched_nms(boxes, scores, groups, 0.5)[:2])
        assert first.tolist() == ([0, 2] if kept else [0, 3])


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


@pytest.mark.parametrize("pooler_type,sampling_ratio", [("ROIAlignV2", 0), ("ROIAlign", 0), ("ROIAlignV2", 2),
                                                         ("ROIPool", 0)])
@pytest.mark.parametrize("bin_step", [1, 2])
def test_fpn_pooler_without_host_sync_equals_pooling_each_levels_rois(pooler_type, sampling_ratio, bin_step,
                                                                      monkeypatch):
    """A GPU's FPN pooler pools every RoI on every level (the other levels' RoIs shrunk to a point) instead of
    grouping the RoIs by level with a nonzero per level, which waits for the device: the same pooled features
    and the same gradients for the feature maps, to the bit, with torchvision's kernel (float64)."""
    g = torch.Generator().manual_seed(3)
    features = [torch.randn(3, 4, 256 // s, 320 // s, dtype=torch.float64, generator=g) for s in (4, 8, 16, 32)]
    corner = torch.rand(60, 2, generator=g, dtype=torch.float64) * 200
    boxes = torch.cat([corner, corner + torch.rand(60, 2, generator=g, dtype=torch.float64) ** 2 * 600 + 1], 1)
    per_image = [boxes[:25], boxes[25:25], boxes[25:]]  # one image without RoIs
    weights = None
    results = []
    for follow_data in (True, False):
        monkeypatch.setattr("detection.modeling.poolers.sizes_follow_data", lambda device: follow_data)
        pooler = ROIPooler(7, [1 / 4, 1 / 8, 1 / 16, 1 / 32], sampling_ratio, pooler_type, kernel="torchvision")
        maps = [f.clone().requires_grad_() for f in features]
        out = pooler(maps, per_image, bin_step=bin_step)
        weights = torch.randn(out.shape, dtype=torch.float64, generator=g) if weights is None else weights
        (out * weights).sum().backward()
        results.append((out, [m.grad for m in maps]))
    (grouped, grouped_grads), (masked, masked_grads) = results
    levels = assign_boxes_to_levels(boxes, 2, 5)
    assert sorted(set(levels.tolist())) == [0, 1, 2, 3]  # every level has RoIs
    assert torch.equal(masked, grouped) and grouped.flatten(1).abs().amax(1).min() > 0  # no row left empty
    for a, b in zip(masked_grads, grouped_grads):
        assert torch.equal(a, b)


def test_roi_pool_takes_bf16_features_under_cpu_autocast():
    """The paper's RoIPool with bf16 features (solver.amp=bf16 on the CPU): torchvision's CPU kernel has no
    autocast rule and refused them beside float32 boxes, so the R101-C4 config failed at its first step. A max
    is exact in any precision: the same values as pooling the bf16 map in float32, gradients included."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 8, 40, 48, generator=g).to(torch.bfloat16).requires_grad_()
    boxes = [torch.tensor([[10.3, 20.7, 300.2, 410.9], [0.0, 0.0, 640.0, 760.0]]),
             torch.tensor([[33.3, 5.5, 90.1, 77.7]])]
    pooler = ROIPooler(14, [1 / 16], pooler_type="ROIPool")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pooler([features], boxes)
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)])
    reference = roi_pool(features.detach().float(), rois, 14, 1 / 16)
    assert out.dtype == torch.bfloat16 and torch.equal(out.float(), reference)
    out.float().sum().backward()
    assert features.grad is not None and features.grad.dtype == torch.bfloat16 and features.grad.sum() > 0


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bin_step", [1, 2])
def test_separable_roi_align_equals_torchvision_kernel(aligned, sampling_ratio, channels_last, bin_step):
    """Every bin, or every second one along each axis (what the C4 head's res5 reads in the paper's layout)."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(3, 5, 12, 17, dtype=torch.float64, generator=g)
    if channels_last:
        features = features.contiguous(memory_format=torch.channels_last)
    corner = torch.rand(40, 2, generator=g, dtype=torch.float64) * 300 - 30  # some reach outside the map
    size = torch.rand(40, 2, generator=g, dtype=torch.float64) * 150 - 4  # some of no or negative size
    boxes = torch.cat([corner, corner + size], 1)
    boxes[0] = torch.tensor([10.0, 10.0, 10.0, 10.0])  # a point
    boxes[1] = torch.tensor([-500.0, -500.0, -400.0, -400.0])  # wholly outside: zeros
    image = torch.randint(0, 3, (40,), generator=g).double()
    image[image == 1] = 2  # image 1 has no boxes; the rows are not sorted by image
    rois = torch.cat([image[:, None], boxes], 1)

    def separable(feats, rois, *args):
        return roi_align_separable(feats, rois, *args, bin_step)

    def kernel(feats, rois, *args):
        return roi_align(feats, rois, *args)[:, :, ::bin_step, ::bin_step]

    ours, ref = (fn(features, rois, (4, 3), 1 / 16, sampling_ratio, aligned) for fn in (separable, kernel))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    assert ours[1].abs().max() == 0
    assert ours.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    # the gradient w.r.t. the features, which is what training runs through it
    weights = torch.randn(ref.shape, dtype=torch.float64, generator=g)
    grads = []
    for fn in (separable, kernel):
        feats = features.clone().requires_grad_()
        (fn(feats, rois, (4, 3), 1 / 16, sampling_ratio, aligned) * weights).sum().backward()
        grads.append(feats.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12)
    # float32 under autocast: computed in float32 and returned in the input's dtype, like torchvision's op
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours32 = separable(features.float(), rois.float(), (4, 3), 1 / 16, sampling_ratio, aligned)
    assert ours32.dtype == torch.float32
    torch.testing.assert_close(ours32, ref.float(), rtol=1e-5, atol=1e-5)


# In a fresh process: Triton decides at import whether its kernels run interpreted (TRITON_INTERPRET=1, on the
# CPU), and they must here, where there is no GPU.
TRITON_ROI_ALIGN_PROBE = """
import torch
from torchvision.ops import roi_align
import detection.modeling.poolers as poolers
from detection.modeling import ROIPooler
from detection.modeling.roi_align_triton import INTERPRETED, roi_align_triton
assert INTERPRETED
g = torch.Generator().manual_seed(0)
features = torch.randn(3, 5, 12, 17, dtype=torch.float64, generator=g)
corner = torch.rand(9, 2, generator=g, dtype=torch.float64) * 300 - 30  # some reach outside the map
boxes = torch.cat([corner, corner + torch.rand(9, 2, generator=g, dtype=torch.float64) * 150 - 4], 1)
boxes[0] = torch.tensor([10.0, 10.0, 10.0, 10.0])  # a point
boxes[1] = torch.tensor([-500.0, -500.0, -400.0, -400.0])  # wholly outside: zeros
boxes[2] = torch.tensor([-20.0, -20.0, 300.0, 200.0])  # the whole map: several samples per bin
rois = torch.cat([torch.tensor([2, 0, 2, 0, 2, 2, 0, 0, 2.0], dtype=torch.float64)[:, None], boxes], 1)
for aligned, ratio, step, layout in ((True, 0, 1, torch.channels_last), (True, 0, 2, torch.contiguous_format),
                                     (False, 2, 1, torch.contiguous_format), (False, 0, 2, torch.channels_last)):
    feats = [features.clone(memory_format=layout).requires_grad_() for _ in range(2)]
    ours = roi_align_triton(feats[0], rois, (4, 3), 1 / 16, ratio, aligned, step)
    ref = roi_align(feats[1], rois, (4, 3), 1 / 16, ratio, aligned)[:, :, ::step, ::step]
    assert ours.is_contiguous(memory_format=torch.channels_last) and ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    assert ours[1].abs().max() == 0 and ours[2].abs().min() > 0
    weights = torch.randn(ref.shape, dtype=torch.float64, generator=g)
    (ours * weights).sum().backward(), (ref * weights).sum().backward()
    torch.testing.assert_close(feats[0].grad, feats[1].grad, rtol=0, atol=1e-12)
# more channels than one program takes (256 in float64): two channel blocks, the second partial
wide = torch.randn(3, 300, 6, 7, dtype=torch.float64, generator=g).to(memory_format=torch.channels_last)
feats = [wide.clone().requires_grad_() for _ in range(2)]
ours = roi_align_triton(feats[0], rois, (2, 2), 1 / 16, 0, True)
ref = roi_align(feats[1], rois, (2, 2), 1 / 16, 0, True)
torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
(ours * ref.detach()).sum().backward(), (ref * ref.detach()).sum().backward()
torch.testing.assert_close(feats[0].grad, feats[1].grad, rtol=0, atol=1e-12)
# bf16 channels-last, as a bf16 trunk hands it over: bf16 out (float32 sums), bf16 gradient
half = features.float().bfloat16().contiguous(memory_format=torch.channels_last).requires_grad_()
full = half.detach().float().requires_grad_()
ours = roi_align_triton(half, rois.float(), (4, 3), 1 / 16, 0, True)
ref = roi_align(full, rois.float(), (4, 3), 1 / 16, 0, True)
assert ours.dtype == torch.bfloat16 and ours.is_contiguous(memory_format=torch.channels_last)
torch.testing.assert_close(ours.float(), ref, rtol=1e-2, atol=1e-2)
ours.float().sum().backward(), ref.sum().backward()
assert half.grad.dtype == torch.bfloat16
torch.testing.assert_close(half.grad.float(), full.grad, rtol=1e-2, atol=1e-2)
# through the pooler, as the detector calls it
pooler = ROIPooler(4, (1 / 16,), 0, "ROIAlignV2", kernel="triton")
reference = ROIPooler(4, (1 / 16,), 0, "ROIAlignV2", kernel="torchvision")
boxes_per_image = [boxes[:4].float(), boxes[4:].float()]
features32 = features[:2].float()
torch.testing.assert_close(pooler([features32], boxes_per_image, bin_step=2),
                           reference([features32], boxes_per_image, bin_step=2), rtol=1e-5, atol=1e-5)
# FPN levels as a GPU pools them: every RoI on every level, the others' shrunk to a point (one sample a bin)
pyramid = [torch.randn(2, 5, 640 // s, 640 // s, generator=g) for s in (4, 8, 16, 32)]
sides = torch.tensor([[30.0], [150.0], [300.0], [600.0], [90.0]])  # P2, P3, P4, P5, P2
levels_boxes = [torch.cat([corner[:5].float() / 10 + 3.5, corner[:5].float() / 10 + sides], 1)]
levels_boxes.append(levels_boxes[0][[3, 1]] + 7)
scales = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
expected = ROIPooler(3, scales, 1, "ROIAlignV2", kernel="torchvision")(pyramid, levels_boxes)
assert expected.flatten(1).abs().amax(1).min() > 0
poolers.sizes_follow_data = lambda device: False
got = ROIPooler(3, scales, 1, "ROIAlignV2", kernel="triton")(pyramid, levels_boxes)
assert got.dtype == torch.float32
torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
print("ok")
"""


def test_triton_roi_align_equals_torchvision_kernel():
    """The CUDA kernels (model.roi_heads.pooler_kernel=triton), run by Triton's interpreter on the CPU: values
    and gradients equal torchvision's op in float64 (every bin or every second one, both sampling modes, both
    input layouts), bf16 in and out within bf16's precision; off CUDA without the interpreter, a clear error."""
    from detection.modeling.roi_align_triton import roi_align_triton
    with pytest.raises(RuntimeError, match="pooler_kernel=auto"):
        roi_align_triton(torch.randn(1, 2, 4, 4), torch.tensor([[0.0, 0, 0, 8, 8]]), (2, 2), 1 / 4, 0, True)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", TRITON_ROI_ALIGN_PROBE], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-3000:])


def build_for_h100(kernel, dtype: str, constants: dict, num_warps: int) -> tuple[str, str]:
    """A Triton RoIAlign kernel compiled for an H100 (sm_90 cubin; Triton's own ptxas, no GPU needed) as a launch
    on channels-last tensors specialises it: unit channel strides (Triton makes an int argument equal to 1 a
    constant), pointers, channel count and the other strides multiples of 16. Returns its SASS and its resource
    usage (Triton's nvdisasm and cuobjdump)."""
    names = kernel.arg_names  # mapped, rois, pooled, channels, height, width, mapped's 4 strides, pooled's 4, ...
    mapped, rois, pooled = names[:3]
    strides = [*names[6:10], *names[10:14]]
    constants = {**constants, names[7]: 1, names[11]: 1}  # the channel strides
    types = {mapped: "*fp32" if mapped == "grad_in" else f"*{dtype}", pooled: f"*{dtype}", rois: "*fp32",
             "spatial_scale": "fp32"}
    return compile_for_h100(kernel, types, constants, num_warps, multiples_of_16=(mapped, rois, pooled, "channels",
                                                                                  *strides))


def test_triton_roi_align_compiles_for_an_h100():
    """The interpreter runs the kernels as Python; a GPU runs them compiled, whose front end accepts less, and how
    they compile decides their speed, which no test here can time. Both kernels compile to an H100's machine code
    for bf16 and float32 features of C4's 1024 channels and FPN's 256, and the code is what they were written
    for: each bilinear tap is one 16-byte vector per thread (8 channels of bf16, 4 of float32) and so is the
    pooled value written; nothing goes to local or shared memory (a layout conversion would); the backward's
    adds into the float32 gradient are fire-and-forget 16-byte reductions (REDG), with no GPU-wide memory barrier
    (MEMBAR) or L1 invalidation (CCTL) around each, which Triton's default atomics (acquire-release) put there."""
    from detection.modeling import roi_align_triton as kernels

    def memory_ops(sass: str) -> list[str]:  # global loads, stores, atomics, local memory, fences
        return re.findall(r"\b(?:LDG|STG|REDG|ATOMG|LDL|STL|MEMBAR|CCTL)\b[.\w]*", sass)

    def build(kernel, dtype: str, element_size: int, channels: int) -> list[str]:
        block_c, num_warps = kernels.launch_config(channels, element_size)
        constants = {"PH": 14, "PW": 14, "KEPT_H": 7, "KEPT_W": 7, "STEP": 2, "ALIGNED": True, "BLOCK_C": block_c}
        sass, usage = build_for_h100(kernel, dtype, constants, num_warps)
        assert all(re.search(rf"\b{memory}:0\b", usage) for memory in ("STACK", "LOCAL", "SHARED")), usage
        return [op.split(".FTZ")[0] for op in memory_ops(sass)]

    for (dtype, size), channels in itertools.product((("bf16", 2), ("fp32", 4)), (1024, 256)):  # C4's, FPN's
        ops = build(kernels._roi_align_forward, dtype, size, channels)  # the RoI's 5 numbers, 4 taps (a loop), store
        assert sorted(ops) == sorted(["LDG.E"] * 5 + ["LDG.E.128"] * 4 + ["STG.E.128"]), (dtype, channels, ops)
        ops = build(kernels._roi_align_backward, dtype, 4, channels)  # sized by the float32 gradient
        grad_read = {"bf16": "LDG.E.64", "fp32": "LDG.E.128"}[dtype]
        assert sorted(ops) == sorted(["LDG.E"] * 5 + [grad_read] + ["REDG.E.ADD.F32x4"] * 4), (dtype, channels, ops)


def test_pooler_takes_the_separable_roi_align_only_where_it_is_cheaper():
    def rois(n, size, side):
        corner = torch.rand(n, 2, generator=torch.Generator().manual_seed(0)) * (size - side)
        return torch.cat([torch.zeros(n, 1), corner, corner + side], 1)

    demo = torch.randn(1, 64, 16, 16, requires_grad=True)  # the demo's res4 at 256 px, boxes of ~1-2 cells/bin
    assert separable_roi_align_is_cheaper(demo, rois(64, 256, 100), (10, 10), 1 / 16, 0, True)
    with torch.no_grad():  # forward alone: torchvision's kernel is multithreaded and the products do not pay
        assert not separable_roi_align_is_cheaper(demo, rois(64, 256, 100), (10, 10), 1 / 16, 0, True)
    coco = torch.randn(1, 1024, 50, 76, requires_grad=True)  # res4 of an 800x1216 image: the map is too large
    assert not separable_roi_align_is_cheaper(coco, rois(64, 800, 200), (14, 14), 1 / 16, 0, True)
    assert not separable_roi_align_is_cheaper(demo, rois(0, 256, 100), (10, 10), 1 / 16, 0, True)
