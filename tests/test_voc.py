"""PASCAL VOC and ImageNet DET: XML loading (layouts, box convention, difficult objects, load-time
errors), the devkit-semantics evaluator against hand-computed precision/recall curves, and a short
train + eval through detection.engine on a synthetic VOC set."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from det_helpers import SLIM as DET_SLIM
from backbones.engine.config import ConfigError, load_config
from detection.config import DetConfig
from detection.data.coco import CocoDetection, DatasetError
from detection.data.synthetic import make_synthetic_coco, make_synthetic_voc
from detection.data.report import dataset_report, format_report
from detection.data.voc import VOC_CLASSES, VocDetection, voc_to_coco_dict
from detection.data.build import (DataNotFoundError, build_datasets, build_evaluators, prepare_data_paths,
                                  val_loader)
from detection.engine import train
from detection.evaluation.loop import evaluate
from detection.export import sample_val_images
from detection.evaluation import format_metrics_table
from detection.evaluation.coco_eval import COCOEvaluator
from detection.evaluation.voc_eval import (VOCEvaluator, ground_truth_from_coco, imagenet_iou_thresholds,
                                           match_detections, precision_recall, voc07_ap, voc_ap)
from detection.modeling.postprocessing import detections_to_image

SYNTH = dict(num_train=12, num_val=6, image_size=96, seed=3, min_obj=10, max_obj=48, objects_per_image=(1, 3))


# ---- a hand-written VOC layout ------------------------------------------------------------------------

def write_voc(root, images, split="trainval", size=(100, 80)):
    """``images``: name -> list of (class, xmin, ymin, xmax, ymax, difficult) in VOC's 1-based coordinates;
    writes JPEGImages, Annotations and ImageSets/Main/<split>.txt under ``root``."""
    import cv2
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    width, height = size
    for name, objects in images.items():
        cv2.imwrite(os.path.join(root, "JPEGImages", name + ".jpg"), np.full((height, width, 3), 128, np.uint8))
        xml = [f"<annotation><filename>{name}.jpg</filename>",
               f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
        for cls, x1, y1, x2, y2, difficult in objects:
            xml.append(f"<object><name>{cls}</name><difficult>{difficult}</difficult><bndbox><xmin>{x1}</xmin>"
                       f"<ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")
        with open(os.path.join(root, "Annotations", name + ".xml"), "w") as f:
            f.write("\n".join(xml + ["</annotation>"]))
    with open(os.path.join(root, "ImageSets", "Main", f"{split}.txt"), "w") as f:
        f.write("".join(f"{name}\n" for name in images))
    return f"{root}:{split}"


@pytest.fixture
def voc07(tmp_path):
    return write_voc(str(tmp_path / "VOC2007"), {
        "000001": [("dog", 1, 1, 10, 20, 0), ("person", 21, 11, 60, 70, 1)],
        "000002": [("cat", 5, 5, 100, 80, 0)],
    })


def test_voc_boxes_become_zero_based_and_difficult_is_ignored_by_default(voc07):
    data = voc_to_coco_dict([voc07])
    assert [c["name"] for c in data["categories"]] == list(VOC_CLASSES)  # the 20 classes, devkit order
    anns = data["annotations"]
    # xmin=1..xmax=10 are the first ten pixel columns: [0, 10) here, width 10 as the devkit counts it
    assert anns[0]["bbox"] == [0.0, 0.0, 10.0, 20.0] and anns[0]["category_id"] == VOC_CLASSES.index("dog") + 1
    assert anns[1]["bbox"] == [20.0, 10.0, 40.0, 60.0] and anns[1]["difficult"] == 1 and anns[1]["iscrowd"] == 1
    assert anns[2]["bbox"] == [4.0, 4.0, 96.0, 76.0]  # up to the image's border (100x80)

    ds = VocDetection([voc07], skip_corrupt=False)
    item = ds[0]
    assert item["boxes"].tolist() == [[0.0, 0.0, 10.0, 20.0]] and item["labels"].tolist() == [12]
    assert item["crowd_boxes"].tolist() == [[20.0, 10.0, 60.0, 70.0]]  # ignore region: neither fg nor bg
    assert ds.image_names == {1: "000001", 2: "000002"} and ds.stats["difficult"] == 1


@pytest.mark.parametrize("mode, boxes, crowd", [("train", 2, 0), ("drop", 1, 0), ("ignore", 1, 1)])
def test_training_difficult_modes(voc07, mode, boxes, crowd):
    item = VocDetection([voc07], difficult=mode, skip_corrupt=False)[0]
    assert len(item["boxes"]) == boxes and len(item["crowd_boxes"]) == crowd


def test_07_plus_12_concatenates_and_keeps_image_names(tmp_path, voc07):
    voc12 = write_voc(str(tmp_path / "VOC2012"), {"2008_000001": [("car", 2, 2, 30, 30, 0)]}, split="trainval")
    ds = VocDetection([voc07, voc12], skip_corrupt=False)
    assert len(ds) == 3 and ds.image_names == {1: "000001", 2: "000002", 3: "2008_000001"}
    assert ds.records[2]["file_name"] == str(tmp_path / "VOC2012" / "JPEGImages" / "2008_000001.jpg")
    assert ds[2]["labels"].tolist() == [VOC_CLASSES.index("car") + 1]


def test_synthetic_voc_matches_the_coco_writer_box_for_box(tmp_path):
    """The VOC writer stores 1-based inclusive boxes; read back they equal make_synthetic_coco's boxes
    for the same parameters, difficult ones (under 12 px) as crowd regions."""
    voc = make_synthetic_voc(tmp_path / "voc", **SYNTH)
    coco = make_synthetic_coco(tmp_path / "coco", **SYNTH)
    a = VocDetection(voc["train_sets"], class_names=voc["class_names"], difficult="train", skip_corrupt=False)
    b = CocoDetection(coco["train_images"], coco["train_annotations"], skip_corrupt=False)
    assert a.class_names == b.class_names == ["circle", "rectangle", "triangle", "cross"]
    assert len(a) == len(b) == SYNTH["num_train"]
    for ra, rb in zip(a.records, b.records):
        np.testing.assert_array_equal(ra["boxes"], rb["boxes"])
        np.testing.assert_array_equal(ra["labels"], rb["labels"])
    ignored = VocDetection(voc["train_sets"], class_names=voc["class_names"], skip_corrupt=False)
    small = sum(int((np.minimum(r["boxes"][:, 2] - r["boxes"][:, 0], r["boxes"][:, 3] - r["boxes"][:, 1]) < 12).sum())
                for r in a.records)
    assert small > 0 and ignored.stats["crowd_boxes"] == ignored.stats["difficult"] == small
    assert np.array_equal(ignored[0]["image"].numpy(), b[0]["image"].numpy())  # the same pixels


def test_imagenet_det_layout_union_of_train_lists_and_synset_names(tmp_path):
    paths = make_synthetic_voc(tmp_path / "inet", layout="imagenet_det", **SYNTH)
    base = tmp_path / "inet" / "ILSVRC"
    train = VocDetection(paths["train_sets"], "imagenet_det", synsets_file=paths["synsets_file"], skip_corrupt=False)
    assert train.xml_class_names == ["n90000001", "n90000003", "n90000007", "n90000011"]  # wnids sorted
    assert train.class_names == ["circle", "rectangle", "triangle", "cross"]  # names from map_det.txt
    # train = the union of the positives of train_1..train_4.txt: the two empty images (1 and 11) are in none
    listed = {line.split()[0] for k in range(1, 5) for line in open(base / "ImageSets/DET" / f"train_{k}.txt")
              if line.split()[1] == "1"}
    assert set(train.image_names.values()) == listed and len(listed) == SYNTH["num_train"] - 2
    assert train.records[0]["file_name"].endswith("Data/DET/train/ILSVRC2013_train/synthetic/train_000001.JPEG")
    val = VocDetection(paths["val_sets"], "imagenet_det", skip_corrupt=False)  # val.txt lines are "name index"
    assert len(val) == SYNTH["num_val"] and val.class_names == val.xml_class_names  # no synsets file: wnids
    one = VocDetection([f"{base}:train_2"], "imagenet_det", class_names=train.xml_class_names, difficult="train",
                       skip_corrupt=False)
    positives = [line.split()[0] for line in open(base / "ImageSets/DET/train_2.txt") if line.split()[1] == "1"]
    assert list(one.image_names.values()) == positives  # the "-1" lines are skipped
    assert all(2 in r["labels"] for r in one.records)  # each holds a rectangle (n90000003, class 2)


# ---- load-time errors: file, field and fix named ------------------------------------------------------

def _edit_xml(set_spec, name, old, new):
    path = os.path.join(set_spec.rsplit(":", 1)[0], "Annotations", name + ".xml")
    text = open(path).read()
    assert old in text
    open(path, "w").write(text.replace(old, new))
    return path


def test_missing_image_set_file(voc07):
    root = voc07.rsplit(":", 1)[0]
    with pytest.raises(DatasetError) as err:
        VocDetection([f"{root}:test"])
    msg = str(err.value)
    assert os.path.join(root, "ImageSets", "Main", "test.txt") in msg and "splits there: trainval" in msg
    assert "fix:" in msg and "JPEGImages" in msg  # the expected layout


def test_xml_without_size(voc07):
    path = _edit_xml(voc07, "000002", "<size><width>100</width><height>80</height><depth>3</depth></size>", "")
    with pytest.raises(DatasetError, match="<size>") as err:
        VocDetection([voc07])
    assert path in str(err.value) and "fix: add <size>" in str(err.value)


def test_unknown_class_name(voc07):
    path = _edit_xml(voc07, "000002", "<name>cat</name>", "<name>kitten</name>")
    with pytest.raises(DatasetError) as err:
        VocDetection([voc07])
    msg = str(err.value)
    assert path in msg and "<name>kitten</name>" in msg and "aeroplane" in msg and "data.xml.class_names" in msg


@pytest.mark.parametrize("box, what", [("<xmin>101</xmin><ymin>5</ymin><xmax>120</xmax><ymax>80</ymax>", "outside"),
                                       ("<xmin>50</xmin><ymin>5</ymin><xmax>40</xmax><ymax>80</ymax>", "inverted"),
                                       ("<xmin>5</xmin><ymin>5</ymin><xmax>100</xmax>", "numeric")])
def test_bad_boxes(voc07, box, what):
    path = _edit_xml(voc07, "000002", "<xmin>5</xmin><ymin>5</ymin><xmax>100</xmax><ymax>80</ymax>", box)
    with pytest.raises(DatasetError, match=what) as err:
        VocDetection([voc07])
    assert path in str(err.value) and "(cat)" in str(err.value) and "fix:" in str(err.value)


def test_missing_image(voc07):
    root = voc07.rsplit(":", 1)[0]
    os.remove(os.path.join(root, "JPEGImages", "000002.jpg"))
    with pytest.raises(DatasetError) as err:
        VocDetection([voc07])
    msg = str(err.value)
    assert "1 x image file listed in" in msg and os.path.join(root, "JPEGImages", "000002.jpg") in msg
    assert os.path.join(root, "ImageSets", "Main", "trainval.txt") in msg and "fix:" in msg
    assert len(VocDetection([voc07], strict=False)) == 1  # or dropped, and counted


def test_xml_problems_are_all_reported_at_once(voc07):
    _edit_xml(voc07, "000002", "<name>cat</name>", "<name>kitten</name>")
    _edit_xml(voc07, "000001", "<size>", "<sighs>")
    with pytest.raises(DatasetError) as err:
        VocDetection([voc07])
    msg = str(err.value)
    assert "2 problems in 2 kinds" in msg and "<name>kitten</name>" in msg and "bad XML annotation file" in msg


def test_set_without_split_is_rejected(voc07):
    with pytest.raises(DatasetError, match="ROOT:SPLIT"):
        VocDetection([voc07.rsplit(":", 1)[0]])


def voc_cfg(tmp_path, sets, *extra):
    return load_config(DetConfig, str(ROOT / "configs" / "frcnn_demo.yaml"), [
        "data.synthetic.enabled=false", "data.format=voc", f"data.xml.train_sets={sets['train_sets']}",
        f"data.xml.val_sets={sets['val_sets']}", f"data.xml.class_names={sets['class_names']}", *SLIM,
        f"output_dir={tmp_path / 'run'}", *extra])


def test_missing_voc_stops_train_det_at_once_with_layout(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "train_det.py"), "configs/frcnn_r101_voc0712.yaml",
                           f"data.xml.train_sets=[{tmp_path}/VOCdevkit/VOC2007:trainval]",
                           f"data.xml.val_sets=[{tmp_path}/VOCdevkit/VOC2007:test]", f"output_dir={tmp_path}/run"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{tmp_path}/VOCdevkit/VOC2007/ImageSets/Main" in proc.stderr
    assert "expected layout" in proc.stderr and "JPEGImages/<id>.jpg" in proc.stderr
    assert "configs/frcnn_demo.yaml" in proc.stderr and not (tmp_path / "run").exists()


def test_voc_config_needs_sets(tmp_path):
    cfg = load_config(DetConfig, None, ["data.format=voc"])
    with pytest.raises(DataNotFoundError, match="needs data.xml.train_sets and data.xml.val_sets"):
        prepare_data_paths(cfg)


# ---- the evaluator: hand-computed precision/recall ---------------------------------------------------

def gt_entry(boxes, labels, difficult):
    return {"boxes": np.asarray(boxes, np.float64).reshape(-1, 4), "labels": np.asarray(labels),
            "difficult": np.asarray(difficult, bool)}


CAT, DOG, BIRD = 1, 2, 3
HAND_GT = {
    # image 1: cats A, B and a difficult cat C; image 2: cat D, a difficult dog E, a bird F
    1: gt_entry([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]], [CAT, CAT, CAT], [0, 0, 1]),
    2: gt_entry([[0, 0, 10, 10], [50, 50, 60, 60], [80, 80, 90, 90]], [CAT, DOG, BIRD], [0, 1, 0]),
}
HAND_DETS = {  # image id -> (boxes, scores, labels)
    1: ([[0, 0, 10, 10],     # d1 .9: A, IoU 1 -> TP
         [0, 0, 10, 10],     # d2 .8: A again -> duplicate, FP
         [40, 0, 50, 10],    # d3 .7: the difficult C -> neither TP nor FP
         [25, 0, 30, 10]],   # d6 .4: B, IoU 50/100 = 0.5 exactly -> TP (the devkit's test is >= 0.5)
        [0.9, 0.8, 0.7, 0.4], [CAT, CAT, CAT, CAT]),
    2: ([[60, 60, 70, 70],   # d4 .6: nothing there -> FP
         [0, 0, 10, 9],      # d5 .5: D, IoU 90/100 -> TP
         [50, 50, 60, 60]],  # a dog on the difficult E: ignored; dogs have no positive -> AP undefined
        [0.6, 0.5, 0.3], [CAT, CAT, DOG]),
}


def test_hand_case_ap_07_and_area():
    """Cat: npos = 3 (A, B, D; C is difficult). Scored in order d1 TP, d2 FP, d4 FP, d5 TP, d6 TP (d3 left out):
    cum TP 1 1 1 2 3, cum FP 0 1 2 2 2 -> recall 1/3 1/3 1/3 2/3 1, precision 1 1/2 1/3 1/2 3/5.
    11-point: t = 0, .1, .2, .3 -> max precision at recall >= t is 1 (4 points); t = .4 .. 1 -> 3/5 (7 points):
    AP_07 = (4 + 7 * 0.6) / 11 = 8.2 / 11. Area: the envelope is 1, .6, .6, .6, .6; recall rises by 1/3 at
    the 1st, 4th and 5th points: AP = (1 + .6 + .6) / 3 = 2.2 / 3.
    Dog: no non-difficult ground truth -> -1, left out of the means. Bird: one, never detected -> 0.
    At IoU 0.75 d6 (IoU 0.5) turns FP: recall 1/3 1/3 1/3 2/3 2/3, precision 1 .5 1/3 .5 .4 -> 11-point:
    4 points of 1, t = .4 .5 .6 -> .5, t >= .7 -> 0: (4 + 1.5) / 11 = 0.5; with the bird's 0: AP75 = 0.25."""
    ev = VOCEvaluator(HAND_GT, ["cat", "dog", "bird"], metric="voc07")
    ev.process([{"image_id": i} for i in HAND_DETS],
               [{"boxes": torch.tensor(b, dtype=torch.float32), "scores": torch.tensor(s), "labels": torch.tensor(l)}
                for b, s, l in HAND_DETS.values()])
    m = ev.evaluate()
    cat = m["per_class"]["cat"]
    assert cat["AP_07"] == pytest.approx(8.2 / 11) and cat["AP"] == pytest.approx(2.2 / 3)
    assert (cat["num_gt"], cat["num_difficult"], cat["num_det"]) == (3, 1, 6)
    assert m["per_class"]["dog"] == {"AP": -1.0, "AP_07": -1.0, "num_gt": 0, "num_difficult": 1, "num_det": 1}
    assert m["per_class"]["bird"]["AP"] == 0.0 and m["per_class"]["bird"]["AP_07"] == 0.0
    assert m["mAP_07"] == pytest.approx(8.2 / 11 / 2) and m["mAP"] == pytest.approx(2.2 / 3 / 2)
    assert m["AP"] == m["AP50"] == m["mAP_07"] and m["metric"] == "voc07"
    assert m["AP75"] == pytest.approx(0.25)
    assert m["per_class_AP"] == {"cat": pytest.approx(8.2 / 11), "dog": -1.0, "bird": 0.0}
    assert m["num_images"] == 2
    area = VOCEvaluator(HAND_GT, ["cat", "dog", "bird"], metric="area").score(
        {i: tuple(np.asarray(x, np.float64) for x in v) for i, v in HAND_DETS.items()})
    assert area["AP"] == pytest.approx(2.2 / 3 / 2) and area["per_class_AP"]["cat"] == pytest.approx(2.2 / 3)


