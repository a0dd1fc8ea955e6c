"""Synthetic shapes drawn on textured, noisy backgrounds: the classes of the demo's pretraining set and
of the localization entry's synthetic set (circle, square, ...; the class is the shape, never the colour)."""
from __future__ import annotations

import cv2
import numpy as np

SHAPES = ("circle", "square", "triangle", "cross", "ring", "star", "diamond", "hexagon")


def textured_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Gradient + random lines + Gaussian noise, in random colours."""
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = np.linspace(0, 1, w if rng.random() < 0.5 else h)
    ramp = (1 - t)[:, None] * c0 + t[:, None] * c1
    img = np.broadcast_to(ramp[None], (h, w, 3)) if len(t) == w else np.broadcast_to(ramp[:, None], (h, w, 3))
    img = np.ascontiguousarray(img, dtype=np.float32)
    for _ in range(int(rng.integers(2, 7))):
        p1 = tuple(int(v) for v in rng.integers(0, [w, h]))
        p2 = tuple(int(v) for v in rng.integers(0, [w, h]))
        cv2.line(img, p1, p2, tuple(float(v) for v in rng.uniform(0, 255, 3)), int(rng.integers(1, 3)))
    img += rng.normal(0, 18, img.shape).astype(np.float32)
    return img


def shape_polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[np.ndarray]:
    """Polygons (list of Nx2 int32) of a shape of 'radius' r; circles/rings are approximated finely."""
    def regular(n, radius, phase=0.0):
        a = angle + phase + np.arange(n) * 2 * np.pi / n
        return np.stack([cx + radius * np.cos(a), cy + radius * np.sin(a)], 1)

    if kind == "circle":
        return [regular(48, r)]
    if kind == "square":
        return [regular(4, r, np.pi / 4)]
    if kind == "triangle":
        return [regular(3, r, -np.pi / 2)]
    if kind == "diamond":
        pts = regular(4, r)
        pts[:, 0] = cx + (pts[:, 0] - cx) * 0.6
        return [pts]
    if kind == "hexagon":
        return [regular(6, r)]
    if kind == "star":
        outer, inner = regular(5, r, -np.pi / 2), regular(5, r * 0.45, -np.pi / 2 + np.pi / 5)
        return [np.stack([outer, inner], 1).reshape(-1, 2)]
    if kind == "cross":
        t = r * 0.35
        bar = np.array([[-r, -t], [r, -t], [r, t], [-r, t]])
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        return [bar @ rot.T + [cx, cy], bar[:, ::-1] @ rot.T + [cx, cy]]
    if kind == "ring":
        return [regular(48, r), regular(48, r * 0.55)]
    raise ValueError(f"unknown shape {kind!r}")


def draw_shape(img: np.ndarray, kind: str, cx: float, cy: float, r: float, angle: float, color):
    """Fill the shape into ``img``; for a ring, return the mask of its hole (else None)."""
    polys = [np.round(p).astype(np.int32) for p in shape_polygon(kind, cx, cy, r, angle)]
    color = tuple(float(c) for c in color)
    if kind == "ring":
        cv2.fillPoly(img, polys[:1], color, lineType=cv2.LINE_AA)
        hole = np.zeros(img.shape[:2], np.uint8)
        cv2.fillPoly(hole, polys[1:], 1, lineType=cv2.LINE_8)
        return hole
    for poly in polys:  # one call per polygon: a single call would XOR the cross's overlapping bars
        cv2.fillPoly(img, [poly], color, lineType=cv2.LINE_AA)
    return None


def render_shape_image(rng: np.random.Generator, kind: str, size: int,
                       radius_range: tuple[float, float] = (0.22, 0.45)) -> tuple[np.ndarray, np.ndarray]:
    """One shape on a textured background: (HxWx3 uint8 image, its xyxy box in pixels).

    ``radius_range`` is the shape's 'radius' as a fraction of ``size``; the box is the extent of the
    drawn polygons (clipped to the image), which localization uses as ground truth.
    """
    img = textured_background(rng, size, size)
    background = img.copy()
    r = rng.uniform(*radius_range) * size
    cx, cy = rng.uniform(r, size - r, 2)
    angle = rng.uniform(0, 2 * np.pi)
    hole = draw_shape(img, kind, cx, cy, r, angle, rng.uniform(0, 255, 3))
    if hole is not None:  # a ring shows the background through its hole
        img[hole > 0] = background[hole > 0]
    img += rng.normal(0, 10, img.shape).astype(np.float32)
    points = np.concatenate(shape_polygon(kind, cx, cy, r, angle))
    box = np.concatenate([points.min(0), points.max(0)]).clip(0, size).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), box
