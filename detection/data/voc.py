"""PASCAL VOC and ImageNet DET (XML annotations), loaded into the COCO-style structure CocoDetection uses.

Both datasets annotate each image with one XML file (``<size>``, then one ``<object>`` per box with
``<name>``, ``<difficult>`` and ``<bndbox>``); image-set files list which images form a split. They are
converted once, at load time, to the in-memory COCO dict (``images``, ``annotations``, ``categories``)
that :class:`~detection.data.coco.CocoDetection` takes, so transforms, batching, the training loop,
checkpoint class names and the COCO evaluator work on them unchanged; :class:`VocDetection` is that
dataset. Every problem (missing image-set file, XML without ``<size>``, unknown class name, a box
outside its image, missing images) is reported here, naming the file, the field and a fix.

Sets are written ``ROOT:SPLIT`` and can be concatenated (VOC 07+12):

* ``voc``: ``ROOT`` is e.g. ``datasets/VOCdevkit/VOC2007``, holding ``JPEGImages/<id>.jpg``,
  ``Annotations/<id>.xml`` and ``ImageSets/Main/<SPLIT>.txt`` (train, val, trainval, test).
* ``imagenet_det``: ``ROOT`` is the ``ILSVRC`` folder, holding ``Data/DET/{train,val}/<name>.JPEG``,
  ``Annotations/DET/{train,val}/<name>.xml`` and ``ImageSets/DET/<SPLIT>.txt``. Splits whose name
  starts with ``train`` read from the train folders, all others from val. ``train`` with no
  ``train.txt`` is the union of the 200 per-class lists ``train_1.txt`` .. ``train_200.txt``.

Image-set lines are ``name`` or ``name number``; a number of ``-1`` marks an image listed as a
negative (ImageNet DET ``train_<k>.txt``: the image holds no object of class k; VOC per-class lists
likewise), which is skipped; any other number (``val.txt``'s running index) is ignored.

Box convention: VOC XML coordinates are 1-based inclusive pixel indices (``xmin=1, xmax=10`` is the
first ten pixel columns). Here pixel ``c`` (0-based) spans ``[c, c + 1)``, as in the rest of resdet, so a
box becomes ``x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax`` (0-based, exclusive end; width
``xmax - xmin + 1`` as the devkit counts it). :mod:`detection.evaluation.voc_eval` relies on this: the
plain IoU of such boxes equals the devkit's IoU with its ``+ 1`` on the inclusive coordinates.

ImageNet DET's validation blacklist (``blacklist``: the devkit's
``data/ILSVRC2015_det_validation_blacklist.txt``, ``<index> <wnid>`` lines, the index being the number on
the image's line in ``val.txt``) names (image, class) pairs whose labels are too ambiguous to score. The
devkit's ``eval_detection`` leaves such a class out of that image: its ground truth is no positive and a
detection of it is neither right nor wrong. Here the ground truth of the pair is left out of the set and
the image records the class under ``unscored_category_ids``, which both evaluators honour for detections.

Difficult objects (``<difficult>1</difficult>``) are kept with a flag. For training, ``difficult``
chooses: ``ignore`` (default) makes them ignore regions like COCO crowd boxes, so anchors and
proposals lying mostly inside one are neither positive nor negative (they are hard or ambiguous
examples, but they are objects, so teaching the detector they are background would be wrong);
``train`` trains them as ordinary objects; ``drop`` removes them (anything overlapping them may
then be sampled as background). Evaluation sets always use ``ignore``: the VOC evaluator ignores
them as the devkit does, and pycocotools sees them as crowd regions.
"""
from __future__ import annotations

import functools
import glob
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from backbones.engine.parallel import map_over_ranks

from .coco import CocoDetection, DatasetError
from .problems import DataProblems, read_token_lines

# The 20 PASCAL VOC classes in the devkit's order (labels 1..20).
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
FORMATS = ("voc", "imagenet_det")
DIFFICULT_MODES = ("ignore", "train", "drop")

VOC_LAYOUT = ("  expected layout (data.format=voc, sets written ROOT:SPLIT, e.g. datasets/VOCdevkit/VOC2007:trainval):\n"
              "    ROOT/JPEGImages/<id>.jpg\n"
              "    ROOT/Annotations/<id>.xml\n"
              "    ROOT/ImageSets/Main/{train,val,trainval,test}.txt")
