"""Decoding the awkward files ImageNet and COCO contain, with OpenCV."""
import numpy as np
import pytest
import torch
from PIL import Image

from backbones.engine.imageio import CorruptImageError, chw_tensor, read_image_rgb


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, to be shown rotated 90 degrees
    Image.new("RGB", (20, 10), (255, 0, 0)).save(tmp_path / "r.jpg", exif=exif)
    assert read_image_rgb(tmp_path / "r.jpg").shape == (20, 10, 3)


def test_cmyk_jpeg_comes_back_rgb(tmp_path):
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(tmp_path / "c.jpg")  # pure red in CMYK
    image = read_image_rgb(tmp_path / "c.jpg")
    assert image.shape == (6, 8, 3) and image[0, 0, 0] > 200 and image[0, 0, 1:].max() < 40


def test_grayscale_png_named_jpeg(tmp_path):
    Image.new("L", (5, 4), 128).save(tmp_path / "g.png")
    (tmp_path / "g.JPEG").write_bytes((tmp_path / "g.png").read_bytes())  # as found in ImageNet
    image = read_image_rgb(tmp_path / "g.JPEG")
    assert image.shape == (4, 5, 3) and image.dtype == np.uint8 and (image == 128).all()


def test_corrupt_and_empty_files_raise_with_the_path(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    (tmp_path / "empty.jpg").write_bytes(b"")
    for name in ("bad.jpg", "empty.jpg", "missing.jpg"):
        with pytest.raises(CorruptImageError, match=name):
            read_image_rgb(tmp_path / name)


def _layouts():
    """What the datasets hand over: whole images, crops (views), mirrored views, other dtypes and channels."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    return {
        "uint8 whole": image, "uint8 crop view": image[3:31, 7:44], "uint8 mirrored view": image[:, ::-1],
        "uint8 upside-down view": image[::-1], "uint8 channels reversed": image[:, :, ::-1],
        "float32 one channel": rng.random((9, 11, 1), dtype=np.float32), "float64 five channels": rng.random((6, 4, 5)),
        "int64 (no OpenCV type)": rng.integers(-5, 5, (6, 4, 3)), "bool": rng.random((6, 4, 3)) > 0.5,
        "empty": np.zeros((0, 4, 3), np.uint8),
    }


@pytest.mark.parametrize("name", list(_layouts()))
def test_chw_tensor_is_the_transposed_array(name):
    image = _layouts()[name]
    expected = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))  # the reference: NumPy's transpose
    out = chw_tensor(image)
    assert out.dtype == expected.dtype and out.is_contiguous() and torch.equal(out, expected)
    if out.numel():  # a copy: the batch may be written to without touching the dataset's array, and back
        out.view(-1)[0] = not out.view(-1)[0].item()  # differs from the value whatever the dtype
        assert torch.equal(torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), expected)


def test_chw_tensor_refuses_an_array_without_channels():
    with pytest.raises(ValueError, match="HxWxC"):
        chw_tensor(np.zeros((4, 5), np.uint8))
