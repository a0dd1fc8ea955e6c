"""The paper's COCO additions (appendix B): global context, box refinement + voting, multi-scale maxout,
flip and ensembles, on fixed inputs and on tiny detectors."""
import math

import pytest
import torch

from detection.modeling.build import build_detector
from detection.modeling.roi_heads import box_voting, postprocess_detections
from detection.modeling.test_time import (TestTimeDetector, TestTimeOptions, flip_boxes, flip_images,
                                          paper_test_scales, resize_images, select_scale_pairs)
from det_helpers import slim_cfg, two_image_batch


def tiny_detector(neck="none", context=False, seed=0):
    torch.manual_seed(seed)
    cfg = slim_cfg(neck)
    cfg.roi_heads.global_context = context
    return build_detector(cfg, num_classes=3).eval()


def as_sorted_rows(det):
    """Detections as rows (label, score, box) sorted, to compare sets that NMS may order differently."""
    rows = torch.cat([det["labels"][:, None].float(), det["scores"][:, None], det["boxes"]], dim=1)
    return rows[torch.argsort(rows[:, 1] * 10 + rows[:, 0], descending=True)]


# -- fixed inputs ------------------------------------------------------------------------------------


def test_box_voting_hand_computed():
    kept = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    candidates = torch.tensor([[0.0, 0.0, 10.0, 10.0],   # itself, score 0.9
                               [0.0, 0.0, 12.0, 12.0],   # IoU 100/144 = 0.69 >= 0.5, score 0.3: votes
                               [0.0, 0.0, 20.0, 20.0],   # IoU 100/400 = 0.25: does not vote
                               [0.0, 0.0, 11.0, 11.0]])  # IoU 0.83 but another class: does not vote
    scores = torch.tensor([0.9, 0.3, 0.8, 0.7])
    labels = torch.tensor([0, 0, 0, 1])
    voted = box_voting(kept, torch.tensor([0]), candidates, scores, labels, 0.5)
    # (0.9 * 10 + 0.3 * 12) / 1.2 = 10.5
    torch.testing.assert_close(voted, torch.tensor([[0.0, 0.0, 10.5, 10.5]]))


def test_refinement_nms_threshold_and_voting():
    # two class-1 boxes 10x10 overlapping 6 columns: IoU 60 / 140 = 0.43; NMS at 0.5 keeps both, at 0.3 the best
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0]], [[4.0, 0.0, 14.0, 10.0]]])  # (N=2, K=1, 4)
    scores = torch.tensor([[0.9], [0.6]])
    assert len(postprocess_detections(boxes, scores, 0.05, 0.5, 100)["boxes"]) == 2
    det = postprocess_detections(boxes, scores, 0.05, 0.3, 100, box_voting_iou=0.0)
    torch.testing.assert_close(det["boxes"], torch.tensor([[0.0, 0.0, 10.0, 10.0]]))
    # voting at IoU >= 0.4 pulls the kept box toward the other: x = (0.9 * 0 + 0.6 * 4) / 1.5 = 1.6
    det = postprocess_detections(boxes, scores, 0.05, 0.3, 100, box_voting_iou=0.4)
    torch.testing.assert_close(det["boxes"], torch.tensor([[1.6, 0.0, 11.6, 10.0]]))
    torch.testing.assert_close(det["scores"], torch.tensor([0.9]))  # scores are not changed by voting


def test_select_scale_pairs_hand_computed():
    factors = [200 / 600, 400 / 600, 1.0, 800 / 600, 1000 / 600]  # the paper's pyramid, base 600
    boxes = torch.tensor([[0.0, 0.0, 224.0, 224.0],   # exactly canonical at 600: 600, then the next up
                          [0.0, 0.0, 100.0, 100.0],   # 167 px at 1000 is closest, still small: inner neighbour 800
                          [0.0, 0.0, 600.0, 600.0],   # 200 px at 200 is closest, small: next up, 400
                          [0.0, 0.0, 300.0, 300.0],   # 200 at 400 (log 0.11) beats 300 at 600 (0.29): 400, then 600
                          [0.0, 0.0, 50.0, 200.0]])   # side 100, as the second row
    first, second = select_scale_pairs(boxes, factors, 224.0)
    assert first.tolist() == [2, 4, 0, 1, 4]
    assert second.tolist() == [3, 3, 1, 2, 3]
    one_first, one_second = select_scale_pairs(boxes, [1.0], 224.0)
    assert one_first.tolist() == one_second.tolist() == [0] * 5
    assert paper_test_scales(600) == (200, 400, 600, 800, 1000)


