"""A synthetic COCO-format shapes dataset written to disk, for trying the detector without a download.

It is built to be a fair test of detection rather than an easy one: the class is given only by the
shape (circle/ellipse, rectangle, triangle, cross), never by colour, which is drawn at random for every
object; objects range from ``min_obj`` pixels to large, several per image, overlapping (each stays at
least 70% visible, so its box is meaningful); backgrounds are gradients with noise and random lines;
objects are filled with a slight texture. Images come in landscape, portrait and square shapes so the
aspect-ratio grouping is exercised, a few images hold no object, and category ids are non-contiguous
(1, 3, 7, 11) to exercise the label mapping.

The files are those of a real COCO dataset (``train/*.jpg``, ``val/*.jpg``,
``annotations/instances_{train,val}.json``), so everything downstream runs unchanged on it.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile

import cv2
import numpy as np

CATEGORIES = ({"id": 1, "name": "circle"}, {"id": 3, "name": "rectangle"},
              {"id": 7, "name": "triangle"}, {"id": 11, "name": "cross"})
FORMAT_VERSION = 1  # bump when the rendering changes, so stale datasets on disk are rebuilt
MIN_VISIBLE = 0.7  # an object may be covered by later ones, but only up to 30% of it
EMPTY_EVERY = 50  # image i with i % EMPTY_EVERY == 1 has no object (plus the last image of a split)
SPLITS = ("train", "val")


def make_synthetic_coco(root, num_train: int = 1500, num_val: int = 200, image_size: int = 128, seed: int = 0,
                        min_obj: int = 10, max_obj: int = 70, objects_per_image: tuple[int, int] = (2, 6)) -> dict:
    """Write the dataset under ``root`` (or reuse it when ``root/meta.json`` records the same parameters)
    and return ``{"root", "train_images", "train_annotations", "val_images", "val_annotations"}``.

    ``image_size`` is the longer image side; ``min_obj``/``max_obj`` bound the object size in pixels
    (``max_obj`` is capped at 90% of the shorter side, 3/4 of ``image_size``);
    ``objects_per_image`` is the inclusive range of objects per non-empty image. The dataset is written
    to a temporary folder beside ``root`` and renamed into place, so an interrupted run leaves no half
    dataset behind. The same parameters always give the same images and annotations."""
    root = os.path.abspath(os.fspath(root))
    max_obj = min(int(max_obj), int(0.9 * round(0.75 * image_size)))  # must fit in the shorter image side
    params = {"version": FORMAT_VERSION, "num_train": int(num_train), "num_val": int(num_val),
              "image_size": int(image_size), "seed": int(seed), "min_obj": int(min_obj), "max_obj": max_obj,
              "objects_per_image": [int(v) for v in objects_per_image]}
    _check_params(params)
    paths = {"root": root}
    for split in SPLITS:
        paths[f"{split}_images"] = os.path.join(root, split)
        paths[f"{split}_annotations"] = os.path.join(root, "annotations", f"instances_{split}.json")
    if _is_complete(root, params):
        return paths
    if os.path.isdir(root) and os.listdir(root) and not os.path.isfile(os.path.join(root, "meta.json")):
        raise FileExistsError(f"{root} exists and is not a synthetic dataset written by make_synthetic_coco; "
                              "refusing to overwrite it (choose another synthetic_root)")
    os.makedirs(os.path.dirname(root), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.tmp-", dir=os.path.dirname(root))
    try:
        _write_dataset(tmp, params)
        if os.path.isdir(root):
            shutil.rmtree(root)  # an older or incomplete synthetic dataset (it has a meta.json, or is empty)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return paths


def _check_params(p: dict) -> None:
    lo, hi = p["objects_per_image"]
    if not (0 < p["min_obj"] <= p["max_obj"] and 1 <= lo <= hi and p["num_train"] >= 0 and p["num_val"] >= 0):
        raise ValueError(f"make_synthetic_coco: inconsistent parameters {p} (after capping max_obj to the image)")


def _is_complete(root: str, params: dict) -> bool:
    """True when ``root`` holds a finished dataset made with ``params`` (meta.json is written last)."""
    try:
        with open(os.path.join(root, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        counts = {split: len(os.listdir(os.path.join(root, split))) for split in SPLITS}
    except (OSError, ValueError):
        return False
    return (meta == params and counts == {"train": params["num_train"], "val": params["num_val"]}
            and all(os.path.isfile(os.path.join(root, "annotations", f"instances_{s}.json")) for s in SPLITS))


def _write_dataset(out_dir: str, params: dict) -> None:
    os.makedirs(os.path.join(out_dir, "annotations"))
    for split_index, split in enumerate(SPLITS):
        os.makedirs(os.path.join(out_dir, split))
        coco = _write_split(out_dir, split, split_index, params)
        with open(os.path.join(out_dir, "annotations", f"instances_{split}.json"), "w", encoding="utf-8") as f:
            json.dump(coco, f)
    with open(os.path.join(out_dir, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(params, f, indent=2)


def _write_split(out_dir: str, split: str, split_index: int, p: dict) -> dict:
    """Render and save one split's images; return its COCO json as a dict."""
    num = p[f"num_{split}"]
    images, annotations = [], []
    for i in range(num):
        rng = np.random.default_rng([p["seed"], split_index, i])  # per image: independent of the split size
        height, width = _image_shape(rng, p["image_size"])
        empty = i % EMPTY_EVERY == 1 or i == num - 1
        num_objects = 0 if empty else int(rng.integers(p["objects_per_image"][0], p["objects_per_image"][1] + 1))
        image, objects = _render_image(rng, height, width, num_objects, p["min_obj"], p["max_obj"])
        image_id, file_name = i + 1, f"{i + 1:06d}.jpg"
        cv2.imwrite(os.path.join(out_dir, split, file_name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 92])
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for category_id, bbox, area in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                                "bbox": bbox, "area": area, "iscrowd": 0})
    return {"info": {"description": "resdet synthetic shapes", "params": p}, "licenses": [],
            "images": images, "annotations": annotations, "categories": [dict(c, supercategory="shape")
                                                                         for c in CATEGORIES]}


