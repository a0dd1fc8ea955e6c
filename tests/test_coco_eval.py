"""COCO evaluation (detection/evaluation): pycocotools is the judge, the expected APs are worked out by
hand from the 101-point interpolated precision-recall curve."""
import json

import numpy as np
import pytest
import torch

from detection.evaluation import METRIC_NAMES, COCOEvaluator, coco_eval, format_metrics_table

CATEGORIES = [{"id": 5, "name": "cat"}, {"id": 9, "name": "dog"}]
CONTIGUOUS = {1: 5, 2: 9}
NAMES = ["cat", "dog"]


@pytest.fixture
def gt_file(tmp_path):
    """Two 100x100 images: image 1 has two cats, image 2 a dog and a crowd of dogs."""
    data = {
        "images": [{"id": 1, "file_name": "1.jpg", "width": 100, "height": 100},
                   {"id": 2, "file_name": "2.jpg", "width": 100, "height": 100}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 5, "bbox": [50, 50, 40, 40], "area": 1600, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 9, "bbox": [5, 5, 20, 60], "area": 1200, "iscrowd": 0},
            {"id": 4, "image_id": 2, "category_id": 9, "bbox": [50, 0, 50, 100], "area": 5000, "iscrowd": 1},
        ],
        "categories": CATEGORIES,
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    return path


def det(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32), "labels": torch.tensor(labels)}


CAT_1, CAT_2 = [10, 10, 40, 40], [50, 50, 90, 90]  # image 1's ground truth, xyxy
DOG = [5, 5, 25, 65]  # image 2's
NOWHERE = [0, 70, 8, 78]  # overlaps no ground truth


def test_perfect_detections_give_ap_1(gt_file, tmp_path):
    ev = COCOEvaluator(str(gt_file), CONTIGUOUS, NAMES, output_dir=str(tmp_path / "out"))
    ev.process([{"image_id": 1}, {"image_id": 2}],
               [det([CAT_1, CAT_2], [0.9, 0.8], [1, 1]), det([DOG], [0.7], [2])])
    m = ev.evaluate()
    for key in ("AP", "AP50", "AP75", "APs", "APm", "AR100"):  # 30x30 is small, 40x40 and 20x60 medium
        assert m[key] == pytest.approx(1.0), key
    assert m["APl"] == -1  # no ground truth over 96x96 (the crowd does not count): undefined, pycocotools' -1
    assert m["per_class_AP"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0)}
    results = json.loads((tmp_path / "out" / "coco_results.json").read_text())
    assert {r["category_id"] for r in results} == {5, 9}  # original ids, not the model's 1..K
    assert results[0] == {"image_id": 1, "category_id": 5, "bbox": [10.0, 10.0, 30.0, 30.0],
                          "score": pytest.approx(0.9)}
    saved = json.loads((tmp_path / "out" / "coco_metrics.json").read_text())
    assert saved["AP"] == pytest.approx(1.0)
    table = (tmp_path / "out" / "per_class_ap.txt").read_text()
    assert "cat" in table and "100.00" in table


def interpolated_ap(hits, num_gt):
    """101-point interpolated AP of detections sorted by score (True = true positive), as COCO defines it:
    the mean over recall r in {0, .01, .., 1} of the best precision at a recall >= r (0 if never reached)."""
    tp = np.cumsum(hits)
    recall, precision = tp / num_gt, tp / np.arange(1, len(hits) + 1)
    return np.mean([max([p for p, rc in zip(precision, recall) if rc >= r], default=0.0)
                    for r in np.linspace(0, 1, 101)])


def test_false_positive_above_true_positive(gt_file):
    """Dog class: one ground truth, detections [FP 0.9, TP 0.8]: at recall 1 the precision is 1/2, and no
    higher precision is reached at any recall, so AP = 0.5 at every IoU threshold."""
    ev = COCOEvaluator(str(gt_file), CONTIGUOUS, NAMES, only_processed=True)  # one image's case
    ev.process([{"image_id": 2}], [det([NOWHERE, DOG], [0.9, 0.8], [2, 2])])
    assert interpolated_ap([False, True], 1) == pytest.approx(0.5)
    m = ev.evaluate()
    assert m["AP"] == pytest.approx(0.5) and m["AP50"] == pytest.approx(0.5)
    assert m["per_class_AP"]["dog"] == pytest.approx(0.5)
    assert m["per_class_AP"]["cat"] == -1  # image 2 has no cat


