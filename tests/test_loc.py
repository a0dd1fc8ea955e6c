"""ImageNet localization entry (appendix C): per-class RPN, R-CNN stage parts, metric, test-time views and box
voting, data checks. The tools end to end are in test_loc_train.py."""

import os

import numpy as np
import pytest
import torch
from torch import nn

from backbones import CheckpointError, backbone_checkpoint, build_resnet
from backbones.engine.config import load_config
from backbones.pretraining.config import PretrainConfig
from backbones.pretraining.data import scan_image_folder, split_holdout
from backbones.pretraining.synthetic import render_classification_image, render_shape_image
from detection.localization.config import LocConfig
from detection.localization.data import (LocDataError, boxes_to_original, center_view, dense_view, load_ilsvrc,
                                         load_imagefolder)
from detection.localization.metrics import centre_box, image_hits
from detection.localization.model import PerClassRPN, PerClassRPNHead, gather_class, load_classifier
from detection.localization.synthetic import annotation_xml
from detection.localization.trainer import check_holdout
from detection.modeling.anchor_generator import AnchorGenerator
from detection.modeling.box_coder import BoxCoder
from detection.modeling.matcher import Matcher



# -- per-class RPN ------------------------------------------------------------------------------

def test_head_outputs_a_times_k_logits_and_deltas_and_gather_picks_the_class():
    head = PerClassRPNHead(in_channels=4, num_anchors=2, num_classes=3, conv_channels=5)
    logits, deltas = head(torch.randn(2, 4, 3, 5))
    assert logits.shape == (2, 2 * 3, 3, 5) and deltas.shape == (2, 2 * 3 * 4, 3, 5)
    # Channel a*K + k holds anchor a, class k: encode (a, k, y, x) in the value and read it back.
    a_, k_, y_, x_ = torch.meshgrid(torch.arange(2), torch.arange(3), torch.arange(3), torch.arange(5), indexing="ij")
    code = (1000 * a_ + 100 * k_ + 10 * y_ + x_).float().reshape(1, 6, 3, 5).repeat(2, 1, 1, 1)
    dcode = code.view(2, 2, 3, 1, 3, 5).repeat(1, 1, 1, 4, 1, 1) + torch.arange(4).view(1, 1, 1, 4, 1, 1) / 10
    lc, dc = gather_class(code, dcode.reshape(2, 24, 3, 5), torch.tensor([2, 0]), num_anchors=2)
    assert lc.shape == (2, 3 * 5 * 2) and dc.shape == (2, 30, 4)
    idx = (1 * 5 + 4) * 2 + 1  # (y=1, x=4, a=1): the anchors' (y, x, anchor) order
    assert lc[0, idx] == 1000 + 200 + 14 and lc[1, idx] == 1000 + 14
    assert dc[0, idx].tolist() == pytest.approx([1214.0, 1214.1, 1214.2, 1214.3])


class FixedHead(nn.Module):
    """Returns the given outputs whatever the features (a hand-made case)."""

    def __init__(self, logits, deltas, num_anchors):
        super().__init__()
        self.logits, self.deltas, self.num_anchors = logits, deltas, num_anchors

    def forward(self, x):
        return self.logits, self.deltas


def hand_made_rpn():
    # One row of two positions (stride 16), anchors of size 16 and 32: (y0,x0,a0) [-8,-8,8,8],
    # (y0,x0,a1) [-16,-16,16,16], (y0,x1,a0) [8,-8,24,8], (y0,x1,a1) [0,-16,32,16]. K = 3 classes.
    gen = AnchorGenerator([[16.0, 32.0]], [[1.0]], [16])
    logits = torch.full((1, 2 * 3, 1, 2), 50.0)  # other classes' channels: wild values that must be ignored
    deltas = torch.full((1, 2 * 3 * 4, 1, 2), 9.0)
    cls1 = torch.tensor([[0.5, -1.0], [2.0, 0.0]])  # [anchor][x] logits of class 1
    for a in range(2):
        logits[0, a * 3 + 1, 0] = cls1[a]
        deltas[0, (a * 3 + 1) * 4:(a * 3 + 2) * 4] = 0.0
    deltas[0, (0 * 3 + 1) * 4 + 0, 0, 1] = 0.1  # class 1, anchor 0 at x=1: dx = 0.1
    rpn = PerClassRPN(FixedHead(logits, deltas, 2), gen, BoxCoder(), Matcher([0.3, 0.7], [0, -1, 1], True),
                      batch_size_per_image=8, positive_fraction=0.5, smooth_l1_beta=1.0 / 9)
    return rpn


