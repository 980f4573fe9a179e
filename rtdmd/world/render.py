"""The shapes world's scenes and its batched anti-aliased SDF renderer.

Coordinates are continuous pixels: x right, y down, the centre of pixel (row i, column j)
at (j + 0.5, i + 0.5), the image spans [0, W] x [0, H]. Every shape of ``size`` s spans
exactly the axis-aligned box [cx - s/2, cx + s/2] x [cy - s/2, cy + s/2].
The caption grammar and scene sampling: rtdmd.world.shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from rtdmd.errors import UserError
from rtdmd.world.geneval import GENEVAL_COLORS, POSITION_THRESHOLD, relative_position


# Saturated, pairwise distinct; black and white far from the #999999 background.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (220 / 255, 30 / 255, 30 / 255),
    "orange": (255 / 255, 140 / 255, 0 / 255),
    "yellow": (250 / 255, 225 / 255, 30 / 255),
    "green": (30 / 255, 170 / 255, 50 / 255),
    "blue": (30 / 255, 70 / 255, 230 / 255),
    "purple": (140 / 255, 40 / 255, 190 / 255),
    "pink": (255 / 255, 130 / 255, 200 / 255),
    "brown": (130 / 255, 75 / 255, 30 / 255),
    "black": (15 / 255, 15 / 255, 15 / 255),
    "white": (250 / 255, 250 / 255, 250 / 255),
}

ALL_CLASSES = ("circle", "square", "triangle", "diamond", "cross", "ring")

# Shape proportions (fractions of size): cross arm width, ring band width.
CROSS_ARM = 0.36
RING_BAND = 0.25


@dataclass(frozen=True)
class WorldSpec:
    """What the world draws: canvas, classes, object sizes (px), background, edge softness."""

    image_size: int = 32
    classes: tuple[str, ...] = ALL_CLASSES
    size_range: tuple[float, float] = (10.0, 15.0)
    max_objects: int = 4
    background: tuple[float, float, float] = (0.6, 0.6, 0.6)  # #999999
    aa_width: float = 1.0  # anti-aliasing ramp width in px: coverage = clamp(0.5 - sdf / aa_width, 0, 1)
    gap: float = 2.0  # minimum free space between sampled objects' boxes, px
    margin: float = 1.0  # minimum distance from a sampled object's box to the frame, px

    def __post_init__(self):
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "size_range", tuple(float(s) for s in self.size_range))
        object.__setattr__(self, "background", tuple(float(c) for c in self.background))
        bad = [c for c in self.classes if c not in ALL_CLASSES]
        if bad or not self.classes or len(set(self.classes)) != len(self.classes):
            raise UserError(
                f"world classes {list(self.classes)} are invalid; use distinct names from {list(ALL_CLASSES)}."
            )
        if self.image_size < 16:
            raise UserError(f"image_size={self.image_size} is too small; use 16 or more (32 or 64 are standard).")
        lo, hi = self.size_range
        if not (2.0 <= lo <= hi <= self.image_size - 2 * self.margin):
            raise UserError(
                f"size_range={self.size_range} does not fit a {self.image_size} px image; "
                f"use 2 <= min <= max <= {self.image_size - 2 * self.margin}."
            )
        if self.max_objects < 1:
            raise UserError(f"max_objects={self.max_objects} must be at least 1.")
        if self.aa_width <= 0:
            raise UserError(f"aa_width={self.aa_width} must be positive.")


@dataclass
class ShapeObject:
    cls: str
    color: str
    cx: float
    cy: float
    size: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


@dataclass
class Scene:
    objects: list[ShapeObject] = field(default_factory=list)


@dataclass
class RenderOutput:
    images: torch.Tensor  # (B, 3, H, W) float in [0, 1]
    masks: list[torch.Tensor]  # per image (n_i, H, W) bool: visible pixels (occlusion aware)
    boxes: list[torch.Tensor]  # per image (n_i, 4) float x0, y0, x1, y1 (the whole shape's box)
    alphas: list[torch.Tensor]  # per image (n_i, H, W) float visible coverage in [0, 1]


# ---------------------------------------------------------------------------- geometry


def _box_sdf(x: torch.Tensor, y: torch.Tensor, hx: torch.Tensor, hy: torch.Tensor) -> torch.Tensor:
    """Exact signed distance to an axis-aligned box of half-sides (hx, hy) centred at 0."""
    qx = x.abs() - hx
    qy = y.abs() - hy
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    inside = torch.maximum(qx, qy).clamp(max=0)
    return outside + inside


def _segment_dist2(x, y, ax, ay, bx, by):
    ex, ey = bx - ax, by - ay
    t = (((x - ax) * ex + (y - ay) * ey) / (ex * ex + ey * ey)).clamp(0, 1)
    dx, dy = x - ax - t * ex, y - ay - t * ey
    return dx * dx + dy * dy


def shape_sdf(cls: str, x: torch.Tensor, y: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Signed distance (px, negative inside) of a shape centred at 0; ``size`` broadcasts."""
    h = size / 2
    if cls == "circle":
        return torch.sqrt(x * x + y * y) - h
    if cls == "square":
        return _box_sdf(x, y, h, h)
    if cls == "diamond":
        # a square turned 45 degrees with vertices on the axes at distance h
        s = math.sqrt(0.5)
        return _box_sdf((x + y) * s, (x - y) * s, h * s, h * s)
    if cls == "cross":
        t = h * CROSS_ARM
        return torch.minimum(_box_sdf(x, y, h, t), _box_sdf(x, y, t, h))
    if cls == "ring":
        w = size * RING_BAND
        return (torch.sqrt(x * x + y * y) - (h - w / 2)).abs() - w / 2
    if cls == "triangle":
        # apex at (0, -h), base from (-h, h) to (h, h): exact polygon distance, signed by the half-planes
        zero = torch.zeros_like(h)
        verts = [(zero, -h), (h, h), (-h, h)]
        d2 = None
        for i in range(3):
            (ax, ay), (bx, by) = verts[i], verts[(i + 1) % 3]
            s = _segment_dist2(x, y, ax, ay, bx, by)
            d2 = s if d2 is None else torch.minimum(d2, s)
        # inward-facing half-plane tests: the base (y <= h) and the two slanted sides |x| <= (y + h) / 2
        inside = (y <= h) & (2 * x.abs() <= y + h)
        d = torch.sqrt(d2)
        return torch.where(inside, -d, d)
    raise UserError(f"unknown shape class {cls!r}; use one of {list(ALL_CLASSES)}.")