IMAGENET_DET_LAYOUT = ("  expected layout (data.format=imagenet_det, sets written ROOT:SPLIT, e.g. datasets/ILSVRC:val):\n"
                       "    ROOT/Data/DET/{train,val}/<name>.JPEG\n"
                       "    ROOT/Annotations/DET/{train,val}/<name>.xml\n"
                       "    ROOT/ImageSets/DET/{train_1..train_200,val}.txt  (ROOT:train = the union of train_*.txt)")
LAYOUTS = {"voc": VOC_LAYOUT, "imagenet_det": IMAGENET_DET_LAYOUT}


@dataclass(frozen=True)
class XmlImageSet:
    """One ``ROOT:SPLIT`` set of an XML-annotated dataset, with where its files live."""

    spec: str
    root: str
    split: str
    layout: str

    @property
    def image_set_dir(self) -> str:
        return os.path.join(self.root, "ImageSets", "Main" if self.layout == "voc" else "DET")

    @property
    def image_dir(self) -> str:
        if self.layout == "voc":
            return os.path.join(self.root, "JPEGImages")
        return os.path.join(self.root, "Data", "DET", self._folder)

    @property
    def annotation_dir(self) -> str:
        if self.layout == "voc":
            return os.path.join(self.root, "Annotations")
        return os.path.join(self.root, "Annotations", "DET", self._folder)

    @property
    def _folder(self) -> str:
        return "train" if self.split.startswith("train") else "val"

    @property
    def image_ext(self) -> str:
        return ".jpg" if self.layout == "voc" else ".JPEG"

    def image_set_files(self) -> list[str]:
        """The image-set file(s) of the split; raises when there is none."""
        path = os.path.join(self.image_set_dir, f"{self.split}.txt")
        if os.path.isfile(path):
            return [path]
        if self.layout == "imagenet_det" and self.split == "train":
            per_class = glob.glob(os.path.join(self.image_set_dir, "train_*.txt"))
            per_class = sorted((p for p in per_class if re.fullmatch(r"train_\d+\.txt", os.path.basename(p))),
                               key=lambda p: int(re.findall(r"\d+", os.path.basename(p))[0]))
            if per_class:
                return per_class
        available = sorted(os.path.basename(p)[:-4] for p in glob.glob(os.path.join(self.image_set_dir, "*.txt")))
        hint = f"splits there: {', '.join(available[:12])}{' ...' if len(available) > 12 else ''}" if available \
            else "that folder has no image-set file"
        raise DatasetError(f"{path}: image-set file for {self.spec!r} not found ({hint}); fix: name an existing "
                           f"split after the ':' or point ROOT at the dataset folder\n{LAYOUTS[self.layout]}")


def parse_set_spec(spec: str, layout: str) -> XmlImageSet:
    """``"datasets/VOCdevkit/VOC2007:trainval"`` -> the set's root and split."""
    if layout not in FORMATS:
        raise ValueError(f"unknown XML dataset format {layout!r}; use one of {FORMATS}")
    root, sep, split = str(spec).rpartition(":")
    if not sep or not root or not split or "/" in split:
        example = "datasets/VOCdevkit/VOC2007:trainval" if layout == "voc" else "datasets/ILSVRC:val"
        raise DatasetError(f"set {spec!r} is not ROOT:SPLIT; fix: write it like {example!r}")
    return XmlImageSet(spec=str(spec), root=os.path.normpath(root), split=split, layout=layout)


def read_image_set(image_set: XmlImageSet) -> dict[str, int | None]:
    """The image names of a set, in file order, without duplicates and without images listed as -1, each with
    the number on its ``name number`` line (None without one): ImageNet DET's ``val.txt`` index, which the
    devkit's blacklist and result files refer to (the val1/val2 halves of R-CNN's split keep those numbers)."""
    names: dict[str, int | None] = {}
    for path in image_set.image_set_files():
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                tokens = line.split()
                if not tokens:
                    continue
                if len(tokens) > 2:
                    raise DatasetError(f"{path}: line {line_no} has {len(tokens)} fields ({line.strip()!r}); fix: "
                                       "an image-set line is 'name' or 'name number'")
                if len(tokens) == 2 and tokens[1] == "-1":
                    continue  # listed as a negative of a per-class list: no object of that class
                number = int(tokens[1]) if len(tokens) == 2 and tokens[1].isdigit() else None
                names.setdefault(tokens[0], number)
    return names


