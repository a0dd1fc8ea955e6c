"""Detection training and evaluation loops (iteration-based, like Detectron2's), DDP-ready."""
from __future__ import annotations

import functools
import os
import random
import time

import torch
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from backbones.engine.config import to_yaml
from backbones.engine.dist import (all_gather_object, barrier, get_world_size, init_distributed, is_main_process,
                                   reduce_mean, reduce_sum)
from backbones.engine.precision import check_solver
from backbones.engine.run import RunFolder, progress_bar
from backbones.engine.state import (atomic_save, restore_training_state, rng_state, seed_everything, training_state,
                                   unwrap)

from .data.batching import build_batch_sampler, collate_detection
from .data.coco import CocoDetection
from .data.synthetic import make_synthetic_coco
from .data.transforms import boxes_to_original, build_transform
from .evaluation.coco_eval import COCOEvaluator, format_metrics_table
from .modeling.build import build_detector

COCO_LAYOUT = ("  expected layout:\n"
               "    datasets/coco/train2017/*.jpg\n"
               "    datasets/coco/val2017/*.jpg\n"
               "    datasets/coco/annotations/instances_{train,val}2017.json\n"
               "  (or set data.train_images / data.train_annotations / data.val_images / data.val_annotations)\n"
               "  to try resdet without any download: python tools/train_det.py configs/frcnn_demo.yaml")


class DataNotFoundError(FileNotFoundError):
    """The configured dataset is not on disk."""


def prepare_data_paths(cfg: DictConfig) -> None:
    """Materialise the synthetic set if asked; otherwise fail at once when files are missing."""
    d = cfg.data
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


def build_datasets(cfg: DictConfig, train: bool = True):
    d = cfg.data
    val_set = CocoDetection(d.val_images, d.val_annotations,
                            transform=build_transform((d.min_size_test,), d.max_size_test, 0.0, train=False),
                            skip_corrupt=d.skip_corrupt)
    if not train:
        return None, val_set
    train_set = CocoDetection(d.train_images, d.train_annotations,
                              transform=build_transform(tuple(d.min_size_train), d.max_size_train, d.flip_prob, train=True),
                              skip_corrupt=d.skip_corrupt, filter_empty=d.filter_empty_train)
    if train_set.class_names != val_set.class_names:
        raise ValueError(f"{d.train_annotations} and {d.val_annotations} have different categories")
    return train_set, val_set


def val_loader(cfg: DictConfig, dataset) -> DataLoader:
    sampler = build_batch_sampler(dataset.aspect_ratios(), max(1, cfg.eval.batch_size // get_world_size()),
                                  shuffle=False, seed=0, distributed=get_world_size() > 1, drop_last=False)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.workers,
                      collate_fn=functools.partial(collate_detection, size_divisibility=cfg.data.size_divisibility))


@torch.no_grad()
def evaluate(model, loader: DataLoader, dataset, device, output_dir: str | None, amp_dtype=None,
             progress: bool = True) -> dict:
    """COCO-evaluate ``model`` on ``loader`` (sharded over ranks; gathered and scored on rank 0)."""
    evaluator = COCOEvaluator(dataset.coco, dataset.contiguous_to_cat_id, dataset.class_names, output_dir=output_dir)
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
        evaluator.process(batch["targets"], [to_original(det, t) for det, t in zip(detections, batch["targets"])])
    model.train(was_training)
    metrics = evaluator.evaluate()
    skipped = int(reduce_sum({"s": skipped}, device)["s"])
    if metrics is not None and is_main_process():
        metrics["skipped_corrupt"] = skipped
    return metrics or {}


def to_original(det: dict, target: dict) -> dict:
    """Map one image's detections from the network's (resized, maybe flipped) frame to the file's."""
    h, w = target["orig_size"]
    boxes = boxes_to_original(det["boxes"].float().cpu(), target["scale"], target["flipped"],
                              transformed_width=w * target["scale"][1])
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    return {"boxes": boxes, "scores": det["scores"].float().cpu(), "labels": det["labels"].cpu()}


