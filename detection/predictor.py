"""Load a trained detector from its run folder and run it on images: the Python API (``Predictor``)."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from backbones.engine.errors import CheckpointError, ConfigError
from backbones.engine.solver import CompileMode
from backbones.engine.config import load_config
from backbones.engine.imageio import chw_tensor, read_image_rgb
from backbones.engine.run import get_logger
from backbones.engine.state import load_checkpoint

from .config import DetConfig
from .data.batching import collate_detection
from .data.transforms import build_transform
from .modeling.build import build_detector
from .modeling.config import NMSKernel
from .modeling.test_time import for_testing, options_from_config


def resolve_checkpoint(run_dir: str, which: str) -> str:
    path = which if which not in ("last", "best") else os.path.join(run_dir, "checkpoints", f"{which}.pth")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {os.path.abspath(path)} (checkpoint=last|best|PATH)")
    return path


def check_cuda_graphs(cfg: DictConfig, compile: bool, device) -> None:
    """``eval.cuda_graphs``' requirements, all at once, before any weight is loaded. ``model.nms_kernel=auto``
    becomes ``triton`` here, the only NMS a graph can hold (torchvision's makes the host wait for its count)."""
    problems = []
    if torch.device(device).type != "cuda":
        problems.append(f"it records CUDA graphs and runs on a GPU, not on {device}: set eval.cuda_graphs=false there")
    if cfg.model.nms_kernel == NMSKernel.auto:
        cfg.model.nms_kernel = NMSKernel.triton
        get_logger().info("eval.cuda_graphs: NMS as Triton kernels (model.nms_kernel=auto -> triton)")
    elif cfg.model.nms_kernel != NMSKernel.triton:
        problems.append(f"it needs the NMS without host synchronisation, not model.nms_kernel="
                        f"{cfg.model.nms_kernel.name}: model.nms_kernel=triton (or auto)")
    if compile and cfg.eval.compile_mode == CompileMode.reduce_overhead:
        problems.append("eval.compile_mode=reduce_overhead records graphs of its own: use eval.compile_mode=default")
    if options_from_config(cfg.eval).enabled:
        problems.append("the test-time options (eval.box_refinement, eval.test_scales, eval.flip) run eagerly: "
                        "turn them off")
    if problems:
        raise ConfigError("eval.cuda_graphs=true: " + "; ".join(problems))


def load_trained_detector(run_dir: str, cfg: DictConfig, which: str, device, compile: bool = False):
    """Rebuild the run's detector and load its weights (the backbone file is not needed any more), in the
    memory format it was trained and evaluated in (``solver.channels_last``: faster on CUDA, and under bf16
    the other layout rounds differently, so the run's own AP would not be reproduced exactly);
    ``compile``: torch.compile its dense parts (``GeneralizedRCNN.compile_parts``) in ``eval.compile_mode``.

    Returns ``(model, checkpoint path, class names)``; the class names travel in the checkpoint.
    """
    if cfg.eval.cuda_graphs:
        check_cuda_graphs(cfg, compile, device)
    if compile and cfg.eval.compile_mode == CompileMode.reduce_overhead and options_from_config(cfg.eval).enabled:
        raise ConfigError("eval.compile_mode=reduce_overhead keeps one set of features per image size (CUDA "
                          "graphs reuse their outputs), and the test-time options (eval.box_refinement, "
                          "eval.test_scales, eval.flip) need several at once: turn them off, or use "
                          "eval.compile_mode=default")
    path = resolve_checkpoint(run_dir, which)
    state = load_checkpoint(path)
    class_names = list(state["class_names"])
    cfg.model.backbone.weights = ""  # every weight, the normalisation buffers too, comes from the checkpoint
    model = build_detector(cfg.model, num_classes=len(class_names))
    model.load_state_dict(state["model"])
    if cfg.solver.channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        model.compile_parts(mode=str(cfg.eval.compile_mode))
    return model.to(device).eval(), path, class_names


class Predictor:
    """Detections for images (file paths or RGB uint8 arrays), in each image's own pixels, with class names.

        predictor = Predictor.from_run("runs/frcnn_demo", checkpoint="best")
        result = predictor("photo.jpg")                 # one image -> one dict
        results = predictor(["a.jpg", "b.jpg", array])  # a list -> a list, run as one batch

    Each result is ``{"file", "width", "height", "detections": [{"box_xyxy", "score", "label"}, ...]}``
    (``file`` is None for an array). Boxes are clipped to the image. The run's ``eval:`` test-time options
    (box refinement, multi-scale, flip) apply, as in ``tools/eval_det.py``.
    """

    def __init__(self, model, cfg: DictConfig, class_names: list[str], device, score_thresh: float = 0.5):
        self.model, self.device, self.class_names = model, device, class_names
        self.transform = build_transform((cfg.data.min_size_test,), cfg.data.max_size_test, 0.0, train=False)
        self.size_divisibility = cfg.data.size_divisibility
        self.score_thresh = score_thresh

    @classmethod
    def from_run(cls, run_dir: str, checkpoint: str = "last", device="cpu", score_thresh: float = 0.5,
                 overrides: Sequence[str] = ()) -> "Predictor":
        """The detector a ``tools/train_det.py`` run folder holds (its config.yaml and a checkpoint:
        last | best | PATH), with config ``overrides`` (``key=value``, e.g. ``eval.flip=true``)."""
        cfg = load_config(DetConfig, os.path.join(run_dir, "config.yaml"), list(overrides))
        model, _, class_names = load_trained_detector(run_dir, cfg, checkpoint, device, cfg.eval.compile)
        model = for_testing([model], options_from_config(cfg.eval), cfg.data.min_size_test, cfg.data.size_divisibility,
                            cuda_graphs=cfg.eval.cuda_graphs)
        return cls(model, cfg, class_names, device, score_thresh)

    @torch.no_grad()
    def __call__(self, images):
        """One image (path or HxWx3 RGB uint8 array) -> its result; a list of them -> a list of results."""
        if isinstance(images, (str, os.PathLike, np.ndarray)):
            return self([images])[0]
        if not images:
            return []
        files = [str(im) if isinstance(im, (str, os.PathLike)) else None for im in images]
        arrays = [read_image_rgb(f) if f is not None else np.asarray(im) for f, im in zip(files, images)]
        items = []
        for array in arrays:
            if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
                raise ValueError(f"Predictor: an image array must be HxWx3 RGB uint8, got {array.shape} {array.dtype}")
            out = self.transform(image=array, bboxes=np.zeros((0, 4), np.float32), labels=[])
            # the image's frame travels with it, so the detector returns boxes in the array's own pixels
            items.append({"image": chw_tensor(out["image"]),
                          "orig_size": array.shape[:2], "scale": out["scale"], "flipped": False})
        batch = collate_detection(items, self.size_divisibility)
        batch["images"] = batch["images"].to(self.device)
        results = []
        for det, file, array in zip(self.model(batch), files, arrays):
            h, w = array.shape[:2]
            boxes, scores, labels = (det[key].cpu() for key in ("boxes", "scores", "labels"))
            keep = scores >= self.score_thresh
            results.append({
                "file": file, "width": w, "height": h,
                "detections": [
                    {"box_xyxy": [round(float(v), 1) for v in b], "score": round(float(s), 4),
                     "label": self.class_names[int(lbl) - 1]}
                    for b, s, lbl in zip(boxes[keep], scores[keep], labels[keep])
                ],
            })
        return results
