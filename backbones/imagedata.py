"""ImageNet-style image data that pretraining and localization share: ImageFolder scanning, a
deterministic per-class holdout, the sharded (resumable) sampler, AlexNet's PCA colour augmentation
and the normalisation done on the device."""
from __future__ import annotations

import os
import random

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Sampler

from .engine.errors import DatasetError  # noqa: F401  (raised here; importers take it from here too)
from .engine.imageio import is_image_file

# Principal components of ImageNet's RGB pixels (on a 0-1 scale), as used for AlexNet's and the
# ResNet paper's colour augmentation.
IMAGENET_PCA_EIGVAL = np.array([0.2175, 0.0188, 0.0045], dtype=np.float32)
IMAGENET_PCA_EIGVEC = np.array([
    [-0.5675, 0.7192, 0.4009],
    [-0.5808, -0.0045, -0.8140],
    [-0.5836, -0.6948, 0.4203],
], dtype=np.float32)

EXPECTED_LAYOUT = "<root>/<class_name>/<image>.jpg (ImageFolder: one sub-folder per class)"



def seed_augmentation(transform: A.Compose, seed: int) -> None:
    """Seed an albumentations pipeline so that its transforms draw independently.

    ``Compose.set_random_seed`` hands every transform the same seed, so their first draws coincide: with
    SmallestMaxSize, RandomCrop and HorizontalFlip the shorter side, the crop's vertical position and the
    flip came from one number (the flipped crops all from the top half of the image, correlation -0.85
    between flip and position, -0.6 between scale and position). Each transform gets its own seed here, and
    the pipeline itself the generators ``set_random_seed(seed)`` gave it, without that call's seeding of every
    transform first (creating generators is most of the seeding's cost, which is paid per training image)."""
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
    for i, step in enumerate(transform.transforms):
        step.set_random_seed(hash((seed, i)) % 2**32)


def pca_lighting_offset(alpha: np.ndarray) -> np.ndarray:
    """The RGB offset (0-255 scale) of the principal components weighted by ``alpha`` (drawn N(0, std))."""
    return IMAGENET_PCA_EIGVEC @ (alpha.astype(np.float32) * IMAGENET_PCA_EIGVAL) * 255.0


class PCALighting(A.ImageOnlyTransform):
    """AlexNet-style colour augmentation: add multiples of the ImageNet RGB principal components."""

    def __init__(self, std: float = 0.1, p: float = 1.0):
        super().__init__(p=p)
        self.std = std

    def get_params_dependent_on_data(self, params, data):
        return {"offset": pca_lighting_offset(self.random_generator.normal(0.0, self.std, 3))}

    def apply(self, img, offset=None, **params):
        return add_clipped(img, offset)


def add_clipped(image: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """``clip(image + offset, 0, 255)`` per channel, in float32, truncated to uint8. A uint8 HxWx3 image takes
    it through a 256-entry table per channel computed that way: the same bytes, and where the workers feed a GPU
    a sixth less CPU per training image (a 500x375 JPEG decoded, resized, cropped, flipped and lit: 1.5-1.6
    against 1.8-1.85 ms on one core of a 2-core AMD EPYC; ``bench/pretrain_speed.py --pipeline-only``)."""
    if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        table = add_clipped(np.arange(256, dtype=np.uint8).reshape(256, 1, 1), offset)
        return cv2.LUT(image, table.reshape(256, 1, 3))
    return np.clip(image.astype(np.float32) + offset, 0, 255).astype(np.uint8)


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


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 NxCxHxW -> normalised float, on the images' device (cheaper than in the workers)."""
    x = (images.float() / 255.0 - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class ShardedSampler(Sampler[int]):
    """Each rank's share of a (per-epoch shuffled) order.

    Training shards are padded to equal length so every rank runs the same number of steps
    (DDP needs that); evaluation shards are not padded so each image counts exactly once.
    """

    def __init__(self, size: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1, pad: bool = True):
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

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
        return iter(self._indices())

    def __len__(self):
        return len(self._indices())
