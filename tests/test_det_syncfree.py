"""The RPN and the RoI heads without host synchronisation (issue 9): the batched proposal selection and
post-processing against the per-image implementations they replace (kept here as references), a count of
the operations that make the host wait for the device in one training and one inference step, and the NMS
as Triton kernels (model.nms_kernel=triton, in Triton's interpreter) that leaves none in training."""
import os
import re
import subprocess
import sys
from collections import Counter

import pytest
import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

from detection.modeling import Matcher, build_detector
from detection.modeling.box_ops import (batched_nms, box_iou_batched, clip_boxes, crowd_mask, nonempty, pad_stack,
                                        sizes_follow_data)
from detection.modeling.roi_heads import postprocess_batch, postprocess_detections
from detection.modeling.sampling import sample_balanced
from detection.modeling.rpn import select_proposals
from conftest import ROOT
from det_helpers import compile_for_h100, slim_cfg, tiny_res5_head, two_image_batch


# -- the per-image implementations before issue 9 (references) ----------------------------------------


def reference_filter_proposals(boxes, scores, level_ids, image_size, nms_thresh, post_nms_topk, min_size=0.0):
    boxes = clip_boxes(boxes, image_size)
    keep = nonempty(boxes, min_size) & torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
    boxes, scores, level_ids = boxes[keep], scores[keep], level_ids[keep]
    keep = torchvision.ops.batched_nms(boxes, scores, level_ids, nms_thresh)
    keep = keep[:post_nms_topk]
    return boxes[keep], scores[keep]


def reference_postprocess_detections(boxes, scores, score_thresh, nms_thresh, detections_per_img):
    finite = torch.isfinite(boxes).all(dim=(1, 2)) & torch.isfinite(scores).all(dim=1)
    boxes, scores = boxes[finite], scores[finite]
    roi_idx, cls_idx = torch.nonzero(scores > score_thresh, as_tuple=True)
    boxes = boxes[roi_idx, cls_idx]
    scores = scores[roi_idx, cls_idx]
    keep = torchvision.ops.batched_nms(boxes, scores, cls_idx, nms_thresh)[:detections_per_img]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": cls_idx[keep] + 1}


def reference_matcher(matcher, match_quality_matrix):
    num_gt, num_pred = match_quality_matrix.shape
    if num_gt == 0:
        return torch.zeros(num_pred, dtype=torch.int64), torch.full((num_pred,), matcher.labels[0], dtype=torch.int8)
    best_iou, matched_idx = match_quality_matrix.max(dim=0)
    match_labels = torch.empty(num_pred, dtype=torch.int8)
    for label, low, high in zip(matcher.labels, matcher.thresholds[:-1], matcher.thresholds[1:]):
        match_labels[(best_iou >= low) & (best_iou < high)] = label
    if matcher.allow_low_quality_matches:
        best_per_gt = match_quality_matrix.max(dim=1).values
        best_per_gt = torch.where(best_per_gt > 0, best_per_gt, torch.full_like(best_per_gt, float("nan")))
        _, pred_idx = torch.nonzero(match_quality_matrix == best_per_gt[:, None], as_tuple=True)
        match_labels[pred_idx] = 1
    return matched_idx, match_labels


def reference_label_and_sample_proposals(head, proposals, targets):
    """``ROIHeads.label_and_sample_proposals`` one image at a time, as before the images were labelled together."""
    sampled_boxes, sampled_labels, sampled_targets = [], [], []
    for boxes, target in zip(proposals, targets):
        gt_boxes, gt_labels = target["boxes"].float(), target["labels"]
        boxes = boxes.float()
        padding = ~nonempty(boxes)
        if head.proposal_append_gt:
            boxes = torch.cat([boxes, gt_boxes])
            padding = torch.cat([padding, padding.new_zeros(len(gt_boxes))])
        if gt_boxes.numel() == 0:
            matched_idx = torch.zeros(len(boxes), dtype=torch.int64)
            classes = torch.zeros(len(boxes), dtype=torch.int64)
        else:
            matched_idx, match_labels = head.matcher(torchvision.ops.box_iou(gt_boxes, boxes))
            classes = gt_labels[matched_idx].masked_fill(match_labels == 0, 0).masked_fill(match_labels == -1, -1)
        ignored = padding | ((classes == 0) & crowd_mask(target.get("crowd_boxes"), boxes, head.crowd_ioa_thresh))
        classes = classes.masked_fill(ignored, -1)
        idx, valid = sample_balanced(classes, head.batch_size_per_image, head.positive_fraction, head.generator)
        if sizes_follow_data(idx.device):
            count = int(valid.sum())
            idx, valid = idx[:count], valid[:count]
        labels = classes[idx].masked_fill(~valid, -1)
        sampled_boxes.append(boxes[idx])
        sampled_labels.append(labels)
        matched = gt_boxes[matched_idx[idx]] if gt_boxes.numel() else boxes[idx]
        targets_i = head.box_predictor.box_coder.encode(matched, boxes[idx])
        sampled_targets.append(torch.where((labels > 0)[:, None], targets_i, 0.0))
    return sampled_boxes, sampled_labels, sampled_targets


