"""ImageFolder data for pretraining: OpenCV decoding, albumentations augmentation.

Augmentation is reproducible per sample: each ``__getitem__`` seeds the pipeline from
(seed, epoch, index), so the result does not depend on the number of workers or ranks and a
resumed run sees exactly the images an uninterrupted one would have seen.
"""
from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ..engine.imageio import chw_tensor, read_image_rgb, read_or_skip
from ..engine.loader import epoch_and_index, item_seed, packed
# shared with localization (backbones/imagedata.py); re-exported under their old names here
from ..imagedata import (EXPECTED_LAYOUT, DatasetError, PCALighting, ShardedSampler,  # noqa: F401
                         scan_image_folder, seed_augmentation, split_holdout)

class ScaleAndCrop(A.ImageOnlyTransform):
    """The paper's scale augmentation and random crop as one resampling: the image's shorter side goes to a
    size drawn from ``sizes`` (the longer in proportion, rounded), and a ``crop``-square is taken at a uniform
    position of that resized image, computing only the crop's pixels (``cv2.warpAffine``, bilinear, pixel
    centres mapped as ``cv2.resize`` maps them) instead of resizing the whole image and cropping it.

    The positions and scales are SmallestMaxSize + RandomCrop's; the pixel values differ from resizing first
    by at most one level (OpenCV's 1/32-pixel interpolation table against resize's finer weights; a test).
    For a 500x375 JPEG and sizes 256-480, 51-84 us against 161-382 us to resize the whole image (2-core EPYC,
    one thread): a fifth of a worker's time per training image. A resized side shorter than the crop
    is padded with zeros on both sides, as RandomCrop(pad_if_needed=True) pads it."""

    def __init__(self, sizes, crop: int, p: float = 1.0):
        super().__init__(p=p)
        self.sizes, self.crop = list(sizes), crop

    def get_params_dependent_on_data(self, params, data):
        height, width = params["shape"][:2]
        size = self.py_random.choice(self.sizes)
        scale = size / min(height, width)
        resized = (size, round(width * scale)) if height <= width else (round(height * scale), size)
        # the crop's corner in the resized image: uniform where it fits, else centred (negative: padding)
        corner = [int((n - self.crop + 1) * self.py_random.random()) if n >= self.crop else -((self.crop - n) // 2)
                  for n in resized]
        return {"resized": resized, "corner": corner}

    def apply(self, img, resized=(), corner=(), **params):
        (rows, cols), (top, left) = resized, corner
        sy, sx = img.shape[0] / rows, img.shape[1] / cols  # source pixels per resized pixel
        inverse = np.array([[sx, 0.0, (left + 0.5) * sx - 0.5], [0.0, sy, (top + 0.5) * sy - 0.5]])
        out = cv2.warpAffine(img, inverse, (self.crop, self.crop), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                             borderMode=cv2.BORDER_REPLICATE)  # cv2.resize's own border rule
        if top < 0 or left < 0:  # outside the resized image: RandomCrop's zero padding
            out[:max(0, -top)] = 0
            out[max(0, -top) + rows:] = 0
            out[:, :max(0, -left)] = 0
            out[:, max(0, -left) + cols:] = 0
        return out


def train_transform(scale_range, crop_size: int, flip: bool, pca_std: float, crop_padding: int = 0) -> A.Compose:
    lo, hi = scale_range
    if crop_padding:  # CIFAR's recipe: pad the (fixed-size) image, then crop
        ops = [A.SmallestMaxSize(max_size=list(range(lo, hi + 1))),
               A.PadIfNeeded(crop_size + 2 * crop_padding, crop_size + 2 * crop_padding,
                             border_mode=cv2.BORDER_CONSTANT, fill=0),
               A.RandomCrop(crop_size, crop_size, pad_if_needed=True)]
    else:
        ops = [ScaleAndCrop(range(lo, hi + 1), crop_size)]  # shorter side sampled in [lo, hi], then the crop
    if flip:
        ops.append(A.HorizontalFlip(p=0.5))
    if pca_std > 0:
        ops.append(PCALighting(pca_std))
    return A.Compose(ops)


def center_crop_transform(resize: int, crop_size: int) -> A.Compose:
    return A.Compose([A.SmallestMaxSize(max_size=resize), A.CenterCrop(crop_size, crop_size, pad_if_needed=True)])


def resize_transform(shorter_side: int) -> A.Compose:
    return A.Compose([A.SmallestMaxSize(max_size=shorter_side)])


class ImageFolderDataset(Dataset):
    """(image uint8 CxHxW, label) pairs; a corrupt file yields ``None`` (skipped and counted)."""

    def __init__(self, samples, classes, transform: A.Compose, seed: int = 0, skip_corrupt: bool = True,
                 ten_crop: int = 0):
        self.samples = packed(samples)  # shared with the workers, not copied (backbones.engine.loader)
        self.classes = classes
        self.transform = transform
        self.seed = seed
        self.skip_corrupt = skip_corrupt
        self.ten_crop = ten_crop

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        """``key``: ``(epoch, index)`` in training (augmentation seeded by both), or an index."""
        epoch, index = epoch_and_index(key)
        path, label = self.samples[index]
        image = read_or_skip(lambda: read_image_rgb(path), self.skip_corrupt)
        if image is None:
            return None
        seed_augmentation(self.transform, item_seed(self.seed, epoch, index))
        image = self.transform(image=image)["image"]
        if self.ten_crop:
            crops = ten_crops(image, self.ten_crop)
            return torch.stack([chw_tensor(crop) for crop in crops]), label
        return chw_tensor(image), label


def ten_crops(image: np.ndarray, size: int) -> list[np.ndarray]:
    """Four corners and centre, each also mirrored (the paper's 10-crop testing)."""
    h, w = image.shape[:2]
    if h < size or w < size:
        image = cv2.copyMakeBorder(image, 0, max(0, size - h), 0, max(0, size - w), cv2.BORDER_CONSTANT)
        h, w = image.shape[:2]
    tops = [0, 0, h - size, h - size, (h - size) // 2]
    lefts = [0, w - size, 0, w - size, (w - size) // 2]
    crops = [image[t:t + size, l:l + size] for t, l in zip(tops, lefts)]
    return crops + [c[:, ::-1] for c in crops]


def collate_skip_none(batch):
    """Stack (image, label) pairs, dropping the ``None`` of corrupt files and counting them."""
    kept = [b for b in batch if b is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return None, None, skipped
    images = torch.stack([b[0] for b in kept])
    labels = torch.tensor([b[1] for b in kept], dtype=torch.long)
    return images, labels, skipped
