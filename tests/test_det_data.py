"""Detection datasets (detection/data): annotation validation with messages that name the file and the
record, the category mapping, crowd and degenerate boxes, corrupt and mis-sized images, the synthetic
shapes set, and the real coco128 sample when it is present. Transforms and batching have their own files."""
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from backbones.engine.imageio import CorruptImageError
from det_helpers import CATEGORIES, ann, write_dataset
from detection.data import (
    CocoDetection,
    DatasetError,
    build_transform,
    make_synthetic_coco,
)

COCO128 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco128"


# ---- validation ---------------------------------------------------------------------------------------


def test_missing_annotation_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(DatasetError, match="annotation file not found") as err:
        CocoDetection(tmp_path, missing)
    assert str(missing) in str(err.value)


def test_invalid_json_reports_line_and_column(tmp_path):
    ann_file = tmp_path / "bad.json"
    ann_file.write_text('{\n  "images": [],\n  "annotations": [,]\n}')
    with pytest.raises(DatasetError, match=r"invalid JSON at line 3 column 19") as err:
        CocoDetection(tmp_path, ann_file)
    assert str(ann_file) in str(err.value)


def test_missing_top_level_key(tmp_path):
    ann_file = tmp_path / "x.json"
    ann_file.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DatasetError, match=r"missing top-level key\(s\) \['categories'\]") as err:
        CocoDetection(tmp_path, ann_file)
    assert str(ann_file) in str(err.value)


@pytest.mark.parametrize("record, expected", [
    (ann(123, [1, 1, 5, 5], image_id=7), r"annotation id 123 .*image_id 7.* not in \"images\""),
    (ann(124, [1, 1, 5, 5], category_id=2), r"annotation id 124 .*category_id 2, which is not in \"categories\""),
    (ann(125, [1, 1, 5]), r"annotation id 125 .*bbox \[1, 1, 5\].*4 finite numbers"),
    (ann(126, [1, 1, "5", 5]), r"annotation id 126 .*4 finite numbers"),
    (ann(127, [10, 10, -4, 5]), r"annotation id 127 .*negative bbox width or height"),
    (ann(128, [120, 10, 5, 5]), r"annotation id 128 .*entirely outside its 100x60 image 'a.jpg'"),
    (ann(129, [-20, 10, 20, 5]), r"annotation id 129 .*entirely outside"),
    ({"id": 130, "image_id": 1, "bbox": [1, 1, 5, 5]}, r"annotation id 130 .*no 'category_id'"),
])
def test_bad_annotation_names_file_record_and_fix(tmp_path, record, expected):
    image_dir, ann_file = write_dataset(tmp_path, annotations=[ann(1, [1, 1, 5, 5]), record])
    with pytest.raises(DatasetError, match="(?s)" + expected) as err:  # the record, then its fix below it
        CocoDetection(image_dir, ann_file)
    message = str(err.value)
    assert message.startswith(str(ann_file)) and "fix:" in message


def test_bad_image_record(tmp_path):
    images = [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 0}]
    image_dir, ann_file = write_dataset(tmp_path, images=images, make_files=False)
    with pytest.raises(DatasetError, match=r"image record #0 \(id 1\) has width=100 height=0"):
        CocoDetection(image_dir, ann_file)


def test_missing_image_files_are_listed_and_counted(tmp_path):
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 60} for i in range(1, 10)]
    image_dir, ann_file = write_dataset(tmp_path, images=images[:2])
    ann_file.write_text(json.dumps({"images": images, "annotations": [], "categories": CATEGORIES}))
    with pytest.raises(DatasetError) as err:
        CocoDetection(image_dir, ann_file)
    message = str(err.value)
    assert "7 x image file missing" in message and str(ann_file) in message and str(image_dir) in message
    assert "3.jpg (image id 3)" in message and "7.jpg (image id 7)" in message
    assert "8.jpg" not in message and "first 5 shown" in message  # only the first few are listed
    lenient = CocoDetection(image_dir, ann_file, strict=False)
    assert len(lenient) == 2 and lenient.stats["problems"] == {f"image file missing from {image_dir}": 7}
    assert sorted(lenient.coco.getImgIds()) == [1, 2]  # the evaluation ground truth follows


