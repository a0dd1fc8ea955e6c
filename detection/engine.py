"""Detection training and evaluation loops (iteration-based, like Detectron2's), DDP-ready."""
from __future__ import annotations

import functools
import os
import random

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from backbones.engine.config import ConfigError, to_yaml
from backbones.engine.dist import all_gather_object, barrier, get_world_size, init_distributed, is_main_process, reduce_sum
from backbones.engine.precision import check_solver
from backbones.engine.run import RunFolder, progress_bar
from backbones.engine.solver import describe_scaling, lr_multiplier, scaled_lr
from backbones.engine.trainer import Trainer, distribute, sgd
from backbones.engine.state import (should_resume, atomic_save, keyed_generator, restore_training_state, rng_state,
                                   seed_everything, training_state, unwrap)

from .data.batching import build_batch_sampler, collate_detection
from .data.coco import CocoDetection, DatasetError
from .data.report import class_box_counts
from .data.synthetic import make_synthetic_coco, make_synthetic_voc
from .data.transforms import build_transform
from .data.voc import LAYOUTS as XML_LAYOUTS, VocDetection, parse_set_spec
from .evaluation.coco_eval import COCOEvaluator
from .evaluation.tables import format_metrics_table
from .evaluation.voc_eval import VOCEvaluator, ground_truth_from_coco
from .modeling.build import build_detector
from .postprocessing import target_to_original
from .modeling.test_time import for_testing, options_from_config

DEMO_HINT = "  to try resdet without any download: python tools/train_det.py configs/frcnn_demo.yaml"
COCO_LAYOUT = ("  expected layout:\n"
               "    datasets/coco/train2017/*.jpg\n"
               "    datasets/coco/val2017/*.jpg\n"
               "    datasets/coco/annotations/instances_{train,val}2017.json\n"
               "  (or set data.train_images / data.train_annotations / data.val_images / data.val_annotations)\n"
               + DEMO_HINT)


class DataNotFoundError(FileNotFoundError):
    """The configured dataset is not on disk."""


def prepare_data_paths(cfg: DictConfig) -> None:
    """Materialise the synthetic set if asked; otherwise fail at once when files are missing."""
    d = cfg.data
    if d.format != "coco":
        _prepare_xml_sets(cfg)
        return
    if d.synthetic:
        make = functools.partial(make_synthetic_coco, d.synthetic_root, num_train=d.synthetic_num_train,
                                 num_val=d.synthetic_num_val, image_size=d.synthetic_image_size, seed=cfg.seed)
        if is_main_process():
            make()
        barrier()
        paths = make()  # complete on disk by now: only returns the paths
        d.train_images, d.train_annotations = paths["train_images"], paths["train_annotations"]
        d.val_images, d.val_annotations = paths["val_images"], paths["val_annotations"]
        return
    missing = [p for p in (d.train_images, d.train_annotations, d.val_images, d.val_annotations) if not os.path.exists(p)]
    if missing:
        raise DataNotFoundError("dataset not found; looked for:\n    " + "\n    ".join(os.path.abspath(p) for p in missing)
                                + "\n" + COCO_LAYOUT)


def _prepare_xml_sets(cfg: DictConfig) -> None:
    """PASCAL VOC / ImageNet DET: check that every set's folders are there (their files are checked when
    the sets are loaded; data.format and the other fixed choices when the config loads)."""
    d = cfg.data
    if d.synthetic:
        make = functools.partial(make_synthetic_voc, f"{d.synthetic_root}_{d.format}", num_train=d.synthetic_num_train,
                                 num_val=d.synthetic_num_val, image_size=d.synthetic_image_size, seed=cfg.seed,
                                 layout=d.format)
        if is_main_process():
            make()
        barrier()
        paths = make()
        d.train_sets, d.val_sets, d.synsets_file = paths["train_sets"], paths["val_sets"], paths["synsets_file"]
        if d.format == "voc":
            d.class_names = paths["class_names"]
        return
    layout = XML_LAYOUTS[d.format]
    if not d.train_sets or not d.val_sets:
        raise DataNotFoundError(f"data.format={d.format} needs data.train_sets and data.val_sets (ROOT:SPLIT lists); "
                                f"got {list(d.train_sets)} and {list(d.val_sets)}\n{layout}\n{DEMO_HINT}")
    missing = []
    for spec in [*d.train_sets, *d.val_sets]:
        image_set = parse_set_spec(spec, d.format)
        for folder in (image_set.image_set_dir, image_set.annotation_dir, image_set.image_dir):
            if not os.path.isdir(folder) and folder not in missing:
                missing.append(folder)
    if missing:
        raise DataNotFoundError("dataset not found; looked for:\n    " + "\n    ".join(os.path.abspath(p) for p in missing)
                                + f"\n{layout}\n  (or set data.train_sets / data.val_sets)\n{DEMO_HINT}")


