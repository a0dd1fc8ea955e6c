"""Load a trained detector from its run folder and run it on image files."""
from __future__ import annotations

import os

import numpy as np
import torch
from omegaconf import DictConfig

from backbones.engine.imageio import read_image_rgb
from backbones.engine.state import load_checkpoint

from .data.batching import collate_detection
from .data.transforms import boxes_to_original, build_transform
from .modeling.build import build_detector


def resolve_checkpoint(run_dir: str, which: str) -> str:
    path = which if which not in ("last", "best") else os.path.join(run_dir, "checkpoints", f"{which}.pth")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {os.path.abspath(path)} (checkpoint=last|best|PATH)")
    return path


def load_trained_detector(run_dir: str, cfg: DictConfig, which: str, device):
    """Rebuild the run's detector and load its weights (the backbone file is not needed any more).

    Returns ``(model, checkpoint path, class names)``; the class names travel in the checkpoint.
    """
    path = resolve_checkpoint(run_dir, which)
    state = load_checkpoint(path)
    class_names = list(state["class_names"])
    cfg.model.backbone.weights = ""  # every weight, the normalisation buffers too, comes from the checkpoint
    model = build_detector(cfg.model, num_classes=len(class_names))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), path, class_names


class Predictor:
    """Detections for image files, in the files' own pixel coordinates, with class names."""

    def __init__(self, model, cfg: DictConfig, class_names: list[str], device, score_thresh: float = 0.5):
        self.model, self.device, self.class_names = model, device, class_names
        self.transform = build_transform((cfg.data.min_size_test,), cfg.data.max_size_test, 0.0, train=False)
        self.size_divisibility = cfg.data.size_divisibility
        self.score_thresh = score_thresh

    @torch.no_grad()
    def __call__(self, path: str) -> dict:
        image = read_image_rgb(path)
        h, w = image.shape[:2]
        out = self.transform(image=image, bboxes=np.zeros((0, 4), np.float32), labels=[])
        resized = out["image"]
        rh, rw = resized.shape[:2]
        batch = collate_detection([{"image": torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1)}],
                                  self.size_divisibility)
        batch["images"] = batch["images"].to(self.device)
        det = self.model(batch)[0]
        scale = (rh / h, rw / w)
        boxes = boxes_to_original(det["boxes"].float().cpu(), scale, False, transformed_width=rw)
        keep = det["scores"].cpu() >= self.score_thresh
        return {
            "file": path, "width": w, "height": h,
            "detections": [
                {"box_xyxy": [round(float(v), 1) for v in b], "score": round(float(s), 4),
                 "label": self.class_names[int(lbl) - 1]}
                for b, s, lbl in zip(boxes[keep], det["scores"].cpu()[keep], det["labels"].cpu()[keep])
            ],
        }