@pytest.mark.parametrize("low_quality", [False, True])
def test_matcher_equals_the_nonzero_reference(low_quality):
    g = torch.Generator().manual_seed(0)
    matcher = Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=low_quality)
    for num_gt, num_pred in ((5, 40), (1, 7), (0, 6), (12, 300)):
        quality = (torch.rand(num_gt, num_pred, generator=g) * 10).floor() / 10  # many ties
        if num_gt > 2:
            quality[1] = 0.0  # a ground truth that overlaps nothing
        for got, expected in zip(matcher(quality), reference_matcher(matcher, quality)):
            assert torch.equal(got, expected)


def overlapping_boxes(shape, size, g):
    """Random boxes crowded in a ``size`` square (NMS has work), some reaching out of it."""
    xy = torch.rand(shape + (2,), generator=g) * size * 1.1 - size * 0.05
    wh = torch.rand(shape + (2,), generator=g) * size * 0.5
    return torch.cat([xy, xy + wh], dim=-1)


def spoil(boxes, scores, g, fraction=0.05):
    """Some non-finite boxes and scores and some empty boxes, in place."""
    flat_boxes, flat_scores = boxes.view(-1, 4), scores.view(-1)
    n = flat_scores.numel()
    pick = lambda: torch.randint(0, n, (max(1, int(n * fraction)),), generator=g)  # noqa: E731
    flat_boxes[pick(), 2] = float("nan")
    flat_boxes[pick(), 1] = float("inf")
    flat_scores[pick()] = float("nan")
    flat_scores[pick()] = float("-inf")
    empty = pick()
    flat_boxes[empty, 2] = flat_boxes[empty, 0]


@pytest.mark.parametrize("seed", range(4))
def test_select_proposals_equals_the_per_image_reference(seed):
    g = torch.Generator().manual_seed(seed)
    num_images, per_level = 3, [60, 40, 25, 7]
    levels = torch.cat([torch.full((n,), i) for i, n in enumerate(per_level)])
    boxes = overlapping_boxes((num_images, len(levels)), 100.0, g)
    scores = torch.randn(num_images, len(levels), generator=g)
    spoil(boxes, scores, g)
    boxes[2, :, 2] = boxes[2, :, 0]  # an image without any valid box: all padding
    sizes = [(100, 90), (80, 100), (100, 100)]
    for post_nms_topk, min_size in ((50, 0.0), (1000, 0.0), (20, 3.0)):
        got_boxes, got_scores, valid = select_proposals(boxes, scores, levels, sizes, 0.6, post_nms_topk, min_size)
        assert got_boxes.shape == (num_images, min(post_nms_topk, len(levels)), 4)
        for i in range(num_images):
            ref_boxes, ref_scores = reference_filter_proposals(boxes[i], scores[i], levels, sizes[i], 0.6,
                                                               post_nms_topk, min_size)
            n = len(ref_boxes)
            assert n == valid[i].sum() and valid[i, :n].all()  # the valid rows first, then padding
            assert torch.equal(got_boxes[i, :n], ref_boxes) and torch.equal(got_scores[i, :n], ref_scores)
            assert (got_boxes[i, n:] == 0).all() and (got_scores[i, n:] == float("-inf")).all()
            assert not nonempty(got_boxes[i, n:]).any()  # padding is recognisable as such
        assert valid[2].sum() == 0


