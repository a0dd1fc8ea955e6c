"""The pretraining loop: SGD with the paper's recipe, DDP-ready, resumable to the iteration."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from ..checkpoint import backbone_checkpoint
from ..engine.config import to_yaml
from ..engine.dist import all_gather_object, barrier, init_distributed, is_main_process
from ..engine.loader import SpanningBatchSampler, run_loader
from ..engine.precision import check_solver
from ..engine.run import RunFolder
from ..engine.solver import describe_scaling, lr_multiplier, scaled_lr
from ..engine.trainer import Trainer, distribute, sgd
from ..engine.state import (atomic_save, keyed_generator, restore_training_state, rng_state, seed_everything,
                            should_resume, training_state)
from ..resnet import build_resnet
from .config import Decode
from .data import (DatasetError, ImageFolderDataset, ShardedSampler, collate_skip_none, scan_image_folder,
                   split_holdout, train_transform)
from .device_decode import (EncodedBatch, EncodedImageFolderDataset, augment_on_device, check_device_decode,
                            collate_encoded, probe_device_decoder)
from .evaluate import evaluate_classifier, normalize
from .synthetic import make_synthetic_shapes

def build_classifier(model_cfg, num_classes: int):
    return build_resnet(
        model_cfg.depth, cifar=model_cfg.cifar, plain=model_cfg.plain, num_classes=num_classes,
        shortcut=model_cfg.shortcut, base_width=model_cfg.base_width, stride_in_1x1=model_cfg.stride_in_1x1,
        zero_init_last_bn=model_cfg.zero_init_last_bn, norm="bn",
    )


def prepare_data(cfg: DictConfig):
    """Find (or materialise) the dataset; fail at once with the path and layout when it is missing."""
    d = cfg.data
    if d.synthetic and not (os.path.isdir(d.train_dir) and (not d.val_dir or os.path.isdir(d.val_dir))):
        if is_main_process():
            print(f"materialising the synthetic shapes dataset at {os.path.dirname(os.path.abspath(d.train_dir))} ...")
            make_synthetic_shapes(d.train_dir, d.val_dir, d.synthetic_train_per_class, d.synthetic_val_per_class,
                                  d.synthetic_image_size, seed=cfg.seed)
        barrier()
    classes, train_samples = scan_image_folder(d.train_dir)
    if d.val_dir:
        val_classes, val_samples = scan_image_folder(d.val_dir)
        if val_classes != classes:
            extra = sorted(set(val_classes) ^ set(classes))[:5]
            raise DatasetError(f"{d.val_dir}: class folders differ from {d.train_dir} (e.g. {extra}); "
                               "both splits need the same class sub-folders")
    elif d.val_fraction > 0:
        train_samples, val_samples = split_holdout(train_samples, d.val_fraction, cfg.seed)
    else:
        raise DatasetError("data.val_dir is empty and data.val_fraction is 0: set one of them")
    return classes, train_samples, val_samples


def build_train_set(cfg: DictConfig, classes, train_samples):
    """The training set of ``data.decode``: encoded files for the device to decode and augment, or images
    the workers decode and augment (what ``bench/trainer_speed.py`` times alone too)."""
    d = cfg.data
    if d.decode == Decode.device:
        return EncodedImageFolderDataset(train_samples, d.scale_range, d.crop_size, d.flip, d.pca_lighting_std,
                                         seed=cfg.seed, skip_corrupt=d.skip_corrupt)
    return ImageFolderDataset(train_samples, classes, train_transform(
        d.scale_range, d.crop_size, d.flip, d.pca_lighting_std, d.crop_padding), seed=cfg.seed,
        skip_corrupt=d.skip_corrupt)


def lr_factor(cfg: DictConfig, iteration: int, iters_per_epoch: int) -> float:
    """Multiplier of the base learning rate at ``iteration``: the shared schedule counted in epochs
    (warm-up from 0.1 of the rate, then step or cosine)."""
    s = cfg.solver
    return lr_multiplier(iteration / iters_per_epoch, s.steps, s.gamma, s.warmup_epochs, 0.1, s.schedule, s.epochs)


def train(cfg: DictConfig, run_name: str) -> dict:
    rank, world_size, device = init_distributed()
    if cfg.device == "cpu":
        device = torch.device("cpu")
    amp_dtype = check_solver(cfg.solver, world_size)
    on_device = cfg.data.decode == Decode.device
    if on_device:  # what the device path cannot do, and whether this device decodes at all: before any work
        check_device_decode(cfg.data)
        if device.type == "cuda":
            probe_device_decoder(device)
    output_dir = cfg.output_dir or os.path.join("runs", run_name)
    classes, train_samples, val_samples = prepare_data(cfg)
    run = RunFolder(output_dir, cfg)
    log = run.logger
    seed_everything(cfg.seed + rank)
    d, s = cfg.data, cfg.solver

    # every training batch has one shape (crop_size), so cuDNN's autotuner pays once and picks the fastest
    # kernels (detection, whose image sizes vary, leaves it off: it would re-tune at every new size)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    model = build_classifier(cfg.model, len(classes))
    if cfg.model.norm == "sync_bn" and world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    ddp_model = distribute(model, device, world_size, s.channels_last, compile=s.compile)

    per_rank_batch = s.batch_size // world_size
    train_set = build_train_set(cfg, classes, train_samples)
    sampler = ShardedSampler(len(train_set), shuffle=True, seed=cfg.seed, rank=rank, world_size=world_size)
    iters_per_epoch = len(sampler) // per_rank_batch
    if iters_per_epoch == 0:
        raise DatasetError(f"{d.train_dir}: {len(train_set)} images are fewer than one batch of {s.batch_size}")
    total_iters = iters_per_epoch * s.epochs
    lr = scaled_lr(s)
    optimizer, scheduler, scaler = sgd(model.parameters(), lr, s.momentum, s.weight_decay,
                                       lambda it: lr_factor(cfg, it, iters_per_epoch), device, s.amp, s.nesterov)

    start_iter, best_top1, skipped_total = 0, -1.0, 0
    if should_resume(cfg.resume, run.last_checkpoint):
        state = restore_training_state(run.last_checkpoint, model, optimizer, scheduler, scaler, rank)
        start_iter, best_top1, skipped_total = state["iteration"], state["best_top1"], state["skipped_corrupt"]
        log.info("resumed from %s at iteration %d (epoch %.2f)", run.last_checkpoint, start_iter,
                 start_iter / iters_per_epoch)

    log.info("pretraining %s-%d (%s shortcuts, width %d) on %d classes: %d train / %d val images, "
             "%d ranks, batch %d, lr %.4f, %d iterations", "plain" if cfg.model.plain else "resnet", cfg.model.depth,
             cfg.model.shortcut, cfg.model.base_width, len(classes), len(train_samples), len(val_samples),
             world_size, s.batch_size, lr, total_iters)
    log.info(describe_scaling(s, world_size))
    if on_device and device.type != "cuda":
        log.warning("data.decode=device on %s: the main process decodes and augments every image, slower than the "
                    "workers (data.decode=workers); the option is for GPUs whose host has too few cores", device.type)

    mean_t = torch.tensor(d.mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(d.std, device=device).view(1, 3, 1, 1)

    last_saved = start_iter

    def save_state(iteration: int) -> None:
        nonlocal last_saved
        last_saved = iteration
        rngs = all_gather_object(rng_state())  # every rank's generators, restored per rank
        if is_main_process():
            atomic_save(training_state(
                model, optimizer, scheduler, scaler, iteration, rngs, epoch=iteration // iters_per_epoch,
                best_top1=best_top1, skipped_corrupt=trainer.skipped, config=to_yaml(cfg),
                backbone=backbone_checkpoint(model, d.mean, d.std, classes, to_yaml(cfg)),
            ), run.last_checkpoint)

    def evaluate(mode: str) -> dict:
        return evaluate_classifier(model, val_samples, classes, mode, device, d.mean, d.std,
                                   resize=d.test_resize, crop=d.crop_size, scales=cfg.eval.multiscale_sizes,
                                   batch_size=cfg.eval.batch_size, workers=d.workers, amp_dtype=amp_dtype,
                                   channels_last=s.channels_last)

    def loader(epoch: int, offset: int) -> DataLoader:
        batches = SpanningBatchSampler(sampler, iters_per_epoch, epoch, offset, total_iters, per_rank_batch)
        return run_loader(train_set, batches, collate_encoded if on_device else collate_skip_none, d.workers,
                          device, keyed_generator(cfg.seed, epoch, rank))

    first_batch = True

    def prepare(batch, iteration: int):
        if isinstance(batch, EncodedBatch):  # data.decode=device: the images are decoded and augmented here
            images, labels, n_failed = augment_on_device(batch, d.crop_size, device, d.skip_corrupt)
            images, n_skipped = (images if len(labels) else None), batch.skipped + n_failed
        else:
            images, labels, n_skipped = batch
        if images is None:
            return None, 0, n_skipped
        nonlocal first_batch
        if first_batch:  # what the network sees, once, whichever decode path made it
            first_batch = False
            path = run.write_image_grid("train_batch.jpg", images[:32])
            if path:
                log.info("the first training batch, augmented (up to 32 images): %s", path)
        images = normalize(images.to(device, non_blocking=True), mean_t, std_t, s.channels_last)
        return (images, labels.to(device, non_blocking=True)), labels.numel(), n_skipped

    def forward(inputs) -> dict:
        images, labels = inputs
        return {"loss_cls": F.cross_entropy(ddp_model(images), labels)}

    trainer = Trainer(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, device=device,
                      amp_dtype=amp_dtype, run=run, max_iter=total_iters, iters_per_epoch=iters_per_epoch,
                      loader=loader, prepare=prepare, forward=forward, save_state=save_state,
                      checkpoint=run.last_checkpoint, log_period=cfg.log_period, checkpoint_period=cfg.checkpoint_period,
                      params=list(model.parameters()), clip_grad_norm=s.clip_grad_norm,
                      debug_stop_at_iter=cfg.debug_stop_at_iter, log_every_epoch=True, desc="pretrain",
                      # mid-epoch checkpoints by checkpoint_period; the one at each epoch's end follows its evaluation
                      should_checkpoint=lambda it: bool(cfg.checkpoint_period and it % cfg.checkpoint_period == 0
                                                        and it % iters_per_epoch),
                      log_extra=lambda it: {"epoch": it / iters_per_epoch, "skipped_corrupt": trainer.skipped})
    trainer.skipped = skipped_total
    val_metrics: dict = {}

    def end_of_epoch(epoch: int, iteration: int) -> None:
        nonlocal best_top1, val_metrics
        evaluates = bool(cfg.eval.period and (epoch + 1) % cfg.eval.period == 0) or epoch + 1 == s.epochs
        if evaluates:
            val_metrics = evaluate("center")
            model.train()
            run.log_metrics(iteration, val_metrics, prefix="val/")
            log.info("epoch %d/%d  val top-1 %.2f%%  top-5 %.2f%%  (center crop, %d images)", epoch + 1, s.epochs,
                     100 * val_metrics["top1"], 100 * val_metrics["top5"], val_metrics["images"])
            if val_metrics["top1"] > best_top1:
                best_top1 = val_metrics["top1"]
                if is_main_process():
                    atomic_save(backbone_checkpoint(model, d.mean, d.std, classes, to_yaml(cfg)), run.best_checkpoint)
        # With checkpoint_period, an epoch's end writes one only once that many iterations have passed (or
        # after an evaluation): on a small set (7 iterations per epoch at batch 256 for 1,900 images) a
        # ResNet-50 checkpoint every epoch took more time than the epoch's training on an H100.
        if evaluates or not cfg.checkpoint_period or iteration - last_saved >= cfg.checkpoint_period:
            save_state(iteration)

    trainer.after_epoch_hooks.append(end_of_epoch)
    iteration = trainer.train(start_iter)

    final = {"center": val_metrics or evaluate("center")}
    if cfg.eval.ten_crop:
        final["ten_crop"] = evaluate("ten_crop")
    if cfg.eval.multiscale_sizes:
        final["multiscale"] = evaluate("multiscale")
    backbone_path = os.path.join(run.checkpoint_dir, "backbone.pth")
    if is_main_process():
        atomic_save(backbone_checkpoint(model, d.mean, d.std, classes, to_yaml(cfg)), backbone_path)
    for mode, m in final.items():
        log.info("final %-10s top-1 %.2f%% (err %.2f%%)  top-5 %.2f%% (err %.2f%%)", mode, 100 * m["top1"],
                 100 * m["top1_err"], 100 * m["top5"], 100 * m["top5_err"])
    summary = {
        "task": "pretrain", "classes": classes, "iterations": iteration, "epochs": s.epochs,
        "val": final, "best_center_top1": best_top1, "skipped_corrupt_train": trainer.skipped,
        "backbone_checkpoint": backbone_path, "last_checkpoint": run.last_checkpoint,
        "best_checkpoint": run.best_checkpoint,
    }
    summary = run.write_summary(summary)
    run.close()
    return summary