def test_false_positive_between_true_positives(gt_file):
    """Cat class: two ground truths, detections [TP .95, FP .9, TP .8] give (recall, precision) points
    (.5, 1), (.5, .5), (1, 2/3): recall .00-.50 (51 points) has precision 1, .51-1.00 (50 points) 2/3,
    so AP = (51 + 50 * 2/3) / 101."""
    expected = (51 + 50 * 2 / 3) / 101
    assert interpolated_ap([True, False, True], 2) == pytest.approx(expected)
    ev = COCOEvaluator(str(gt_file), CONTIGUOUS, NAMES, only_processed=True)  # one image's case
    ev.process([{"image_id": 1}], [det([CAT_1, NOWHERE, CAT_2], [0.95, 0.9, 0.8], [1, 1, 1])])
    m = ev.evaluate()
    assert m["AP"] == pytest.approx(expected) and m["per_class_AP"]["cat"] == pytest.approx(expected)


def test_class_agnostic_scores_boxes_whatever_their_label(gt_file):
    """Perfect boxes, image 1's second cat labelled dog: cat finds 1 of its 2 (AP 51/101, recall stops at .5),
    dog has that false positive above its true positive (AP .5); with every class merged all three boxes
    are hits (AP 1)."""
    ev = COCOEvaluator(str(gt_file), CONTIGUOUS, NAMES, class_agnostic=True)
    ev.process([{"image_id": 1}, {"image_id": 2}],
               [det([CAT_1, CAT_2], [0.9, 0.8], [1, 2]), det([DOG], [0.7], [2])])
    m = ev.evaluate()
    assert interpolated_ap([True], 2) == pytest.approx(51 / 101)  # cat: [TP .9] of 2
    assert interpolated_ap([False, True], 1) == pytest.approx(0.5)  # dog: [FP .8, TP .7] of 1
    assert m["per_class_AP"] == {"cat": pytest.approx(51 / 101), "dog": pytest.approx(0.5)}
    assert m["AP"] == pytest.approx((51 / 101 + 0.5) / 2)
    agnostic = m["class_agnostic"]
    assert agnostic["AP"] == pytest.approx(1.0) and agnostic["AP75"] == pytest.approx(1.0)
    assert "class_agnostic" not in COCOEvaluator(str(gt_file), CONTIGUOUS, NAMES).evaluate()


def test_detection_on_crowd_region_is_not_a_false_positive(gt_file):
    ev = COCOEvaluator(str(gt_file), CONTIGUOUS, NAMES, only_processed=True)  # one image's case
    ev.process([{"image_id": 2}], [det([[60, 10, 90, 40], DOG], [0.9, 0.8], [2, 2])])
    assert ev.evaluate()["AP"] == pytest.approx(1.0)


def test_empty_detections_give_ap_0(gt_file, tmp_path):
    ev = COCOEvaluator(str(gt_file), CONTIGUOUS, NAMES, output_dir=str(tmp_path))
    ev.process([{"image_id": 1}, {"image_id": 2}], [det([], [], []), det([], [], [])])
    m = ev.evaluate()
    assert m["AP"] == 0 and m["AR100"] == 0 and m["per_class_AP"] == {"cat": 0.0, "dog": 0.0}
    assert json.loads((tmp_path / "coco_results.json").read_text()) == []
    assert "n/a" in format_metrics_table(m) and "0.00" in format_metrics_table(m)


