"""Training of the per-class RPN (and, when ``rcnn.enabled``, the R-CNN stage), then evaluation.

Iteration-based, DDP-ready (``torchrun``), resumable to the iteration: augmentation is seeded per
(seed, epoch, index) and anchor sampling per (seed, iteration, rank), so a resumed run computes
exactly what an uninterrupted one would have.
"""
from __future__ import annotations

import os

import torch
import yaml
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from backbones.engine.errors import ConfigError
from backbones.engine.config import to_yaml
from backbones.engine.dist import all_gather_object, barrier, init_distributed, is_main_process
from backbones.engine.loader import SpanningBatchSampler, run_loader
from backbones.engine.precision import check_solver
from backbones.engine.run import RunFolder
from backbones.engine.solver import describe_scaling, lr_multiplier, scaled_lr
from backbones.engine.trainer import Trainer, distribute, sgd
from backbones.engine.state import (atomic_save, keyed_generator, restore_training_state, rng_state, seed_everything,
                                    should_resume, training_state)
from backbones.imagedata import ShardedSampler, normalize

from .data import (LAYOUTS, LocDataError, LocTrainDataset, apply_val_blacklist, collate_loc, load_ilsvrc,
                   load_imagefolder, loc_train_transform, read_synset_mapping)
from .evaluate import MODES, best_centre_fraction, evaluate_localization, format_errors
from .model import build_localization_net, load_classifier
from .synthetic import make_synthetic_loc

FORMAT = "resdet-localization/1"


def prepare_paths(cfg: DictConfig) -> None:
    """Materialise the synthetic set (rank 0) and point the imagefolder keys at it."""
    d = cfg.data
    if d.layout not in LAYOUTS:
        raise LocDataError(f"data.layout must be one of {LAYOUTS}, got {d.layout!r}")
    if d.layout == "synthetic":
        if is_main_process():
            make_synthetic_loc(d.synthetic_root, d.synthetic_per_class, d.synthetic_image_size, seed=cfg.seed)
        barrier()
        paths = make_synthetic_loc(d.synthetic_root, d.synthetic_per_class, d.synthetic_image_size, seed=cfg.seed)
        d.train_images, d.train_annotations = paths["images"], paths["annotations"]


def check_holdout(cfg: DictConfig, classifier_ckpt: dict, classifier_path: str) -> None:
    """When the classifier was pretrained on the same folder with part of it held out, localization must
    hold out the same images (same fraction and seed), or its val images would have been trained on."""
    d = cfg.data
    if d.layout == "ilsvrc" or d.val_images:
        return
    try:
        pre = yaml.safe_load(classifier_ckpt.get("config") or "") or {}
    except yaml.YAMLError:
        return
    pre_data = pre.get("data") or {}
    if not pre_data.get("train_dir") or pre_data.get("val_dir"):
        return
    if os.path.realpath(pre_data["train_dir"]) != os.path.realpath(d.train_images):
        return
    fraction, seed = float(pre_data.get("val_fraction", 0.0)), int(pre.get("seed", 0))
    if (fraction, seed) != (float(d.val_fraction), int(d.holdout_seed)):
        raise LocDataError(f"{classifier_path}: the classifier was pretrained on {d.train_images} holding out "
                           f"val_fraction={fraction} with seed {seed}, but this run holds out "
                           f"data.val_fraction={d.val_fraction} with data.holdout_seed={d.holdout_seed}: its val "
                           f"images would include the classifier's training images; set data.val_fraction={fraction} "
                           f"data.holdout_seed={seed}")


# What `python tools/pretrain_backbone.py` (no argument) writes: a classifier of the same 8 shapes, trained
# on other images (datasets/synthetic_shapes), so none of the localization images were seen by it.
SYNTHETIC_CLASSIFIER = "runs/pretrain_demo/checkpoints/backbone.pth"


def load_data(cfg: DictConfig, class_names: list[str]):
    d = cfg.data
    if d.layout == "ilsvrc":
        train_records, val_records, stats = load_ilsvrc(d, class_names)
    elif not d.train_images or not d.train_annotations:
        raise LocDataError("data.train_images and data.train_annotations must be set for the imagefolder layout "
                           "(<images>/<wnid>/*.JPEG and <annotations>/<stem>.xml)")
    else:
        train_records, val_records, stats = load_imagefolder(d, class_names)
    if d.val_blacklist:
        stats["val_blacklisted"] = apply_val_blacklist(val_records, d.val_blacklist)
    return train_records, val_records, stats


