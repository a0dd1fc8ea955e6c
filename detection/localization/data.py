"""Localization data: images with their class and ground-truth boxes, read from the official ILSVRC
CLS-LOC layout or from an ImageFolder plus a folder of XML files (the same PASCAL VOC style XML).

Every annotation is checked when the dataset is loaded, so a bad file stops the run before any
training with the file, the field and the fix. Class indices are those of the classifier the run
starts from (its ``class_names``, the pretraining's ImageFolder order = sorted wnids), matched by name.

``data.val_blacklist``: the ILSVRC devkit's CLS-LOC validation blacklist (``data/ILSVRC2015_clsloc_
validation_blacklist.txt``, one number ``N`` of ``ILSVRC2012_val_<N>.JPEG`` per line: 1,762 of the 50,000
val images, whose boxes the organisers judged unsatisfactory). The devkit's localization evaluation leaves
them out and its classification evaluation keeps them; here such a record is ``loc_scored=False``: it counts
for the classification errors only.
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from backbones.engine.errors import DatasetError
from backbones.engine.imageio import chw_tensor, is_image_file, read_image_rgb, read_or_skip
from backbones.engine.loader import epoch_and_index, item_seed, packed
from backbones.engine.parallel import map_over_ranks
from backbones.imagedata import PCALighting, scan_image_folder, seed_augmentation, split_holdout
from detection.data.problems import DataProblems, read_token_lines, verify_images
from detection.data.voc import read_xml_annotation

LAYOUTS = ("imagefolder", "ilsvrc", "synthetic")
ILSVRC_LAYOUT = ("  expected ILSVRC CLS-LOC layout under data.ilsvrc_root:\n"
                 "    LOC_synset_mapping.txt\n"
                 "    Data/CLS-LOC/train/<wnid>/<wnid>_<n>.JPEG     Annotations/CLS-LOC/train/<wnid>/<wnid>_<n>.xml\n"
                 "    Data/CLS-LOC/val/ILSVRC2012_val_<n>.JPEG       Annotations/CLS-LOC/val/ILSVRC2012_val_<n>.xml")
# A box may end this many pixels past the image border (rounding in the official annotations) and is
# then clipped; beyond that it is an annotation error.
BORDER_TOLERANCE = 2.0


class LocDataError(DatasetError):
    """A localization dataset or annotation that cannot be used; the message names file, field and fix."""


class AnnotationProblem(LocDataError):
    """One record's problem: ``kind`` groups it in the report, ``where`` names the file and field, ``fix`` says
    what to do. The loaders collect these for every record and report them together."""

    def __init__(self, kind: str, where: str, fix: str):
        super().__init__(f"{where}: {kind}; {fix}")
        self.kind, self.where, self.fix = kind, where, fix


@dataclass
class LocRecord:
    """One image: its class index (in the classifier's order), boxes (n, 4) xyxy pixels of the size the
    XML declares, and each box's class index."""

    path: str
    label: int
    boxes: np.ndarray
    box_labels: np.ndarray
    width: int
    height: int
    loc_scored: bool = True  # False: listed in the CLS-LOC val blacklist (classification errors only)


ILSVRC_VAL_NAME = re.compile(r"ILSVRC2012_val_0*(\d+)$")


def apply_val_blacklist(records: list[LocRecord], path: str) -> int:
    """Mark the val records the CLS-LOC blacklist at ``path`` lists (by ``N`` of ``ILSVRC2012_val_<N>``) as not
    scored for localization; returns how many. Raises when the file is unreadable or names no image the way
    ILSVRC's val images are named."""
    if not os.path.isfile(path):
        raise LocDataError(f"{path}: blacklist file not found; fix: set data.val_blacklist to the ILSVRC devkit's "
                           "data/ILSVRC2015_clsloc_validation_blacklist.txt, or to '' to score every val image")
    rows, malformed = read_token_lines(path, lambda t: len(t) == 1 and t[0].isdigit(), "one val image number")
    if malformed:
        raise LocDataError(f"{path}: {malformed}; fix: one N of ILSVRC2012_val_<N>.JPEG per line, as in the devkit's "
                           "data/ILSVRC2015_clsloc_validation_blacklist.txt")
    listed = {int(number) for number, in rows}
    numbered = 0
    for r in records:
        match = ILSVRC_VAL_NAME.match(os.path.splitext(os.path.basename(r.path))[0])
        numbered += match is not None
        if match and int(match.group(1)) in listed:
            r.loc_scored = False
    if records and not numbered:
        raise LocDataError(f"{path}: the blacklist numbers ILSVRC2012 val images, but none of the {len(records)} val "
                           f"images is named ILSVRC2012_val_<N> (e.g. {records[0].path}); fix: "
                           "data.val_blacklist='' for other images")
    return sum(not r.loc_scored for r in records)


def parse_annotation(xml_path: str) -> tuple[int, int, list[tuple[str, list[float]]]]:
    """(width, height, [(name, [xmin, ymin, xmax, ymax])]) of a CLS-LOC / PASCAL VOC XML file, coordinates
    as written."""
    width, height, objects = read_xml_annotation(xml_path, LocDataError)
    return width, height, [(name, list(box)) for name, box, _ in objects]


def check_boxes(xml_path: str, width: int, height: int, objects, clip: bool) -> np.ndarray:
    """The objects' boxes as (n, 4) float32, checked against the declared image size."""
    boxes = np.array([b for _, b in objects], dtype=np.float32).reshape(-1, 4)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        where = f"{xml_path}: object {i} <bndbox> ({x1:g}, {y1:g}, {x2:g}, {y2:g})"
        if x2 <= x1 or y2 <= y1:
            raise AnnotationProblem("empty box (xmax <= xmin or ymax <= ymin)", where, "fix or delete that object")
        outside = x1 < -BORDER_TOLERANCE or y1 < -BORDER_TOLERANCE or x2 > width + BORDER_TOLERANCE \
            or y2 > height + BORDER_TOLERANCE
        if outside and not clip:
            raise AnnotationProblem("box outside its image", f"{where} lies outside the {width}x{height} image of "
                                    "<size>", "fix the annotation, or set data.clip_boxes=true to clip boxes to the image")
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    return boxes


def make_record(image_path: str, xml_path: str, folder_class: str | None, class_to_index: dict[str, int],
                clip: bool) -> LocRecord:
    """Read and check one annotation; the image's class is its folder (train) or its objects' name (val)."""
    width, height, objects = parse_annotation(xml_path)
    if not objects:
        raise AnnotationProblem("annotation without <object>", xml_path, "a localization image needs at least one box; "
                                "delete the XML to make it an unannotated image")
    for name, _ in objects:
        if name not in class_to_index:
            raise AnnotationProblem("object of a class the classifier does not know",
                                    f"{xml_path}: <object><name> {name!r} is not one of the classifier's "
                                    f"{len(class_to_index)} classes (e.g. {sorted(class_to_index)[:3]})",
                                    "localize with a classifier trained on these classes (model.classifier=...)")
    image_class = folder_class if folder_class is not None else objects[0][0]
    if image_class not in class_to_index:
        raise AnnotationProblem("image of a class the classifier does not know",
                                f"{image_path}: class folder {image_class!r} is not one of the classifier's classes",
                                "use a classifier trained on these classes (model.classifier=...)")
    boxes = check_boxes(xml_path, width, height, objects, clip)
    box_labels = np.array([class_to_index[n] for n, _ in objects], dtype=np.int64)
    if not (box_labels == class_to_index[image_class]).any():
        raise AnnotationProblem("no object of the image's class", f"{xml_path}: no object of class {image_class!r} "
                                f"(objects: {sorted({n for n, _ in objects})})",
                                "the <name> fields must hold the image's wnid")
    return LocRecord(image_path, class_to_index[image_class], boxes, box_labels, width, height)


def find_annotation(ann_dir: str, image_path: str, wnid: str | None) -> str | None:
    stem = os.path.splitext(os.path.basename(image_path))[0]
    candidates = [os.path.join(ann_dir, f"{stem}.xml")]
    if wnid:
        candidates.append(os.path.join(ann_dir, wnid, f"{stem}.xml"))
    return next((c for c in candidates if os.path.isfile(c)), None)


def annotated_record(ann_dir: str, class_to_index: dict[str, int], clip: bool, sample: tuple[str, str | None]
                     ) -> LocRecord | tuple[str, str, str] | None:
    """An image ``(path, class folder or None)`` as its record, its problem ``(kind, where, fix)``, or None when
    ``ann_dir`` has no XML for it. Pure (problems are returned, not collected), so that the ranks of a torchrun
    job can each read a share (:func:`backbones.engine.parallel.map_over_ranks`)."""
    path, folder_class = sample
    xml = find_annotation(ann_dir, path, folder_class)
    if xml is None:
        return None
    try:
        return make_record(path, xml, folder_class, class_to_index, clip)
    except AnnotationProblem as problem:
        return problem.kind, problem.where, problem.fix
    except LocDataError as exc:  # the XML itself: unreadable, not XML, a field missing
        return "unreadable or incomplete XML", str(exc), "repair or re-export the annotation file"


def read_records(samples: list[tuple[str, str | None]], ann_dir: str, class_to_index: dict[str, int], clip: bool,
                 split: str, problems: DataProblems, unannotated) -> tuple[list[LocRecord], int]:
    """:func:`annotated_record` of every sample, each rank of a torchrun job reading its share (ILSVRC's train set:
    1.28M images, 544k XML files) in one thread (XML parsing holds the GIL); problems go to ``problems``, an
    image without XML to ``unannotated(path)`` (which adds its problem), or is skipped and counted when that is
    None. Returns (records, skipped)."""
    outcomes = map_over_ranks(functools.partial(annotated_record, ann_dir, class_to_index, clip), samples, threads=1,
                              desc=f"reading {split} annotations" if len(samples) >= 2000 else None)
    records, skipped = [], 0
    for (path, _), outcome in zip(samples, outcomes):
        if isinstance(outcome, LocRecord):
            records.append(outcome)
        elif outcome is not None:
            problems.add(*outcome)
        elif unannotated is None:
            skipped += 1
        else:
            unannotated(path)
    return records, skipped


def records_from_samples(samples, folder_classes, ann_dir, class_to_index, clip, skip_missing, split,
                         problems: DataProblems):
    """ImageFolder samples (path, folder index) -> records, every record's problem added to ``problems``;
    returns (records, number skipped unannotated)."""
    if not os.path.isdir(ann_dir):
        raise LocDataError(f"annotation folder not found: {os.path.abspath(ann_dir)} (the {split} split's XML "
                           f"files, <annotations>/<image stem>.xml); set data.{split}_annotations")

    def unannotated(path):
        stem = os.path.splitext(os.path.basename(path))[0]
        problems.add("image without annotation", f"{path}: no annotation {os.path.join(ann_dir, stem + '.xml')}",
                     "add it, or remove the image" + (" or set data.skip_unannotated_train=true"
                                                      if split == "train" else ""))
    return read_records([(path, folder_classes[folder_idx]) for path, folder_idx in samples], ann_dir,
                        class_to_index, clip, split, problems, None if skip_missing else unannotated)


def finish_problems(d, splits: dict[str, tuple[list[LocRecord], DataProblems]]) -> tuple[list, list, dict]:
    """Every image of both splits checked against its XML's size (``data.verify_images``), then both
    splits' problems at once: one error for the strict ones (``data.strict_train`` / ``strict_val``), the
    others logged and their records dropped. Returns (train records, val records, problem counts)."""
    counts, kept, reports = {}, {}, []
    for split, (records, problems) in splits.items():
        bad = verify_images([(r.path, r.height, r.width, split) for r in records], problems, str(d.verify_images))
        kept[split] = [r for r in records if r.path not in bad]
        counts[split] = problems.counts()
        if problems and getattr(d, f"strict_{split}"):
            reports.append(problems.report())
        else:
            problems.finish(strict=False)
    if reports:
        raise LocDataError("\n\n".join(reports) + "\nNothing was trained. Fix the records above, or set "
                           "data.strict_train / data.strict_val=false to drop them and go on.")
    return kept["train"], kept["val"], counts


def load_imagefolder(d, class_names: list[str]) -> tuple[list[LocRecord], list[LocRecord], dict]:
    """``<images>/<wnid>/*`` + XML folder; val is a separate folder or the pretraining's holdout split."""
    class_to_index = {c: i for i, c in enumerate(class_names)}
    folder_classes, samples = scan_image_folder(d.train_images)
    unknown = [c for c in folder_classes if c not in class_to_index]
    if unknown:
        raise LocDataError(f"{d.train_images}: class folders {unknown[:5]} are not among the classifier's "
                           f"{len(class_names)} classes (e.g. {class_names[:3]}); localize with a classifier "
                           "trained on these classes (model.classifier=...)")
    stats = {}
    if d.val_images:
        train_samples = samples
        val_folder_classes, val_samples = scan_image_folder(d.val_images)
        val_source = d.val_annotations or d.train_annotations
    else:
        if not d.val_fraction > 0:
            raise LocDataError("data.val_images is empty and data.val_fraction is 0: set one of them")
        # The pretraining's own split function on the same list, with its seed: the same images are held out.
        train_samples, val_samples = split_holdout(samples, d.val_fraction, d.holdout_seed)
        val_folder_classes, val_source = folder_classes, d.train_annotations
    train_problems = DataProblems(f"{d.train_annotations} (train)")
    val_problems = DataProblems(f"{val_source} (val)")
    val_records, _ = records_from_samples(val_samples, val_folder_classes, val_source, class_to_index, d.clip_boxes,
                                          False, "val", val_problems)
    train_records, missing = records_from_samples(train_samples, folder_classes, d.train_annotations, class_to_index,
                                                  d.clip_boxes, d.skip_unannotated_train, "train", train_problems)
    train_records, val_records, stats["problems"] = finish_problems(
        d, {"train": (train_records, train_problems), "val": (val_records, val_problems)})
    stats["train_unannotated_skipped"] = missing
    return train_records, val_records, stats


def read_synset_mapping(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise LocDataError(f"{path}: not found\n{ILSVRC_LAYOUT}")
    with open(path, encoding="utf-8") as f:
        wnids = [line.split()[0] for line in f if line.strip()]
    return wnids


def load_ilsvrc(d, class_names: list[str]) -> tuple[list[LocRecord], list[LocRecord], dict]:
    """The official layout. Train: class from the folder, only images with an XML (the rest skipped and
    counted). Val: a flat folder, class from the XML's objects; every val image needs its XML."""
    root = d.ilsvrc_root
    wnids = read_synset_mapping(os.path.join(root, "LOC_synset_mapping.txt"))
    class_to_index = {c: i for i, c in enumerate(class_names)}
    unknown = [w for w in wnids if w not in class_to_index]
    if unknown:
        raise LocDataError(f"{root}/LOC_synset_mapping.txt: wnids {unknown[:5]} are not among the classifier's "
                           f"{len(class_names)} classes; localize with an ImageNet-1k classifier (model.classifier=...)")
    train_dir, val_dir = os.path.join(root, "Data/CLS-LOC/train"), os.path.join(root, "Data/CLS-LOC/val")
    for folder in (train_dir, val_dir, os.path.join(root, "Annotations/CLS-LOC/train"),
                   os.path.join(root, "Annotations/CLS-LOC/val")):
        if not os.path.isdir(folder):
            raise LocDataError(f"{folder}: not found\n{ILSVRC_LAYOUT}")
    folder_classes, samples = scan_image_folder(train_dir)
    if folder_classes != sorted(wnids):
        extra = sorted(set(folder_classes) ^ set(wnids))[:5]
        raise LocDataError(f"{train_dir}: class folders differ from LOC_synset_mapping.txt (e.g. {extra}); "
                           "re-extract the training set")
    train_ann, val_ann = os.path.join(root, "Annotations/CLS-LOC/train"), os.path.join(root, "Annotations/CLS-LOC/val")
    train_problems, val_problems = DataProblems(f"{train_ann} (train)"), DataProblems(f"{val_ann} (val)")
    train_records, missing = records_from_samples(samples, folder_classes, train_ann, class_to_index, d.clip_boxes,
                                                  d.skip_unannotated_train, "train", train_problems)
    val_samples = [(os.path.join(val_dir, name), None) for name in sorted(os.listdir(val_dir)) if is_image_file(name)]
    if not val_samples:
        raise LocDataError(f"{val_dir}: no images\n{ILSVRC_LAYOUT}")
    val_records, _ = read_records(val_samples, val_ann, class_to_index, d.clip_boxes, "val", val_problems,
                                  lambda path: val_problems.add(
                                      "val image without annotation", f"{path}: no annotation in {val_ann}",
                                      "every val image needs its XML: re-extract ILSVRC's Annotations/CLS-LOC/val"))
    train_records, val_records, problems = finish_problems(
        d, {"train": (train_records, train_problems), "val": (val_records, val_problems)})
    return train_records, val_records, {"train_unannotated_skipped": missing, "problems": problems}


# -- transforms ---------------------------------------------------------------------------------

def loc_train_transform(scale_range, crop_size: int, flip: bool, pca_std: float, min_visibility: float) -> A.Compose:
    """The pretraining's augmentation (shorter side in ``scale_range``, random square crop, flip, PCA
    colour), carrying the boxes along: clipped to the crop, dropped when less than ``min_visibility``
    of them is left."""
    lo, hi = scale_range
    ops = [A.SmallestMaxSize(max_size=list(range(lo, hi + 1))), A.RandomCrop(crop_size, crop_size, pad_if_needed=True)]
    if flip:
        ops.append(A.HorizontalFlip(p=0.5))
    if pca_std > 0:
        ops.append(PCALighting(pca_std))
    return A.Compose(ops, bbox_params=A.BboxParams(format="pascal_voc", label_fields=["box_labels"],
                                                   min_visibility=min_visibility, clip=True))


def image_boxes(record: LocRecord, image: np.ndarray) -> np.ndarray:
    """The record's boxes in the decoded image's pixels (a resized copy of the data keeps its XML)."""
    h, w = image.shape[:2]
    boxes = record.boxes.copy()
    if (w, h) != (record.width, record.height):
        boxes[:, 0::2] *= w / record.width
        boxes[:, 1::2] *= h / record.height
    return boxes


class LocTrainDataset(Dataset):
    """(image uint8 CxHxW, class, boxes of that class (n, 4)) per ``(epoch, index)`` key (an index alone:
    epoch 0); augmentation seeded per (seed, epoch, index) as in pretraining, so a resumed run sees the
    same crops. Corrupt: ``None``."""

    def __init__(self, records: list[LocRecord], transform: A.Compose, seed: int = 0, skip_corrupt: bool = True):
        self.records, self.transform, self.seed, self.skip_corrupt = packed(records), transform, seed, skip_corrupt

    def __len__(self):
        return len(self.records)

    def __getitem__(self, key):
        epoch, index = epoch_and_index(key)
        record = self.records[index]
        image = read_or_skip(lambda: read_image_rgb(record.path), self.skip_corrupt)
        if image is None:
            return None
        keep = record.box_labels == record.label
        boxes = image_boxes(record, image)[keep]
        seed_augmentation(self.transform, item_seed(self.seed, epoch, index))
        out = self.transform(image=image, bboxes=boxes, box_labels=record.box_labels[keep])
        boxes = torch.as_tensor(np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4))
        image = chw_tensor(out["image"])
        return image, record.label, boxes


def collate_loc(batch):
    """Stack images and labels, keep boxes as a list; drop (and count) corrupt files."""
    kept = [b for b in batch if b is not None]
    if not kept:
        return None, None, [], len(batch)
    return (torch.stack([b[0] for b in kept]), torch.tensor([b[1] for b in kept], dtype=torch.long),
            [b[2] for b in kept], len(batch) - len(kept))


# -- test-time views ----------------------------------------------------------------------------

def resize_shorter(image: np.ndarray, size: int) -> tuple[np.ndarray, float, float]:
    """Resize so the shorter side is ``size``; return the image and its x and y scale factors."""
    h, w = image.shape[:2]
    s = size / min(h, w)
    new_w, new_h = max(1, round(w * s)), max(1, round(h * s))
    out = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    return out, new_w / w, new_h / h


@dataclass
class View:
    """How a test input was cut from the original image: input = resize(image)[top:, left:]."""

    scale_x: float
    scale_y: float
    left: int = 0
    top: int = 0


def center_view(image: np.ndarray, resize: int, crop: int) -> tuple[np.ndarray, View]:
    """The classification centre crop (shorter side ``resize``, centre ``crop`` square, zero padding if smaller)."""
    resized, sx, sy = resize_shorter(image, resize)
    h, w = resized.shape[:2]
    if h < crop or w < crop:
        resized = cv2.copyMakeBorder(resized, 0, max(0, crop - h), 0, max(0, crop - w), cv2.BORDER_CONSTANT)
        h, w = resized.shape[:2]
    top, left = (h - crop) // 2, (w - crop) // 2
    return np.ascontiguousarray(resized[top:top + crop, left:left + crop]), View(sx, sy, left, top)


def dense_view(image: np.ndarray, size: int) -> tuple[np.ndarray, View]:
    resized, sx, sy = resize_shorter(image, size)
    return resized, View(sx, sy)


def boxes_to_original(boxes: torch.Tensor, view: View, orig_size: tuple[int, int]) -> torch.Tensor:
    """Map (n, 4) boxes from a view's input pixels back to the original image, clipped to it."""
    offset = torch.tensor([view.left, view.top, view.left, view.top], dtype=boxes.dtype, device=boxes.device)
    scale = torch.tensor([view.scale_x, view.scale_y, view.scale_x, view.scale_y], dtype=boxes.dtype,
                         device=boxes.device)
    out = (boxes + offset) / scale
    h, w = orig_size
    out[:, 0::2] = out[:, 0::2].clamp(0, w)
    out[:, 1::2] = out[:, 1::2].clamp(0, h)
    return out
