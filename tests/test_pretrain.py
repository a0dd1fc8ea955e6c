import json
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from backbones import read_backbone_checkpoint
from backbones.pretraining.data import (DatasetError, ImageFolderDataset, PCALighting, ShardedSampler,
                                        collate_skip_none, scan_image_folder, split_holdout, ten_crops,
                                        train_transform)
from backbones.pretraining.synthetic import make_synthetic_shapes
from backbones.engine.config import load_config
from backbones.pretraining.config import PretrainConfig
from backbones.pretraining.trainer import lr_factor
from conftest import ROOT, SHARED_DATA, assert_same_weights

TOOL = str(ROOT / "tools" / "pretrain_backbone.py")


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_synthetic_shapes(str(root / "train"), str(root / "val"), 6, 3, 32, seed=1)
    return root


def tiny_overrides(root, out, *extra):
    return [f"data.train_dir={root}/train", f"data.val_dir={root}/val", "data.synthetic=false",
            "data.scale_range=[32,40]", "data.crop_size=32", "data.test_resize=32", "data.workers=0",
            "model.base_width=8", "solver.batch_size=8", "solver.epochs=2", "solver.steps=[1]", "solver.warmup_epochs=0",
            "eval.period=1", "eval.multiscale_sizes=[32,48]", "eval.batch_size=16", "log_period=2",
            f"output_dir={out}", *extra]


def run_tool(args, env_extra=None, check=True):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    proc = subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def test_synthetic_dataset_is_imagefolder_and_reused(tiny_shapes):
    classes, samples = scan_image_folder(str(tiny_shapes / "train"))
    assert len(classes) == 8 and len(samples) == 48
    before = os.path.getmtime(samples[0][0])
    make_synthetic_shapes(str(tiny_shapes / "train"), str(tiny_shapes / "val"), 6, 3, 32, seed=1)
    assert os.path.getmtime(samples[0][0]) == before  # same parameters: not rewritten