def read_det_blacklist(path: str, wnids=None) -> list[tuple[int, str]]:
    """The ``(image index, wnid)`` pairs of an ILSVRC DET validation blacklist (``<index> <wnid>`` lines, the
    devkit's ``data/ILSVRC2015_det_validation_blacklist.txt``). Malformed lines and wnids not in ``wnids``
    (the class list; None: not checked) are reported together in one error."""
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: blacklist file not found; fix: set data.xml.val_blacklist to the ILSVRC "
                           "devkit's data/ILSVRC2015_det_validation_blacklist.txt, or to '' to score every image "
                           "and class")
    rows, malformed = read_token_lines(path, lambda t: len(t) == 2 and t[0].isdigit(), "'<image index> <wnid>'")
    pairs = [(int(index), wnid) for index, wnid in rows]
    problems = []
    if malformed:
        problems.append(f"{malformed}; fix: one pair per line, as in the devkit's "
                        "data/ILSVRC2015_det_validation_blacklist.txt")
    unknown = [] if wnids is None else sorted({w for _, w in pairs} - set(wnids))
    if unknown:
        problems.append(f"wnids {unknown[:5]}{' ...' if len(unknown) > 5 else ''} are not among the {len(wnids)} "
                        "classes; fix: the blacklist of the same devkit as the class list (data.xml.synsets_file)")
    if problems:
        raise DatasetError(f"{path}: " + "\n  ".join(problems))
    return pairs


def read_synsets_file(path: str) -> dict[str, str]:
    """wnid -> name from a mapping file whose lines are ``wnid [index] name words`` (the ILSVRC devkit's
    ``map_det.txt``: ``n02672831 1 accordion``; or ``n01440764 tench, Tinca tinca``). The file defines the
    class list, so it should hold exactly the detection classes (200 for ImageNet DET)."""
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: synset mapping file not found; fix: set data.xml.synsets_file to a file of "
                           "'wnid [index] name' lines (e.g. the ILSVRC devkit's data/map_det.txt), or to '' to "
                           "use the wnids as class names")
    mapping: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            tokens = line.split()
            if not tokens:
                continue
            words = tokens[1:]
            if words and words[0].isdigit():
                words = words[1:]
            if tokens[0] in mapping:
                raise DatasetError(f"{path}: line {line_no}: wnid {tokens[0]} appears twice; fix: list each once")
            mapping[tokens[0]] = " ".join(words) or tokens[0]
    if not mapping:
        raise DatasetError(f"{path}: no synset listed; fix: one 'wnid [index] name' per line")
    return mapping