@pytest.mark.parametrize("seed", range(4))
def test_postprocess_batch_equals_the_per_image_reference(seed):
    g = torch.Generator().manual_seed(seed)
    counts, num_classes = [40, 0, 65, 23], 5
    boxes = clip_boxes(overlapping_boxes((sum(counts), num_classes), 80.0, g), (80, 80))
    scores = torch.softmax(torch.randn(sum(counts), num_classes + 1, generator=g) * 2, dim=1)[:, 1:].contiguous()
    spoil(boxes, scores, g)
    for score_thresh, detections_per_img in ((0.05, 100), (0.2, 7), (0.0, 1000)):
        got = postprocess_batch(boxes, scores, counts, score_thresh, 0.5, detections_per_img)
        assert len(got) == len(counts)
        for det, b, s in zip(got, boxes.split(counts), scores.split(counts)):
            ref = reference_postprocess_detections(b, s, score_thresh, 0.5, detections_per_img)
            assert len(ref["boxes"]) > 0 or len(b) == 0
            for key in ("boxes", "scores", "labels"):
                assert torch.equal(det[key], ref[key]), key
            assert torch.equal(postprocess_detections(b, s, score_thresh, 0.5, detections_per_img)["boxes"],
                               ref["boxes"])
    # rows marked invalid (the RPN's padding) are left out as if they were not there
    valid = torch.rand(sum(counts), generator=g) > 0.3
    got = postprocess_batch(boxes, scores, counts, 0.05, 0.5, 100, valid=valid)
    for det, b, s, v in zip(got, boxes.split(counts), scores.split(counts), valid.split(counts)):
        ref = reference_postprocess_detections(b[v], s[v], 0.05, 0.5, 100)
        assert all(torch.equal(det[key], ref[key]) for key in ("boxes", "scores", "labels"))


def ragged_ground_truth(g, counts, size=100.0):
    return [overlapping_boxes((n,), size, g) for n in counts]


@pytest.mark.parametrize("low_quality", [False, True])
def test_matcher_on_a_padded_batch_matches_each_image_on_its_own(low_quality):
    """Images' IoU matrices padded to the longest ground-truth list with -1 rows, matched together: each
    image's matches and labels as alone (box_iou_batched gives torchvision's IoUs to the bit)."""
    g = torch.Generator().manual_seed(1)
    matcher = Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=low_quality)
    predictions = overlapping_boxes((3, 50), 100.0, g)
    gt, valid = pad_stack(ragged_ground_truth(g, [4, 0, 7]))
    assert gt.shape == (3, 7, 4) and valid.sum(dim=1).tolist() == [4, 0, 7] and (gt[~valid] == 0).all()
    iou = box_iou_batched(gt, predictions)
    for i, n in enumerate([4, 0, 7]):
        assert torch.equal(iou[i, :n], torchvision.ops.box_iou(gt[i, :n], predictions[i]))
    matched_idx, labels = matcher(iou.masked_fill(~valid[..., None], -1.0))
    for i, n in enumerate([4, 0, 7]):
        expected = reference_matcher(matcher, torchvision.ops.box_iou(gt[i, :n], predictions[i]))
        assert torch.equal(matched_idx[i], expected[0]) and torch.equal(labels[i], expected[1])
    assert (labels[1] == 0).all()  # no ground truth: all background


def positional_keys(shape, generator, device):
    """Sampling keys that depend on an example's position only (the same for every image): the images labelled
    together and one at a time then draw the same examples, where their positions agree."""
    return torch.linspace(0.9, 0.1, 200)[torch.randperm(200, generator=torch.Generator().manual_seed(5))][
        :shape[-1]].expand(shape).contiguous()