def _image_shape(rng: np.random.Generator, size: int) -> tuple[int, int]:
    """Square 60% of the time, else landscape or portrait with the shorter side at 3/4."""
    short = round(0.75 * size)
    return [(size, size), (short, size), (size, short)][int(rng.choice(3, p=[0.6, 0.2, 0.2]))]


def _render_image(rng: np.random.Generator, height: int, width: int, num_objects: int, min_obj: int,
                 max_obj: int) -> tuple[np.ndarray, list[tuple[int, list[float], float]]]:
    """An RGB uint8 image and its objects as (category id, COCO [x, y, w, h] of the visible part, visible area)."""
    canvas = _background(rng, height, width)
    placed: list[tuple[int, np.ndarray]] = []  # (category id, visible mask)
    for _ in range(num_objects):
        obj = _place_object(rng, height, width, min_obj, max_obj, placed)
        if obj is None:
            continue
        category_id, mask = obj
        for _, visible in placed:
            visible &= ~mask
        placed.append((category_id, mask.copy()))
        _paint(rng, canvas, mask)
    canvas += rng.normal(0.0, rng.uniform(2.0, 8.0), canvas.shape).astype(np.float32)  # sensor noise
    image = np.clip(canvas, 0, 255).astype(np.uint8)
    return image, [(category_id, _mask_box(mask), float(mask.sum())) for category_id, mask in placed]