def test_per_class_rpn_losses_on_a_hand_made_case():
    rpn = hand_made_rpn()
    gt = torch.tensor([[8.0, -8.0, 24.0, 8.0]])  # exactly anchor (x1, a0); IoUs of the others: 0, 0.11, 0.25
    losses = rpn(torch.zeros(1, 1, 1, 2), torch.tensor([1]), [gt])
    # All 4 anchors sampled (1 positive, 3 negatives <= 8 at 1:1), logistic on class 1's channel only.
    flat_logits = torch.tensor([0.5, 2.0, -1.0, 0.0])  # (x0,a0), (x0,a1), (x1,a0), (x1,a1)
    labels = torch.tensor([0.0, 0.0, 1.0, 0.0])
    expected_cls = torch.nn.functional.binary_cross_entropy_with_logits(flat_logits, labels)
    assert losses["loss_cls"].item() == pytest.approx(expected_cls.item(), rel=1e-5)
    # Smooth L1 (beta 1/9) of class 1's regressor on the positive: |0.1| < 1/9 -> 0.5 * 0.01 * 9, over 4 sampled.
    assert losses["loss_loc"].item() == pytest.approx(0.5 * 0.01 * 9 / 4, rel=1e-4)


def test_per_class_rpn_samples_at_most_eight_anchors_one_to_one():
    gen = AnchorGenerator([[16.0]], [[1.0]], [8])
    rpn = PerClassRPN(PerClassRPNHead(4, 1, 5, 0), gen, BoxCoder(), Matcher([0.3, 0.7], [0, -1, 1], True),
                      batch_size_per_image=8, positive_fraction=0.5)
    anchors = gen([torch.zeros(1, 4, 8, 8)])[0]
    gt = [{"boxes": torch.tensor([[0.0, 0.0, 64.0, 64.0]])}, {"boxes": anchors[[9, 10, 18, 19, 27, 28]] + 0.5}]
    labels, _ = rpn.label_and_sample_anchors(anchors, gt)
    assert ((labels >= 0).sum(1) <= 8).all() and (labels == 1).sum(1)[1] == 4 and (labels == 0).sum(1)[1] == 4


def test_class_candidates_decode_each_class_with_its_own_regressor():
    rpn = hand_made_rpn()
    (boxes, scores), = rpn.class_candidates(torch.zeros(1, 1, 1, 2), [1], (64, 64), pre_topk=10)
    assert scores[0].item() == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item())  # best: (x0, a1)
    assert boxes[0].tolist() == pytest.approx([0, 0, 16, 16])  # [-16,-16,16,16] clipped to the image
    i = int(torch.nonzero(scores == torch.sigmoid(torch.tensor(-1.0))).flatten()[0])
    assert boxes[i].tolist() == pytest.approx([8 + 1.6, 0, 24 + 1.6, 8])  # dx 0.1 * width 16