def test_missing_dataset_error_names_path_and_layout(tmp_path):
    with pytest.raises(DatasetError, match=r"not found: .*nowhere[\s\S]*expected layout: <root>/<class_name>"):
        scan_image_folder(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class sub-folders"):
        scan_image_folder(str(tmp_path / "empty"))


def test_tool_reports_missing_dataset_before_training(tmp_path):
    proc = run_tool([str(ROOT / "configs/pretrain/resnet50_imagenet.yaml"), f"data.train_dir={tmp_path}/imagenet/train",
                     f"output_dir={tmp_path}/run"], check=False)
    assert proc.returncode == 2
    assert f"{tmp_path}/imagenet/train" in proc.stderr and "expected layout" in proc.stderr
    proc = run_tool(["solver.epocs=3"], check=False)
    assert proc.returncode == 2 and "did you mean 'solver.epochs'" in proc.stderr


def test_corrupt_image_is_skipped_and_counted(tiny_shapes, tmp_path):
    classes, samples = scan_image_folder(str(tiny_shapes / "train"))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    samples = samples[:3] + [(str(bad), 0)]
    ds = ImageFolderDataset(samples, classes, train_transform([32, 40], 32, True, 0.1))
    assert ds[3] is None
    images, labels, skipped = collate_skip_none([ds[i] for i in range(4)])
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.uint8 and skipped == 1
    strict = ImageFolderDataset(samples, classes, train_transform([32, 40], 32, True, 0.1), skip_corrupt=False)
    with pytest.raises(RuntimeError, match="bad.jpg"):
        strict[3]


def test_augmentation_is_reproducible_per_sample(tiny_shapes):
    classes, samples = scan_image_folder(str(tiny_shapes / "train"))
    ds = ImageFolderDataset(samples, classes, train_transform([32, 48], 32, True, 0.1), seed=3)
    a, b = ds[(0, 5)][0], ds[(0, 5)][0]
    assert torch.equal(a, b) and torch.equal(a, ds[5][0])  # a plain index is epoch 0
    assert not torch.equal(a, ds[(1, 5)][0])  # a new epoch draws new crops


def coordinate_crops(pipeline: str, tmp_path, draws: int = 600) -> torch.Tensor:
    """``draws`` augmented crops (epochs 0..draws-1 of one sample) of an image whose red channel is its
    x coordinate and green its y, through one of the training pipelines (no colour augmentation)."""
    from backbones.pretraining.device_decode import EncodedImageFolderDataset, augment_on_device, collate_encoded
    from detection.localization.data import LocRecord, LocTrainDataset, loc_train_transform
    y, x = np.mgrid[0:224, 0:224]
    path = str(tmp_path / "coords.png")
    cv2.imwrite(path, np.stack([np.full_like(x, 128), y, x], -1).astype(np.uint8))  # BGR
    if pipeline == "workers":
        ds = ImageFolderDataset([(path, 0)], ["c"], train_transform([112, 160], 112, True, 0.0))
        return torch.stack([ds[(e, 0)][0] for e in range(draws)]).float()
    if pipeline == "device":
        ds = EncodedImageFolderDataset([(path, 0)], [112, 160], 112, True, 0.0)
        return augment_on_device(collate_encoded([ds[(e, 0)] for e in range(draws)]), 112, torch.device("cpu"))[0].float()
    record = LocRecord(path=path, label=0, width=224, height=224, boxes=np.array([[20, 20, 200, 200]], np.float32),
                       box_labels=np.array([0]))
    ds = LocTrainDataset([record], loc_train_transform([112, 160], 112, True, 0.0, 0.0))
    return torch.stack([ds[(e, 0)][0] for e in range(draws)]).float()


@pytest.mark.parametrize("pipeline", ["workers", "device", "localization"])
def test_augmentation_draws_scale_position_and_flip_independently(pipeline, tmp_path):
    # Found in resdet: albumentations' Compose.set_random_seed seeds every transform alike, and the flip,
    # the crop's vertical position and the scale were one draw (flip vs position correlation -0.85).
    crops = coordinate_crops(pipeline, tmp_path)
    slope = (crops[:, 0, :, -1] - crops[:, 0, :, 0]).mean(1) / 111  # source pixels per crop pixel, < 0: flipped
    flipped, zoom = (slope < 0).float(), slope.abs()
    centre_x, centre_y = crops[:, 0].mean((1, 2)), crops[:, 1].mean((1, 2))
    pairs = {"flip, y": (flipped, centre_y), "flip, x": (flipped, centre_x), "scale, y": (zoom, centre_y),
             "scale, x": (zoom, centre_x), "flip, scale": (flipped, zoom)}
    correlations = {k: round(float(np.corrcoef(a.numpy(), b.numpy())[0, 1]), 3) for k, (a, b) in pairs.items()}
    assert all(abs(r) < 0.15 for r in correlations.values()), correlations  # 600 independent draws: |r| ~ 0.04
    assert 0.4 < flipped.mean() < 0.6 and zoom.min() < 1.5 < zoom.max()  # scales 112/160 .. 112/112 of 224
    assert abs(float(centre_y.mean()) - 111.5) < 3 and abs(float(centre_x.mean()) - 111.5) < 3


def test_scale_and_crop_is_resizing_then_cropping_to_one_level():
    """The crop sampled straight from the source equals cv2.resize of the whole image followed by the crop
    (and RandomCrop's centred zero padding where the resized image is smaller), within one level."""
    from backbones.pretraining.data import ScaleAndCrop
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8), (0, 0), 2)
    cases = {"downscale": ([60, 72], 48), "upscale": ([150, 200], 64), "pad the short side": ([40], 48),
             "pad both sides": ([30], 48), "portrait": ([50, 61], 40)}
    for name, (sizes, crop) in cases.items():
        source = image.transpose(1, 0, 2).copy() if name == "portrait" else image
        transform = ScaleAndCrop(sizes, crop)
        for seed in range(12):
            transform.set_random_seed(seed)
            params = transform.get_params_dependent_on_data({"shape": source.shape}, {})
            (rows, cols), (top, left) = params["resized"], params["corner"]
            assert min(rows, cols) in sizes and abs(rows / cols - source.shape[0] / source.shape[1]) < 0.03
            out = transform.apply(source, **params)
            resized = cv2.resize(source, (cols, rows), interpolation=cv2.INTER_LINEAR)
            canvas = np.zeros((max(rows, crop), max(cols, crop), 3), np.uint8)
            canvas[max(0, -top):max(0, -top) + rows, max(0, -left):max(0, -left) + cols] = resized
            expected = canvas[max(0, top):max(0, top) + crop, max(0, left):max(0, left) + crop]
            assert out.shape == expected.shape == (crop, crop, 3), name
            assert np.abs(out.astype(int) - expected).max() <= 1, (name, seed)
            if name.startswith("pad"):
                assert (out[:max(0, -top)] == 0).all() and (out[max(0, -top) + rows:] == 0).all()


