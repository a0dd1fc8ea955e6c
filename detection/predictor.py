"""Load a trained detector from its run folder and run it on image files."""
from __future__ import annotations

import os

import cv2
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


def draw_detections(image_rgb: np.ndarray, detections: list[dict]) -> np.ndarray:
    """Boxes, class names and scores drawn onto a copy of the image (BGR, ready for cv2.imwrite)."""
    canvas = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    scale = max(1.0, 480 / max(canvas.shape[:2]))  # small images are enlarged so the labels stay legible
    if scale > 1:
        canvas = cv2.resize(canvas, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    palette = [(0, 220, 255), (255, 80, 80), (80, 255, 80), (255, 0, 255), (0, 128, 255), (255, 255, 0)]
    names = sorted({d["label"] for d in detections})
    for d in detections:
        x1, y1, x2, y2 = (int(round(v * scale)) for v in d["box_xyxy"])
        color = palette[names.index(d["label"]) % len(palette)]
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, 2)
        text = f"{d['label']} {d['score']:.2f}" if "score" in d else str(d["label"])  # ground truth: no score
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
        cv2.rectangle(canvas, (x1, max(0, y1 - th - 4)), (x1 + tw + 2, y1), color, -1)
        cv2.putText(canvas, text, (x1 + 1, y1 - 3), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return canvas
