"""COCO-format detection dataset, validated when it is loaded.

Every problem an annotation file can have is found at construction, all of them in one pass, each with
the file, the record and a fix (:mod:`detection.data.problems`), so a bad dataset fails before any
training starts rather than hours into it inside a worker; with ``strict=False`` the offending records
(and images) are dropped instead and counted in ``stats["problems"]``. Structural faults (not JSON, no
``categories``) stop at once: nothing after them can be checked.
Boxes are stored once per image as arrays (xyxy, clipped to the image); crowd regions are kept apart
because they are ignored by matching, not trained as foreground.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from backbones.engine.imageio import CorruptImageError, chw_tensor, read_image_rgb
from backbones.engine.loader import packed

from .problems import DataProblems, DatasetError, verify_images

logger = logging.getLogger(__name__)

REQUIRED_KEYS = ("images", "annotations", "categories")
__all__ = ["CocoDetection", "DatasetError"]


class CocoDetection(Dataset):
    """Images and boxes of a COCO instances json.

    ``dataset[i]`` is ``{"image": uint8 3xHxW, "boxes": float32 Nx4 xyxy, "labels": int64 N in 1..K,
    "crowd_boxes": float32 Mx4, "image_id": int, "orig_size": (h, w), "scale": (sy, sx), "flipped": bool}``
    with boxes in the transformed image's pixels, or None when the image cannot be decoded and
    ``skip_corrupt`` is set (the collate function drops and counts those).
    """

    def __init__(self, image_dir, ann_file, transform=None, skip_corrupt: bool = True, filter_empty: bool = False,
                 data: dict | None = None, strict: bool = True, verify: str = "header",
                 problems: DataProblems | None = None, evaluation_index: bool = True):
        """``data``: an already loaded COCO-style dict (e.g. converted from PASCAL VOC XML by
        :func:`detection.data.voc.voc_to_coco_dict`); ``ann_file`` then only names it in messages.
        ``strict``: stop on any problem (all of them listed) or drop what is wrong and go on.
        ``verify``: how every image is opened before use (:func:`detection.data.problems.verify_images`:
        ``header``, ``decode`` or ``none``). ``problems``: a collector that already holds the problems an
        earlier step found (the XML reader). ``evaluation_index``: keep the json as the pycocotools index
        the evaluators score against (:attr:`coco`); a training set lets it go, which on COCO train2017's
        size is a gigabyte or more per process (1.1 GB against 0.19 held, measured on a synthetic set of
        that size with short polygons; the real file's polygons are larger)."""
        self.image_dir, self.ann_file = os.fspath(image_dir), os.fspath(ann_file)
        self.transform, self.skip_corrupt = transform, skip_corrupt
        data = _load_json(self.ann_file) if data is None else data
        self._check_top_level(data)
        self._build_category_maps(data["categories"])
        self.problems = problems if problems is not None else DataProblems(self.ann_file)
        images = self._check_images(data["images"])
        self.stats = {"images_in_file": len(data["images"]), "boxes": 0, "crowd_boxes": 0, "boxes_clipped": 0,
                      "degenerate_boxes_dropped": 0, "images_without_boxes": 0, "empty_images_filtered": 0}
        per_image, kept_annotations = self._parse_annotations(data["annotations"], images)
        bad_paths = self._check_files_exist(images)
        bad_paths |= verify_images([(self.image_path(img), img["height"], img["width"], f"image id {img['id']}")
                                    for img in images.values() if self.image_path(img) not in bad_paths],
                                   self.problems, verify)
        self.problems.finish(strict)
        self.stats["problems"] = self.problems.counts()  # what was dropped (strict=False)
        if bad_paths:
            images = {i: img for i, img in images.items() if self.image_path(img) not in bad_paths}
        records = self._make_records(images, per_image, filter_empty)
        self.stats["boxes"] = sum(len(r["boxes"]) for r in records)  # of the images kept
        self.stats["crowd_boxes"] = sum(len(r["crowd_boxes"]) for r in records)
        self._aspect_ratios = [r["width"] / r["height"] for r in records]
        # one buffer the loader's forked workers share, where a list of dicts would be copied into each
        self.records = packed(records)
        self._coco = None
        if evaluation_index:
            if self.problems:  # the evaluation ground truth holds what the dataset holds
                data = dict(data, images=list(images.values()),
                            annotations=[a for a in kept_annotations if a["image_id"] in images])
            self._coco = _to_coco(data)

    @property
    def coco(self) -> COCO:
        """The pycocotools index of this set's ground truth, what the evaluators score against."""
        if self._coco is None:
            raise DatasetError(f"{self.ann_file}: loaded without its evaluation index (evaluation_index=False, as "
                               "training sets are); fix: load it with evaluation_index=True to evaluate on it")
        return self._coco

    # ---- validation -------------------------------------------------------------------------------

    def _fail(self, what: str, fix: str) -> DatasetError:
        return DatasetError(f"{self.ann_file}: {what}; fix: {fix}")

    def _check_top_level(self, data) -> None:
        if not isinstance(data, dict):
            raise self._fail(f"top level is a {type(data).__name__}, not a JSON object",
                             "use a COCO instances file (an object with images, annotations, categories)")
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise self._fail(f"missing top-level key(s) {missing}",
                             'a COCO instances file needs "images", "annotations" and "categories" lists')
        for key in REQUIRED_KEYS:
            if not isinstance(data[key], list):
                raise self._fail(f'"{key}" is a {type(data[key]).__name__}, not a list', f'make "{key}" a JSON list')

    def _check_images(self, records: list) -> dict[int, dict]:
        """Image id -> record, each with an id, a file name and a positive width and height; a bad
        record is a problem and left out."""
        images: dict[int, dict] = {}
        for n, img in enumerate(records):
            name = f"image record #{n} (id {img.get('id') if isinstance(img, dict) else '?'})"
            if (not isinstance(img, dict) or any(k not in img for k in ("id", "file_name", "width", "height"))
                    or not isinstance(img["file_name"], str)):
                self.problems.add("image record without id, file_name, width or height", name,
                                  "give every image its id, file_name, width and height")
            elif not (_is_int(img["width"]) and _is_int(img["height"]) and img["width"] > 0 and img["height"] > 0):
                self.problems.add("image record with a bad width or height",
                                  f"{name} has width={img['width']!r} height={img['height']!r}",
                                  "width and height must be positive integers (the image's pixel size)")
            elif img["id"] in images:
                self.problems.add("duplicate image id", f"{name}: image id {img['id']} appears twice",
                                  "give every image a unique id")
            else:
                images[img["id"]] = img
        return images

    def _build_category_maps(self, categories: list) -> None:
        """Contiguous labels 1..K in order of category id; 0 is left to the background."""
        by_id: dict[int, str] = {}
        for n, cat in enumerate(categories):
            if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
                raise self._fail(f"category record #{n} lacks id or name", "give every category an id and a name")
            if cat["id"] in by_id:
                raise self._fail(f"category id {cat['id']} appears twice", "give every category a unique id")
            by_id[cat["id"]] = str(cat["name"])
        if not by_id:
            raise self._fail('"categories" is empty', "list the object classes under categories")
        cat_ids = sorted(by_id)
        self.contiguous_to_cat_id = {label: cat_id for label, cat_id in enumerate(cat_ids, start=1)}
        self.cat_id_to_contiguous = {cat_id: label for label, cat_id in self.contiguous_to_cat_id.items()}
        self.class_names = [by_id[c] for c in cat_ids]

    def _parse_annotations(self, annotations: list, images: dict[int, dict]
                           ) -> tuple[dict[int, dict[str, list]], list[dict]]:
        """Per image id: clipped xyxy boxes and labels, and crowd boxes, after validating each record; and
        the annotation records kept. A bad record is a problem and left out."""
        per_image: dict[int, dict[str, list]] = {}
        kept = []
        for n, ann in enumerate(annotations):
            if not isinstance(ann, dict):
                self.problems.add("annotation that is not a JSON object", f"annotation #{n}",
                                  "make every annotation an object")
                continue
            name = f"annotation id {ann.get('id', '?')} (#{n}, image_id {ann.get('image_id', '?')})"
            missing = [key for key in ("id", "image_id", "category_id", "bbox") if key not in ann]
            if missing:
                self.problems.add(f"annotation without {missing[0]!r}", f"{name} has no {missing[0]!r}",
                                  f"add {missing[0]!r} to every annotation")
                continue
            img = images.get(ann["image_id"])
            if img is None:
                self.problems.add("annotation of an unknown image",
                                  f"{name} refers to image_id {ann['image_id']!r}, which is not in \"images\" "
                                  "(or its record is bad)", "add the image record or remove the annotation")
                continue
            if ann["category_id"] not in self.cat_id_to_contiguous:
                self.problems.add("annotation of an unknown category",
                                  f"{name} has category_id {ann['category_id']!r}, which is not in \"categories\" "
                                  f"(known ids {sorted(self.cat_id_to_contiguous)[:20]})",
                                  "add the category or correct the annotation's category_id")
                continue
            ok, box = self._clip_box(ann["bbox"], img, name)
            if not ok:
                continue
            kept.append(ann)
            if box is None:
                continue
            entry = per_image.setdefault(ann["image_id"], {"boxes": [], "labels": [], "crowd": []})
            if ann.get("iscrowd", 0):
                entry["crowd"].append(box)
                self.stats["crowd_boxes"] += 1
            else:
                entry["boxes"].append(box)
                entry["labels"].append(self.cat_id_to_contiguous[ann["category_id"]])
                self.stats["boxes"] += 1
        return per_image, kept

    def _clip_box(self, bbox, img: dict, name: str) -> tuple[bool, list[float] | None]:
        """(valid, xyxy box clipped to the image or None when degenerate, under 1 px). A malformed box, or
        one entirely outside its image, is a problem (valid False)."""
        if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                or not all(_is_number(v) and math.isfinite(v) for v in bbox)):
            self.problems.add("malformed bbox", f"{name} has bbox {bbox!r}",
                              "bbox must be 4 finite numbers [x, y, width, height]")
            return False, None
        x, y, w, h = (float(v) for v in bbox)
        if w < 0 or h < 0:
            self.problems.add("negative bbox width or height", f"{name} has a negative bbox width or height ({bbox!r})",
                              "bbox is [x, y, width, height] with width, height >= 0 (not [x1, y1, x2, y2])")
            return False, None
        width, height = img["width"], img["height"]
        if w > 0 and h > 0 and (x >= width or y >= height or x + w <= 0 or y + h <= 0):
            self.problems.add("bbox entirely outside its image", f"{name} has bbox {bbox!r} entirely outside its "
                              f"{width}x{height} image {img['file_name']!r}",
                              "correct the box or the image's width/height in \"images\"")
            return False, None
        x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
        x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
        if (x1, y1, x2, y2) != (x, y, x + w, y + h):
            self.stats["boxes_clipped"] += 1
        if x2 - x1 < 1 or y2 - y1 < 1:
            self.stats["degenerate_boxes_dropped"] += 1
            return True, None
        return True, [x1, y1, x2, y2]

    def _check_files_exist(self, images: dict[int, dict]) -> set[str]:
        """All image files at once, so a wrong image_dir shows up before training, not in a worker.
        Returns the missing paths (each a problem)."""
        try:
            present = {e.name for e in os.scandir(self.image_dir) if e.is_file()}
        except OSError as exc:
            raise DatasetError(f"{self.image_dir}: cannot list the image folder for {self.ann_file} ({exc}); "
                               "fix: point image_dir at the folder holding the images") from exc
        missing = [img for img in images.values()
                   if img["file_name"] not in present and not os.path.isfile(self.image_path(img))]
        for img in missing:
            self.problems.add(f"image file missing from {self.image_dir}", f"{img['file_name']} (image id {img['id']})",
                              "point image_dir at the folder holding the images, or remove their records from the "
                              "annotation file")
        if missing and len(missing) == len(images):
            raise DatasetError(f"{self.image_dir}: none of the {len(images)} images listed in {self.ann_file} is "
                               f"there, e.g. {missing[0]['file_name']}; fix: point image_dir at the folder holding "
                               "the images")
        return {self.image_path(img) for img in missing}

    def _make_records(self, images: dict[int, dict], per_image: dict, filter_empty: bool) -> list[dict]:
        records = []
        for image_id, img in images.items():
            entry = per_image.get(image_id, {"boxes": [], "labels": [], "crowd": []})
            if not entry["boxes"]:
                self.stats["images_without_boxes"] += 1
                if filter_empty:
                    self.stats["empty_images_filtered"] += 1
                    continue
            records.append({
                "image_id": image_id, "file_name": img["file_name"], "height": img["height"], "width": img["width"],
                "boxes": np.asarray(entry["boxes"], dtype=np.float32).reshape(-1, 4),
                "labels": np.asarray(entry["labels"], dtype=np.int64),
                "crowd_boxes": np.asarray(entry["crowd"], dtype=np.float32).reshape(-1, 4),
            })
        return records

    # ---- access -----------------------------------------------------------------------------------

    def image_path(self, record: dict) -> str:
        return os.path.join(self.image_dir, record["file_name"])

    def __len__(self) -> int:
        return len(self.records)

    def aspect_ratios(self) -> list[float]:
        """w / h per index, from the json (no decoding), for aspect-ratio grouping."""
        return list(self._aspect_ratios)

    def __getitem__(self, index: int) -> dict | None:
        record = self.records[index]
        image = self._read(record)
        if image is None:
            return None
        boxes, labels, crowd = record["boxes"], record["labels"], record["crowd_boxes"]
        scale, flipped = (1.0, 1.0), False
        if self.transform is not None:
            out = self.transform(image=image, bboxes=boxes, labels=labels, crowd_boxes=crowd)
            image, boxes, labels, crowd = out["image"], out["bboxes"], out["labels"], out["crowd_boxes"]
            scale, flipped = out["scale"], out["flipped"]
        return {
            "image": chw_tensor(image),
            "boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.as_tensor(labels, dtype=torch.int64).reshape(-1),
            "crowd_boxes": torch.as_tensor(crowd, dtype=torch.float32).reshape(-1, 4),
            "image_id": int(record["image_id"]),
            "orig_size": (record["height"], record["width"]),
            "scale": tuple(float(s) for s in scale),
            "flipped": bool(flipped),
        }

    def _read(self, record: dict) -> np.ndarray | None:
        """The decoded image, or None (with a warning) when ``skip_corrupt`` and the file cannot be decoded
        or its size disagrees with the json (its boxes could not be trusted either)."""
        path = self.image_path(record)
        try:
            image = read_image_rgb(path)
        except CorruptImageError as exc:
            return self._skip_or_raise(exc)
        if image.shape[:2] != (record["height"], record["width"]):
            return self._skip_or_raise(DatasetError(
                f"{path}: decoded as {image.shape[1]}x{image.shape[0]} but {self.ann_file} says "
                f"{record['width']}x{record['height']} (image id {record['image_id']}); fix: correct width/height "
                "in the annotation file or replace the image"))
        return image

    def _skip_or_raise(self, exc: Exception) -> None:
        if not self.skip_corrupt:
            raise exc
        logger.warning("skipping image: %s", exc)
        return None


def _load_json(path: str):
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: annotation file not found; fix: check the path (a COCO instances json, "
                           "e.g. annotations/instances_train2017.json)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}; "
                           "fix: repair or re-export the annotation file") from exc
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc}); fix: re-export the annotation file as UTF-8 JSON") from exc


def _to_coco(data: dict) -> COCO:
    """A pycocotools index over the already parsed json (the evaluation ground truth, without re-reading)."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        coco.createIndex()
    return coco


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return _is_number(v) and float(v).is_integer()
