"""ImageFolder data for pretraining: OpenCV decoding, albumentations augmentation.

Augmentation is reproducible per sample: each ``__getitem__`` seeds the pipeline from
(seed, epoch, index), so the result does not depend on the number of workers or ranks and a
resumed run sees exactly the images an uninterrupted one would have seen.
"""
from __future__ import annotations

import os

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..engine.imageio import CorruptImageError, is_image_file, read_image_rgb
from ..engine.run import get_logger

# Principal components of ImageNet's RGB pixels (on a 0-1 scale), as used for AlexNet's and the
# ResNet paper's colour augmentation.
IMAGENET_PCA_EIGVAL = np.array([0.2175, 0.0188, 0.0045], dtype=np.float32)
IMAGENET_PCA_EIGVEC = np.array([
    [-0.5675, 0.7192, 0.4009],
    [-0.5808, -0.0045, -0.8140],
    [-0.5836, -0.6948, 0.4203],
], dtype=np.float32)

EXPECTED_LAYOUT = "<root>/<class_name>/<image>.jpg (ImageFolder: one sub-folder per class)"


class DatasetError(ValueError):
    """The dataset on disk is missing or malformed."""


class PCALighting(A.ImageOnlyTransform):
    """AlexNet-style colour augmentation: add multiples of the ImageNet RGB principal components."""

    def __init__(self, std: float = 0.1, p: float = 1.0):
        super().__init__(p=p)
        self.std = std

    def get_params_dependent_on_data(self, params, data):
        alpha = self.random_generator.normal(0.0, self.std, 3).astype(np.float32)
        return {"offset": IMAGENET_PCA_EIGVEC @ (alpha * IMAGENET_PCA_EIGVAL) * 255.0}

    def apply(self, img, offset=None, **params):
        return np.clip(img.astype(np.float32) + offset, 0, 255).astype(np.uint8)


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


def scan_image_folder(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes (sorted sub-folder names) and (path, class index) samples; clear errors when missing."""
    if not os.path.isdir(root):
        raise DatasetError(f"dataset folder not found: {os.path.abspath(root)}\n  expected layout: {EXPECTED_LAYOUT}")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DatasetError(f"{os.path.abspath(root)}: no class sub-folders\n  expected layout: {EXPECTED_LAYOUT}")
    samples = []
    for idx, name in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            samples.extend((os.path.join(dirpath, f), idx) for f in sorted(files) if is_image_file(f))
    if not samples:
        raise DatasetError(f"{os.path.abspath(root)}: class folders hold no image files\n  expected layout: {EXPECTED_LAYOUT}")
    return classes, samples


def split_holdout(samples, fraction: float, seed: int):
    """Deterministic per-class holdout (for sets shipped without a val folder)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    by_class: dict[int, list] = {}
    for s in samples:
        by_class.setdefault(s[1], []).append(s)
    for cls in sorted(by_class):
        items = by_class[cls]
        order = rng.permutation(len(items))
        n_val = max(1, int(round(len(items) * fraction)))
        val += [items[i] for i in sorted(order[:n_val])]
        train += [items[i] for i in sorted(order[n_val:])]
    return train, val


class ImageFolderDataset(Dataset):
    """(image uint8 CxHxW, label) pairs; a corrupt file yields ``None`` (skipped and counted)."""

    def __init__(self, samples, classes, transform: A.Compose, seed: int = 0, skip_corrupt: bool = True,
                 ten_crop: int = 0):
        self.samples = samples
        self.classes = classes
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.skip_corrupt = skip_corrupt
        self.ten_crop = ten_crop

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            image = read_image_rgb(path)
        except CorruptImageError as exc:
            if not self.skip_corrupt:
                raise
            get_logger().warning("skipping corrupt image: %s", exc)
            return None
        self.transform.set_random_seed(hash((self.seed, self.epoch, index)) % 2**32)
        image = self.transform(image=image)["image"]
        if self.ten_crop:
            crops = ten_crops(image, self.ten_crop)
            return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous(), label
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous(), label


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


class ShardedSampler(Sampler[int]):
    """Each rank's share of a (per-epoch shuffled) order; can start mid-epoch for exact resumption.

    Training shards are padded to equal length so every rank runs the same number of steps
    (DDP needs that); evaluation shards are not padded so each image counts exactly once.
    """

    def __init__(self, size: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1, pad: bool = True):
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """``start``: number of this rank's samples already consumed in this epoch."""
        self.epoch, self.start = epoch, start

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        if self.pad and self.world_size > 1:
            per_rank = -(-self.size // self.world_size)
            order += order[: per_rank * self.world_size - self.size]
        return order[self.rank::self.world_size]

    def __iter__(self):
        return iter(self._indices()[self.start:])

    def __len__(self):
        return len(self._indices()) - self.start