def test_rcnn_rois_labels_losses_and_mirroring(tmp_path):
    import cv2
    from detection.localization.data import LocRecord
    from detection.localization.rcnn import rcnn_losses
    from detection.localization.rcnn_data import RoIBatchSampler, RoIDataset, roi_table, warp_crops
    from detection.modeling.box_coder import BoxCoder
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, :40] = 255
    cv2.imwrite(str(tmp_path / "a.png"), image)
    rec = LocRecord(str(tmp_path / "a.png"), 1, np.array([[10, 10, 30, 30]], np.float32), np.array([1]), 80, 40)
    table = roi_table([rec], [np.array([[12, 10, 32, 31], [40, 0, 80, 40]], np.float32)], 0.5)
    assert table["fg"].tolist() == [True, False, True] and table["box"].shape == (3, 4)  # + the gt box itself
    assert table["pos"].tolist() == [0, 2] and table["neg"].tolist() == [1]
    batches = list(RoIBatchSampler(table["pos"], table["neg"], 4, 0.25, seed=0, start=2, stop=4))
    assert len(batches) == 2 and [sum(table["fg"][i] for i, _ in b) for b in batches] == [1, 1]
    assert list(RoIBatchSampler(table["pos"], table["neg"], 4, 0.25, seed=0, start=0, stop=4))[2:] == batches  # resumable
    ds = RoIDataset([rec], table, 16, BoxCoder((10.0, 10.0, 5.0, 5.0)))
    crop, label, fg, deltas = ds[(0, False)]
    crop_m, _, _, deltas_m = ds[(0, True)]
    assert crop.shape == (3, 16, 16) and label == 1 and fg
    assert torch.equal(crop_m, crop.flip(-1)) and deltas[0] < 0
    assert deltas_m.tolist() == pytest.approx([-deltas[0].item(), *deltas[1:].tolist()])
    assert warp_crops(image, np.array([[30.0, 0, 50, 40]]), 8)[0, :, :4].min() == 255  # left half white
    logits = torch.tensor([[9.0, 0.0], [9.0, 2.0]])
    deltas = torch.zeros(2, 2, 4)
    deltas[0, 1] = torch.tensor([0.5, 0, 0, 0])
    losses = rcnn_losses(logits, deltas, torch.tensor([1, 1]), torch.tensor([True, False]), torch.zeros(2, 4))
    expected = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0]))
    assert losses["loss_rcnn_cls"].item() == pytest.approx(expected.item())
    assert losses["loss_rcnn_loc"].item() == pytest.approx(0.5 * 0.25 / 2)  # smooth L1 (beta 1) over 2 RoIs


# -- metric ----------------------------------------------------------------------------------------

def test_localization_metric_top1_top5_and_oracle():
    gt_boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 90.0, 90.0]])
    gt_labels = torch.tensor([2, 2])
    right, wrong = torch.tensor([1.0, 1.0, 10.0, 10.0]), torch.tensor([20.0, 20.0, 40.0, 40.0])
    # Right box under a wrong first class, right class second: top-1 wrong, top-5 right.
    hits = image_hits([5, 2, 7], {5: right, 2: torch.tensor([52.0, 52.0, 90.0, 90.0]), 7: wrong}, 2, gt_boxes, gt_labels)
    assert hits == {"cls_top1": 0, "cls_top5": 1, "loc_top1": 0, "loc_top5": 1, "oracle": 1}
    # Right class first but its box misses (IoU < 0.5): every localization count wrong, classification right.
    hits = image_hits([2, 5], {2: wrong, 5: right}, 2, gt_boxes, gt_labels)
    assert hits == {"cls_top1": 1, "cls_top5": 1, "loc_top1": 0, "loc_top5": 0, "oracle": 0}
    # True class outside the top-5: only the oracle (ground-truth class) guess can be right.
    hits = image_hits([0, 1, 3, 4, 5, 2], {0: right, 1: right, 3: right, 4: right, 5: right, 2: right}, 2,
                      gt_boxes, gt_labels, topk=5)
    assert hits == {"cls_top1": 0, "cls_top5": 0, "loc_top1": 0, "loc_top5": 0, "oracle": 1}
    # IoU exactly at the threshold counts: [0,0,10,10] vs [0,0,10,5] is 0.5.
    assert image_hits([2], {2: torch.tensor([0.0, 0.0, 10.0, 5.0])}, 2, gt_boxes, gt_labels)["loc_top1"] == 1
    assert centre_box(100, 50, (0.5, 0.2)).tolist() == [25, 20, 75, 30]


# -- test-time views -------------------------------------------------------------------------------