def _place_object(rng, height, width, min_obj, max_obj, placed, attempts: int = 20):
    """A random shape mask that leaves every earlier object at least MIN_VISIBLE visible, or None."""
    for _ in range(attempts):
        category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        size = math.exp(rng.uniform(math.log(min_obj), math.log(max_obj)))  # log-uniform: as many small as large
        cy, cx = rng.uniform(size / 2, height - size / 2), rng.uniform(size / 2, width - size / 2)
        mask = _shape_mask(rng, category["name"], size, (cx, cy), (height, width))
        if not mask.any():
            continue
        if all((visible & ~mask).sum() >= MIN_VISIBLE * visible.sum() for _, visible in placed):
            return category["id"], mask
    return None


def _shape_mask(rng, name: str, size: float, center: tuple[float, float], shape: tuple[int, int]) -> np.ndarray:
    """A filled shape of diameter about ``size`` at ``center``, random proportions and orientation."""
    mask = np.zeros(shape, np.uint8)
    cx, cy = center
    angle = rng.uniform(0, 360)
    if name == "circle":
        axes = (size / 2, size / 2 * rng.uniform(0.6, 1.0))
        cv2.ellipse(mask, ((cx, cy), (2 * axes[0], 2 * axes[1]), angle), 1, thickness=-1)
    elif name == "rectangle":
        long_side = size / math.sqrt(1 + 0.49)  # keeps the diagonal within ``size``
        rect = ((cx, cy), (long_side, long_side * rng.uniform(0.4, 1.0)), rng.uniform(-30, 30))
        cv2.fillPoly(mask, [np.round(cv2.boxPoints(rect)).astype(np.int32)], 1)
    elif name == "triangle":
        corners = np.deg2rad(angle + np.array([0.0, 120.0, 240.0]) + rng.uniform(-20, 20, 3))
        points = np.stack([cx + size / 2 * np.cos(corners), cy + size / 2 * np.sin(corners)], axis=1)
        cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 1)
    elif name == "cross":
        thickness = size * rng.uniform(0.25, 0.38)
        tilt = rng.uniform(-30, 30)
        for arm_angle in (tilt, tilt + 90):
            arm = ((cx, cy), (size / math.sqrt(2) * 1.25, thickness), arm_angle)
            cv2.fillPoly(mask, [np.round(cv2.boxPoints(arm)).astype(np.int32)], 1)
    else:
        raise ValueError(f"unknown shape {name!r}")
    return mask.astype(bool)


def _background(rng, height: int, width: int) -> np.ndarray:
    """Float32 HxWx3: a linear gradient between two random colours, noise, and a few random lines."""
    direction = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    t = (xs * math.cos(direction) + ys * math.sin(direction)) / max(height, width)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    start, end = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    canvas = (start + t[..., None] * (end - start)).astype(np.float32)
    canvas += rng.normal(0.0, rng.uniform(5.0, 20.0), canvas.shape).astype(np.float32)
    for _ in range(int(rng.integers(2, 8))):
        p1 = (int(rng.integers(width)), int(rng.integers(height)))
        p2 = (int(rng.integers(width)), int(rng.integers(height)))
        cv2.line(canvas, p1, p2, tuple(float(c) for c in rng.uniform(0, 255, 3)), int(rng.integers(1, 3)))
    return canvas


def _paint(rng, canvas: np.ndarray, mask: np.ndarray) -> None:
    """Fill ``mask`` with a random colour that stands out from the background there, plus a slight
    gradient and noise, so the colour says nothing about the class and flat fills are not a cue."""
    background = canvas[mask].mean(axis=0)
    color = rng.uniform(0, 255, 3)
    for _ in range(10):
        if np.linalg.norm(color - background) >= 80:
            break
        color = rng.uniform(0, 255, 3)
    ys, xs = np.nonzero(mask)
    shade = rng.uniform(-25, 25) * (xs - xs.mean()) / max(float(np.ptp(xs)), 1.0)
    fill = color + shade[:, None] + rng.normal(0.0, 8.0, (len(xs), 3))
    canvas[ys, xs] = fill.astype(np.float32)