def test_an_unprocessed_image_counts_as_one_without_detections(gt_file):
    """Image 2 could not be read: by default its dog is a miss (the AP of the whole set), not left out."""
    ev = COCOEvaluator(str(gt_file), CONTIGUOUS, NAMES)
    ev.process([{"image_id": 1}], [det([CAT_1, CAT_2], [0.9, 0.8], [1, 1])])
    m = ev.evaluate()
    assert m["per_class_AP"] == {"cat": pytest.approx(1.0), "dog": 0.0}
    assert m["AP"] == pytest.approx(0.5)  # mean over the two classes
    assert m["num_images"] == 2 and m["num_unprocessed"] == 1
    assert "1 not processed" in format_metrics_table(m)


def test_only_processed_images_are_scored_when_asked_and_repeats_count_once(gt_file):
    ev = COCOEvaluator(str(gt_file), CONTIGUOUS, NAMES, only_processed=True)
    for _ in range(2):  # a padded sampler may hand the same image out twice
        ev.process([{"image_id": 1}], [det([CAT_1, CAT_2], [0.9, 0.8], [1, 1])])
    m = ev.evaluate()  # a deliberate subset: image 2's dog was never looked at, not a miss
    assert m["AP"] == pytest.approx(1.0) and m["per_class_AP"]["dog"] == -1
    assert m["num_images"] == 1 and m["num_unprocessed"] == 0
    ev.reset()
    assert ev.evaluate()["AP"] == -1  # nothing processed: undefined, no crash


def test_gathers_all_ranks_on_rank_0(gt_file, monkeypatch):
    """Rank 1's images reach rank 0 through all_gather_object; the other ranks get {}."""
    rank1 = COCOEvaluator(str(gt_file), CONTIGUOUS, NAMES)
    rank1.process([{"image_id": 2}], [det([DOG], [0.7], [2])])
    ev = COCOEvaluator(str(gt_file), CONTIGUOUS, NAMES)
    ev.process([{"image_id": 1}], [det([CAT_1, CAT_2], [0.9, 0.8], [1, 1])])
    monkeypatch.setattr(coco_eval, "all_gather_object", lambda obj: [obj, rank1._results])
    m = ev.evaluate()
    assert m["per_class_AP"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0)}
    monkeypatch.setattr(coco_eval, "get_rank", lambda: 1)
    assert ev.evaluate() == {}


def test_ground_truth_without_area_or_iscrowd(tmp_path):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": [{"id": 3, "file_name": "x.jpg", "width": 50, "height": 50}],
                                "annotations": [{"id": 1, "image_id": 3, "category_id": 9, "bbox": [1, 1, 10, 10]}],
                                "categories": CATEGORIES}))
    ev = COCOEvaluator(str(path), CONTIGUOUS, NAMES)
    ev.process([{"image_id": 3}], [det([[1, 1, 11, 11]], [0.5], [2])])
    m = ev.evaluate()
    assert m["AP"] == pytest.approx(1.0) and m["APs"] == pytest.approx(1.0)


def test_format_metrics_table():
    metrics = {name: 0.5 for name in METRIC_NAMES}
    metrics["APl"] = -1.0
    metrics["per_class_AP"] = {"cat": 0.25, "dog": -1.0}
    text = format_metrics_table(metrics)
    assert "AP50" in text and " 50.00" in text and "n/a" in text and "cat" in text and " 25.00" in text