def test_curve_helpers_by_hand():
    tp, fp = np.array([1, 0, 0, 1, 0]), np.array([0, 1, 0, 0, 1])  # the middle one matched a difficult box
    recall, precision = precision_recall(tp, fp, npos=4)
    np.testing.assert_allclose(recall, [0.25, 0.25, 0.5, 0.5])
    np.testing.assert_allclose(precision, [1, 0.5, 2 / 3, 0.5])
    # 11-point: t = 0, .1, .2 -> 1; t = .3, .4, .5 -> 2/3; t >= .6 -> 0:  (3 + 3 * 2/3) / 11 = 5 / 11
    assert voc07_ap(recall, precision) == pytest.approx(5 / 11)
    # area: envelope 1, 2/3, 2/3, 1/2; recall steps .25, 0, .25, 0:  .25 + .25 * 2/3 = 5 / 12
    assert voc_ap(recall, precision) == pytest.approx(5 / 12)
    assert voc_ap(np.zeros(0), np.zeros(0)) == 0.0 and voc07_ap(np.zeros(0), np.zeros(0)) == 0.0


def test_duplicate_of_a_matched_box_is_fp_in_voc_but_finds_the_other_box_in_imagenet():
    """A = [0,0,10,10], B = [2,0,12,10] overlap (IoU 80/120). Two detections exactly on A: the devkit
    matches the second to A again (its best IoU) -> FP (recall .5 .5, precision 1 .5: AP = .5 * 1 = 0.5);
    ILSVRC's rule takes the best *unmatched* box, B (IoU 2/3 >= 0.5) -> TP (recall .5 1, precision 1 1: AP 1)."""
    gt = {1: (np.array([[0, 0, 10, 10], [2, 0, 12, 10]], np.float64), np.array([False, False]))}
    ids, scores, boxes = np.array([1, 1]), np.array([0.9, 0.8]), np.array([[0, 0, 10, 10], [0, 0, 10, 10]], np.float64)
    tp, fp, npos = match_detections(gt, ids, scores, boxes, protocol="voc")
    assert tp.tolist() == [1, 0] and fp.tolist() == [0, 1] and npos == 2
    assert voc_ap(*precision_recall(tp, fp, npos)) == pytest.approx(0.5)
    tp, fp, _ = match_detections(gt, ids, scores, boxes, protocol="imagenet")
    assert tp.tolist() == [1, 1] and voc_ap(*precision_recall(tp, fp, npos)) == pytest.approx(1.0)