def prepare(cfg: DictConfig):
    """Classifier and data, every check done before any work: (classifier, ckpt, class names, train, val, stats)."""
    prepare_paths(cfg)
    fallback = []
    if cfg.data.layout == "ilsvrc":
        fallback = sorted(read_synset_mapping(os.path.join(cfg.data.ilsvrc_root, "LOC_synset_mapping.txt")))
    if not cfg.model.classifier and cfg.data.layout == "synthetic":
        if not os.path.isfile(SYNTHETIC_CLASSIFIER):
            raise LocDataError(
                "model.classifier is empty: localization starts from a classifier of the same classes. For the "
                "synthetic demo, pretrain the demo's classifier of the same 8 shapes, then run again:\n"
                "  python tools/pretrain_backbone.py\n"
                "  python tools/train_loc.py")
        cfg.model.classifier = SYNTHETIC_CLASSIFIER
    classifier, ckpt, class_names = load_classifier(cfg.model.classifier, fallback)
    check_holdout(cfg, ckpt, cfg.model.classifier)
    train_records, val_records, stats = load_data(cfg, class_names)
    if not train_records:
        raise LocDataError(f"{cfg.data.train_images or cfg.data.ilsvrc_root}: no annotated training images")
    return classifier, ckpt, class_names, train_records, val_records, stats


def train(cfg: DictConfig, run_name: str) -> dict:
    rank, world_size, device = init_distributed()
    if cfg.device == "cpu":
        device = torch.device("cpu")
    s, d = cfg.solver, cfg.data
    amp_dtype = check_solver(s, world_size)
    for mode in cfg.eval.modes:
        if mode not in MODES:
            raise ConfigError(f"eval.modes: {mode!r} is not one of {MODES}")
    classifier, clf_ckpt, class_names, train_records, val_records, stats = prepare(cfg)
    run = RunFolder(cfg.output_dir or os.path.join("runs", run_name), cfg)
    log = run.logger
    seed_everything(cfg.seed + rank)
    norm = clf_ckpt.get("normalization") or {}
    mean, std = norm.get("mean", [0.485, 0.456, 0.406]), norm.get("std", [0.229, 0.224, 0.225])

    model = build_localization_net(cfg.model, clf_ckpt, len(class_names), cfg.eval.nms_thresh).to(device)
    classifier.to(device)
    ddp_model = distribute(model, device, world_size, s.channels_last, compile=s.compile)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = scaled_lr(s)
    optimizer, scheduler, scaler = sgd(params, lr, s.momentum, s.weight_decay, lambda it: lr_multiplier(
        it, s.steps, s.gamma, s.warmup_iters, s.warmup_factor), device, s.amp)

    per_rank_batch = s.batch_size // world_size
    train_set = LocTrainDataset(train_records, loc_train_transform(d.scale_range, d.crop_size, d.flip,
                                d.pca_lighting_std, d.min_box_visibility), seed=cfg.seed, skip_corrupt=d.skip_corrupt)
    sampler = ShardedSampler(len(train_set), shuffle=True, seed=cfg.seed, rank=rank, world_size=world_size)
    iters_per_epoch = len(sampler) // per_rank_batch
    if iters_per_epoch == 0:
        raise LocDataError(f"{len(train_set)} annotated training images are fewer than one batch of {s.batch_size}")
    baseline_fraction = best_centre_fraction(train_records)
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)

    start_iter, skipped_total = 0, 0
    if should_resume(cfg.resume, run.last_checkpoint):
        state = restore_training_state(run.last_checkpoint, model, optimizer, scheduler, scaler, rank)
        start_iter, skipped_total = state["iteration"], state["skipped_corrupt"]
        log.info("resumed from %s at iteration %d", run.last_checkpoint, start_iter)

    log.info("per-class RPN on %s (%s, %d classes): %d train images (%d unannotated skipped), %d val (%d of them "
             "blacklisted: classification only), %d ranks, batch %d, lr %.4f, %d iterations", cfg.model.classifier,
             cfg.model.feature_stage, len(class_names), len(train_records), stats.get("train_unannotated_skipped", 0),
             len(val_records), stats.get("val_blacklisted", 0), world_size, s.batch_size, lr, s.max_iter)
    log.info(describe_scaling(s, world_size))

    def save_state(iteration: int) -> None:
        rngs = all_gather_object(rng_state())
        if is_main_process():
            atomic_save(training_state(model, optimizer, scheduler, scaler, iteration, rngs, format=FORMAT,
                                       skipped_corrupt=trainer.skipped, config=to_yaml(cfg), class_names=class_names,
                                       classifier=os.path.abspath(cfg.model.classifier),
                                       normalization={"mean": list(mean), "std": list(std)}), run.last_checkpoint)

    def evaluate(mode: str, limit: int = 0, rescorer=None) -> dict:
        return evaluate_localization(model, classifier, val_records, mode, cfg.eval, d.crop_size, device, mean, std,
                                     baseline_fraction=baseline_fraction, rescorer=rescorer, workers=d.workers,
                                     amp_dtype=amp_dtype, limit=limit)

    def loader(epoch: int, offset: int) -> DataLoader:
        batches = SpanningBatchSampler(sampler, iters_per_epoch, epoch, offset, s.max_iter, per_rank_batch)
        return run_loader(train_set, batches, collate_loc, d.workers, device, keyed_generator(cfg.seed, epoch, rank))

    def to_device(batch, iteration: int):
        images, labels, boxes, n_skipped = batch
        model.rpn.generator = keyed_generator(cfg.seed, iteration, rank, device=device)  # anchor sampling, reproducible
        if images is None:
            return None, 0, n_skipped
        x = normalize(images.to(device, non_blocking=True), mean_t, std_t, s.channels_last)
        return (x, labels.to(device), [b.to(device) for b in boxes]), len(labels), n_skipped

    trainer = Trainer(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, device=device,
                      amp_dtype=amp_dtype, run=run, max_iter=s.max_iter, iters_per_epoch=iters_per_epoch,
                      loader=loader, prepare=to_device, forward=lambda inputs: ddp_model(*inputs), save_state=save_state,
                      checkpoint=run.last_checkpoint, log_period=cfg.log_period, checkpoint_period=cfg.checkpoint_period,
                      params=params, clip_grad_norm=s.clip_grad_norm, debug_stop_at_iter=cfg.debug_stop_at_iter,
                      log_extra=lambda it: {"epoch": it / iters_per_epoch, "skipped_corrupt": trainer.skipped},
                      desc="train_loc")
    trainer.skipped = skipped_total

    def periodic_eval(iteration: int) -> None:
        if cfg.eval.period and iteration % cfg.eval.period == 0 and iteration < s.max_iter:
            m = evaluate("center")  # restores training mode
            run.log_metrics(iteration, {k: v for k, v in m.items() if not isinstance(v, dict)}, prefix="val_center/")
            log.info("iteration %d\n%s", iteration, format_errors("center", m))

    trainer.after_step_hooks.append(periodic_eval)
    iteration = trainer.train(start_iter)
    if start_iter >= s.max_iter:
        log.info("the per-class RPN finished training earlier (%s): evaluating only", run.last_checkpoint)

    rescorer, rcnn_summary = None, {}
    if cfg.rcnn.enabled:
        from .rcnn import train_rcnn
        rescorer, rcnn_summary = train_rcnn(cfg, run, model, train_records, class_names, mean, std, device,
                                            amp_dtype)

    final = {}
    for mode in cfg.eval.modes:
        final[mode] = evaluate(mode, rescorer=rescorer)
        run.log_metrics(iteration, {k: v for k, v in final[mode].items() if not isinstance(v, dict)},
                        prefix=f"val_{mode}/")
        log.info("final\n%s", format_errors(mode, final[mode]))
    summary = {"task": "localization", "iterations": iteration, "class_names": class_names,
               "classifier": os.path.abspath(cfg.model.classifier), "train_images": len(train_records),
               "val_images": len(val_records), "val_blacklisted": stats.get("val_blacklisted", 0),
               "train_unannotated_skipped": stats.get("train_unannotated_skipped", 0),
               "skipped_corrupt_train": trainer.skipped, "val": final, "last_checkpoint": run.last_checkpoint,
               # records dropped at load (data.strict_train / strict_val false), per kind of problem
               "data_problems": stats.get("problems", {})}
    if rcnn_summary:
        summary["rcnn"] = rcnn_summary
    summary = run.write_summary(summary)
    run.close()
    return summary