def _mask_box(mask: np.ndarray) -> list[float]:
    """COCO [x, y, w, h] enclosing the mask's pixels (pixel c spans [c, c + 1))."""
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return [float(x0), float(y0), float(xs.max() + 1 - x0), float(ys.max() + 1 - y0)]


# ---- the same shapes as PASCAL VOC / ImageNet DET XML datasets ----------------------------------------

SYNSETS = {"circle": "n90000001", "rectangle": "n90000003", "triangle": "n90000007", "cross": "n90000011"}


def make_synthetic_voc(root, num_train: int = 60, num_val: int = 20, image_size: int = 128, seed: int = 0,
                       min_obj: int = 10, max_obj: int = 70, objects_per_image: tuple[int, int] = (2, 6),
                       layout: str = "voc", difficult_below: int = 12) -> dict:
    """The synthetic shapes (same images and boxes as :func:`make_synthetic_coco` with these parameters)
    written in the PASCAL VOC or ImageNet DET layout, with one XML file per image.

    Objects whose box is narrower or lower than ``difficult_below`` pixels are marked
    ``<difficult>1</difficult>`` (small, hard ones, as VOC's annotators did). Boxes are written in
    VOC's 1-based inclusive coordinates. ``layout="voc"`` writes ``root/VOC2007/{JPEGImages,
    Annotations,ImageSets/Main/{train,val,trainval}.txt}`` with class names circle/rectangle/
    triangle/cross; ``layout="imagenet_det"`` writes ``root/ILSVRC/{Data,Annotations}/DET/{train,val}``
    with wnid-like class names, per-class ``ImageSets/DET/train_<k>.txt`` (``name 1`` / ``name -1``),
    ``val.txt`` (``name index``) and a ``map_det.txt`` synset file. Returns ``{"root", "train_sets",
    "val_sets", "class_names", "synsets_file"}`` (``synsets_file`` is "" for VOC). An existing dataset
    with the same parameters is reused."""
    if layout not in ("voc", "imagenet_det"):
        raise ValueError(f"make_synthetic_voc: layout must be 'voc' or 'imagenet_det', got {layout!r}")
    root = os.path.abspath(os.fspath(root))
    max_obj = min(int(max_obj), int(0.9 * round(0.75 * image_size)))
    params = {"version": FORMAT_VERSION, "num_train": int(num_train), "num_val": int(num_val),
              "image_size": int(image_size), "seed": int(seed), "min_obj": int(min_obj), "max_obj": max_obj,
              "objects_per_image": [int(v) for v in objects_per_image], "layout": layout,
              "difficult_below": int(difficult_below)}
    _check_params(params)
    base = os.path.join(root, "VOC2007" if layout == "voc" else "ILSVRC")
    names = [c["name"] for c in CATEGORIES]
    out = {"root": root, "train_sets": [f"{base}:train"], "val_sets": [f"{base}:val"],
           "class_names": names if layout == "voc" else sorted(SYNSETS[n] for n in names),
           "synsets_file": "" if layout == "voc" else os.path.join(base, "map_det.txt")}
    meta_path = os.path.join(root, "meta.json")
    if os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            if json.load(f) == params:
                return out
    if os.path.isdir(root) and os.listdir(root):
        raise FileExistsError(f"{root} exists and is not this synthetic dataset; refusing to overwrite it")
    lists: dict[str, list[str]] = {}
    for split_index, split in enumerate(SPLITS):
        for i in range(params[f"num_{split}"]):
            rng = np.random.default_rng([params["seed"], split_index, i])  # as make_synthetic_coco draws them
            height, width = _image_shape(rng, params["image_size"])
            empty = i % EMPTY_EVERY == 1 or i == params[f"num_{split}"] - 1
            lo, hi = params["objects_per_image"]
            image, objects = _render_image(rng, height, width, 0 if empty else int(rng.integers(lo, hi + 1)),
                                           params["min_obj"], params["max_obj"])
            name = _write_xml_image(base, layout, split, split_index, i, image, objects, params["difficult_below"])
            lists.setdefault(split, []).append(name)
            for category_id, _, _ in objects:
                lists.setdefault(f"{split}/{category_id}", []).append(name)
    _write_image_sets(base, layout, lists)
    if layout == "imagenet_det":
        with open(out["synsets_file"], "w", encoding="utf-8") as f:
            f.writelines(f"{wnid} {k} {name}\n" for k, (name, wnid) in enumerate(sorted(SYNSETS.items()), 1))
    with open(meta_path, "w", encoding="utf-8") as f:
        json.dump(params, f, indent=2)
    return out