def test_per_image_ap50_of_the_report_by_hand():
    from detection.evaluation.report import image_ap50
    gt, labels = [[0, 0, 10, 10], [20, 20, 30, 30]], [1, 1]
    assert image_ap50(gt, labels, [[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.8], np.array([1, 1])) == 1.0
    # one hit after a false positive: precision 1/2 at recall 1/2 -> 51 of 101 recall points at 0.5
    assert image_ap50(gt, labels, [[50, 50, 60, 60], [0, 0, 10, 10]], [0.9, 0.8], np.array([1, 1])) == \
        pytest.approx(51 * 0.5 / 101)
    assert image_ap50(gt, labels, [[0, 0, 10, 10]], [0.9], np.array([2])) == 0.0  # right place, wrong class
    assert image_ap50([], [], [], [], np.array([])) == 1.0 and image_ap50([], [], [[0, 0, 1, 1]], [0.5], np.array([1])) == 0.0


def _crowded_set(tmp_path, n_images=40, n_categories=12, seed=0):
    """A set where categories differ in size: ground truth of every area range, crowds, a category with no
    ground truth, one never detected; detections jittered from the truth and scattered at random."""
    rng = np.random.default_rng(seed)
    categories = [{"id": 3 * c + 1, "name": f"c{c}"} for c in range(n_categories)]
    images, annotations, detections = [], [], {}
    for i in range(1, n_images + 1):
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 320, "height": 240})
        boxes, scores, labels = [], [], []
        for _ in range(int(rng.integers(0, 12))):
            c = int(min(rng.geometric(0.25), n_categories - 1))  # skewed: the first categories are large
            w, h = rng.uniform(4, 200, 2)
            x, y = rng.uniform(0, 320 - w), rng.uniform(0, 240 - h)
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": 3 * c + 1,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(rng.random() < 0.05)})
            if c != 1 and rng.random() < 0.8:  # category 1 (id 4) is never detected
                jitter = rng.normal(0, 0.08 * min(w, h), 4)
                boxes.append([x + jitter[0], y + jitter[1], x + w + jitter[2], y + h + jitter[3]])
                scores.append(rng.uniform(0.2, 1.0))
                labels.append(c + 1)
        for _ in range(int(rng.integers(0, 20))):  # background detections, some of category 0 (no truth)
            x, y = rng.uniform(0, 280), rng.uniform(0, 200)
            boxes.append([x, y, x + rng.uniform(3, 40), y + rng.uniform(3, 40)])
            scores.append(rng.uniform(0, 0.6))
            labels.append(int(rng.integers(1, n_categories + 1)))
        detections[i] = det(boxes, scores, labels) if boxes else det(np.zeros((0, 4)), [], [])
    annotations = [a for a in annotations if a["category_id"] != 1]  # category 0 (id 1): no ground truth
    path = tmp_path / "crowded.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    contiguous = {c + 1: cat["id"] for c, cat in enumerate(categories)}
    return path, contiguous, [cat["name"] for cat in categories], detections


def test_scoring_categories_in_processes_gives_pycocotools_numbers_to_the_bit(tmp_path):
    from pycocotools.cocoeval import COCOeval

    path, contiguous, names, detections = _crowded_set(tmp_path)
    metrics, curves = {}, {}
    for workers in (1, 3):
        ev = COCOEvaluator(str(path), contiguous, names, workers=workers, output_dir=str(tmp_path / f"w{workers}"))
        for image_id, d in detections.items():
            ev.process([{"image_id": image_id}], [d])
        metrics[workers] = ev.evaluate()
        curves[workers] = np.load(tmp_path / f"w{workers}" / coco_eval.PR_CURVES_FILE)["precision"]
    assert metrics[1]["AP"] > 0.2 and metrics[1]["per_class_AP"]["c1"] == 0.0  # a set that scores something
    assert metrics[1]["per_class_AP"]["c0"] == -1.0  # no ground truth: undefined
    assert metrics[3] == metrics[1] and np.array_equal(curves[3], curves[1])

    # and the arrays themselves, against pycocotools' own evaluate() + accumulate()
    ev = COCOEvaluator(str(path), contiguous, names)
    for image_id, d in detections.items():
        ev.process([{"image_id": image_id}], [d])
    results = [r for rs in ev._results.values() for r in rs]
    reference = COCOeval(ev.coco_gt, ev.coco_gt.loadRes([dict(r) for r in results]), iouType="bbox")
    shared = COCOeval(ev.coco_gt, ev.coco_gt.loadRes([dict(r) for r in results]), iouType="bbox")
    reference.evaluate()
    reference.accumulate()
    coco_eval.score_by_category(shared, workers=4)
    for key in ("precision", "recall", "scores"):
        assert np.array_equal(shared.eval[key], reference.eval[key]), key
    assert shared.eval["counts"] == reference.eval["counts"]