def coverage(sdf: torch.Tensor, aa_width: float) -> torch.Tensor:
    """Anti-aliased coverage of a pixel from the signed distance at its centre."""
    return (0.5 - sdf / aa_width).clamp(0.0, 1.0)


def relations(box_a, box_b, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """GenEval's relative position of box A to box B, as a set (rtdmd.world.geneval.relative_position)."""
    return set(relative_position(box_a, box_b, threshold))


def relation_margin(box_a: np.ndarray, box_b: np.ndarray, rel: str) -> np.ndarray:
    """How far the relation's normalised component is past GenEval's 0.5 cut (negative: fails).

    Boxes are (..., 4) arrays; the result has shape (...).
    """
    a = np.asarray(box_a, dtype=np.float64)
    b = np.asarray(box_b, dtype=np.float64)
    offset = (a[..., :2] + a[..., 2:]) / 2 - (b[..., :2] + b[..., 2:]) / 2
    norm = np.linalg.norm(offset, axis=-1, keepdims=True)
    dims = np.abs(a[..., 2:] - a[..., :2]) + np.abs(b[..., 2:] - b[..., :2])
    rev = np.maximum(np.abs(offset) - POSITION_THRESHOLD * dims, 0) * np.sign(offset) / np.maximum(norm, 1e-9)
    value = {"left of": -rev[..., 0], "right of": rev[..., 0], "above": -rev[..., 1], "below": rev[..., 1]}[rel]
    return np.where(norm[..., 0] < 1e-9, -1.0, value - 0.5)


# ---------------------------------------------------------------------------- rendering


def render(scenes: list[Scene], spec: WorldSpec, device: str | torch.device = "cpu") -> RenderOutput:
    """Draw scenes in painter's order (later objects on top) with batched torch SDFs."""
    B = len(scenes)
    H = W = spec.image_size
    N = max([len(s.objects) for s in scenes] + [1])
    cls_idx = np.full((B, N), -1, dtype=np.int64)
    params = np.zeros((B, N, 3), dtype=np.float32)
    colors = np.zeros((B, N, 3), dtype=np.float32)
    for b, scene in enumerate(scenes):
        for n, o in enumerate(scene.objects):
            if o.cls not in ALL_CLASSES:
                raise UserError(f"unknown shape class {o.cls!r}; use one of {list(ALL_CLASSES)}.")
            if o.color not in PALETTE:
                raise UserError(f"unknown colour {o.color!r}; use one of {GENEVAL_COLORS}.")
            cls_idx[b, n] = ALL_CLASSES.index(o.cls)
            params[b, n] = (o.cx, o.cy, o.size)
            colors[b, n] = PALETTE[o.color]
    dev = torch.device(device)
    p = torch.from_numpy(params).to(dev)
    col = torch.from_numpy(colors).to(dev)
    cidx = torch.from_numpy(cls_idx).to(dev)
    xs = torch.arange(W, device=dev, dtype=torch.float32) + 0.5
    ys = torch.arange(H, device=dev, dtype=torch.float32) + 0.5
    cov = torch.zeros(B, N, H, W, device=dev)
    for k, name in enumerate(ALL_CLASSES):
        sel = cidx == k
        if not bool(sel.any()):
            continue
        q = p[sel]  # (M, 3)
        x = xs.view(1, 1, W) - q[:, 0].view(-1, 1, 1)
        y = ys.view(1, H, 1) - q[:, 1].view(-1, 1, 1)
        cov[sel] = coverage(shape_sdf(name, x, y, q[:, 2].view(-1, 1, 1)), spec.aa_width)
    bg = torch.tensor(spec.background, device=dev, dtype=torch.float32).view(1, 3, 1, 1)
    img = bg.expand(B, 3, H, W).clone()
    for n in range(N):
        a = cov[:, n : n + 1]
        img = img * (1 - a) + a * col[:, n].view(B, 3, 1, 1)
    # visible coverage: own coverage times the transmittance of everything drawn later
    vis = torch.empty_like(cov)
    trans = torch.ones(B, H, W, device=dev)
    for n in reversed(range(N)):
        vis[:, n] = cov[:, n] * trans
        trans = trans * (1 - cov[:, n])
    half = p[..., 2] / 2
    boxes_all = torch.stack([p[..., 0] - half, p[..., 1] - half, p[..., 0] + half, p[..., 1] + half], dim=-1)
    masks, boxes, alphas = [], [], []
    for b, scene in enumerate(scenes):
        n = len(scene.objects)
        alphas.append(vis[b, :n])
        masks.append(vis[b, :n] >= 0.5)
        boxes.append(boxes_all[b, :n])
    return RenderOutput(images=img.clamp(0, 1), masks=masks, boxes=boxes, alphas=alphas)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float [0, 1] -> (B, H, W, 3) uint8, as written to PNG."""
    return (images.detach().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)