def test_imagenet_threshold_is_looser_for_small_objects():
    """A 10x10 box: threshold min(0.5, 100 / (20 * 20)) = 0.25; a 100x100 one: min(0.5, 10^4 / 110^2) = 0.5.
    A detection shifted by half the small box has IoU 50/150 = 1/3: a TP for ILSVRC, a FP for VOC."""
    np.testing.assert_allclose(imagenet_iou_thresholds(np.array([[0, 0, 10, 10], [0, 0, 100, 100]], float)), [0.25, 0.5])
    gt = {7: (np.array([[0, 0, 10, 10]], np.float64), np.array([False]))}
    args = (np.array([7]), np.array([0.5]), np.array([[5, 0, 15, 10]], np.float64))
    assert match_detections(gt, *args, protocol="imagenet")[0].tolist() == [1]
    assert match_detections(gt, *args, protocol="voc")[0].tolist() == [0]


def test_score_ties_keep_input_order_and_images_without_detections_count():
    """Two images with one cat each; only image 1 is detected. Evaluating both: recall 1/2, AP = 0.5, also
    when image 2 was never processed; evaluating image 1 alone (``only_processed``, a subset): AP = 1."""
    gt = {1: gt_entry([[0, 0, 10, 10]], [1], [0]), 2: gt_entry([[0, 0, 10, 10]], [1], [0])}
    ev = VOCEvaluator(gt, ["cat"], metric="area")
    none = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    hit = {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "scores": torch.tensor([0.5]), "labels": torch.tensor([1])}
    ev.process([{"image_id": 1}, {"image_id": 2}], [hit, none])
    assert ev.evaluate()["AP"] == pytest.approx(0.5)
    ev.reset()
    ev.process([{"image_id": 1}], [hit])  # image 2 unreadable: scored as an image without detections
    m = ev.evaluate()
    assert m["AP"] == pytest.approx(0.5) and m["num_unprocessed"] == 1 and "1 not processed" in format_metrics_table(m)
    subset = VOCEvaluator(gt, ["cat"], metric="area", only_processed=True)
    subset.process([{"image_id": 1}], [hit])
    assert subset.evaluate()["AP"] == pytest.approx(1.0)
    # equal scores: the devkit's stable sort keeps the input order, so FP-then-TP gives precision 1/2 at recall 1
    tp, fp, _ = match_detections({1: (np.array([[0, 0, 10, 10]], float), np.array([False]))}, np.array([1, 1]),
                                 np.array([0.5, 0.5]), np.array([[50, 50, 60, 60], [0, 0, 10, 10]], float))
    assert tp.tolist() == [0, 1] and fp.tolist() == [1, 0]


