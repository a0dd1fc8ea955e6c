"""A small synthetic classification set, written as real JPEG files in ImageFolder layout.

Each image holds one shape on a textured, noisy background; the class is the shape, never the
colour (colours are drawn independently of the class), so a net must learn edges and geometry:
the features a detector of shapes needs later.
"""
from __future__ import annotations

import json
import os
import shutil

import cv2
import numpy as np

from ..shapes import SHAPES, render_shape_image  # noqa: F401 (SHAPES: re-exported)


def render_classification_image(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    return render_shape_image(rng, kind, size)[0]


def make_synthetic_shapes(train_dir: str, val_dir: str, train_per_class: int, val_per_class: int,
                          image_size: int, seed: int = 0) -> None:
    """Write the dataset unless a complete one with the same parameters is already there.

    Each split is written to a temporary folder and renamed, so a killed run leaves no half dataset.
    """
    params = dict(classes=list(SHAPES), train=train_per_class, val=val_per_class, size=image_size, seed=seed)
    for split, folder, per_class in (("train", train_dir, train_per_class), ("val", val_dir, val_per_class)):
        meta = os.path.join(folder, ".synthetic.json")
        if os.path.isfile(meta):
            with open(meta) as f:
                if json.load(f) == params:
                    continue
        tmp = folder.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        for kind in SHAPES:
            os.makedirs(os.path.join(tmp, kind))
            for i in range(per_class):
                img = render_classification_image(rng, kind, image_size)
                cv2.imwrite(os.path.join(tmp, kind, f"{split}_{i:05d}.jpg"), img[:, :, ::-1],
                            [cv2.IMWRITE_JPEG_QUALITY, 92])
        with open(os.path.join(tmp, ".synthetic.json"), "w") as f:
            json.dump(params, f)
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(os.path.dirname(os.path.abspath(folder)), exist_ok=True)
        os.replace(tmp, folder)