def test_dense_and_centre_views_map_boxes_back_to_the_original_image():
    image = np.zeros((100, 200, 3), np.uint8)
    image[30:70, 120:180] = 255  # the object: x 120..180, y 30..70
    for size in (50, 100, 160):
        view_image, view = dense_view(image, size)
        ys, xs = np.nonzero(view_image[:, :, 0] > 127)
        found = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
        assert boxes_to_original(found, view, (100, 200))[0].tolist() == pytest.approx([120, 30, 180, 70], abs=2.5)
    view_image, view = center_view(image, 50, 40)  # resized 50x100, crop at left 30, top 5
    assert view_image.shape == (40, 40, 3) and (view.left, view.top) == (30, 5)
    assert boxes_to_original(torch.tensor([[0.0, 0.0, 40.0, 40.0]]), view, (100, 200))[0].tolist() == \
        pytest.approx([60, 10, 140, 90])
    assert boxes_to_original(torch.tensor([[-5.0, 0.0, 500.0, 10.0]]), view, (100, 200))[0].tolist() == \
        pytest.approx([50, 10, 200, 30])  # clipped to the original image


def test_shape_renderer_returns_box_and_classification_images_are_unchanged():
    img, box = render_shape_image(np.random.default_rng(4), "square", 64, (0.12, 0.3))
    x1, y1, x2, y2 = box
    assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64 and (x2 - x1) <= 0.6 * 64 * 1.5
    a = render_classification_image(np.random.default_rng(4), "star", 32)
    assert np.array_equal(a, render_shape_image(np.random.default_rng(4), "star", 32)[0])


# -- data checks ----------------------------------------------------------------------------------

def write_xml(path, wnid, boxes, size=(64, 64)):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(annotation_xml(wnid, path.stem, size[0], size[1], [(wnid, b) for b in boxes]))


def tiny_imagefolder(root, classes=("n01", "n02"), per_class=5):
    import cv2
    for c in classes:
        (root / "images" / c).mkdir(parents=True)
        for i in range(per_class):
            cv2.imwrite(str(root / "images" / c / f"{c}_{i}.JPEG"), np.full((64, 64, 3), 100, np.uint8))
            write_xml(root / "annotations" / f"{c}_{i}.xml", c, [[4, 4, 40, 40]])
    return root


def loc_cfg(root, *extra):
    return load_config(LocConfig, None, ["data.layout=imagefolder", f"data.train_images={root}/images",
                                         f"data.train_annotations={root}/annotations", *extra])


def test_holdout_is_the_pretraining_split(tmp_path):
    root = tiny_imagefolder(tmp_path)
    cfg = loc_cfg(root, "data.val_fraction=0.4", "data.holdout_seed=3")
    train, val, stats = load_imagefolder(cfg.data, ["n01", "n02", "n03"])
    _, samples = scan_image_folder(str(root / "images"))
    pre_train, pre_val = split_holdout(samples, 0.4, 3)
    assert [r.path for r in val] == [p for p, _ in pre_val] and [r.path for r in train] == [p for p, _ in pre_train]
    assert {r.label for r in val} == {0, 1} and stats["train_unannotated_skipped"] == 0
    pre_cfg = load_config(PretrainConfig, None, [f"data.train_dir={root}/images", "data.val_dir=",
                                                 "data.val_fraction=0.2", "seed=7"])
    from backbones.engine.config import to_yaml
    with pytest.raises(LocDataError, match=r"data.val_fraction=0.2 data.holdout_seed=7"):
        check_holdout(cfg, {"config": to_yaml(pre_cfg)}, "clf.pth")
    check_holdout(loc_cfg(root, "data.val_fraction=0.2", "data.holdout_seed=7"), {"config": to_yaml(pre_cfg)}, "c")


