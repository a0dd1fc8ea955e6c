"""Detection training (iteration-based, like Detectron2's, DDP-ready): builds the run from its config and hands
the loop to :class:`backbones.engine.trainer.Trainer`. The data formats live behind
:mod:`detection.data.build`, the evaluation loop in :mod:`detection.evaluation.loop`."""
from __future__ import annotations

import functools
import os
import random

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from backbones.engine.config import ConfigError, to_yaml
from backbones.engine.dist import all_gather_object, init_distributed, is_main_process
from backbones.engine.errors import DatasetError
from backbones.engine.loader import SpanningBatchSampler, epoch_and_index, run_loader
from backbones.engine.precision import STEP_HINT, check_solver
from backbones.engine.run import RunFolder
from backbones.engine.solver import describe_scaling, lr_multiplier, scaled_lr
from backbones.engine.trainer import Trainer, distribute, sgd
from backbones.engine.state import (should_resume, atomic_save, keyed_generator, restore_training_state, rng_state,
                                   seed_everything, training_state)

from .data.batching import build_batch_sampler, collate_detection
from .data.build import build_datasets, build_evaluators, data_source, prepare_data_paths, val_loader
from .data.report import class_box_counts
from .evaluation.loop import evaluate
from .evaluation.tables import format_metrics_table
from .modeling.build import build_detector, unnormalised_backbone
from .modeling.test_time import for_testing, options_from_config


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
    """Items keyed by ``(epoch, index)``; seeds Python's ``random`` (which the detection transforms draw
    from) per (seed, epoch, index), so augmentation does not depend on workers or ranks, and a resumed
    run sees the same images."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = epoch_and_index(key)
        random.seed(hash((self.seed, epoch, index)))
        return self.dataset[index]


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
        raise DatasetError(f"{data_source(cfg, 'train')}: fewer training images than one batch of {per_rank_batch}")
    epoch_schedule = apply_epoch_schedule(cfg, iters_per_epoch)  # before config.yaml is written
    run = RunFolder(cfg.output_dir or os.path.join("runs", run_name), cfg)
    log = run.logger
    seed_everything(cfg.seed + rank)

    model = build_detector(cfg.model, num_classes=len(train_set.class_names)).to(device)
    ddp_model = distribute(model, device, world_size, s.channels_last, compile=s.compile)
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
    if unnormalised := unnormalised_backbone(cfg.model.backbone):
        log.warning(unnormalised)
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
    evaluators = build_evaluators(cfg, val_set, run.dir if is_main_process() else None)

    def run_eval(iteration: int) -> dict:
        # the run's test-time additions (eval.box_refinement / test_scales / flip), if any, apply here too
        tester = for_testing([model], options_from_config(cfg.eval), cfg.data.min_size_test, cfg.data.size_divisibility)
        metrics = evaluate(tester if tester is not model else ddp_model, loader_val, evaluators, device, amp_dtype)
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
        batches = SpanningBatchSampler(batch_sampler, iters_per_epoch, epoch, offset, s.max_iter)
        return run_loader(seeded_train_set, batches, collate, cfg.data.workers, device,
                          keyed_generator(cfg.seed, epoch, rank))

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
                      log_extra=lambda it: {"skipped_corrupt": trainer.skipped}, desc="train_det",
                      hint=f"{unnormalised}; or {STEP_HINT}" if unnormalised else STEP_HINT)
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