def test_every_problem_is_reported_in_one_pass_then_dropped_when_not_strict(tmp_path):
    """An export with several kinds of bad records: one run lists all of them (count per kind, examples);
    strict=False trains on the rest and counts what it dropped."""
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 60} for i in (1, 2, 3)]
    annotations = [ann(1, [1, 1, 5, 5]), ann(2, [1, 1, 5, 5], category_id=99), ann(3, [1, 1, 5, 5], category_id=98),
                   ann(4, [1, 1, 5, 5], image_id=42), ann(5, [float("nan"), 1, 5, 5]), ann(6, [2, 2, 8, 8], image_id=2),
                   ann(7, [2, 2, 8, 8], image_id=3)]
    image_dir, ann_file = write_dataset(tmp_path, images=images, annotations=annotations)
    os.remove(image_dir / "3.jpg")
    with pytest.raises(DatasetError) as err:
        CocoDetection(image_dir, ann_file)
    message = str(err.value)
    assert "5 problems in 4 kinds" in message
    for expected in ("2 x annotation of an unknown category", "category_id 99", "category_id 98",
                     "1 x annotation of an unknown image", "image_id 42", "1 x malformed bbox", "nan",
                     "1 x image file missing", "3.jpg (image id 3)", "strict_train"):
        assert expected in message, expected
    ds = CocoDetection(image_dir, ann_file, strict=False)
    assert len(ds) == 2 and ds.stats["boxes"] == 2  # annotations 1 and 6; image 3 (and annotation 7) dropped
    assert sum(ds.stats["problems"].values()) == 5
    assert sorted(a["id"] for a in ds.coco.dataset["annotations"]) == [1, 6]


# ---- contents -----------------------------------------------------------------------------------------


def test_category_mapping_round_trip(tmp_path):
    image_dir, ann_file = write_dataset(tmp_path, annotations=[
        ann(1, [1, 1, 10, 10], category_id=7), ann(2, [20, 5, 10, 10], category_id=3), ann(3, [40, 5, 9, 9])])
    ds = CocoDetection(image_dir, ann_file)
    assert ds.contiguous_to_cat_id == {1: 1, 2: 3, 3: 7}
    assert ds.class_names == ["person", "car", "dog"]
    assert all(ds.cat_id_to_contiguous[ds.contiguous_to_cat_id[k]] == k for k in (1, 2, 3))
    item = ds[0]
    assert [ds.contiguous_to_cat_id[int(label)] for label in item["labels"]] == [7, 3, 1]
    assert item["labels"].dtype == torch.int64 and item["boxes"].dtype == torch.float32
    torch.testing.assert_close(item["boxes"][0], torch.tensor([1.0, 1.0, 11.0, 11.0]))
    assert item["image"].shape == (3, 60, 100) and item["image"].dtype == torch.uint8
    assert item["orig_size"] == (60, 100) and item["scale"] == (1.0, 1.0) and item["flipped"] is False
    assert sorted(ds.coco.getCatIds()) == [1, 3, 7]  # the untouched ground truth, for evaluation
    # a training set lets the json go: the same records and item, no evaluation index, and a clear error
    train = CocoDetection(image_dir, ann_file, evaluation_index=False)
    assert len(train) == len(ds) and train.aspect_ratios() == ds.aspect_ratios()
    for a, b in zip(train.records, ds.records):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert [ds.contiguous_to_cat_id[int(label)] for label in train[0]["labels"]] == [7, 3, 1]
    with pytest.raises(DatasetError, match=r"instances.json: loaded without its evaluation index.*evaluation_index=Tr"):
        train.coco


def test_crowd_degenerate_clipped_and_empty(tmp_path):
    images = [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 60},
              {"id": 2, "file_name": "b.jpg", "width": 50, "height": 80}]
    image_dir, ann_file = write_dataset(tmp_path, images=images, annotations=[
        ann(1, [10, 10, 20, 20]),
        ann(2, [0, 0, 60, 40], iscrowd=1),
        ann(3, [30, 30, 0.5, 10]),  # under 1 px wide
        ann(4, [99.5, 5, 10, 10]),  # 0.5 px wide once clipped
        ann(5, [90, 50, 20, 20]),  # partly outside: clipped to [90, 50, 100, 60]
    ])
    ds = CocoDetection(image_dir, ann_file)
    assert len(ds) == 2 and ds.stats["degenerate_boxes_dropped"] == 2 and ds.stats["crowd_boxes"] == 1
    assert ds.stats["images_without_boxes"] == 1
    item = ds[0]
    torch.testing.assert_close(item["boxes"], torch.tensor([[10.0, 10, 30, 30], [90, 50, 100, 60]]))
    torch.testing.assert_close(item["crowd_boxes"], torch.tensor([[0.0, 0, 60, 40]]))
    empty = ds[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,) and empty["crowd_boxes"].shape == (0, 4)
    assert ds.aspect_ratios() == [100 / 60, 50 / 80]
    filtered = CocoDetection(image_dir, ann_file, filter_empty=True)
    assert len(filtered) == 1 and filtered.stats["empty_images_filtered"] == 1