def test_pca_lighting_shifts_along_imagenet_components():
    img = np.full((4, 4, 3), 128, np.uint8)
    out = PCALighting(std=0.5, p=1.0)(image=img)["image"].astype(int) - 128
    assert out.std() == 0 or np.ptp(out.reshape(-1, 3), axis=0).max() == 0  # one offset for every pixel
    assert np.abs(out[0, 0]).sum() > 0


def test_pca_lighting_by_table_gives_the_float_formula_bytes():
    """The per-channel tables give exactly ``clip(float32(image) + offset, 0, 255)`` truncated to uint8, on
    crops as the pipeline hands them over (contiguous, a view, a mirrored view) and offsets that clip at both
    ends; other images take the formula itself."""
    from backbones.imagedata import add_clipped
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    crops = [np.ascontiguousarray(big[5:30, 7:40]), big[5:30, 7:40], big[5:30, 7:40][:, ::-1]]
    for offset in ([0.0, 0.0, 0.0], [3.7, -12.2, 250.1], [-255.5, 0.49, -0.51], rng.normal(0, 30, 3)):
        offset = np.asarray(offset, dtype=np.float32)
        for crop in crops + [crop.astype(np.float32) for crop in crops] + [big[..., :2]]:
            expected = np.clip(crop.astype(np.float32) + offset[:crop.shape[-1]], 0, 255).astype(np.uint8)
            out = add_clipped(crop, offset[:crop.shape[-1]])
            assert out.dtype == np.uint8 and np.array_equal(out, expected), (offset, crop.dtype, crop.shape)


def test_ten_crops_are_corners_centre_and_mirrors():
    img = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    crops = ten_crops(img, 4)
    assert len(crops) == 10
    assert np.array_equal(crops[0], img[:4, :4]) and np.array_equal(crops[3], img[2:, 4:])
    assert np.array_equal(crops[4], img[1:5, 2:6]) and np.array_equal(crops[9], img[1:5, 2:6][:, ::-1])


def test_sharded_sampler_covers_everything_once_per_epoch():
    shards = [list(ShardedSampler(10, shuffle=True, seed=1, rank=r, world_size=3)) for r in range(3)]
    assert all(len(s) == 4 for s in shards) and set(sum(shards, [])) == set(range(10))
    evals = [list(ShardedSampler(10, shuffle=False, rank=r, world_size=3, pad=False)) for r in range(3)]
    assert sorted(sum(evals, [])) == list(range(10))
    s = ShardedSampler(10, shuffle=True, seed=1)
    s.set_epoch(2)
    full = list(s)
    assert list(s) == full and sorted(full) == list(range(10))  # deterministic for an epoch
    s.set_epoch(3)
    assert list(s) != full  # reshuffled (resuming mid-epoch: tests/test_loader.py)


def test_holdout_split_is_disjoint_and_per_class():
    samples = [(f"{c}_{i}", c) for c in range(3) for i in range(10)]
    train, val = split_holdout(samples, 0.2, seed=0)
    assert len(val) == 6 and not set(train) & set(val) and {c for _, c in val} == {0, 1, 2}


def test_step_schedule_divides_by_ten():
    cfg = load_config(PretrainConfig, None, ["solver.steps=[2,4]", "solver.epochs=6", "solver.warmup_epochs=0"])
    assert [lr_factor(cfg, it, 10) for it in (0, 19, 20, 40, 59)] == pytest.approx([1, 1, 0.1, 0.01, 0.01])
    cfg = load_config(PretrainConfig, None, ["solver.steps=[2,4]", "solver.epochs=6"])  # the demo's 3-epoch warm-up
    assert [lr_factor(cfg, it, 10) for it in (0, 15, 30, 59)] == pytest.approx([0.1, 0.55, 0.1, 0.01])
    cfg = load_config(PretrainConfig, None, ["solver.schedule=cosine", "solver.epochs=2", "solver.warmup_epochs=0"])
    assert lr_factor(cfg, 10, 10) == pytest.approx(0.5)