def data_source(cfg: DictConfig, split: str) -> str:
    """What a split is read from, for messages and the summary."""
    d = cfg.data
    if d.format == "coco":
        return os.path.abspath(d[f"{split}_annotations"])
    return " + ".join(d[f"{split}_sets"])


def _xml_dataset(cfg: DictConfig, sets, transform, train: bool, class_names=None) -> VocDetection:
    d = cfg.data
    dataset = VocDetection(sets, d.format, class_names=class_names or list(d.class_names) or None,
                           synsets_file=d.synsets_file, difficult=d.train_difficult if train else "ignore",
                           transform=transform, skip_corrupt=d.skip_corrupt, filter_empty=train and d.filter_empty_train,
                           strict=d.strict_train if train else d.strict_val, verify=d.verify_images)
    metric = cfg.eval.voc_metric
    if metric == "auto":
        roots = [os.path.basename(parse_set_spec(s, d.format).root) for s in sets]
        metric = "voc07" if d.format == "voc" and all(r == "VOC2007" for r in roots) else "area"
    # How this set is scored travels with it, so evaluate() (and tools/eval_det.py) need no new argument.
    dataset.eval_options = {"protocol": "voc" if d.format == "voc" else "imagenet", "metric": metric,
                            "coco": bool(cfg.eval.coco_metrics)}
    return dataset


def _build_xml_datasets(cfg: DictConfig, train: bool):
    d = cfg.data
    val_transform = build_transform((d.min_size_test,), d.max_size_test, 0.0, train=False)
    if not train:
        return None, _xml_dataset(cfg, d.val_sets, val_transform, train=False)
    train_set = _xml_dataset(cfg, d.train_sets, build_transform(tuple(d.min_size_train), d.max_size_train,
                                                                d.flip_prob, train=True), train=True)
    # the training sets fix the class list (ImageNet DET without a synsets file: the wnids found there)
    val_set = _xml_dataset(cfg, d.val_sets, val_transform, train=False, class_names=train_set.xml_class_names)
    return train_set, val_set


def build_datasets(cfg: DictConfig, train: bool = True):
    """(train set or None, val set). Both are checked before either raises, so one run lists the problems
    of both (``data.strict_train`` / ``data.strict_val`` false: dropped and counted instead)."""
    d = cfg.data
    if d.format != "coco":
        return _build_xml_datasets(cfg, train)
    errors: list[str] = []

    def load(split: str, transform, strict: bool, filter_empty: bool = False):
        try:
            return CocoDetection(d[f"{split}_images"], d[f"{split}_annotations"], transform=transform,
                                 skip_corrupt=d.skip_corrupt, filter_empty=filter_empty, strict=strict,
                                 verify=d.verify_images)
        except DatasetError as exc:
            errors.append(f"{split} set: {exc}")
            return None

    val_set = load("val", build_transform((d.min_size_test,), d.max_size_test, 0.0, train=False), d.strict_val)
    train_set = load("train", build_transform(tuple(d.min_size_train), d.max_size_train, d.flip_prob, train=True),
                     d.strict_train, d.filter_empty_train) if train else None
    if errors:
        raise DatasetError("\n\n".join(errors))
    if train_set is not None and train_set.class_names != val_set.class_names:
        raise ValueError(f"{d.train_annotations} and {d.val_annotations} have different categories")
    return train_set, val_set


