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

def train_transform(scale_range, crop_size: int, flip: bool, pca_std: float, crop_padding: int = 0) -> A.Compose:
    lo, hi = scale_range
    ops = [A.SmallestMaxSize(max_size=list(range(lo, hi + 1)))]  # shorter side sampled in [lo, hi]
    if crop_padding:
        ops.append(A.PadIfNeeded(crop_size + 2 * crop_padding, crop_size + 2 * crop_padding,
                                 border_mode=cv2.BORDER_CONSTANT, fill=0))
    ops.append(A.RandomCrop(crop_size, crop_size, pad_if_needed=True))
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
