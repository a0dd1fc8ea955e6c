"""Every dataset format behind one table: how a format makes its files ready, builds its train and val
sets, names where a split comes from, and scores detections on its val set.

``FORMATS[cfg.data.format]`` is all the rest of resdet asks (the training loop, ``tools/eval_det.py``,
``tools/check_data.py``, the benches). Adding a format is a dataset module (a
:class:`~detection.data.coco.CocoDetection`, or a converter to the COCO dict it takes, as ``voc.py`` is)
plus one :class:`DatasetFormat` here and its entry in ``FORMATS`` (and, in ``detection/config.py``, the
name in ``DataFormat``, the config's fixed choices, and a group for its paths beside ``data.coco`` and
``data.xml``). The evaluator travels with the format, not as an attribute on the dataset.
"""
from __future__ import annotations

import functools
import os

from omegaconf import DictConfig
from torch.utils.data import DataLoader

from backbones.engine.dist import barrier, get_world_size, is_main_process
from backbones.engine.errors import ConfigError, DataNotFoundError
from backbones.engine.loader import worker_loader
from backbones.engine.preemption import ignore_stop_signals

from ..evaluation.coco_eval import COCOEvaluator
from ..evaluation.voc_eval import VOCEvaluator, ground_truth_from_coco
from .batching import build_batch_sampler, collate_detection
from .coco import CocoDetection, DatasetError
from .synthetic import make_synthetic_coco, make_synthetic_voc
from .transforms import build_transform
from .voc import LAYOUTS as XML_LAYOUTS, VocDetection, parse_set_spec, read_det_blacklist

DEMO_HINT = "  to try resdet without any download: python tools/train_det.py configs/frcnn_demo.yaml"
COCO_LAYOUT = ("  expected layout:\n"
               "    datasets/coco/train2017/*.jpg\n"
               "    datasets/coco/val2017/*.jpg\n"
               "    datasets/coco/annotations/instances_{train,val}2017.json\n"
               "  (or set data.coco.train_images / train_annotations / val_images / val_annotations)\n"
               + DEMO_HINT)


def _not_found(missing: list[str], how_to_fix: str) -> DataNotFoundError:
    return DataNotFoundError("dataset not found; looked for:\n    "
                             + "\n    ".join(os.path.abspath(p) for p in missing) + "\n" + how_to_fix)


def _materialise(make) -> dict:
    """Write a synthetic set once (rank 0), then every rank reads its paths."""
    if is_main_process():
        make()
    barrier()
    return make()  # complete on disk by now: only returns the paths


def _transforms(cfg: DictConfig):
    d = cfg.data
    return (build_transform(tuple(d.min_size_train), d.max_size_train, d.flip_prob, train=True),
            build_transform((d.min_size_test,), d.max_size_test, 0.0, train=False))


class DatasetFormat:
    """One ``data.format``. Each method takes the whole run config."""

    def prepare(self, cfg: DictConfig) -> None:
        """Materialise the synthetic set when ``data.synthetic.enabled`` (setting the format's paths in
        ``cfg``); otherwise raise :class:`DataNotFoundError` at once when the configured files are not there."""
        raise NotImplementedError

    def build(self, cfg: DictConfig, train: bool = True):
        """``(train set or None, val set)``. Both are checked before either raises, so one run lists the
        problems of both (``data.strict_train`` / ``data.strict_val`` false: dropped and counted instead)."""
        raise NotImplementedError

    def source(self, cfg: DictConfig, split: str) -> str:
        """What ``split`` ("train" or "val") is read from, for messages and the summary."""
        raise NotImplementedError

    def evaluators(self, cfg: DictConfig, dataset, output_dir: str | None) -> list:
        """The evaluators that score detections on ``dataset`` (the first one's ``AP`` is the run's AP)."""
        raise NotImplementedError