@pytest.mark.parametrize("sizes_from_data", [False, True])
def test_roi_sampling_of_a_batch_equals_each_image_on_its_own(sizes_from_data, monkeypatch):
    """The RoI heads label and sample all images together (ground truth and crowd regions padded to the
    longest): each image's RoIs, labels and box targets as the per-image implementation gives them, with the
    same keys per position. Images of 0, 1, 3 and 6 objects, crowd regions in two, RPN padding rows in one."""
    monkeypatch.setattr("detection.modeling.sampling.uniform_keys", positional_keys)
    for module in ("detection.modeling.roi_heads", "test_det_syncfree"):
        monkeypatch.setattr(f"{module}.sizes_follow_data", lambda device: sizes_from_data)
    g = torch.Generator().manual_seed(2)
    counts = [3, 0, 6, 1]
    gts = ragged_ground_truth(g, counts)
    proposals = list(overlapping_boxes((4, 60), 100.0, g))
    for i, gt in enumerate(gts):  # some proposals near each object, so that there is foreground
        proposals[i][:len(gt)] = gt + torch.rand(len(gt), 4, generator=g) * 4 - 2
    proposals[3][50:] = 0.0  # the RPN's padding
    targets = [{"boxes": gt, "labels": torch.randint(1, 4, (len(gt),), generator=g)} for gt in gts]
    targets[0]["crowd_boxes"] = torch.tensor([[0.0, 0.0, 60.0, 60.0]])
    targets[2]["crowd_boxes"] = torch.tensor([[40.0, 40.0, 110.0, 110.0], [0.0, 50.0, 50.0, 100.0]])
    targets[1]["crowd_boxes"] = torch.zeros(0, 4)
    for batch_size, fraction in ((32, 0.25), (100, 0.5)):  # 100: more than an image's 60 + objects
        head = tiny_res5_head(batch_size_per_image=batch_size, positive_fraction=fraction)
        got = head.label_and_sample_proposals(proposals, targets)
        expected = reference_label_and_sample_proposals(head, proposals, targets)
        for i in range(4):
            rows = len(expected[1][i])
            # without the CPU's trimming every image has the batch's count of rows: more than its own
            # where its own lists are shorter, the extra rows padding (label -1)
            assert (got[1][i][rows:] == -1).all() and (len(got[1][i]) == rows if sizes_from_data else
                                                       len(got[1][i]) == min(batch_size, 60 + max(counts)))
            assert torch.equal(got[1][i][:rows], expected[1][i])
            kept = expected[1][i] >= 0  # a padding row points at an arbitrary example: its box is not compared
            for got_part, expected_part in zip(got[::2], expected[::2]):
                assert torch.equal(got_part[i][:rows][kept], expected_part[i][kept])
        assert sum(int((labels > 0).sum()) for labels in got[1]) >= 4
        if batch_size == 100 and not sizes_from_data:  # every example is taken: the ignored ones are padding
            assert all(int((labels == -1).sum()) for labels in expected[1][2:])


class OperatorCounter(TorchDispatchMode):
    """The operators dispatched, in order (``names``), views left out: each other one is a kernel launch on a
    GPU."""

    VIEWS = {"view", "_unsafe_view", "reshape", "unsqueeze", "squeeze", "permute", "transpose", "t", "expand",
             "select", "slice", "as_strided", "alias", "unbind", "split", "detach", "lift_fresh"}

    def __init__(self):
        super().__init__()
        self.names = []

    @property
    def count(self):
        return len(self.names)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in self.VIEWS:
            self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_roi_sampling_launches_as_many_operators_for_8_images_as_for_2(monkeypatch):
    """On a GPU the RoI heads' labelling comes after the RPN's NMS, which makes the host wait: the GPU idles
    while the host launches it. Its operators do not grow with the batch (they were about 80 per image)."""
    monkeypatch.setattr("detection.modeling.roi_heads.sizes_follow_data", lambda device: False)
    g = torch.Generator().manual_seed(3)
    head = tiny_res5_head(batch_size_per_image=64)
    counts = {}
    for num_images in (2, 8):
        gts = ragged_ground_truth(g, [(i % 4) + 1 for i in range(num_images)])
        targets = [{"boxes": gt, "labels": torch.ones(len(gt), dtype=torch.int64),
                    "crowd_boxes": gt[:1] if i == 1 else torch.zeros(0, 4)} for i, gt in enumerate(gts)]
        proposals = list(overlapping_boxes((num_images, 100), 100.0, g))
        with OperatorCounter() as counter:
            head.label_and_sample_proposals(proposals, targets)
        counts[num_images] = counter.count
    assert counts[2] == counts[8] and counts[2] < 150, counts  # about 120 (per image: about 80 each)


def test_rpn_launches_its_training_labels_and_losses_before_its_nms(monkeypatch):
    """The RPN's NMS makes the host wait for the GPU (its output size), which then idles while the host
    launches what follows: in training the anchors' labels, sampling and losses come before it, and after it
    only the proposals' selection, a fixed few operators per batch."""
    monkeypatch.setattr("detection.modeling.box_ops.batched_nms_first",
                        lambda boxes, scores, groups, thresh, count: batched_nms(boxes, scores, groups, thresh)[:count])
    torch.manual_seed(0)
    model = build_detector(slim_cfg("fpn"), num_classes=3).train()
    batch = two_image_batch()
    sizes = batch["image_sizes"]
    features = model.rpn_inputs(model.features(model.preprocess(batch["images"], sizes)))
    with OperatorCounter() as ops:
        model.rpn(features, sizes, batch["targets"])
    first_nms = ops.names.index("nms")
    last_nms = len(ops.names) - 1 - ops.names[::-1].index("nms")
    assert {"rand", "topk", "binary_cross_entropy_with_logits"} <= set(ops.names[:first_nms])
    after = ops.names[last_nms + 1:]
    assert "rand" not in after and len(after) < 30, after


