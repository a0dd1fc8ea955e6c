"""Decoding the awkward files ImageNet and COCO contain, with OpenCV."""
import numpy as np
import pytest
from PIL import Image

from backbones.engine.imageio import CorruptImageError, read_image_rgb


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