class CocoFormat(DatasetFormat):
    """A COCO json per split (``data.coco.{train,val}_{images,annotations}``); the synthetic demo is written so."""

    def prepare(self, cfg: DictConfig) -> None:
        coco, synthetic = cfg.data.coco, cfg.data.synthetic
        if synthetic.enabled:
            paths = _materialise(functools.partial(
                make_synthetic_coco, synthetic.root, num_train=synthetic.num_train, num_val=synthetic.num_val,
                image_size=synthetic.image_size, seed=cfg.seed))
            for key in ("train_images", "train_annotations", "val_images", "val_annotations"):
                coco[key] = paths[key]
            return
        missing = [p for p in (coco.train_images, coco.train_annotations, coco.val_images, coco.val_annotations)
                   if not os.path.exists(p)]
        if missing:
            raise _not_found(missing, COCO_LAYOUT)

    def build(self, cfg: DictConfig, train: bool = True):
        d, coco = cfg.data, cfg.data.coco
        train_transform, val_transform = _transforms(cfg)
        errors: list[str] = []

        def load(split: str, transform, strict: bool, filter_empty: bool = False):
            try:
                return CocoDetection(coco[f"{split}_images"], coco[f"{split}_annotations"], transform=transform,
                                     skip_corrupt=d.skip_corrupt, filter_empty=filter_empty, strict=strict,
                                     verify=d.verify_images, evaluation_index=split == "val")
            except DatasetError as exc:
                errors.append(f"{split} set: {exc}")
                return None

        val_set = load("val", val_transform, d.strict_val)
        train_set = load("train", train_transform, d.strict_train, d.filter_empty_train) if train else None
        if errors:
            raise DatasetError("\n\n".join(errors))
        if train_set is not None and train_set.class_names != val_set.class_names:
            raise DatasetError(f"{coco.train_annotations} and {coco.val_annotations} have different categories: "
                               f"{train_set.class_names} vs {val_set.class_names}; fix: give both files the same "
                               "'categories' list")
        return train_set, val_set

    def source(self, cfg: DictConfig, split: str) -> str:
        return os.path.abspath(cfg.data.coco[f"{split}_annotations"])

    def evaluators(self, cfg: DictConfig, dataset, output_dir: str | None) -> list:
        return [COCOEvaluator(dataset.coco, dataset.contiguous_to_cat_id, dataset.class_names, output_dir=output_dir,
                              only_processed=cfg.eval.only_processed_images, workers=cfg.data.workers)]