def voc_to_coco_dict(sets, layout: str = "voc", class_names=None, synsets_file: str = "",
                     difficult: str = "ignore", problems: DataProblems | None = None, blacklist: str = "") -> dict:
    """Read the XML sets (``"ROOT:SPLIT"`` strings, concatenated in order) into a COCO-style dict.

    ``class_names``: the XML ``<name>`` values in label order (labels 1..K). Default: the 20 VOC classes
    for ``voc``; for ``imagenet_det`` the wnids of ``synsets_file`` when given, else every wnid found in
    these sets, sorted. The categories' display names come from ``synsets_file`` when given.
    ``difficult``: ``ignore`` (difficult objects become crowd regions), ``train`` or ``drop``; see the
    module docstring. Images carry their absolute path as ``file_name`` (several roots can mix),
    plus ``xml_id`` (the image-set name) and ``xml_set``; annotations carry ``difficult`` (0/1).
    ``problems``: where per-file problems go (a missing or broken XML or image file, an unknown class
    name), all of them, the offending image or object left out; without it the first one raises.
    ``blacklist``: an ImageNet DET validation blacklist (see the module docstring): the ground truth of each
    listed (image, class) is left out and the image's ``unscored_category_ids`` lists the class.
    """
    collect = problems if problems is not None else DataProblems(" + ".join(map(str, sets)))
    if difficult not in DIFFICULT_MODES:
        raise ValueError(f"difficult={difficult!r}; use one of {DIFFICULT_MODES}")
    image_sets = [parse_set_spec(s, layout) for s in sets]
    if not image_sets:
        raise DatasetError(f"no {layout} set given; fix: list sets as ROOT:SPLIT (e.g. "
                           f"{'datasets/VOCdevkit/VOC2007:trainval' if layout == 'voc' else 'datasets/ILSVRC:val'})")
    parsed = []  # (image set, image name, width, height, objects)
    numbers = {}  # set spec -> image name -> its number in the image-set file (ImageNet DET's val index)
    for image_set in image_sets:
        numbers[image_set.spec] = read_image_set(image_set)
        names = list(numbers[image_set.spec])
        if not names:
            raise DatasetError(f"{image_set.image_set_files()[0]}: the set {image_set.spec!r} lists no image; fix: "
                               "choose a split with images")
        # each rank of a torchrun job reads its share of the files (ImageNet DET: ~450k XML files); in one
        # thread, as parsing holds the GIL (threads measured slower on a local disk, see backbones.engine.parallel)
        entries = map_over_ranks(functools.partial(_read_entry, image_set.annotation_dir, image_set.image_dir,
                                                   image_set.image_ext), names, threads=1,
                                 desc=f"reading {image_set.spec}" if len(names) >= 2000 else None)
        parsed.extend((image_set, name, *xml) for name, xml in _collect_entries(image_set, names, entries, collect))
    keys, display = _resolve_classes(layout, class_names, synsets_file, parsed)
    label_of = {key: label for label, key in enumerate(keys, start=1)}
    unscored = _unscored_classes(blacklist, layout, image_sets, parsed, label_of, numbers) if blacklist else {}
    images, annotations, left_out = [], [], 0
    # each set's folders once: the properties behind them cost more than the rest of this loop (~450k images)
    image_prefix = {s.spec: (os.path.join(os.path.abspath(s.image_dir), ""), s.image_ext) for s in image_sets}
    for image_set, name, width, height, objects in parsed:
        image_id = len(images) + 1
        folder, ext = image_prefix[image_set.spec]
        images.append({"id": image_id, "file_name": folder + name + ext,
                       "width": width, "height": height, "xml_id": name, "xml_set": image_set.spec})
        not_scored = unscored.get((image_set.spec, name), set())
        if not_scored:
            images[-1]["unscored_category_ids"] = sorted(label_of[w] for w in not_scored)
        for n, (cls, (x1, y1, x2, y2), is_difficult) in enumerate(objects, 1):
            if cls not in label_of:
                shown = ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else "")
                xml_path = os.path.join(image_set.annotation_dir, name + ".xml")
                collect.add("object of an unknown class", f"{xml_path}: <object> #{n} has <name>{cls}</name>, which "
                            f"is not one of the {len(keys)} classes ({shown})",
                            "correct the name, or set data.xml.class_names"
                            + (" / data.xml.synsets_file" if layout == "imagenet_det" else "")
                            + " to the dataset's classes")
                continue
            if is_difficult and difficult == "drop":
                continue
            if cls in not_scored:
                left_out += 1
                continue
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label_of[cls],
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                "iscrowd": int(is_difficult and difficult == "ignore"),
                                "difficult": int(is_difficult)})
    if problems is None:
        collect.finish(strict=True)
    categories = [{"id": label, "name": display[key], "xml_name": key} for key, label in label_of.items()]
    info = {"description": f"{layout} sets {list(sets)} (difficult: {difficult})"}
    if blacklist:
        info["blacklist"] = {"file": os.path.abspath(blacklist), "image_class_pairs": sum(map(len, unscored.values())),
                             "objects_left_out": left_out}
    return {"info": info, "images": images, "annotations": annotations, "categories": categories}


def _unscored_classes(blacklist: str, layout: str, image_sets: list[XmlImageSet], parsed: list,
                      label_of: dict[str, int], numbers: dict[str, dict[str, int | None]]
                      ) -> dict[tuple[str, str], set[str]]:
    """(set spec, image name) -> the wnids the blacklist leaves unscored in that image, for the images of
    these sets that it lists (by their ``val.txt`` number, ``numbers`` as :func:`read_image_set` gives them)."""
    if layout != "imagenet_det":
        raise DatasetError(f"data.xml.val_blacklist={blacklist!r} is ImageNet DET's (data.format=imagenet_det); "
                           "fix: set it to '' for data.format=voc")
    pairs = read_det_blacklist(blacklist, label_of)
    by_index: dict[int, set[str]] = {}
    for index, wnid in pairs:
        by_index.setdefault(index, set()).add(wnid)
    out: dict[tuple[str, str], set[str]] = {}
    for image_set in image_sets:
        names = [name for s, name, *_ in parsed if s is image_set]
        indices = numbers[image_set.spec]
        unnumbered = [n for n in names if indices[n] is None]
        if unnumbered:
            raise DatasetError(f"{', '.join(image_set.image_set_files())}: {len(unnumbered)} image(s) listed without "
                               f"the index the blacklist refers to (e.g. {unnumbered[0]!r}); fix: lines 'name index' "
                               "as in the devkit's val.txt, or data.xml.val_blacklist=''")
        for name in names:
            if indices[name] in by_index:
                out[(image_set.spec, name)] = by_index[indices[name]]
    return out