def val_loader(cfg: DictConfig, dataset) -> DataLoader:
    sampler = build_batch_sampler(dataset.aspect_ratios(), max(1, cfg.eval.batch_size // get_world_size()),
                                  shuffle=False, seed=0, distributed=get_world_size() > 1, drop_last=False)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.workers,
                      collate_fn=functools.partial(collate_detection, size_divisibility=cfg.data.size_divisibility))


@torch.no_grad()
def evaluate(model, loader: DataLoader, dataset, device, output_dir: str | None, amp_dtype=None,
             progress: bool = True, only_processed: bool = False) -> dict:
    """COCO-evaluate ``model`` on ``loader`` (sharded over ranks; gathered and scored on rank 0).

    A PASCAL VOC / ImageNet DET dataset (a :class:`VocDetection` from :func:`build_datasets`) is scored
    with :class:`VOCEvaluator` instead: ``metrics["AP"]`` is then its mAP at IoU 0.5 (11-point or area,
    per ``eval.voc_metric``), the key the training loop keeps best.pth by; pycocotools' metrics on the
    same detections are under ``metrics["coco"]`` when ``eval.coco_metrics`` is set.

    Every image of the set is scored; one that could not be read counts as an image without detections
    (``metrics["num_unprocessed"]``), unless ``only_processed`` (``eval.only_processed_images``)."""
    options = getattr(dataset, "eval_options", None)
    if options is None:
        evaluators = [COCOEvaluator(dataset.coco, dataset.contiguous_to_cat_id, dataset.class_names,
                                    output_dir=output_dir, only_processed=only_processed)]
    else:
        evaluators = [VOCEvaluator(ground_truth_from_coco(dataset.coco, dataset.cat_id_to_contiguous),
                                   dataset.class_names, protocol=options["protocol"], metric=options["metric"],
                                   output_dir=output_dir, image_names=getattr(dataset, "image_names", None),
                                   only_processed=only_processed)]
        if options["coco"]:
            evaluators.append(COCOEvaluator(dataset.coco, dataset.contiguous_to_cat_id, dataset.class_names,
                                            only_processed=only_processed))
    model = unwrap(model)
    was_training = model.training
    model.eval()
    skipped = 0
    for batch in progress_bar(iterable=loader, desc="eval", disable=not (progress and is_main_process())):
        skipped += batch["num_skipped"]
        if not batch["targets"]:
            continue
        batch["images"] = batch["images"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            detections = model(batch)
        originals = [target_to_original(det, t) for det, t in zip(detections, batch["targets"])]
        for evaluator in evaluators:
            evaluator.process(batch["targets"], originals)
    model.train(was_training)
    metrics = evaluators[0].evaluate()
    if len(evaluators) > 1:
        coco_metrics = evaluators[1].evaluate()  # every rank takes part in the gather
        if metrics:
            metrics["coco"] = coco_metrics
    skipped = int(reduce_sum({"s": skipped}, device)["s"])
    if metrics is not None and is_main_process():
        metrics["skipped_corrupt"] = skipped
    return metrics or {}


def apply_epoch_schedule(cfg: DictConfig, iters_per_epoch: int) -> str | None:
    """With ``solver.epochs`` > 0, set max_iter, steps and the evaluation period from epochs (in place, so
    the run's config.yaml records them). Returns a line for the log, or None with an iteration schedule."""
    s = cfg.solver
    if s.epochs <= 0:
        return None
    if any(not 0 < e < s.epochs for e in s.step_epochs):
        raise ConfigError(f"solver.step_epochs {list(s.step_epochs)}: each must lie between 0 and solver.epochs "
                          f"({s.epochs})")
    s.max_iter = s.epochs * iters_per_epoch
    s.steps = [round(e * iters_per_epoch) for e in s.step_epochs]
    if cfg.eval.period_epochs > 0:
        cfg.eval.period = cfg.eval.period_epochs * iters_per_epoch
    return (f"schedule in epochs: {s.epochs} epochs x {iters_per_epoch} iterations = {s.max_iter} iterations, "
            f"lr steps at {list(s.steps)}, evaluation every {cfg.eval.period or 'end only'} iterations")


class EpochSeeded(torch.utils.data.Dataset):
    """Seeds Python's ``random`` (which the detection transforms draw from) per (seed, epoch, index), so
    augmentation does not depend on workers or ranks, and a resumed run sees the same images."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        random.seed(hash((self.seed, self.epoch, index)))
        return self.dataset[index]


class SkipBatches:
    """A batch sampler that starts ``skip`` batches into its epoch (exact mid-epoch resumption)."""

    def __init__(self, batch_sampler, skip: int):
        self.batch_sampler, self.skip = batch_sampler, skip

    def __iter__(self):
        for i, batch in enumerate(self.batch_sampler):
            if i >= self.skip:
                yield batch

    def __len__(self):
        return max(0, len(self.batch_sampler) - self.skip)


def train(cfg: DictConfig, run_name: str) -> dict:
    rank, world_size, device = init_distributed()
    if cfg.device == "cpu":
        device = torch.device("cpu")
    s = cfg.solver
    amp_dtype = check_solver(s, world_size)
    prepare_data_paths(cfg)
    train_set, val_set = build_datasets(cfg)  # annotation problems surface here, before any training
    per_rank_batch = s.batch_size // world_size
    batch_sampler = build_batch_sampler(train_set.aspect_ratios(), per_rank_batch, shuffle=True, seed=cfg.seed,
                                        distributed=world_size > 1, drop_last=True)
    iters_per_epoch = len(batch_sampler)
    if iters_per_epoch == 0:
        raise ValueError(f"{data_source(cfg, 'train')}: fewer training images than one batch of {per_rank_batch}")
    epoch_schedule = apply_epoch_schedule(cfg, iters_per_epoch)  # before config.yaml is written
    run = RunFolder(cfg.output_dir or os.path.join("runs", run_name), cfg)
    log = run.logger
    seed_everything(cfg.seed + rank)

    model = build_detector(cfg.model, num_classes=len(train_set.class_names)).to(device)
    ddp_model = distribute(model, device, world_size, s.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = scaled_lr(s)
    optimizer, scheduler, scaler = sgd(params, lr, s.momentum, s.weight_decay, lambda it: lr_multiplier(
        it, s.steps, s.gamma, s.warmup_iters, s.warmup_factor), device, s.amp)

    seeded_train_set = EpochSeeded(train_set, cfg.seed)
    collate = functools.partial(collate_detection, size_divisibility=cfg.data.size_divisibility)

    start_iter, best_ap, skipped_total = 0, -1.0, 0
    if should_resume(cfg.resume, run.last_checkpoint):
        state = restore_training_state(run.last_checkpoint, model, optimizer, scheduler, scaler, rank)
        start_iter, best_ap, skipped_total = state["iteration"], state["best_ap"], state["skipped_corrupt"]
        log.info("resumed from %s at iteration %d", run.last_checkpoint, start_iter)

    log.info("training %s on %d images (%d classes), %d ranks x %d images, lr %.5f, %d iterations",
             run_name, len(train_set), len(train_set.class_names), world_size, per_rank_batch, lr, s.max_iter)
    log.info(describe_scaling(s, world_size))
    if epoch_schedule:
        log.info(epoch_schedule)
    counts = class_box_counts(train_set)
    log.info("classes (training boxes): %s", ", ".join(f"{name} ({n})" for name, n in counts.items()))
    if missing := [name for name, n in counts.items() if n == 0]:
        log.warning("classes without a single training box (they cannot be learned): %s", ", ".join(missing))
    if train_set.stats.get("degenerate_boxes_dropped"):
        log.info("dropped %d degenerate boxes from %s", train_set.stats["degenerate_boxes_dropped"],
                 data_source(cfg, "train"))

    def save_state(iteration: int) -> None:
        rngs = all_gather_object(rng_state())
        if is_main_process():
            atomic_save(training_state(
                model, optimizer, scheduler, scaler, iteration, rngs, best_ap=best_ap,
                skipped_corrupt=trainer.skipped, config=to_yaml(cfg), class_names=list(train_set.class_names),
                contiguous_to_cat_id={int(k): int(v) for k, v in train_set.contiguous_to_cat_id.items()},
            ), run.last_checkpoint)

    loader_val = val_loader(cfg, val_set)

    def run_eval(iteration: int) -> dict:
        # the run's test-time additions (eval.box_refinement / test_scales / flip), if any, apply here too
        tester = for_testing([model], options_from_config(cfg.eval), cfg.data.min_size_test, cfg.data.size_divisibility)
        metrics = evaluate(tester if tester is not model else ddp_model, loader_val, val_set, device,
                           run.dir if is_main_process() else None, amp_dtype,
                           only_processed=cfg.eval.only_processed_images)
        if is_main_process() and metrics:
            run.log_metrics(iteration, {k: v for k, v in metrics.items() if not isinstance(v, dict)}, prefix="val/")
            log.info("iteration %d %s val:\n%s", iteration, cfg.data.format.upper(), format_metrics_table(metrics))
        return metrics

    def keep_best(metrics: dict, iteration: int, best: float) -> float:
        """best.pth: the weights of the evaluation with the highest AP so far (the final one included)."""
        if not metrics or metrics["AP"] <= best:
            return best
        if is_main_process():
            atomic_save({"model": model.state_dict(), "iteration": iteration, "AP": metrics["AP"],
                         "class_names": list(train_set.class_names)}, run.best_checkpoint)
        return metrics["AP"]

    def loader(epoch: int, offset: int) -> DataLoader:
        batch_sampler.set_epoch(epoch)
        seeded_train_set.epoch = epoch
        return DataLoader(seeded_train_set, batch_sampler=SkipBatches(batch_sampler, offset), collate_fn=collate,
                          num_workers=cfg.data.workers, pin_memory=device.type == "cuda",
                          generator=keyed_generator(cfg.seed, epoch, rank))

    def prepare(batch: dict, iteration: int):
        # When every image of this rank's (or another rank's) batch was unreadable (counted), the step is
        # spent untrained, so that iterations still map to epochs exactly.
        if not batch["targets"]:
            return None, 0, batch["num_skipped"]
        batch["images"] = batch["images"].to(device, non_blocking=True)
        # anchor and RoI sampling keyed by the iteration: a run resumed anywhere samples what it would have
        model.set_sampling_generator(keyed_generator(cfg.seed, iteration, rank, device=device))
        for t in batch["targets"]:
            for key in ("boxes", "labels", "crowd_boxes"):
                t[key] = t[key].to(device, non_blocking=True)
        return batch, len(batch["targets"]), batch["num_skipped"]

    trainer = Trainer(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, device=device,
                      amp_dtype=amp_dtype, run=run, max_iter=s.max_iter, iters_per_epoch=iters_per_epoch,
                      loader=loader, prepare=prepare, forward=ddp_model, save_state=save_state,
                      checkpoint=run.last_checkpoint, log_period=cfg.log_period, checkpoint_period=cfg.checkpoint_period,
                      params=params, clip_grad_norm=s.clip_grad_norm, debug_stop_at_iter=cfg.debug_stop_at_iter,
                      log_extra=lambda it: {"skipped_corrupt": trainer.skipped}, desc="train_det")
    trainer.skipped = skipped_total

    def periodic_eval(iteration: int) -> None:
        nonlocal best_ap
        if cfg.eval.period and iteration % cfg.eval.period == 0 and iteration < s.max_iter:
            best_ap = keep_best(run_eval(iteration), iteration, best_ap)

    trainer.after_step_hooks.append(periodic_eval)
    iteration = trainer.train(start_iter)
    save_state(iteration)
    metrics = run_eval(iteration)
    best_ap = keep_best(metrics, iteration, best_ap)
    # "val": the evaluator's metrics; data_format says which (COCO for coco, VOC/ImageNet-DET mAP for the XML formats)
    summary = {"task": "detection", "iterations": iteration, "class_names": list(train_set.class_names),
               "val": metrics, "data_format": cfg.data.format, "last_checkpoint": run.last_checkpoint,
               "skipped_corrupt_train": trainer.skipped,
               "best_checkpoint": run.best_checkpoint if best_ap >= 0 else None, "best_AP": best_ap if best_ap >= 0 else None, "val_annotations": data_source(cfg, "val"),
               # records and images dropped at load (data.strict_train/strict_val false), per kind of problem
               "data_problems": {"train": train_set.stats.get("problems", {}), "val": val_set.stats.get("problems", {})}}
    summary = run.write_summary(summary)
    run.close()
    return summary