def _write_xml_image(base: str, layout: str, split: str, split_index: int, i: int, image: np.ndarray,
                     objects: list, difficult_below: int) -> str:
    """Save one image and its XML; return its image-set name."""
    if layout == "voc":  # one folder for all splits, as in VOC: the names must not collide
        name, image_dir, ann_dir, ext = f"{split_index}{i + 1:05d}", "JPEGImages", "Annotations", ".jpg"
    else:
        folder = "ILSVRC2013_train/synthetic" if split == "train" else ""
        name = f"{folder}/{split}_{i + 1:06d}".lstrip("/")
        image_dir, ann_dir, ext = os.path.join("Data", "DET", split), os.path.join("Annotations", "DET", split), ".JPEG"
    height, width = image.shape[:2]
    image_path, xml_path = os.path.join(base, image_dir, name + ext), os.path.join(base, ann_dir, name + ".xml")
    for path in (image_path, xml_path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
    assert ok
    with open(image_path, "wb") as f:
        f.write(encoded.tobytes())
    by_id = {c["id"]: c["name"] for c in CATEGORIES}
    lines = ["<annotation>", f"  <folder>{'VOC2007' if layout == 'voc' else split}</folder>",
             f"  <filename>{os.path.basename(name)}{ext if layout == 'voc' else ''}</filename>",
             f"  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for category_id, (x, y, w, h), _ in objects:
        cls = by_id[category_id] if layout == "voc" else SYNSETS[by_id[category_id]]
        difficult = int(min(w, h) < difficult_below)
        # COCO-style [x, y, w, h] (pixel c spans [c, c + 1)) -> VOC's 1-based inclusive pixel indices
        lines += ["  <object>", f"    <name>{cls}</name>", "    <pose>Unspecified</pose>",
                  "    <truncated>0</truncated>", f"    <difficult>{difficult}</difficult>",
                  f"    <bndbox><xmin>{int(x) + 1}</xmin><ymin>{int(y) + 1}</ymin>"
                  f"<xmax>{int(x + w)}</xmax><ymax>{int(y + h)}</ymax></bndbox>", "  </object>"]
    with open(xml_path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines + ["</annotation>"]) + "\n")
    return name


def _write_image_sets(base: str, layout: str, lists: dict[str, list[str]]) -> None:
    folder = os.path.join(base, "ImageSets", "Main" if layout == "voc" else "DET")
    os.makedirs(folder, exist_ok=True)

    def write(file_name: str, lines: list[str]) -> None:
        with open(os.path.join(folder, file_name), "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)

    train, val = lists.get("train", []), lists.get("val", [])
    if layout == "voc":
        write("train.txt", train)
        write("val.txt", val)
        write("trainval.txt", train + val)
        return
    # ImageNet DET: per-class train lists over the wnids sorted (the devkit numbers its 200 classes 1..200)
    for k, (name, wnid) in enumerate(sorted(SYNSETS.items(), key=lambda item: item[1]), 1):
        category_id = next(c["id"] for c in CATEGORIES if c["name"] == name)
        positives = set(lists.get(f"train/{category_id}", []))
        write(f"train_{k}.txt", [f"{n} {1 if n in positives else -1}" for n in train])
    write("val.txt", [f"{n} {index}" for index, n in enumerate(val, 1)])