def test_bad_annotations_name_file_field_and_fix(tmp_path):
    root = tiny_imagefolder(tmp_path)
    cfg = loc_cfg(root, "data.skip_unannotated_train=false")
    classes = ["n01", "n02"]
    write_xml(root / "annotations" / "n01_1.xml", "n01", [[4, 4, 80, 40]])
    with pytest.raises(LocDataError, match=r"(?s)n01_1.xml: object 0 <bndbox> .* outside the 64x64 image .*data.clip_boxes=true"):
        load_imagefolder(cfg.data, classes)
    assert len(load_imagefolder(loc_cfg(root, "data.clip_boxes=true").data, classes)[0]) > 0
    write_xml(root / "annotations" / "n01_1.xml", "n09", [[4, 4, 40, 40]])
    with pytest.raises(LocDataError, match=r"n01_1.xml: <object><name> 'n09' is not one of the classifier's"):
        load_imagefolder(cfg.data, classes)
    write_xml(root / "annotations" / "n01_1.xml", "n01", [[4, 4, 40, 40]])
    with pytest.raises(LocDataError, match=r"class folders \['n02'\] are not among the classifier's"):
        load_imagefolder(cfg.data, ["n01", "n03"])
    (root / "annotations" / "n02_3.xml").unlink()
    with pytest.raises(LocDataError, match=r"n02_3.JPEG: no annotation .*n02_3.xml"):
        load_imagefolder(cfg.data, classes)
    (root / "annotations" / "n02_0.xml").write_text("<annotation><size><width>64</width></size></annotation>")
    with pytest.raises(LocDataError, match=r"n02_0.xml: missing field <height>"):
        load_imagefolder(loc_cfg(root).data, classes)


def test_every_annotation_problem_is_reported_in_one_pass(tmp_path):
    """Four broken records of four kinds, in the train and the held-out val split: one error lists them all,
    grouped by kind, each with its file and its fix."""
    root = tiny_imagefolder(tmp_path)
    write_xml(root / "annotations" / "n01_1.xml", "n01", [[4, 4, 80, 40]])  # outside the 64x64 image
    write_xml(root / "annotations" / "n01_2.xml", "n09", [[4, 4, 40, 40]])  # a class the classifier lacks
    write_xml(root / "annotations" / "n02_1.xml", "n02", [[30, 4, 10, 40]])  # xmax < xmin
    (root / "annotations" / "n02_0.xml").write_text("<annotation><size><width>64</width></size></annotation>")
    (root / "annotations" / "n02_3.xml").unlink()
    with pytest.raises(LocDataError) as info:
        load_imagefolder(loc_cfg(root, "data.skip_unannotated_train=false").data, ["n01", "n02"])
    report = str(info.value)
    for name in ("n01_1.xml", "n01_2.xml", "n02_1.xml", "n02_0.xml", "n02_3.JPEG"):
        assert report.count(name) == 1, (name, report)
    for kind in ("box outside its image", "object of a class the classifier does not know",
                 "empty box (xmax <= xmin or ymax <= ymin)", "unreadable or incomplete XML", "image without annotation"):
        assert f"1 x {kind}" in report, (kind, report)
    assert "(train)" in report and "(val)" in report and "data.clip_boxes=true" in report


def test_images_are_checked_against_their_xml_and_strict_false_drops_what_is_wrong(tmp_path):
    """A photo whose size is not its XML's (the boxes are in the XML's pixels), an unreadable file and a box
    outside its image: one error by default; with data.strict_train/strict_val=false the three records are
    dropped, the rest load, and the counts are returned for summary.json."""
    import cv2
    root = tiny_imagefolder(tmp_path)
    cv2.imwrite(str(root / "images" / "n01" / "n01_3.JPEG"), np.full((48, 64, 3), 100, np.uint8))  # XML: 64x64
    (root / "images" / "n02" / "n02_4.JPEG").write_bytes(b"not a jpeg")
    write_xml(root / "annotations" / "n02_2.xml", "n02", [[4, 4, 80, 40]])
    with pytest.raises(LocDataError) as info:
        load_imagefolder(loc_cfg(root).data, ["n01", "n02"])
    report = str(info.value)
    for text in ("1 x image size differs from the annotation", "n01_3.JPEG", "1 x unreadable image", "n02_4.JPEG",
                 "1 x box outside its image", "n02_2.xml", "data.strict_train / data.strict_val=false"):
        assert text in report, (text, report)
    train, val, stats = load_imagefolder(loc_cfg(root, "data.strict_train=false", "data.strict_val=false").data,
                                         ["n01", "n02"])
    kept = {os.path.basename(r.path) for r in train + val}
    assert len(kept) == 7 and not kept & {"n01_3.JPEG", "n02_4.JPEG", "n02_2.JPEG"}
    counts = {}
    for split in ("train", "val"):
        for kind, n in stats["problems"][split].items():
            counts[kind] = counts.get(kind, 0) + n
    assert counts == {"image size differs from the annotation": 1, "unreadable image": 1, "box outside its image": 1}


