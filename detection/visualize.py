"""Drawing boxes on images: what tools/infer.py, tools/check_data.py and the evaluation page show."""
from __future__ import annotations

import cv2
import numpy as np


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
        # above the box, or inside it where the box touches the image's top edge (a label drawn above it
        # would be cut off); shifted left where it would run off the right edge
        top = y1 - th - 4 if y1 - th - 4 >= 0 else y1
        left = max(0, min(x1, canvas.shape[1] - tw - 2))
        cv2.rectangle(canvas, (left, top), (left + tw + 2, top + th + 4), color, -1)
        cv2.putText(canvas, text, (left + 1, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return canvas