class XmlFormat(DatasetFormat):
    """PASCAL VOC or ImageNet DET XML folders, given as ``ROOT:SPLIT`` sets (``data.xml.train_sets`` /
    ``data.xml.val_sets``), scored with the devkit's mAP (``eval.voc_metric``), pycocotools' beside it when
    ``eval.coco_metrics``."""

    def __init__(self, layout: str):
        self.layout = layout

    def prepare(self, cfg: DictConfig) -> None:
        xml, synthetic = cfg.data.xml, cfg.data.synthetic
        if xml.val_blacklist and self.layout != "imagenet_det":
            raise ConfigError(f"data.xml.val_blacklist={xml.val_blacklist!r} is ImageNet DET's validation blacklist; "
                              f"fix: data.xml.val_blacklist='' for data.format={self.layout}")
        if synthetic.enabled:
            paths = _materialise(functools.partial(
                make_synthetic_voc, f"{synthetic.root}_{self.layout}", num_train=synthetic.num_train,
                num_val=synthetic.num_val, image_size=synthetic.image_size, seed=cfg.seed, layout=self.layout))
            xml.train_sets, xml.val_sets = paths["train_sets"], paths["val_sets"]
            xml.synsets_file = paths["synsets_file"]
            if self.layout == "voc":
                xml.class_names = paths["class_names"]
            return
        layout = XML_LAYOUTS[self.layout]
        if not xml.train_sets or not xml.val_sets:
            raise DataNotFoundError(f"data.format={self.layout} needs data.xml.train_sets and data.xml.val_sets "
                                    f"(ROOT:SPLIT lists); got {list(xml.train_sets)} and {list(xml.val_sets)}\n"
                                    f"{layout}\n{DEMO_HINT}")
        missing = []  # the folders; their files are checked when the sets load
        for spec in [*xml.train_sets, *xml.val_sets]:
            image_set = parse_set_spec(spec, self.layout)
            for folder in (image_set.image_set_dir, image_set.annotation_dir, image_set.image_dir):
                if not os.path.isdir(folder) and folder not in missing:
                    missing.append(folder)
        if xml.val_blacklist and not os.path.isfile(xml.val_blacklist):
            missing.append(xml.val_blacklist)
        if missing:
            raise _not_found(missing, f"{layout}\n  (or set data.xml.train_sets / data.xml.val_sets"
                             f"{' / data.xml.val_blacklist' if xml.val_blacklist else ''})\n{DEMO_HINT}")
        if xml.val_blacklist:  # its lines now, not after the training sets' XML (half a minute at ILSVRC scale)
            read_det_blacklist(xml.val_blacklist)

    def _load(self, cfg: DictConfig, sets, transform, train: bool, class_names=None) -> VocDetection:
        d, xml = cfg.data, cfg.data.xml
        return VocDetection(sets, self.layout, class_names=class_names or list(xml.class_names) or None,
                            synsets_file=xml.synsets_file, difficult=xml.train_difficult if train else "ignore",
                            transform=transform, skip_corrupt=d.skip_corrupt,
                            filter_empty=train and d.filter_empty_train,
                            strict=d.strict_train if train else d.strict_val, verify=d.verify_images,
                            blacklist="" if train else xml.val_blacklist, evaluation_index=not train)

    def build(self, cfg: DictConfig, train: bool = True):
        xml = cfg.data.xml
        train_transform, val_transform = _transforms(cfg)
        if not train:
            return None, self._load(cfg, xml.val_sets, val_transform, train=False)
        train_set = self._load(cfg, xml.train_sets, train_transform, train=True)
        # the training sets fix the class list (ImageNet DET without a synsets file: the wnids found there)
        return train_set, self._load(cfg, xml.val_sets, val_transform, train=False,
                                     class_names=train_set.xml_class_names)

    def source(self, cfg: DictConfig, split: str) -> str:
        return " + ".join(cfg.data.xml[f"{split}_sets"])

    def metric(self, cfg: DictConfig) -> str:
        """``eval.voc_metric``; ``auto``: the 11-point AP for VOC2007 sets (as the VOC2007 devkit scores them;
        the paper does not say which it used for its Table 7), the area under the curve otherwise."""
        if cfg.eval.voc_metric != "auto":
            return str(cfg.eval.voc_metric)
        roots = [os.path.basename(parse_set_spec(s, self.layout).root) for s in cfg.data.xml.val_sets]
        return "voc07" if self.layout == "voc" and all(r == "VOC2007" for r in roots) else "area"

    def evaluators(self, cfg: DictConfig, dataset, output_dir: str | None) -> list:
        only_processed = cfg.eval.only_processed_images
        evaluators = [VOCEvaluator(ground_truth_from_coco(dataset.coco, dataset.cat_id_to_contiguous),
                                   dataset.class_names, protocol="voc" if self.layout == "voc" else "imagenet",
                                   metric=self.metric(cfg), output_dir=output_dir, image_names=dataset.image_names,
                                   only_processed=only_processed)]
        if cfg.eval.coco_metrics:
            evaluators.append(COCOEvaluator(dataset.coco, dataset.contiguous_to_cat_id, dataset.class_names,
                                            only_processed=only_processed, workers=cfg.data.workers))
        return evaluators


FORMATS: dict[str, DatasetFormat] = {"coco": CocoFormat(), "voc": XmlFormat("voc"),
                                     "imagenet_det": XmlFormat("imagenet_det")}


def dataset_format(cfg: DictConfig) -> DatasetFormat:
    return FORMATS[str(cfg.data.format)]  # data.format is checked against DataFormat when the config loads


def prepare_data_paths(cfg: DictConfig) -> None:
    dataset_format(cfg).prepare(cfg)


def build_datasets(cfg: DictConfig, train: bool = True):
    return dataset_format(cfg).build(cfg, train)


def data_source(cfg: DictConfig, split: str) -> str:
    return dataset_format(cfg).source(cfg, split)


def build_evaluators(cfg: DictConfig, dataset, output_dir: str | None = None) -> list:
    return dataset_format(cfg).evaluators(cfg, dataset, output_dir)


def val_loader(cfg: DictConfig, dataset) -> DataLoader:
    """The evaluation loader: in order, sharded over ranks, ``eval.batch_size`` images per step in all."""
    world_size = get_world_size()
    sampler = build_batch_sampler(dataset.aspect_ratios(), max(1, cfg.eval.batch_size // world_size),
                                  shuffle=False, seed=0, distributed=world_size > 1, drop_last=False)
    return worker_loader(dataset, cfg.data.workers, batch_sampler=sampler,
                         collate_fn=functools.partial(collate_detection, size_divisibility=cfg.data.size_divisibility),
                         worker_init_fn=ignore_stop_signals)