def test_corrupt_image_found_at_load_or_skipped_mid_epoch(tmp_path):
    image_dir, ann_file = write_dataset(tmp_path, annotations=[ann(1, [1, 1, 5, 5])])
    (image_dir / "a.jpg").write_bytes(b"\x00garbage, not a jpeg" * 10)
    with pytest.raises(DatasetError, match=r"(?s)1 x unreadable image.*a.jpg \(image id 1\): cannot be read"):
        CocoDetection(image_dir, ann_file)  # the image check at load finds it
    assert len(CocoDetection(image_dir, ann_file, strict=False)) == 0
    # unchecked at load (verify=none), it is skipped and counted when it is read, or raises
    assert CocoDetection(image_dir, ann_file, skip_corrupt=True, verify="none")[0] is None
    with pytest.raises(CorruptImageError, match="a.jpg"):
        CocoDetection(image_dir, ann_file, skip_corrupt=False, verify="none")[0]


def test_truncated_image_passes_the_header_check_and_fails_the_decode_check(tmp_path):
    image_dir, ann_file = write_dataset(tmp_path, annotations=[ann(1, [1, 1, 5, 5])])
    cv2.imwrite(str(image_dir / "a.jpg"), np.random.default_rng(0).integers(0, 255, (60, 100, 3), dtype=np.uint8))
    data = (image_dir / "a.jpg").read_bytes()
    (image_dir / "a.jpg").write_bytes(data[: len(data) // 3])
    assert len(CocoDetection(image_dir, ann_file)) == 1  # the header is intact
    with pytest.raises(DatasetError, match="unreadable image"):
        CocoDetection(image_dir, ann_file, verify="decode")


def test_image_size_disagreeing_with_json(tmp_path):
    image_dir, ann_file = write_dataset(tmp_path)
    cv2.imwrite(str(image_dir / "a.jpg"), np.zeros((61, 100, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"(?s)image size differs.*a.jpg \(image id 1\): decodes as 100x61"
                                           r".*annotated 100x60"):
        CocoDetection(image_dir, ann_file)
    assert len(CocoDetection(image_dir, ann_file, strict=False)) == 0
    assert CocoDetection(image_dir, ann_file, verify="none")[0] is None  # unchecked: skipped when read
    with pytest.raises(DatasetError, match=r"a.jpg: decoded as 100x61 but .* says 100x60"):
        CocoDetection(image_dir, ann_file, skip_corrupt=False, verify="none")[0]


def test_exif_rotated_photo_is_checked_at_its_displayed_size(tmp_path):
    """A phone photo stored 100x60 with EXIF orientation 6 (rotate 90) decodes as 60x100, as OpenCV
    applies the tag: annotated 60x100 it is fine, annotated with the stored 100x60 it is a mismatch."""
    from PIL import Image
    images = [{"id": 1, "file_name": "a.jpg", "width": 60, "height": 100}]
    image_dir, ann_file = write_dataset(tmp_path, images=images, annotations=[ann(1, [1, 1, 5, 5])])
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((60, 100, 3), np.uint8)).save(image_dir / "a.jpg", exif=exif)
    ds = CocoDetection(image_dir, ann_file)
    assert ds[0]["image"].shape == (3, 100, 60)  # the reader agrees with the check
    ann_file.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 60}],
                                    "annotations": [], "categories": CATEGORIES}))
    with pytest.raises(DatasetError, match="decodes as 60x100"):
        CocoDetection(image_dir, ann_file)


# ---- synthetic dataset ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("syn") / "shapes", num_train=60, num_val=8, seed=0)


def test_synthetic_dataset_loads_and_is_varied(synthetic):
    ds = CocoDetection(synthetic["train_images"], synthetic["train_annotations"], skip_corrupt=False)
    assert len(ds) == 60 and len(ds.class_names) >= 3
    assert sorted(ds.contiguous_to_cat_id.values()) == [1, 3, 7, 11]
    assert list(ds.contiguous_to_cat_id) == [1, 2, 3, 4]
    labels = np.concatenate([r["labels"] for r in ds.records])
    assert set(labels.tolist()) == {1, 2, 3, 4}
    boxes = np.concatenate([r["boxes"] for r in ds.records])
    sides = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    assert sides.min() <= 14 and sides.max() >= 50
    assert ds.stats["images_without_boxes"] >= 2 and ds.stats["degenerate_boxes_dropped"] == 0
    assert {ar > 1 for ar in ds.aspect_ratios()} == {True, False}
    item = ds[0]
    assert item["image"].shape[1:] == item["orig_size"] and len(item["boxes"]) >= 2
    val = CocoDetection(synthetic["val_images"], synthetic["val_annotations"])
    assert val.class_names == ds.class_names and len(val) == 8