def evaluate_run(cfg: DictConfig, run_dir: str, checkpoint: str = "last", modes=None) -> dict:
    """Re-evaluate a finished (or interrupted) run's checkpoint on its val images: every error, per mode."""
    _, _, device = init_distributed()
    if cfg.device == "cpu":
        device = torch.device("cpu")
    amp_dtype = check_solver(cfg.solver, 1)
    classifier, clf_ckpt, class_names, train_records, val_records, _ = prepare(cfg)
    path = checkpoint if os.path.isfile(checkpoint) else os.path.join(run_dir, "checkpoints", f"{checkpoint}.pth")
    if not os.path.isfile(path):
        raise LocDataError(f"{path}: checkpoint not found; pass checkpoint=last or checkpoint=<file.pth>")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise LocDataError(f"{path}: not a localization checkpoint (format {FORMAT!r}); pass one written by "
                           "tools/train_loc.py")
    if list(state["class_names"]) != class_names:
        raise LocDataError(f"{path}: trained with classes {state['class_names'][:3]}... but model.classifier "
                           f"{cfg.model.classifier} has {class_names[:3]}...; use the run's classifier")
    model = build_localization_net(cfg.model, clf_ckpt, len(class_names), cfg.eval.nms_thresh)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise LocDataError(f"{path}: weights do not fit a model built from model.classifier={cfg.model.classifier} "
                           f"(trained from {state.get('classifier')}); pass that classifier. Detail: "
                           f"{str(exc).splitlines()[0]}") from exc
    model.to(device)
    classifier.to(device)
    norm = state["normalization"]
    rescorer = None
    if cfg.rcnn.enabled:
        from .rcnn import load_rescorer
        rescorer = load_rescorer(cfg, run_dir, clf_ckpt, len(class_names), norm["mean"], norm["std"], device, amp_dtype)
    out = {"checkpoint": os.path.abspath(path), "iteration": int(state["iteration"]), "val": {}}
    for mode in modes or cfg.eval.modes:
        out["val"][mode] = evaluate_localization(model, classifier, val_records, mode, cfg.eval, cfg.data.crop_size,
                                                 device, norm["mean"], norm["std"],
                                                 baseline_fraction=best_centre_fraction(train_records), rescorer=rescorer,
                                                 workers=cfg.data.workers, amp_dtype=amp_dtype)
    return out