def lr_factor(cfg: DictConfig, iteration: int) -> float:
    s = cfg.solver
    factor = s.gamma ** sum(iteration >= step for step in s.steps)
    if iteration < s.warmup_iters:
        alpha = iteration / s.warmup_iters
        factor *= s.warmup_factor * (1 - alpha) + alpha
    return factor


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
    run = RunFolder(cfg.output_dir or os.path.join("runs", run_name), cfg)
    log = run.logger
    seed_everything(cfg.seed + rank)

    model = build_detector(cfg.model, num_classes=len(train_set.class_names)).to(device)
    if s.channels_last:
        model.to(memory_format=torch.channels_last)
    ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=False) if world_size > 1 else model
    params = [p for p in model.parameters() if p.requires_grad]
    lr = s.base_lr * s.batch_size / s.reference_batch_size
    optimizer = torch.optim.SGD(params, lr=lr, momentum=s.momentum, weight_decay=s.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(cfg, it))
    scaler = torch.amp.GradScaler(device.type, enabled=s.amp == "fp16")

    per_rank_batch = s.batch_size // world_size
    batch_sampler = build_batch_sampler(train_set.aspect_ratios(), per_rank_batch, shuffle=True, seed=cfg.seed,
                                        distributed=world_size > 1, drop_last=True)
    iters_per_epoch = len(batch_sampler)
    if iters_per_epoch == 0:
        raise ValueError(f"{cfg.data.train_annotations}: fewer training images than one batch of {per_rank_batch}")
    seeded_train_set = EpochSeeded(train_set, cfg.seed)
    collate = functools.partial(collate_detection, size_divisibility=cfg.data.size_divisibility)

    start_iter, best_ap, skipped_total = 0, -1.0, 0
    if cfg.resume and os.path.isfile(run.last_checkpoint):
        state = restore_training_state(run.last_checkpoint, model, optimizer, scheduler, scaler, rank)
        start_iter, best_ap, skipped_total = state["iteration"], state["best_ap"], state["skipped_corrupt"]
        log.info("resumed from %s at iteration %d", run.last_checkpoint, start_iter)

    log.info("training %s on %d images (%d classes), %d ranks x %d images, lr %.5f, %d iterations",
             run_name, len(train_set), len(train_set.class_names), world_size, per_rank_batch, lr, s.max_iter)
    if train_set.stats.get("degenerate_boxes_dropped"):
        log.info("dropped %d degenerate boxes from %s", train_set.stats["degenerate_boxes_dropped"],
                 cfg.data.train_annotations)

    def save_state(iteration: int) -> None:
        rngs = all_gather_object(rng_state())
        if is_main_process():
            atomic_save(training_state(
                model, optimizer, scheduler, scaler, iteration, rngs, best_ap=best_ap,
                skipped_corrupt=skipped_total, config=to_yaml(cfg), class_names=list(train_set.class_names),
                contiguous_to_cat_id={int(k): int(v) for k, v in train_set.contiguous_to_cat_id.items()},
            ), run.last_checkpoint)

    loader_val = val_loader(cfg, val_set)

    def run_eval(iteration: int) -> dict:
        metrics = evaluate(ddp_model, loader_val, val_set, device, run.dir if is_main_process() else None, amp_dtype)
        if is_main_process() and metrics:
            run.log_metrics(iteration, {k: v for k, v in metrics.items() if not isinstance(v, dict)}, prefix="val/")
            log.info("iteration %d COCO val:\n%s", iteration, format_metrics_table(metrics))
        return metrics

    iteration = start_iter
    progress = progress_bar(total=s.max_iter, initial=start_iter, desc="train_det")
    window: dict[str, float] = {}
    window_n, window_images, window_start = 0, 0, time.time()
    metrics: dict = {}
    model.train()
    while iteration < s.max_iter:
        epoch, offset = divmod(iteration, iters_per_epoch)
        batch_sampler.set_epoch(epoch)
        seeded_train_set.epoch = epoch
        loader = DataLoader(seeded_train_set, batch_sampler=SkipBatches(batch_sampler, offset), collate_fn=collate,
                            num_workers=cfg.data.workers, pin_memory=device.type == "cuda")
        for batch in loader:
            skipped_total += batch["num_skipped"]
            if not batch["targets"]:  # every image was unreadable (counted): the step is spent, untrained,
                scheduler.step()  # so that iterations still map to epochs exactly
                iteration += 1
                progress.update(1)
                continue
            batch["images"] = batch["images"].to(device, non_blocking=True)
            for t in batch["targets"]:
                for key in ("boxes", "labels", "crowd_boxes"):
                    t[key] = t[key].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                losses = ddp_model(batch)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at iteration {iteration} "
                                         f"({ {k: float(v) for k, v in losses.items()} }); lower solver.base_lr, "
                                         "add solver.warmup_iters or set solver.clip_grad_norm")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if s.clip_grad_norm > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, s.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            iteration += 1
            progress.update(1)
            for k, v in losses.items():
                window[k] = window.get(k, 0.0) + float(v.detach())
            window_n += 1
            window_images += len(batch["targets"])
            if cfg.debug_stop_at_iter and iteration == cfg.debug_stop_at_iter:
                os._exit(3)  # simulate a killed process
            if iteration % cfg.log_period == 0 or iteration == s.max_iter:
                avg = reduce_mean({k: v / window_n for k, v in window.items()}, device)
                avg["loss"] = sum(avg.values())
                img_s = reduce_sum({"n": window_images}, device)["n"] / max(time.time() - window_start, 1e-9)
                progress.set_postfix(loss=f"{avg['loss']:.3f}", img_s=f"{img_s:.1f}")
                run.log_metrics(iteration, dict(avg, lr=optimizer.param_groups[0]["lr"], img_per_s=img_s,
                                                skipped_corrupt=skipped_total), prefix="train/")
                window, window_n, window_images, window_start = {}, 0, 0, time.time()
            if iteration % cfg.checkpoint_period == 0 or iteration == s.max_iter:
                save_state(iteration)
            if cfg.eval.period and iteration % cfg.eval.period == 0 and iteration < s.max_iter:
                metrics = run_eval(iteration)
                if metrics and metrics["AP"] > best_ap:
                    best_ap = metrics["AP"]
                    if is_main_process():
                        atomic_save({"model": model.state_dict(), "iteration": iteration, "AP": best_ap,
                                     "class_names": list(train_set.class_names)}, run.best_checkpoint)
            if iteration >= s.max_iter:
                break
    progress.close()
    save_state(iteration)
    metrics = run_eval(iteration)
    summary = {"task": "detection", "iterations": iteration, "class_names": list(train_set.class_names),
               "coco_val": metrics, "last_checkpoint": run.last_checkpoint,
               "skipped_corrupt_train": skipped_total, "val_annotations": os.path.abspath(cfg.data.val_annotations)}
    summary = run.write_summary(summary)
    run.close()
    return summary
