"""data.decode=device: the workers read bytes, the device decodes and augments (backbones/pretraining/device_decode.py).

On the CPU the "device" is the CPU (libjpeg-turbo instead of nvJPEG); the augmentation arithmetic is the same."""
import io

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import backbones.pretraining.device_decode as dd
from backbones.engine.config import load_config
from backbones.engine.errors import ConfigError
from backbones.engine.imageio import CorruptImageError, read_image_rgb
from backbones.pretraining.config import PretrainConfig
from backbones.pretraining.device_decode import (EncodedBatch, EncodedImageFolderDataset, augment_on_device,
                                                 check_device_decode, collate_encoded, resized_crop_box)
from conftest import assert_same_weights
from test_pretrain import run_tool, tiny_overrides, tiny_shapes  # noqa: F401 (a fixture)

CPU = torch.device("cpu")


def photo(h, w, seed=0):
    """Blurred noise: a JPEG of photo-like entropy, as HxWx3 RGB."""
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), (0, 0), 2)


def jpeg_bytes(rgb) -> np.ndarray:
    return cv2.imencode(".jpg", rgb[:, :, ::-1])[1].ravel()


def batch_of(payloads, boxes, flips, offsets):
    return EncodedBatch([torch.from_numpy(np.ascontiguousarray(p)) for p in payloads],
                        torch.tensor(boxes, dtype=torch.float32), torch.tensor(flips),
                        torch.tensor(np.asarray(offsets, np.float32)), torch.arange(len(payloads)),
                        [f"img{i}.jpg" for i in range(len(payloads))], 0)


def opencv_reference(rgb, shorter_side, crop, u, v, flip, offset):
    """The workers' arithmetic written out: OpenCV's bilinear resize, crop, flip, offset, clip, truncate."""
    h, w = rgb.shape[:2]
    nh, nw = (shorter_side, w * shorter_side // h) if h <= w else (h * shorter_side // w, shorter_side)
    top, left = int(v * (nh - crop + 1)), int(u * (nw - crop + 1))
    out = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR)[top:top + crop, left:left + crop]
    out = out[:, ::-1] if flip else out
    return np.clip(out.astype(np.float32) + offset, 0, 255).astype(np.uint8)