def test_wrong_classifier_checkpoints_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="model.classifier is empty"):
        load_classifier("")
    net = build_resnet(18, num_classes=0, base_width=8)
    torch.save(backbone_checkpoint(net, [0.5] * 3, [0.2] * 3, []), tmp_path / "trunk.pth")
    with pytest.raises(CheckpointError, match=r"trunk.pth: a backbone without its classifier"):
        load_classifier(str(tmp_path / "trunk.pth"))
    torch.save({"model": {"x": torch.zeros(1)}, "iteration": 3}, tmp_path / "det.pth")
    with pytest.raises(CheckpointError, match=r"det.pth: neither a resdet backbone"):
        load_classifier(str(tmp_path / "det.pth"))
    net = build_resnet(18, num_classes=3, base_width=8)
    torch.save(backbone_checkpoint(net, [0.5] * 3, [0.2] * 3, ["a", "b", "c"]), tmp_path / "clf.pth")
    model, _, names = load_classifier(str(tmp_path / "clf.pth"))
    assert names == ["a", "b", "c"] and not any(p.requires_grad for p in model.parameters())


def test_ilsvrc_layout_skips_unannotated_train_images_and_reads_val_classes_from_xml(tmp_path):
    import cv2
    root = tmp_path / "ILSVRC"
    (root / "Data/CLS-LOC/val").mkdir(parents=True)
    (root / "LOC_synset_mapping.txt").write_text("n01 tench, Tinca tinca\nn02 goldfish\n")
    for wnid in ("n01", "n02"):
        (root / "Data/CLS-LOC/train" / wnid).mkdir(parents=True)
        for i in range(3):
            cv2.imwrite(str(root / f"Data/CLS-LOC/train/{wnid}/{wnid}_{i}.JPEG"), np.zeros((32, 48, 3), np.uint8))
            if i < 2:  # the third has no box, as most ILSVRC train images
                write_xml(root / f"Annotations/CLS-LOC/train/{wnid}/{wnid}_{i}.xml", wnid, [[1, 1, 20, 20]], (48, 32))
    for i, wnid in enumerate(("n02", "n01")):
        cv2.imwrite(str(root / f"Data/CLS-LOC/val/ILSVRC2012_val_{i}.JPEG"), np.zeros((32, 48, 3), np.uint8))
        write_xml(root / f"Annotations/CLS-LOC/val/ILSVRC2012_val_{i}.xml", wnid, [[1, 1, 20, 20]], (48, 32))
    cfg = load_config(LocConfig, None, ["data.layout=ilsvrc", f"data.ilsvrc_root={root}"])
    train, val, stats = load_ilsvrc(cfg.data, ["n00", "n01", "n02"])  # indices by name in the classifier's order
    assert len(train) == 4 and stats["train_unannotated_skipped"] == 2
    assert [r.label for r in val] == [2, 1]
    (root / "Annotations/CLS-LOC/val/ILSVRC2012_val_1.xml").unlink()
    with pytest.raises(LocDataError, match=r"ILSVRC2012_val_1.JPEG: no annotation"):
        load_ilsvrc(cfg.data, ["n01", "n02"])


def test_box_voting_prefers_what_several_views_agree_on():
    from detection.localization.evaluate import vote
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [0.0, 1.0, 10.0, 11.0], [50.0, 50, 60, 60]])
    scores = torch.tensor([0.5, 0.5, 0.5, 0.9])  # a lone confident box vs three that agree
    new_boxes, new_scores = vote(boxes, scores, num_views=3)
    assert int(new_scores.argmax()) in (0, 1, 2) and new_scores[3] == pytest.approx(0.3)
    assert new_boxes[0].tolist() == pytest.approx([1 / 3, 1 / 3, 31 / 3, 31 / 3])  # score-weighted mean