def _resolve_classes(layout: str, class_names, synsets_file: str, parsed: list) -> tuple[list[str], dict[str, str]]:
    """(XML names in label order, XML name -> display name)."""
    mapping = read_synsets_file(synsets_file) if synsets_file else {}
    if class_names:
        keys = [str(c) for c in class_names]
    elif layout == "voc":
        keys = list(VOC_CLASSES)
    elif mapping:
        keys = sorted(mapping)
    else:
        keys = sorted({obj[0] for *_, objects in parsed for obj in objects})
        if not keys:
            raise DatasetError("no object found in the ImageNet DET sets, so the class list is unknown; fix: set "
                               "data.xml.synsets_file (e.g. the devkit's data/map_det.txt) or data.xml.class_names")
    if len(set(keys)) != len(keys):
        raise DatasetError(f"class list {keys} names a class twice; fix: list each class once in data.xml.class_names")
    return keys, {key: mapping.get(key, key) for key in keys}


def _read_entry(annotation_dir: str, image_dir: str, image_ext: str, name: str
                ) -> tuple[bool, bool, tuple | str | None]:
    """(annotation file there, image file there, the parsed XML or its problem's message); the XML is read
    only when both files are there."""
    xml_path = os.path.join(annotation_dir, name + ".xml")
    has_xml = os.path.isfile(xml_path)
    has_image = os.path.isfile(os.path.join(image_dir, name + image_ext))
    if not (has_xml and has_image):
        return has_xml, has_image, None
    try:
        return True, True, _parse_xml(xml_path)
    except DatasetError as exc:
        return True, True, str(exc)


def _collect_entries(image_set: XmlImageSet, names: list[str], entries: list, problems: DataProblems) -> list:
    """(name, parsed XML) of the listed images whose XML and image file both exist and whose XML reads; each
    missing file and bad XML is a problem. A set with none of its files there (a wrong ROOT) stops at once."""
    listed_in = ", ".join(image_set.image_set_files())[:300]  # looked up on disk: once, not per missing file
    for kind, index, folder, ext in (("annotation", 0, image_set.annotation_dir, ".xml"),
                                     ("image", 1, image_set.image_dir, image_set.image_ext)):
        missing = [n for n, entry in zip(names, entries) if not entry[index]]
        fix = ("point ROOT at the dataset folder (test sets of some years come without annotations)"
               if kind == "annotation" else "point ROOT at the dataset folder or restore the images")
        if missing and len(missing) == len(names):
            raise DatasetError(f"{image_set.root}: none of the {len(names)} {kind} files listed in {listed_in} "
                               f"is there, e.g. {os.path.join(folder, missing[0] + ext)}; fix: {fix}\n"
                               f"{LAYOUTS[image_set.layout]}")
        for n in missing:
            problems.add(f"{kind} file listed in {listed_in} is missing",
                         os.path.join(folder, n + ext), fix)
    read = []
    for name, (_, _, xml) in zip(names, entries):
        if isinstance(xml, str):
            where, _, fix = xml.partition("; fix: ")
            problems.add("bad XML annotation file", where, fix or "repair the file")
        elif xml is not None:
            read.append((name, xml))
    return read


