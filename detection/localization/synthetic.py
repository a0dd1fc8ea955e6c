"""A synthetic localization set: one shape per image (the pretraining's shape classes and renderer),
smaller and placed anywhere so a fixed centre box does badly, written as an ImageFolder
(``images/<shape>/*.jpg``) plus one PASCAL VOC / CLS-LOC style XML per image (``annotations/``).

The classifier comes from the pretraining demo (``python tools/pretrain_backbone.py``: the same 8 shape
classes, other images); this folder is split into localization train and val.
"""
from __future__ import annotations

import json
import os
import shutil

import cv2
import numpy as np

from backbones.shapes import SHAPES, render_shape_image

RADIUS_RANGE = (0.12, 0.3)  # fraction of the image side (classification uses 0.22-0.45)


def annotation_xml(folder: str, stem: str, width: int, height: int, objects) -> str:
    parts = [f"<annotation>\n  <folder>{folder}</folder>\n  <filename>{stem}</filename>\n",
             f"  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>\n"]
    for name, (x1, y1, x2, y2) in objects:
        parts.append(f"  <object>\n    <name>{name}</name>\n    <bndbox><xmin>{x1:.0f}</xmin><ymin>{y1:.0f}</ymin>"
                     f"<xmax>{x2:.0f}</xmax><ymax>{y2:.0f}</ymax></bndbox>\n  </object>\n")
    parts.append("</annotation>\n")
    return "".join(parts)


def make_synthetic_loc(root: str, per_class: int = 40, image_size: int = 64, seed: int = 0,
                       classes=SHAPES) -> dict:
    """Write ``root/{images,annotations}`` unless the same parameters are already there (atomic: a
    temporary folder renamed into place). Returns the two paths."""
    params = dict(classes=list(classes), per_class=per_class, size=image_size, seed=seed, radius=list(RADIUS_RANGE))
    paths = {"images": os.path.join(root, "images"), "annotations": os.path.join(root, "annotations")}
    meta = os.path.join(root, "synthetic_loc.json")
    if os.path.isfile(meta):
        with open(meta) as f:
            if json.load(f) == params:
                return paths
    tmp = root.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    rng = np.random.default_rng([seed, 7])
    os.makedirs(os.path.join(tmp, "annotations"))
    for kind in classes:
        os.makedirs(os.path.join(tmp, "images", kind))
        for i in range(per_class):
            img, box = render_shape_image(rng, kind, image_size, RADIUS_RANGE)
            stem = f"{kind}_{i:05d}"
            cv2.imwrite(os.path.join(tmp, "images", kind, stem + ".jpg"), img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
            box = [np.floor(box[0]), np.floor(box[1]), np.ceil(box[2]), np.ceil(box[3])]
            with open(os.path.join(tmp, "annotations", stem + ".xml"), "w") as f:
                f.write(annotation_xml(kind, stem, image_size, image_size, [(kind, box)]))
    with open(os.path.join(tmp, "synthetic_loc.json"), "w") as f:
        json.dump(params, f)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
    os.replace(tmp, root)
    return paths