def test_evaluator_writes_devkit_result_files(tmp_path):
    ev = VOCEvaluator(HAND_GT, ["cat", "dog", "bird"], output_dir=str(tmp_path), image_names={1: "000001", 2: "000002"})
    ev.process([{"image_id": 2}], [{"boxes": torch.tensor([[0.0, 0, 10, 9]]), "scores": torch.tensor([0.5]),
                                    "labels": torch.tensor([CAT])}])
    m = ev.evaluate()
    assert json.loads((tmp_path / "voc_metrics.json").read_text())["mAP_07"] == pytest.approx(m["mAP_07"])
    # 0-based [0, 0, 10, 9) is the devkit's 1-based inclusive (1, 1, 10, 9)
    assert (tmp_path / "voc_results" / "comp4_det_test_cat.txt").read_text() == "000002 0.500000 1.0 1.0 10.0 9.0\n"
    assert (tmp_path / "voc_results" / "comp4_det_test_bird.txt").read_text() == ""
    assert "cat" in (tmp_path / "per_class_ap.txt").read_text()
    table = format_metrics_table(m)  # the shared formatter recognises a VOC dict
    assert "11-point" in table and "bird" in table


# ---- through the engine ------------------------------------------------------------------------------

SLIM = [*DET_SLIM, "device=cpu"]  # the slim from-scratch detector of the detection tool tests