def read_xml_annotation(path: str, error: type[Exception] = DatasetError
                        ) -> tuple[int, int, list[tuple[str, tuple[float, float, float, float], bool]]]:
    """(width, height, [(class name, (xmin, ymin, xmax, ymax) as written, difficult)]) of one PASCAL VOC /
    ILSVRC (CLS-LOC, DET) XML file. A missing or malformed field raises ``error`` naming the file, the
    field and the fix; what the coordinates mean (and which boxes are valid) is the caller's business."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise error(f"{path}: not well-formed XML ({exc}); fix: repair or re-download the file") from exc
    size = root.find("size")
    dims = {}
    for key in ("width", "height"):
        value = _int_field(size, key) if size is not None else None
        if value is None:
            raise error(f"{path}: missing field <{key}> in <size>; fix: add "
                        "<size><width>W</width><height>H</height></size> with the image's pixel size")
        if value <= 0:
            raise error(f"{path}: <size> <{key}> is {value}; fix: set the image's real pixel size in <size>")
        dims[key] = value
    objects = []
    for n, obj in enumerate(root.findall("object"), 1):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise error(f"{path}: <object> #{n} has no <name>; fix: give every object its class name")
        box = obj.find("bndbox")
        coords = [_float_field(box, key) if box is not None else None for key in ("xmin", "ymin", "xmax", "ymax")]
        if box is None or any(c is None for c in coords):
            raise error(f"{path}: <object> #{n} ({name}) lacks a numeric <bndbox> xmin/ymin/xmax/ymax "
                        f"(got {coords}); fix: give every object its box")
        objects.append((name, tuple(coords), bool(_int_field(obj, "difficult") or 0)))
    return dims["width"], dims["height"], objects


def _parse_xml(path: str) -> tuple[int, int, list[tuple[str, tuple[float, float, float, float], bool]]]:
    """(width, height, [(class name, 0-based xyxy box, difficult)]) of one VOC annotation file."""
    width, height, written = read_xml_annotation(path)
    objects = []
    for n, (name, (xmin, ymin, xmax, ymax), difficult) in enumerate(written, 1):
        if xmax < xmin or ymax < ymin:
            raise DatasetError(f"{path}: <object> #{n} ({name}) has xmin={xmin:g} ymin={ymin:g} xmax={xmax:g} "
                               f"ymax={ymax:g}, an inverted box; fix: xmax >= xmin and ymax >= ymin (1-based, inclusive)")
        x1, y1, x2, y2 = xmin - 1, ymin - 1, xmax, ymax  # 1-based inclusive -> 0-based, exclusive end
        if x1 >= width or y1 >= height or x2 <= 0 or y2 <= 0:
            raise DatasetError(f"{path}: <object> #{n} ({name}) box xmin={xmin:g} ymin={ymin:g} xmax={xmax:g} "
                               f"ymax={ymax:g} lies outside its {width}x{height} image (<size>); fix: correct the "
                               "box or <size> (VOC coordinates are 1-based, from 1 to width/height)")
        objects.append((name, (x1, y1, x2, y2), difficult))
    return width, height, objects


def _float_field(node, key: str) -> float | None:
    try:
        return float(node.findtext(key))
    except (TypeError, ValueError):
        return None


def _int_field(node, key: str) -> int | None:
    value = _float_field(node, key)
    return int(value) if value is not None and value.is_integer() else None


class VocDetection(CocoDetection):
    """A :class:`CocoDetection` over PASCAL VOC or ImageNet DET XML sets (see :func:`voc_to_coco_dict`).

    ``image_names`` maps image id -> the image-set name (``000005``), for devkit-style result files.
    ``blacklist``: ImageNet DET's validation blacklist, for a val set (see :func:`voc_to_coco_dict`).
    """

    def __init__(self, sets, layout: str = "voc", class_names=None, synsets_file: str = "", difficult: str = "ignore",
                 transform=None, skip_corrupt: bool = True, filter_empty: bool = False, strict: bool = True,
                 verify: str = "header", blacklist: str = "", evaluation_index: bool = True):
        self.sets, self.layout = [str(s) for s in sets], layout
        problems = DataProblems(" + ".join(self.sets))
        data = voc_to_coco_dict(self.sets, layout, class_names, synsets_file, difficult, problems, blacklist)
        super().__init__("", " + ".join(self.sets), transform=transform, skip_corrupt=skip_corrupt,
                         filter_empty=filter_empty, data=data, strict=strict, verify=verify, problems=problems,
                         evaluation_index=evaluation_index)
        self.xml_class_names = [c["xml_name"] for c in data["categories"]]
        self.image_names = {img["id"]: img["xml_id"] for img in data["images"]}
        self.stats["difficult"] = sum(a["difficult"] for a in data["annotations"])
        if "blacklist" in data["info"]:  # (image, class) pairs left unscored, and their objects left out
            self.stats["blacklisted_pairs"] = data["info"]["blacklist"]["image_class_pairs"]
            self.stats["blacklisted_objects"] = data["info"]["blacklist"]["objects_left_out"]

    def _check_files_exist(self, images) -> set[str]:
        """Done per set by :func:`voc_to_coco_dict`, with the image-set file named in the message."""
        return set()