# -- host synchronisations --------------------------------------------------------------------------


class HostSyncCounter(TorchDispatchMode):
    """Records the operations whose output size depends on the data or that read a value on the host:
    on a GPU each makes the host wait until the device has computed its input. ``Tensor.tolist`` does not
    go through the dispatcher; it is counted by wrapping it."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()
        self._tolist = None

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        counter, tolist = self.calls, self._tolist

        def counted_tolist(tensor):
            counter["Tensor.tolist"] += 1
            return tolist(tensor)
        torch.Tensor.tolist = counted_tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        bool_index = (func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default,
                               torch.ops.aten.index_put.default)
                      and any(t is not None and t.dtype == torch.bool for t in args[1]))
        if (bool_index or "unique" in name or name in (
                "aten::nonzero", "aten::masked_select", "aten::_local_scalar_dense", "torchvision::nms")
                or (name == "aten::repeat_interleave.Tensor" and (kwargs or {}).get("output_size") is None)):
            self.calls[name + (" (bool index)" if bool_index else "")] += 1
        return func(*args, **(kwargs or {}))


def count_head_syncs(model, batch):
    """Host synchronisations in the RPN and the RoI heads (not the backbone) of one forward (and, in
    training, backward) pass."""
    sizes = batch["image_sizes"]
    features = model.features(model.preprocess(batch["images"], sizes))
    targets = batch["targets"] if model.training else None
    with HostSyncCounter() as counter:
        proposals, rpn_losses = model.rpn(model.rpn_inputs(features), sizes, targets)
        detections, head_losses = model.roi_heads(features, proposals, sizes, targets)
        if model.training:
            sum({**rpn_losses, **head_losses}.values()).backward()
    return counter.calls, detections


@pytest.mark.parametrize("neck,context", [("none", False), ("fpn", False), ("none", True)])
def test_rpn_and_roi_heads_synchronise_a_fixed_few_times_per_batch(neck, context, monkeypatch):
    """Training: the RPN's NMS, one per image. Inference: those, and post-processing's candidates
    above the score threshold, its one NMS and the read of the detections per image. Nothing more with FPN:
    its pooler does not group the RoIs by level (a nonzero per level) on a GPU. Counted on the CPU for
    CUDA's path: the CPU's own shortcuts (the separable RoIAlign, NMS stopped in chunks, proposals and RoI
    samples without their padding, RoIs grouped by level) are switched off."""
    monkeypatch.setattr("detection.modeling.poolers.separable_roi_align_is_cheaper", lambda *args: False)
    for module in ("rpn", "roi_heads", "poolers"):
        monkeypatch.setattr(f"detection.modeling.{module}.sizes_follow_data", lambda device: False)
    monkeypatch.setattr("detection.modeling.box_ops.batched_nms_first",
                        lambda boxes, scores, groups, thresh, count: batched_nms(boxes, scores, groups, thresh)[:count])
    torch.manual_seed(0)
    cfg = slim_cfg(neck)
    cfg.roi_heads.global_context = context
    model = build_detector(cfg, num_classes=3)
    batch = two_image_batch()
    batch["targets"][1]["boxes"] = torch.tensor([[5.0, 50.0, 60.0, 75.0]])  # a foreground RoI in each image
    batch["targets"][1]["labels"] = torch.tensor([2])
    model.train()
    model.set_sampling_generator(torch.Generator().manual_seed(0))
    calls, _ = count_head_syncs(model, batch)
    print(f"training ({neck}, context {context}): {dict(calls)}")
    assert calls == Counter({"torchvision::nms": 2})
    model.eval()
    with torch.no_grad():
        calls, detections = count_head_syncs(model, batch)
    print(f"inference ({neck}, context {context}): {dict(calls)}")
    assert calls == Counter({"torchvision::nms": 3, "aten::nonzero": 1, "Tensor.tolist": 1})
    assert len(detections) == 2 and all(len(d["boxes"]) > 0 for d in detections)


@pytest.mark.parametrize("neck", ["none", "fpn"])
def test_cpu_drops_the_padding_of_proposals_and_roi_samples_with_the_same_results(neck, monkeypatch):
    """On the CPU the RoI heads get only the valid proposals in inference and only the valid RoI samples in
    training (padding rows would go through res5 or the box head for nothing): the same proposals in the
    same order, the same detections, the same random draw and the same losses as with the padding."""
    torch.manual_seed(0)
    cfg = slim_cfg(neck)
    # every candidate a row: whatever NMS removes becomes padding, and slots of the RoI sample too
    cfg.rpn.post_nms_topk_test = cfg.rpn.post_nms_topk_train = 10**4
    cfg.roi_heads.batch_size_per_image = 10**4
    model = build_detector(cfg, num_classes=3)
    batch = two_image_batch()
    sizes = batch["image_sizes"]
    rows = []
    model.roi_heads.box_predictor.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    results = []
    for drop in (False, True):
        for module in ("rpn", "roi_heads"):
            monkeypatch.setattr(f"detection.modeling.{module}.sizes_follow_data", lambda device: drop)
        model.eval()
        with torch.no_grad():
            features = model.features(model.preprocess(batch["images"], sizes))
            proposals, _ = model.rpn(model.rpn_inputs(features), sizes)
            detections = model(batch)
        model.train()
        model.set_sampling_generator(torch.Generator().manual_seed(0))
        results.append((proposals, detections, model(batch)))
    (padded, padded_detections, padded_losses), (dropped, dropped_detections, dropped_losses) = results
    assert any(len(d) < len(p) for d, p in zip(dropped, padded))  # the untrained RPN leaves padding rows
    for d, p in zip(dropped, padded):
        assert len(d) > 0 and torch.equal(d, p[:len(d)]) and (p[len(d):] == 0).all()
    assert sum(len(d["boxes"]) for d in padded_detections) > 0
    for a, b in zip(padded_detections, dropped_detections):
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(b["boxes"], a["boxes"], rtol=0, atol=1e-4)
        torch.testing.assert_close(b["scores"], a["scores"], rtol=0, atol=1e-6)
    padded_rows, dropped_rows = rows[1], rows[3]  # (inference, training) per setting
    assert dropped_rows < padded_rows, rows  # fewer than batch_size_per_image could be sampled
    for k in padded_losses:
        torch.testing.assert_close(dropped_losses[k], padded_losses[k], rtol=1e-5, atol=1e-7, msg=k)


# In a fresh process: Triton decides at import whether its kernels run interpreted (TRITON_INTERPRET=1, on the
# CPU), and they must here, where there is no GPU.
TRITON_NMS_PROBE = """
import sys
from collections import Counter
sys.path.insert(0, "tests")
import torch
import torchvision
import detection.modeling.box_ops as box_ops
from detection.modeling import build_detector, poolers, roi_heads, rpn
from detection.modeling.nms_triton import nms_ranks_triton
from detection.modeling.roi_align_triton import INTERPRETED
from det_helpers import slim_cfg, two_image_batch
from detection.modeling.box_ops import clip_boxes
from detection.modeling.roi_heads import postprocess_batch, postprocess_padded
from detection.modeling.graphed import GraphedDetector
from test_det_syncfree import HostSyncCounter, count_head_syncs, overlapping_boxes, spoil
assert INTERPRETED