@pytest.fixture(scope="module")
def synthetic_voc(tmp_path_factory):
    return make_synthetic_voc(tmp_path_factory.mktemp("synvoc") / "voc", **SYNTH)


class GroundTruthDetector(torch.nn.Module):
    """'Detects' each image's training boxes (in the network's frame) with score 1 and, as the detector does,
    maps them to the image file's pixels with the frame the batch carries."""

    def forward(self, batch):
        found = [{"boxes": t["boxes"].clone(), "scores": torch.ones(len(t["boxes"])), "labels": t["labels"].clone()}
                 for t in batch["targets"]]
        return detections_to_image(found, batch["targets"])


def test_evaluate_scores_voc_data_with_the_voc_evaluator(tmp_path, synthetic_voc):
    """Perfect detections, mapped back from the resized frame: every class with ground
    truth gets AP 1 (difficult boxes are not detected and not needed), and the COCO numbers come along."""
    cfg = voc_cfg(tmp_path, synthetic_voc, "data.min_size_test=150", "data.max_size_test=200")
    prepare_data_paths(cfg)
    _, val_set = build_datasets(cfg, train=False)
    evaluators = build_evaluators(cfg, val_set, str(tmp_path / "ev"))
    voc, coco = evaluators  # eval.coco_metrics: pycocotools' numbers beside the devkit's
    assert (voc.protocol, voc.metric, coco.name) == ("voc", "voc07", "coco")  # auto: VOC2007 -> 11-point
    m = evaluate(GroundTruthDetector(), val_loader(cfg, val_set), evaluators, torch.device("cpu"), progress=False)
    assert m["AP"] == pytest.approx(1.0) and m["mAP"] == pytest.approx(1.0)
    assert all(c["AP"] == pytest.approx(1.0) for c in m["per_class"].values() if c["num_gt"])
    assert m["coco"]["AP50"] == pytest.approx(1.0) and m["skipped_corrupt"] == 0
    assert (tmp_path / "ev" / "voc_metrics.json").is_file()


