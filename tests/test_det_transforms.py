"""Detection transforms (detection/data/transforms.py): the resize rule, exact resize/flip geometry of
images and boxes, and its inverse back to the original pixels."""
import random

import numpy as np
import pytest
import torch

from det_helpers import ann, write_dataset
from detection.data import CocoDetection, build_transform, resized_shape
from detection.modeling.postprocessing import boxes_to_image


@pytest.mark.parametrize("hw, short, max_size, expected", [
    ((480, 640), 800, 1333, (800, 1067)),
    ((640, 480), 800, 1333, (1067, 800)),
    ((480, 1000), 800, 1333, (640, 1333)),  # the longer side is capped
    ((100, 100), 64, 1000, (64, 64)),
    ((427, 640), 600, 1000, (600, 899)),
    ((2236, 702), 800, 1333, (1333, 419)),  # 702 * 1333 / 2236 = 418.5: rounded half up
])
def test_resized_shape(hw, short, max_size, expected):
    assert resized_shape(*hw, short, max_size) == expected


def test_resize_scales_image_and_boxes_exactly():
    image = np.random.default_rng(0).integers(0, 255, (60, 100, 3), np.uint8)
    t = build_transform((120,), 1000, flip_prob=0.5, train=False)  # test mode never flips
    out = t(image=image, bboxes=np.array([[10, 5, 30, 25], [0, 0, 100, 60]], np.float32), labels=[2, 1],
            crowd_boxes=np.array([[50, 10, 70, 20]], np.float32))
    assert out["image"].shape == (120, 200, 3) and out["image"].dtype == np.uint8
    assert out["scale"] == (2.0, 2.0) and out["flipped"] is False
    np.testing.assert_allclose(out["bboxes"], [[20, 10, 60, 50], [0, 0, 200, 120]], atol=1e-3)
    np.testing.assert_allclose(out["crowd_boxes"], [[100, 20, 140, 40]], atol=1e-3)
    assert out["labels"].tolist() == [2, 1]

    capped = build_transform((100,), 300, 0.0, train=True)(image=np.zeros((50, 200, 3), np.uint8),
                                                          bboxes=[[20, 10, 40, 30]], labels=[1])
    assert capped["image"].shape == (75, 300, 3) and capped["scale"] == (1.5, 1.5)
    np.testing.assert_allclose(capped["bboxes"], [[30, 15, 60, 45]], atol=1e-3)


def test_flip_maps_boxes_and_pixels():
    image = np.random.default_rng(1).integers(0, 255, (60, 100, 3), np.uint8)
    t = build_transform((60,), 1000, flip_prob=1.0, train=True)
    out = t(image=image, bboxes=[[10, 5, 30, 25]], labels=[1], crowd_boxes=[[0, 0, 20, 60]])
    assert out["flipped"] is True and out["scale"] == (1.0, 1.0)
    np.testing.assert_array_equal(out["image"], image[:, ::-1])
    np.testing.assert_allclose(out["bboxes"], [[70, 5, 90, 25]], atol=1e-3)  # x -> 100 - x
    np.testing.assert_allclose(out["crowd_boxes"], [[80, 0, 100, 60]], atol=1e-3)


def test_multiscale_sampling_and_predictor_style_call():
    random.seed(0)
    t = build_transform((64, 96), 1000, 0.5, train=True)
    outs = [t(image=np.zeros((32, 48, 3), np.uint8), bboxes=np.zeros((0, 4), np.float32), labels=[])
            for _ in range(40)]
    assert {o["image"].shape[0] for o in outs} == {64, 96}
    assert {o["flipped"] for o in outs} == {True, False}
    assert all(o["bboxes"].shape == (0, 4) and o["crowd_boxes"].shape == (0, 4) for o in outs)


@pytest.mark.parametrize("flip", [False, True])
def test_boxes_to_image_inverts_the_transform(flip):
    rng = np.random.default_rng(2)
    xy = rng.uniform(0, [160, 55], (20, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 35, (20, 2))], 1).astype(np.float32)  # inside 200x90
    out = build_transform((123,), 400, float(flip), train=True)(
        image=np.zeros((90, 200, 3), np.uint8), bboxes=boxes, labels=np.ones(20, np.int64))
    assert out["flipped"] is flip
    back = boxes_to_image(torch.from_numpy(out["bboxes"]), (90, 200), out["scale"], out["flipped"])
    np.testing.assert_allclose(back.numpy(), boxes, atol=1e-3)


def test_dataset_with_transform_keeps_boxes_in_image(tmp_path):
    image_dir, ann_file = write_dataset(tmp_path, annotations=[ann(1, [80, 40, 30, 30]), ann(2, [0, 0, 5, 5])])
    ds = CocoDetection(image_dir, ann_file, transform=build_transform((90,), 1000, 1.0, train=True))
    item = ds[0]
    h, w = item["image"].shape[1:]
    assert (h, w) == (90, 150) and item["scale"] == (1.5, 1.5) and item["flipped"] is True
    torch.testing.assert_close(item["boxes"], torch.tensor([[0.0, 60, 30, 90], [142.5, 0, 150, 7.5]]),
                               atol=1e-3, rtol=0)