def reference(boxes, scores, groups, thresh, max_keep):
    out = torch.full(scores.shape, scores.shape[1], dtype=torch.int64)
    for i in range(len(boxes)):
        keep = torchvision.ops.batched_nms(boxes[i], scores[i], groups if groups.dim() == 1 else groups[i], thresh)
        out[i, keep[:max_keep]] = torch.arange(len(keep[:max_keep]))
    return out


g = torch.Generator().manual_seed(0)
# images, boxes, groups (per image or shared), IoU threshold, kept at most
for images, count, groups, thresh, max_keep, shared in ((3, 300, 3, 0.5, 1000, True), (2, 257, 1, 0.7, 40, True),
                                                        (2, 100, 4, 0.6, 100, False), (1, 5, 1, 0.3, 10, True),
                                                        (2, 64, 2, 0.6, 0, True), (2, 0, 1, 0.7, 10, True)):
    centres = torch.rand(images, count, 2, generator=g) * 200
    sizes = torch.rand(images, count, 2, generator=g) * 60 + 5
    boxes = torch.cat([centres - sizes / 2, centres + sizes / 2], 2)
    scores = torch.rand(images, count, generator=g)
    if count >= 64:  # as select_proposals leaves them: invalid boxes (0, 0, 0, 0) with -inf scores
        boxes[:, 10:20], scores[:, 10:20] = 0.0, float("-inf")
        boxes[:, 30:32] = boxes[:, 40:42] + 0.25  # near-duplicates
    level = torch.randint(0, groups, (count,) if shared else (images, count), generator=g)
    got = nms_ranks_triton(boxes, scores, level, thresh, max_keep)
    expected = reference(boxes, scores, level, thresh, max_keep)
    assert torch.equal(got, expected), (images, count, groups, thresh, max_keep)
    assert count < 64 or 0 < int((got < count).sum()) < images * count or max_keep == 0