def test_flip_and_resize_helpers():
    images = torch.arange(2 * 1 * 4 * 6, dtype=torch.float32).view(2, 1, 4, 6)
    flipped = flip_images(images, [(4, 6), (3, 4)])
    assert torch.equal(flipped[0, 0, 0], torch.tensor([5.0, 4, 3, 2, 1, 0]))
    assert torch.equal(flipped[1, 0, 0], torch.tensor([27.0, 26, 25, 24, 28, 29]))  # padding columns stay put
    assert torch.equal(flipped[1, 0, 3], images[1, 0, 3])  # padding row untouched
    assert torch.equal(flip_images(flipped, [(4, 6), (3, 4)]), images)
    torch.testing.assert_close(flip_boxes(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), 10), torch.tensor([[7.0, 2.0, 9.0, 4.0]]))
    resized = resize_images(torch.ones(1, 3, 40, 64), [(40, 50)], 1.5, size_divisibility=32)
    assert resized.shape == (1, 3, 64, 96)
    assert resized[0, :, :60, :75].eq(1).all() and resized[0, :, 60:].eq(0).all() and resized[0, :, :, 75:].eq(0).all()


# -- on tiny detectors -------------------------------------------------------------------------------


@pytest.mark.parametrize("neck,context", [("none", False), ("none", True), ("fpn", False), ("fpn", True)])
def test_all_switches_off_gives_the_detectors_own_output(neck, context):
    model = tiny_detector(neck, context)
    batch = two_image_batch()
    with torch.no_grad():
        expected = model(batch)
    got = TestTimeDetector([model], TestTimeOptions(), base_size=96)(batch)
    for e, g in zip(expected, got):
        assert torch.equal(e["boxes"], g["boxes"]) and torch.equal(e["scores"], g["scores"])
        assert torch.equal(e["labels"], g["labels"])


@pytest.mark.parametrize("neck", ["none", "fpn"])
def test_global_context_trains_end_to_end(neck):
    model = tiny_detector(neck, context=True).train()
    plain = tiny_detector(neck, context=False)
    assert model.roi_heads.box_predictor.cls_score.in_features == 2 * plain.roi_heads.box_predictor.cls_score.in_features
    losses = model(two_image_batch())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # the context feature is the whole image pooled as one RoI through the same post-RoI layers
    model.eval()
    with torch.no_grad():
        features = model.features(model.preprocess(two_image_batch()["images"], [(96, 128), (80, 100)]))
        context = model.roi_heads.context_features(features, [(96, 128), (80, 100)])
        direct = model.roi_heads.box_features(features, [torch.tensor([[0.0, 0.0, 128.0, 96.0]]),
                                                         torch.tensor([[0.0, 0.0, 100.0, 80.0]])])
    torch.testing.assert_close(context, direct)


@pytest.mark.parametrize("neck", ["none", "fpn"])
def test_multiscale_maxout_equals_the_max_of_the_two_chosen_scales(neck):
    model = tiny_detector(neck)
    scales = (48, 96, 160)
    tester = TestTimeDetector([model], TestTimeOptions(scales=scales), base_size=96)
    batch = two_image_batch()
    views, _, _ = tester.prepare(batch)
    (view,) = views
    boxes = [torch.tensor([[4.0, 4.0, 20.0, 24.0], [10.0, 5.0, 90.0, 80.0], [30.0, 30.0, 60.0, 50.0]]),
             torch.tensor([[0.0, 0.0, 100.0, 80.0], [50.0, 20.0, 58.0, 30.0]])]
    got = tester.region_features(view, boxes)
    factors = [s / 96 for s in scales]
    first, second = select_scale_pairs(torch.cat(boxes), factors, model.roi_heads.canonical_box_size)
    assert len(set(first.tolist()) | set(second.tolist())) >= 2  # the maxout really mixes scales
    expected = []
    flat_image = [i for i, b in enumerate(boxes) for _ in range(len(b))]
    for row, (box, img) in enumerate(zip(torch.cat(boxes), flat_image)):
        per_scale = []
        for s in (first[row], second[row]):
            f = factors[int(s)]
            feats = {k: v[img: img + 1] for k, v in view.features[f].items()}
            per_scale.append(model.roi_heads.box_features(feats, [box[None] * f]))
        expected.append(torch.maximum(*per_scale))
    torch.testing.assert_close(got, torch.cat(expected), atol=1e-5, rtol=1e-5)


