"""The RPN and the RoI heads without host synchronisation (issue 9): the batched proposal selection and
post-processing against the per-image implementations they replace (kept here as references), and a
count of the operations that make the host wait for the device in one training and one inference step."""
from collections import Counter

import pytest
import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

from detection.modeling import Matcher, build_detector
from detection.modeling.box_ops import batched_nms, clip_boxes, nonempty
from detection.modeling.roi_heads import postprocess_batch, postprocess_detections
from detection.modeling.rpn import select_proposals
from det_helpers import slim_cfg, two_image_batch


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
    above the score threshold, its one NMS and the read of the detections per image. The FPN pooler's
    grouping of RoIs by level (a nonzero per level, per batch) remains. Counted on the CPU for CUDA's
    path: the CPU's own shortcuts (the separable RoIAlign, NMS stopped in chunks, proposals and RoI samples
    without their padding) are switched off."""
    monkeypatch.setattr("detection.modeling.poolers.separable_roi_align_is_cheaper", lambda *args: False)
    for module in ("rpn", "roi_heads"):
        monkeypatch.setattr(f"detection.modeling.{module}.drops_padding", lambda device: False)
    monkeypatch.setattr("detection.modeling.box_ops.batched_nms_first",
                        lambda boxes, scores, groups, thresh, count: batched_nms(boxes, scores, groups, thresh)[:count])
    torch.manual_seed(0)
    cfg = slim_cfg(neck)
    cfg.roi_heads.global_context = context
    model = build_detector(cfg, num_classes=3)
    batch = two_image_batch()
    batch["targets"][1]["boxes"] = torch.tensor([[5.0, 50.0, 60.0, 75.0]])  # a foreground RoI in each image
    batch["targets"][1]["labels"] = torch.tensor([2])
    pooler = Counter({"aten::nonzero": 4}) if neck == "fpn" else Counter()
    model.train()
    model.set_sampling_generator(torch.Generator().manual_seed(0))
    calls, _ = count_head_syncs(model, batch)
    print(f"training ({neck}, context {context}): {dict(calls)}")
    assert calls == Counter({"torchvision::nms": 2}) + pooler
    model.eval()
    with torch.no_grad():
        calls, detections = count_head_syncs(model, batch)
    print(f"inference ({neck}, context {context}): {dict(calls)}")
    assert calls == Counter({"torchvision::nms": 3, "aten::nonzero": 1, "Tensor.tolist": 1}) + pooler
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
            monkeypatch.setattr(f"detection.modeling.{module}.drops_padding", lambda device: drop)
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