# -- the CLS-LOC validation blacklist -------------------------------------------------------------------

def test_clsloc_val_blacklist_scores_classification_only(tmp_path, monkeypatch):
    """The devkit's eval_localization leaves the blacklisted val images out; its classification keeps them.
    Four val images; a stand-in localizer guesses class 1 with a right box, except on image 3 (blacklisted),
    where it guesses a wrong class and box: the localization errors stay 0 over the 3 scored images, the
    classification errors are 1/4, and without the blacklist image 3 is a localization error too."""
    import cv2
    from detection.localization import evaluate as loc_eval
    from detection.localization.config import LocEvalConfig
    from detection.localization.data import LocRecord, apply_val_blacklist
    box = np.array([[4.0, 4.0, 20.0, 20.0]], np.float32)
    records = []
    for n in (1, 2, 3, 4):
        path = str(tmp_path / f"ILSVRC2012_val_{n:08d}.JPEG")
        cv2.imwrite(path, np.zeros((32, 32, 3), np.uint8))
        records.append(LocRecord(path, 1, box, np.array([1]), 32, 32))

    def stand_in(loc_net, classifier, image, mode, eval_cfg, crop_size, device, mean_t, std_t, extra, **kw):
        blacklisted = not image.any() and image.shape[0] == 33  # image 3 is written 33 px high, below
        guess, hit = (0, torch.tensor([[25.0, 25.0, 31.0, 31.0]])) if blacklisted else (1, torch.tensor(box))
        return None, [guess], {c: (hit, torch.ones(1)) for c in {guess, *extra}}

    cv2.imwrite(records[2].path, np.zeros((33, 32, 3), np.uint8))
    records[2].height = 33
    monkeypatch.setattr(loc_eval, "localize_image", stand_in)
    listed = tmp_path / "ILSVRC2015_clsloc_validation_blacklist.txt"
    listed.write_text("3\n7\n")
    assert apply_val_blacklist(records, str(listed)) == 1
    assert [r.loc_scored for r in records] == [True, True, False, True]
    eval_cfg = load_config(LocEvalConfig, None, [])
    args = (nn.Identity(), nn.Identity(), records, "center", eval_cfg, 32, torch.device("cpu"), [0, 0, 0], [1, 1, 1])
    m = loc_eval.evaluate_localization(*args, workers=0, progress=False)
    assert (m["images"], m["loc_images"]) == (4, 3)
    assert m["loc_top1_err"] == m["loc_top5_err"] == m["oracle_err"] == 0.0
    assert m["cls_top1_err"] == m["cls_top5_err"] == 0.25
    assert "boxes scored on 3, the rest blacklisted" in loc_eval.format_errors("center", m)
    records[2].loc_scored = True
    m = loc_eval.evaluate_localization(*args, workers=0, progress=False)
    assert (m["images"], m["loc_images"]) == (4, 4) and m["loc_top1_err"] == 0.25 and m["cls_top1_err"] == 0.25


def test_clsloc_val_blacklist_errors_name_the_file_and_the_fix(tmp_path):
    from detection.localization.data import LocRecord, apply_val_blacklist
    records = [LocRecord(str(tmp_path / "n01_1.JPEG"), 0, np.zeros((1, 4), np.float32), np.array([0]), 8, 8)]
    with pytest.raises(LocDataError, match="blacklist file not found; fix: set data.val_blacklist"):
        apply_val_blacklist(records, str(tmp_path / "none.txt"))
    listed = tmp_path / "blacklist.txt"
    listed.write_text("36\n36 n01\nx\n")
    with pytest.raises(LocDataError, match=r"2 line\(s\) are not one val image number \(line 2: '36 n01'; line 3"):
        apply_val_blacklist(records, str(listed))
    listed.write_text("36\n")
    with pytest.raises(LocDataError, match=r"none of the 1 val images is named ILSVRC2012_val_<N>.*val_blacklist=''"):
        apply_val_blacklist(records, str(listed))