# post-processing: every (image, class) pair through it at once, one host wait
counts, classes = [40, 0, 65, 23], 5
boxes = clip_boxes(overlapping_boxes((sum(counts), classes), 80.0, g), (80, 80))
scores = torch.softmax(torch.randn(sum(counts), classes + 1, generator=g) * 2, dim=1)[:, 1:].contiguous()
spoil(boxes, scores, g)
valid = torch.rand(sum(counts), generator=g) > 0.2
for thresh, per_image in ((0.05, 100), (0.2, 7), (0.0, 1000), (0.99, 100)):
    got = postprocess_padded(boxes, scores, counts, thresh, 0.5, per_image, valid=valid).unpad()
    expected = postprocess_batch(boxes, scores, counts, thresh, 0.5, per_image, valid=valid)
    assert [len(d["boxes"]) for d in got] == [len(d["boxes"]) for d in expected], (thresh, per_image)
    for a, b in zip(got, expected):
        assert all(torch.equal(a[key], b[key]) for key in ("boxes", "scores", "labels")), (thresh, per_image)
assert len(got[0]["boxes"]) == 0 and len(expected[2]["boxes"]) == 0  # nothing above 0.99
(got,) = postprocess_padded(boxes[:40], scores[:40], [40], 0.05, 0.5, 100).unpad()  # one image
(expected,) = postprocess_batch(boxes[:40], scores[:40], [40], 0.05, 0.5, 100)
assert len(got["boxes"]) > 0 and all(torch.equal(got[key], expected[key]) for key in ("boxes", "scores", "labels"))

# the detector's RPN on CUDA's path, the CPU's shortcuts off: the same proposals and losses, and no host wait
for module in (rpn, roi_heads, poolers):
    module.sizes_follow_data = lambda device: False
poolers.separable_roi_align_is_cheaper = lambda *args: False
box_ops.batched_nms_first = (lambda boxes, scores, groups, thresh, count:
                             box_ops.batched_nms(boxes, scores, groups, thresh)[:count])