def test_flip_view_scores_mirror_exactly():
    """Scoring the mirrored image's proposals on the mirrored image gives the same scores and the mirrored
    boxes: flip testing averages two views that are exact mirrors of each other."""
    model = tiny_detector("none", context=True)
    batch = two_image_batch()
    sizes = [(96, 128), (80, 100)]
    mirrored = dict(batch, images=flip_images(batch["images"], sizes))
    tester = TestTimeDetector([model], TestTimeOptions(flip=True), base_size=96)
    views, proposals, _ = tester.prepare(batch)
    views_m, _, _ = tester.prepare(mirrored)
    scores, boxes = tester.score(views, proposals, sizes)
    proposals_m = [flip_boxes(p, w) for p, (_, w) in zip(proposals, sizes)]
    scores_m, boxes_m = tester.score(views_m, proposals_m, sizes)
    torch.testing.assert_close(scores_m, scores, atol=1e-5, rtol=1e-4)
    counts = [len(p) for p in proposals]
    unmirrored = torch.cat([flip_boxes(b, w) for b, (_, w) in zip(boxes_m.split(counts), sizes)])
    torch.testing.assert_close(unmirrored, boxes, atol=1e-3, rtol=1e-4)


def test_refinement_without_regression_is_nms_at_the_refinement_threshold():
    """With a box regressor that predicts zero deltas, the refined boxes are the proposals themselves: the
    second pass repeats the first, and refinement reduces to NMS at 0.3 over the (duplicated) predictions."""
    model = tiny_detector("none")
    predictor = model.roi_heads.box_predictor
    torch.nn.init.zeros_(predictor.bbox_pred.weight)
    torch.nn.init.zeros_(predictor.bbox_pred.bias)
    batch = two_image_batch()
    refined = TestTimeDetector([model], TestTimeOptions(box_refinement=True, box_voting_iou=0.0), 96)(batch)
    predictor.nms_thresh = 0.3
    with torch.no_grad():
        plain = model(batch)
    for r, p in zip(refined, plain):
        assert len(p["boxes"]) > 0
        torch.testing.assert_close(as_sorted_rows(r), as_sorted_rows(p))


def test_ensemble_of_identical_members_equals_one_member():
    model = tiny_detector("none")
    batch = two_image_batch()
    options = TestTimeOptions(box_refinement=True)
    one = TestTimeDetector([model], options, 96)(batch)
    two = TestTimeDetector([model, model], options, 96)(batch)
    for a, b in zip(one, two):
        torch.testing.assert_close(as_sorted_rows(a), as_sorted_rows(b))


def test_ensemble_members_must_agree_on_classes():
    with pytest.raises(ValueError, match="numbers of classes"):
        TestTimeDetector([tiny_detector(), build_detector(slim_cfg(), num_classes=5)], TestTimeOptions(), 96)


@pytest.mark.parametrize("options", [
    TestTimeOptions(box_refinement=True),
    TestTimeOptions(scales=(64, 96, 128)),
    TestTimeOptions(flip=True),
    TestTimeOptions(box_refinement=True, scales=(48, 96, 144), flip=True),
])
def test_every_switch_gives_valid_detections(options):
    model = tiny_detector("none", context=True)
    batch = two_image_batch()
    for det, (h, w) in zip(TestTimeDetector([model, tiny_detector(seed=1, context=True)], options, 96)(batch),
                           batch["image_sizes"]):
        assert 0 < len(det["boxes"]) <= 100
        assert det["boxes"][:, 0::2].min() >= 0 and det["boxes"][:, 2].max() <= w and det["boxes"][:, 3].max() <= h
        assert bool((det["scores"][:-1] >= det["scores"][1:]).all())
        assert set(det["labels"].tolist()) <= {1, 2, 3}
        assert math.isfinite(float(det["boxes"].sum()))