def test_resize_crop_flip_and_lighting_equal_opencv_to_its_rounding():
    rng = np.random.default_rng(0)
    crop = 96
    # landscape, portrait, near-square, smaller than the crop's scale (upsampled) and larger (downsampled);
    # two images of one size share a roi_align call
    sizes = [(375, 500), (375, 500), (500, 333), (97, 130), (480, 640), (300, 301)]
    photos = [photo(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    decoded = [cv2.cvtColor(cv2.imdecode(jpeg_bytes(p), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB) for p in photos]
    for shorter_side in (96, 150, 480):
        draws = [(*rng.random(2), bool(rng.random() < 0.5), rng.normal(0, 10, 3).astype(np.float32)) for _ in sizes]
        boxes = [resized_crop_box(h, w, shorter_side, crop, u, v) for (h, w), (u, v, _, _) in zip(sizes, draws)]
        batch = batch_of([jpeg_bytes(p) for p in photos], boxes, [d[2] for d in draws], [d[3] for d in draws])
        images, labels, failed = augment_on_device(batch, crop, CPU)
        assert images.dtype == torch.uint8 and images.shape == (len(sizes), 3, crop, crop) and failed == 0
        assert labels.tolist() == list(range(len(sizes)))
        for image, rgb, (u, v, flip, offset) in zip(images, decoded, draws):
            ref = opencv_reference(rgb, shorter_side, crop, u, v, flip, offset)
            diff = np.abs(image.permute(1, 2, 0).numpy().astype(int) - ref.astype(int))
            # OpenCV's uint8 resize uses 11-bit fixed-point weights: one level off at most, rarely
            assert diff.max() <= 1 and diff.mean() < 0.25, (rgb.shape, shorter_side, diff.max(), diff.mean())


def test_crop_box_stays_inside_the_resized_image_and_covers_crop_size_pixels():
    for h, w, s in [(375, 500, 256), (500, 375, 480), (224, 224, 224), (97, 130, 96)]:
        for u, v in [(0.0, 0.0), (0.999999, 0.999999), (0.5, 0.25)]:
            x1, y1, x2, y2 = resized_crop_box(h, w, s, 96, u, v)
            assert 0 <= x1 < x2 <= w + 1e-9 and 0 <= y1 < y2 <= h + 1e-9
            scale = s / min(h, w)
            assert (x2 - x1) * scale == pytest.approx(96, rel=0.01) and (y2 - y1) * scale == pytest.approx(96, rel=0.01)


def write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


def test_files_the_gpu_engines_should_not_get_travel_as_pixels_and_unreadable_ones_are_skipped(tmp_path):
    rgb = photo(60, 80)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    png_named_jpeg = write(tmp_path / "png.JPEG", buf.getvalue())
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, format="JPEG")
    cmyk = write(tmp_path / "cmyk.jpg", buf.getvalue())
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[dd.EXIF_ORIENTATION] = 6  # stored sideways: OpenCV turns it upright
    Image.fromarray(rgb).save(buf, format="JPEG", exif=exif)
    rotated = write(tmp_path / "rotated.jpg", buf.getvalue())
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", progressive=True)  # nvJPEG: Huffman on the training thread
    progressive = write(tmp_path / "progressive.jpg", buf.getvalue())
    grey = write(tmp_path / "grey.jpg", cv2.imencode(".jpg", rgb[:, :, 0])[1].tobytes())
    plain = write(tmp_path / "plain.jpg", jpeg_bytes(rgb).tobytes())
    corrupt = write(tmp_path / "corrupt.jpg", b"\xff\xd8\xff not a jpeg after all")
    samples = [(p, 0) for p in (png_named_jpeg, cmyk, rotated, progressive, grey, plain, corrupt)]
    dataset = EncodedImageFolderDataset(samples, (64, 64), 48, flip=False, pca_std=0.0)
    items = [dataset[i] for i in range(len(samples))]
    assert items[-1] is None  # skipped (and counted by the collate)
    for item, (path, _) in zip(items[:5], samples):
        assert item[0].dim() == 3 and torch.equal(item[0], torch.from_numpy(read_image_rgb(path))), path
    assert items[2][0].shape[:2] == (80, 60)  # turned upright
    assert items[5][0].dim() == 1  # bytes for the device
    batch = collate_encoded(items)
    assert batch.skipped == 1 and len(batch.payloads) == 6
    images, labels, failed = augment_on_device(batch, 48, CPU)
    assert images.shape == (6, 3, 48, 48) and failed == 0
    with pytest.raises(CorruptImageError, match="corrupt.jpg"):
        EncodedImageFolderDataset(samples, (64, 64), 48, False, 0.0, skip_corrupt=False)[6]


def test_a_jpeg_the_device_refuses_is_decoded_on_the_host_and_one_nothing_decodes_is_skipped(monkeypatch):
    photos = [photo(40, 50, seed=i) for i in range(2)]
    payloads = [jpeg_bytes(p) for p in photos] + [np.frombuffer(b"\xff\xd8\xff not a jpeg after all", np.uint8).copy()]
    real = dd.decode_jpegs

    def refusing(datas, device):  # as nvJPEG with a file it cannot take: the whole call fails
        if any(d.numel() == len(payloads[1]) for d in datas):
            raise RuntimeError("nvjpeg refused")
        return real(datas, device)

    monkeypatch.setattr(dd, "decode_jpegs", refusing)
    box = resized_crop_box(40, 50, 40, 32, 0.5, 0.5)
    batch = batch_of(payloads, [box] * 3, [False] * 3, [[0, 0, 0]] * 3)
    images, labels, failed = augment_on_device(batch, 32, CPU)
    assert failed == 1 and labels.tolist() == [0, 1] and images.shape == (2, 3, 32, 32)
    monkeypatch.setattr(dd, "decode_jpegs", real)
    ref = augment_on_device(batch_of(payloads[:2], [box] * 2, [False] * 2, [[0, 0, 0]] * 2), 32, CPU)[0]
    assert torch.equal(images, ref)  # the host decoded the refused one to the same pixels
    with pytest.raises(CorruptImageError, match="img2.jpg"):
        augment_on_device(batch, 32, CPU, skip_corrupt=False)


def test_a_device_that_cannot_decode_jpegs_stops_the_run_with_the_fix(monkeypatch):
    dd.probe_device_decoder(CPU)  # torchvision decodes on the CPU: fine

    def unavailable(datas, device):
        raise RuntimeError("decode_jpegs_cuda: torchvision not compiled with nvJPEG support")

    monkeypatch.setattr(dd, "decode_jpegs", unavailable)
    with pytest.raises(ConfigError, match="cannot decode JPEGs on cpu here .*nvJPEG.*Use data.decode=workers"):
        dd.probe_device_decoder(CPU)


def test_draws_are_a_function_of_seed_epoch_and_index(tiny_shapes):
    from backbones.imagedata import scan_image_folder
    _, samples = scan_image_folder(str(tiny_shapes / "train"))

    def draws(dataset, key):
        payload, box, flip, offset, label, path = dataset[key]
        return box, flip, offset.tolist(), label

    def make(seed):
        return EncodedImageFolderDataset(samples, (32, 48), 32, flip=True, pca_std=0.1, seed=seed)

    a, b = make(0), make(0)
    for key in [(0, 3), (1, 3), (0, 7)]:
        assert draws(a, key) == draws(b, key) and torch.equal(a[key][0], b[key][0])
    assert draws(a, (0, 3)) != draws(a, (1, 3)) and draws(a, (0, 3)) != draws(make(1), (0, 3))
    flips = [a[(e, i)][2] for e in range(8) for i in range(len(samples))]
    assert 0.35 < np.mean(flips) < 0.65  # a fair coin over 384 draws
    sides = {round(min(a[(e, 0)][1][2] - a[(e, 0)][1][0], a[(e, 0)][1][3] - a[(e, 0)][1][1]), 6) for e in range(40)}
    assert len(sides) > 5  # the scale is drawn too (the crop covers fewer source pixels on a larger resize)


def test_device_decode_refuses_settings_it_does_not_offer_before_reading_images():
    cfg = load_config(PretrainConfig, None, ["data.decode=device", "data.crop_padding=4",
                                             "data.scale_range=[24,40]", "data.crop_size=32"])
    with pytest.raises(ConfigError, match=r"data.crop_padding=4 .*; data.scale_range=\[24, 40\] starts below"):
        check_device_decode(cfg.data)
    check_device_decode(load_config(PretrainConfig, None, ["data.decode=device"]).data)  # the demo's own: fine


def test_device_decode_run_resumes_to_identical_weights(tiny_shapes, tmp_path):
    # two workers: the draws must not depend on which process reads an image
    common = ["data.decode=device", "data.workers=2", "checkpoint_period=4", "eval.ten_crop=false",
              "eval.multiscale_sizes=[]"]
    run_tool(tiny_overrides(tiny_shapes, tmp_path / "straight", *common))
    killed = run_tool(tiny_overrides(tiny_shapes, tmp_path / "resumed", *common, "debug_stop_at_iter=11"), check=False)
    assert killed.returncode == 3
    log = run_tool(tiny_overrides(tiny_shapes, tmp_path / "resumed", *common, "resume=true")).stdout
    assert "at iteration 8 " in log
    assert_same_weights(tmp_path / "straight", tmp_path / "resumed")