def test_synthetic_dataset_is_deterministic_and_reused(synthetic, tmp_path):
    ann_file = Path(synthetic["train_annotations"])
    stamp = ann_file.stat().st_mtime_ns
    again = make_synthetic_coco(synthetic["root"], num_train=60, num_val=8, seed=0)
    assert again == synthetic and ann_file.stat().st_mtime_ns == stamp  # reused, not rewritten
    other = make_synthetic_coco(tmp_path / "copy", num_train=60, num_val=8, seed=0)
    assert Path(other["train_annotations"]).read_text() == ann_file.read_text()
    changed = make_synthetic_coco(tmp_path / "copy", num_train=10, num_val=2, seed=1)
    assert len(json.loads(Path(changed["train_annotations"]).read_text())["images"]) == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no temporary folder left behind


def test_synthetic_refuses_to_overwrite_other_data(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("x")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        make_synthetic_coco(tmp_path / "mine", num_train=2, num_val=1)


# ---- real data ----------------------------------------------------------------------------------------


@pytest.mark.skipif(not COCO128.exists(), reason=f"real sample data not found at {COCO128}")
def test_coco128_loads():
    ds = CocoDetection(COCO128 / "train2017", COCO128 / "annotations" / "instances_train2017.json",
                       transform=build_transform((320,), 512, 0.5, train=True), skip_corrupt=False)
    assert len(ds) == 128 and len(ds.class_names) == 80 and ds.class_names[0] == "person"
    assert ds.contiguous_to_cat_id[80] == 90 and ds.cat_id_to_contiguous[1] == 1
    assert ds.stats["crowd_boxes"] == 10 and ds.stats["boxes"] + ds.stats["degenerate_boxes_dropped"] == 929
    assert sum(len(r["crowd_boxes"]) for r in ds.records) == 10
    index = next(i for i, r in enumerate(ds.records) if len(r["crowd_boxes"]))
    item = ds[index]
    h, w = item["image"].shape[1:]
    assert min(h, w) == 320 or max(h, w) == 512
    for boxes in (item["boxes"], item["crowd_boxes"]):
        assert len(boxes) and (boxes[:, 2:] > boxes[:, :2]).all()
        assert (boxes >= 0).all() and (boxes[:, 0::2] <= w).all() and (boxes[:, 1::2] <= h).all()


def test_every_configurable_format_has_an_entry_in_the_format_table():
    """data.format's fixed choices and the table behind them name the same formats, each with all four jobs."""
    from detection.config import DataFormat
    from detection.data.build import FORMATS, DatasetFormat
    assert set(FORMATS) == {f.value for f in DataFormat}
    for name, fmt in FORMATS.items():
        for job in ("prepare", "build", "source", "evaluators"):
            assert getattr(type(fmt), job) is not getattr(DatasetFormat, job), (name, job)


@pytest.mark.parametrize("box", [[20, 0, 200, 120], [20, 60, 200, 200], [400, 0, 479, 80]],
                         ids=["top-edge", "inside", "top-right-corner"])
def test_drawn_label_stays_in_the_picture(box):
    """The class name and score are drawn where they can be read: above the box, or inside it where the box
    touches the top edge (drawn above, the label was cut off), shifted left at the right edge."""
    from detection.visualize import draw_detections
    grey = np.full((480, 480, 3), 128, np.uint8)
    canvas = draw_detections(grey, [{"box_xyxy": box, "label": "circle", "score": 0.99}])
    assert canvas.shape == grey.shape
    (tw, th), _ = cv2.getTextSize("circle 0.99", cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
    label_colour = (canvas == np.array([0, 220, 255])).all(-1)  # the first palette colour (BGR)
    x1, y1, x2, y2 = box
    outline = np.zeros_like(label_colour)
    outline[max(0, y1 - 2):y2 + 3, max(0, x1 - 2):x2 + 3] = True
    outline[y1 + 3:y2 - 2, x1 + 3:x2 - 2] = False
    # the label's fill (its text is black) away from the box's 2-px outline
    assert (label_colour & ~outline).sum() >= tw * th // 2, "no legible label in the picture"