def test_pretrain_run_writes_run_folder_and_backbone(tiny_shapes, tmp_path):
    out = tmp_path / "run"
    run_tool(tiny_overrides(tiny_shapes, out))
    for name in ("config.yaml", "log.txt", "metrics.jsonl", "summary.json", "checkpoints/last.pth",
                 "checkpoints/best.pth", "checkpoints/backbone.pth", "train_batch.jpg"):
        assert (out / name).is_file(), name
    grid = cv2.imread(str(out / "train_batch.jpg"))
    assert grid.shape == (2 + 34, 2 + 8 * 34, 3)  # the first batch: 8 crops of 32 px, 2 px apart
    assert any(p.name.startswith("events.out.tfevents") for p in out.iterdir())
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["val"]) == {"center", "ten_crop", "multiscale"}
    assert summary["val"]["center"]["images"] == 24
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in r for r in records) and any("val/top1" in r for r in records)
    ckpt = read_backbone_checkpoint(out / "checkpoints/backbone.pth")
    assert ckpt["arch"]["base_width"] == 8 and len(ckpt["class_names"]) == 8 and "solver" in ckpt["config"]


def test_killed_and_resumed_run_ends_with_identical_weights(tiny_shapes, tmp_path):
    common = ["checkpoint_period=4", "solver.epochs=2", "eval.ten_crop=false", "eval.multiscale_sizes=[]"]
    run_tool(tiny_overrides(tiny_shapes, tmp_path / "straight", *common))
    killed = run_tool(tiny_overrides(tiny_shapes, tmp_path / "resumed", *common, "debug_stop_at_iter=11"), check=False)
    assert killed.returncode == 3  # died mid-epoch, after the checkpoint at iteration 8 (6 per epoch)
    log = run_tool(tiny_overrides(tiny_shapes, tmp_path / "resumed", *common, "resume=true")).stdout
    assert "resumed from" in log and "at iteration 8 " in log
    assert_same_weights(tmp_path / "straight", tmp_path / "resumed")


def test_ddp_two_processes_on_gloo(tiny_shapes, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", TOOL,
           *tiny_overrides(tiny_shapes, out, "eval.ten_crop=false", "eval.multiscale_sizes=[]")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val"]["center"]["images"] == 24  # each val image counted once across the 2 ranks
    assert "2 ranks" in (out / "log.txt").read_text()


@pytest.mark.parametrize("decode", ["workers", "device"])
def test_ddp_rank_with_an_all_corrupt_batch_stays_in_step(tiny_shapes, tmp_path, decode):
    # One image per rank per step and one unreadable file: at that step one rank has no batch at all.
    # Alone it would skip backward's all-reduce and pair every later collective with the wrong one.
    data = tmp_path / "data"
    shutil.copytree(tiny_shapes, data)
    _, samples = scan_image_folder(str(data / "train"))
    with open(samples[5][0], "wb") as f:
        f.write(b"truncated")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29519", TOOL,
           *tiny_overrides(data, out, "eval.ten_crop=false", "eval.multiscale_sizes=[]", "solver.batch_size=2",
                           "solver.epochs=1", "eval.period=0", f"data.decode={decode}",
                           # 64 px: res5 keeps 2x2 cells, so BatchNorm sees more than one value per channel
                           "data.scale_range=[64,72]", "data.crop_size=64", "data.test_resize=64")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 24 and summary["skipped_corrupt_train"] == 1
    assert summary["val"]["center"]["images"] == 24


@pytest.mark.skipif(not (SHARED_DATA / "imagenette-loc" / "images").is_dir(), reason="needs ../shared/data/imagenette-loc")
def test_pretrain_few_steps_on_real_imagenet_sample(tmp_path):
    out = tmp_path / "imagenette"
    run_tool([str(ROOT / "configs/pretrain/resnet18_imagenette.yaml"), f"data.train_dir={SHARED_DATA}/imagenette-loc/images",
              "model.base_width=8", "solver.epochs=1", "solver.batch_size=16", "data.scale_range=[64,80]",
              "data.crop_size=64", "data.test_resize=64", "eval.ten_crop=false", "eval.multiscale_sizes=[]",
              "data.workers=0", f"output_dir={out}"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val"]["center"]["images"] == 100 and len(summary["classes"]) == 10
    assert summary["skipped_corrupt_train"] == 0