for neck, context in (("none", False), ("fpn", False), ("none", True)):
    torch.manual_seed(0)
    cfg = slim_cfg(neck)
    cfg.roi_heads.global_context = context
    cfg.rpn.pre_nms_topk_train = cfg.rpn.pre_nms_topk_test = 100  # per level: the interpreter is slow
    model = build_detector(cfg, num_classes=3)
    batch = two_image_batch()
    results = {}
    for kernel in ("auto", "triton"):
        model.rpn.nms_kernel = model.roi_heads.box_predictor.nms_kernel = kernel
        model.train()
        model.set_sampling_generator(torch.Generator().manual_seed(0))
        calls, _ = count_head_syncs(model, batch)
        losses = model(batch)
        model.eval()
        with torch.no_grad():
            features = model.features(model.preprocess(batch["images"], batch["image_sizes"]))
            proposals, _ = model.rpn(model.rpn_inputs(features), batch["image_sizes"])
            inference_calls, detections = count_head_syncs(model, batch)
        results[kernel] = calls, losses, proposals, inference_calls, detections
    auto, triton = results["auto"], results["triton"]
    assert auto[0] == Counter({"torchvision::nms": 2}) and triton[0] == Counter(), results
    assert triton[3] == Counter({"Tensor.tolist": 1}), triton[3]  # the detections' count per image, at the end
    for name, value in auto[1].items():
        assert torch.equal(triton[1][name], value), name
    for a, b in zip(auto[2], triton[2]):
        assert torch.equal(a, b) and (a.abs().sum(1) > 0).sum() > 10
    for a, b in zip(auto[4], triton[4]):
        assert len(a["boxes"]) > 0 and all(torch.equal(a[key], b[key]) for key in ("boxes", "scores", "labels"))
    # what eval.cuda_graphs records: the whole inference without a host wait, padded; unpadded, the detections
    with torch.no_grad(), HostSyncCounter() as counter:
        padded = model.padded_detections(batch["images"], batch["image_sizes"])
    assert counter.calls == Counter(), counter.calls
    assert padded.boxes.shape == (2, 100, 4) and padded.labels.shape == padded.scores.shape == (2, 100)
    for a, b in zip(padded.unpad(), triton[4]):
        assert all(torch.equal(a[key], b[key]) for key in ("boxes", "scores", "labels"))
    # the sizes as a tensor, as a graph reads them (one graph per padded shape): the same, still no host wait
    with torch.no_grad(), HostSyncCounter() as counter:
        from_tensor = model.padded_detections(batch["images"], torch.tensor(batch["image_sizes"]))
    assert counter.calls == Counter(), counter.calls
    assert all(torch.equal(a, b) for a, b in zip(from_tensor, padded))  # boxes, scores, labels, counts
    # GraphedDetector's own path (off CUDA: eager), detections in each image's own pixels as the model gives them
    frames = [{"orig_size": (192, 256), "scale": (0.5, 0.5), "flipped": False},
              {"orig_size": (160, 200), "scale": (0.5, 0.5), "flipped": True}]
    framed = {**batch, "targets": frames}
    graphed = GraphedDetector(model).eval()
    with torch.no_grad():
        for a, b in zip(graphed(framed), model(framed)):
            assert len(a["boxes"]) > 0 and all(torch.equal(a[key], b[key]) for key in ("boxes", "scores", "labels"))
print("ok")
"""


def test_triton_nms_equals_torchvision_and_spares_the_heads_their_host_waits():
    """NMS as Triton kernels (model.nms_kernel=triton), in Triton's interpreter on the CPU: each box's rank among
    the kept ones equals torchvision's batched NMS per image (groups shared or per image, stopped after
    ``max_keep``, invalid padding boxes, near-duplicates, no boxes); post-processing through it gives
    ``postprocess_batch``'s detections (images without RoIs or without detections, invalid and non-finite
    rows). In the detector: the same proposals, losses and detections as with torchvision's NMS; no host
    synchronisation in a training step's RPN and RoI heads, forward and backward (torchvision's: one per
    image), and in inference only the read of each image's number of detections at the end (torchvision's:
    five at 2 images); the padded inference a CUDA graph records none, with the image sizes as numbers or as a
    tensor (the graph's input), to the same detections. Off CUDA without the interpreter, a clear error."""
    from detection.modeling.nms_triton import nms_ranks_triton
    with pytest.raises(RuntimeError, match="nms_kernel=auto"):
        nms_ranks_triton(torch.zeros(1, 2, 4), torch.zeros(1, 2), torch.zeros(2, dtype=torch.int64), 0.5, 1)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", TRITON_NMS_PROBE], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-3000:])


def test_triton_nms_compiles_for_an_h100():
    """The interpreter runs the kernels as Python; a GPU runs them compiled, whose front end accepts less. Both
    kernels compile to an H100's machine code as ``nms_ranks_triton`` launches them (4 warps; the greedy pass
    for up to 16384 boxes, C4's 12000 training candidates), and nothing spills to local memory."""
    from detection.modeling import nms_triton as kernels
    pointers = {"boxes": "*fp32", "groups": "*i32", "bits": "*i32", "ranks": "*i64", "iou_threshold": "fp32"}
    for kernel, constants in ((kernels._suppression_bits, {"BLOCK_I": 32, "BLOCK_W": 4}),
                              (kernels._greedy_ranks, {"WORDS": 512})):
        sass, usage = compile_for_h100(kernel, pointers, constants, num_warps=4,
                                       multiples_of_16=[n for n in pointers if n in kernel.arg_names[:4]])
        assert all(re.search(rf"\b{memory}:0\b", usage) for memory in ("STACK", "LOCAL")), usage
        assert "LDG" in sass and "STG" in sass