def test_train_and_eval_on_synthetic_voc(tmp_path, synthetic_voc):
    cfg = voc_cfg(tmp_path, synthetic_voc, "solver.max_iter=4", "eval.period=2", "checkpoint_period=2")
    summary = train(cfg, "voc_test")
    m = summary["val"]
    assert summary["data_format"] == "voc" and summary["class_names"] == ["circle", "rectangle", "triangle", "cross"]
    assert {"AP", "AP50", "AP75", "mAP", "mAP_07", "per_class", "per_class_AP", "coco"} <= set(m)
    assert m["metric"] == "voc07" and m["AP"] == m["mAP_07"] and 0 <= m["AP"] <= 1
    assert sum(c["num_gt"] for c in m["per_class"].values()) > 0
    out = tmp_path / "run"
    for name in ("checkpoints/last.pth", "voc_metrics.json", "per_class_ap.txt",
                 "voc_results/comp4_det_test_circle.txt"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val/mAP_07" in r for r in records)
    ckpt = torch.load(out / "checkpoints" / "last.pth", weights_only=True)
    assert ckpt["class_names"] == ["circle", "rectangle", "triangle", "cross"]
    # tools/export.py checks the exported file on the run's own val images, in the XML formats too
    checked = sample_val_images(load_config(DetConfig, str(out / "config.yaml")), 2)
    base = os.path.abspath(synthetic_voc["val_sets"][0].rsplit(":", 1)[0])
    val_ids = open(os.path.join(base, "ImageSets", "Main", "val.txt")).read().split()
    assert len(checked) == 2
    for path, image in checked:
        assert os.path.dirname(path) == os.path.join(base, "JPEGImages") and image.ndim == 3
        assert os.path.splitext(os.path.basename(path))[0] in val_ids


def test_synthetic_imagenet_det_through_the_engine(tmp_path):
    """data.synthetic with format imagenet_det writes the shapes in the ILSVRC layout; build_datasets takes
    the class list from the synsets file for both sets and scores val the ILSVRC way (area AP)."""
    cfg = load_config(DetConfig, None, ["data.synthetic.enabled=true", "data.format=imagenet_det",
                                        f"data.synthetic.root={tmp_path / 'shapes'}", "data.synthetic.num_train=6",
                                        "data.synthetic.num_val=4", "data.synthetic.image_size=64"])
    prepare_data_paths(cfg)
    assert cfg.data.xml.val_sets == [f"{tmp_path / 'shapes_imagenet_det' / 'ILSVRC'}:val"]
    train_set, val_set = build_datasets(cfg)
    assert train_set.class_names == val_set.class_names == ["circle", "rectangle", "triangle", "cross"]
    voc, coco = build_evaluators(cfg, val_set)
    assert (voc.protocol, voc.metric, coco.name) == ("imagenet", "area", "coco")
    with pytest.raises(ConfigError, match="eval.voc_metric"):
        prepare_data_paths(load_config(DetConfig, None, ["data.format=voc", "eval.voc_metric=07"]))


# ---- ImageNet DET's validation blacklist --------------------------------------------------------------

def _blacklist_cfg(tmp_path, *extra):
    return load_config(DetConfig, None, ["data.synthetic.enabled=true", "data.format=imagenet_det",
                                         f"data.synthetic.root={tmp_path / 'shapes'}", "data.synthetic.num_train=4",
                                         "data.synthetic.num_val=8", "data.synthetic.image_size=96", *extra])


def _score(dataset, detections):
    """(VOC-protocol metrics, pycocotools metrics) of ``detections`` (image id -> (boxes, scores, labels))."""
    voc = VOCEvaluator(ground_truth_from_coco(dataset.coco, dataset.cat_id_to_contiguous), dataset.class_names,
                       protocol="imagenet", metric="area")
    coco = COCOEvaluator(dataset.coco, dataset.contiguous_to_cat_id, dataset.class_names)
    for evaluator in (voc, coco):
        for image_id, (boxes, scores, labels) in detections.items():
            found = {"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.tensor(scores),
                     "labels": torch.tensor(labels)}
            evaluator.process([{"image_id": image_id}], [found])
    return voc.evaluate(), coco.evaluate()


def test_imagenet_det_blacklist_leaves_the_listed_classes_unscored(tmp_path):
    """The devkit's eval_detection with its blacklist: in a listed (val.txt index, wnid) pair's image that class
    is no positive and its detections are neither right nor wrong. Detections: every object of the full set
    (score 0.9) plus, in the listed image, a box of the listed class on nothing (score 1.0). Without the
    blacklist that false positive costs the class its AP; with it every AP is 1, for both evaluators."""
    cfg = _blacklist_cfg(tmp_path)
    prepare_data_paths(cfg)
    _, full = build_datasets(cfg, train=False)
    base = cfg.data.xml.val_sets[0].rsplit(":", 1)[0]
    index_of = dict(line.split() for line in open(os.path.join(base, "ImageSets", "DET", "val.txt")))
    image_id = next(i for i in sorted(full.coco.imgs) if full.coco.imgToAnns[i])
    label = full.cat_id_to_contiguous[full.coco.imgToAnns[image_id][0]["category_id"]]
    wnid, name = full.xml_class_names[label - 1], full.image_names[image_id]
    mine = [a for a in full.coco.imgToAnns[image_id] if full.cat_id_to_contiguous[a["category_id"]] == label]
    in_image, positives = len(mine), sum(not a["difficult"] for a in mine)  # difficult: no positive anyway
    blacklist = tmp_path / "ILSVRC2015_det_validation_blacklist.txt"
    blacklist.write_text(f"{index_of[name]} {wnid}\n99999 {wnid}\n")  # the second pair's image is not in the set

    detections = {}
    for i in full.coco.imgs:
        anns = full.coco.imgToAnns[i]
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        labels = [full.cat_id_to_contiguous[a["category_id"]] for a in anns]
        scores = [0.9] * len(anns)
        if i == image_id:
            boxes, scores, labels = boxes + [[0, 0, 2, 2]], scores + [1.0], labels + [label]
        detections[i] = (np.reshape(boxes, (-1, 4)), scores, labels)
    voc_full, coco_full = _score(full, detections)
    assert voc_full["per_class"][full.class_names[label - 1]]["AP"] < 0.999 and coco_full["AP50"] < 0.999

    cfg = _blacklist_cfg(tmp_path, f"data.xml.val_blacklist={blacklist}")
    prepare_data_paths(cfg)
    _, listed = build_datasets(cfg, train=False)
    assert listed.coco.imgs[image_id]["unscored_category_ids"] == [listed.contiguous_to_cat_id[label]]
    assert sum("unscored_category_ids" in img for img in listed.coco.imgs.values()) == 1
    assert listed.stats["blacklisted_pairs"] == 1 and listed.stats["blacklisted_objects"] == in_image
    assert (f"val blacklist: 1 (image, class) pairs not scored, their {in_image} objects left out"
            in format_report("val", dataset_report(listed)))  # what tools/check_data.py prints
    assert len(listed.coco.anns) == len(full.coco.anns) - in_image
    voc, coco = _score(listed, detections)
    cls = full.class_names[label - 1]
    assert voc["per_class"][cls]["num_gt"] == voc_full["per_class"][cls]["num_gt"] - positives
    assert all(c["AP"] == pytest.approx(1.0) for c in voc["per_class"].values() if c["num_gt"])
    assert coco["AP50"] == pytest.approx(1.0) and coco["AP"] == pytest.approx(1.0)
    # build_evaluators scores with the same ground truth (the engine's and tools/eval_det.py's path)
    assert build_evaluators(cfg, listed)[0].ground_truth[image_id]["unscored"] == {label}


def test_imagenet_det_blacklist_errors_name_the_file_and_the_fix(tmp_path):
    cfg = _blacklist_cfg(tmp_path)
    prepare_data_paths(cfg)
    val_sets, synsets = list(cfg.data.xml.val_sets), cfg.data.xml.synsets_file
    bad = tmp_path / "bad.txt"
    bad.write_text("12 n90000001\nn90000001 12\n3\n1 n12345678\n")  # every problem in one error
    with pytest.raises(DatasetError, match=r"(?s)bad.txt: 2 line\(s\) are not '<image index> <wnid>' \(line 2.*line 3"
                                           r".*wnids \['n12345678'\] are not among the 4 classes"):
        VocDetection(val_sets, "imagenet_det", synsets_file=synsets, blacklist=str(bad))
    with pytest.raises(DatasetError, match="blacklist file not found; fix: set data.xml.val_blacklist"):
        VocDetection(val_sets, "imagenet_det", synsets_file=synsets, blacklist=str(tmp_path / "none.txt"))
    base = val_sets[0].rsplit(":", 1)[0]  # a split listed without val.txt's numbers
    names = [line.split()[0] for line in open(os.path.join(base, "ImageSets", "DET", "val.txt"))]
    with open(os.path.join(base, "ImageSets", "DET", "val_names.txt"), "w") as f:
        f.writelines(n + "\n" for n in names)
    bad.write_text("1 n90000001\n")
    with pytest.raises(DatasetError, match=r"val_names.txt: 8 image\(s\) listed without the index"):
        VocDetection([f"{base}:val_names"], "imagenet_det", synsets_file=synsets, blacklist=str(bad))
    # before any XML is read: a missing file, a malformed line, and a blacklist on VOC data
    with pytest.raises(DataNotFoundError, match="missing.txt"):
        prepare_data_paths(load_config(DetConfig, None, [
            "data.format=imagenet_det", f"data.xml.train_sets={val_sets}", f"data.xml.val_sets={val_sets}",
            f"data.xml.val_blacklist={tmp_path / 'missing.txt'}"]))
    bad.write_text("1 n90000001\n2\n")
    with pytest.raises(DatasetError, match=r"bad.txt: 1 line\(s\) are not '<image index> <wnid>' \(line 2: '2'\)"):
        prepare_data_paths(load_config(DetConfig, None, [
            "data.format=imagenet_det", f"data.xml.train_sets={val_sets}", f"data.xml.val_sets={val_sets}",
            f"data.xml.val_blacklist={bad}"]))
    with pytest.raises(ConfigError, match="ImageNet DET's validation blacklist; fix: data.xml.val_blacklist=''"):
        prepare_data_paths(load_config(DetConfig, None, ["data.format=voc", f"data.xml.val_blacklist={bad}"]))
