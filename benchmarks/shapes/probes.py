"""Images that probe the shapes detector: degraded renders and shapeless colour blobs.

``degrade`` imitates a generator's imperfections (Gaussian blur, then pixel noise, then
8-bit quantisation). ``blob_image`` draws one object that is not a shape of the world (a
wobbly disc, an elongated ellipse, two merged discs, a cut disc, a thresholded noise
field, or a world shape blurred past recognition): a sound detector scores these low.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from rtdmd.errors import UserError
from rtdmd.world.shapes import ALL_CLASSES, GENEVAL_COLORS, PALETTE, Scene, ShapeObject, WorldSpec, render, to_uint8

BLOB_KINDS = ("wobbly", "ellipse", "merged", "cut", "noise", "blurred")


def degrade(images: torch.Tensor, rng: np.random.Generator, blur: float = 0.7, noise: float = 0.05) -> np.ndarray:
    """(B, 3, H, W) float renders -> (B, H, W, 3) uint8 after Gaussian blur (px) and Gaussian noise (std)."""
    x = images.detach().cpu().numpy().astype(np.float64)
    if blur > 0:
        x = ndimage.gaussian_filter(x, (0, 0, blur, blur), mode="nearest")
    if noise > 0:
        x = x + rng.normal(0.0, noise, x.shape)
    return to_uint8(torch.from_numpy(x).float())


def blob_image(rng: np.random.Generator, kind: str, spec: WorldSpec | None = None) -> np.ndarray:
    """One (H, W, 3) uint8 image holding one shapeless blob of a palette colour (see BLOB_KINDS)."""
    spec = spec or WorldSpec()
    if kind not in BLOB_KINDS:
        raise UserError(f"unknown blob kind {kind!r}; use one of {list(BLOB_KINDS)}.")
    S = spec.image_size
    scale = S / 32
    color = GENEVAL_COLORS[rng.integers(len(GENEVAL_COLORS))]
    cx, cy = rng.uniform(0.35 * S, 0.65 * S, size=2)
    R = rng.uniform(5.0, 7.5) * scale
    if kind == "blurred":
        cls = ALL_CLASSES[rng.integers(len(ALL_CLASSES))]
        img = render([Scene([ShapeObject(cls, color, cx, cy, 2 * R)])], spec).images
        return degrade(img, rng, blur=2.5 * scale, noise=0.0)[0]
    yy, xx = np.mgrid[0:S, 0:S] + 0.5
    dx, dy = xx - cx, yy - cy
    rho, th = np.hypot(dx, dy), np.arctan2(dy, dx)
    if kind == "wobbly":
        r = R * (1 + sum(rng.uniform(0.12, 0.25) * np.cos(i * th + rng.uniform(0, 2 * np.pi)) for i in (2, 3)))
        sdf = rho - r
    elif kind == "ellipse":
        ratio, a = rng.uniform(1.7, 2.4), rng.uniform(0, np.pi)
        u, v = dx * np.cos(a) + dy * np.sin(a), -dx * np.sin(a) + dy * np.cos(a)
        sdf = np.hypot(u / ratio, v) - R / 1.3
    elif kind == "merged":
        a = rng.uniform(0, 2 * np.pi)
        sdf = np.minimum(rho - 0.8 * R, np.hypot(dx - R * np.cos(a), dy - R * np.sin(a)) - 0.8 * R)
    elif kind == "cut":
        a = rng.uniform(0, 2 * np.pi)
        sdf = np.maximum(rho - R, dx * np.cos(a) + dy * np.sin(a))
    else:  # noise: a thresholded smooth random field, confined to a disc
        f = ndimage.gaussian_filter(rng.normal(size=(S, S)), 2.0 * scale)
        f = f / f.std()
        sdf = 3 * (0.8 - f) + 3 * np.maximum(rho - 1.4 * R, 0)
    cov = np.clip(0.5 - sdf, 0, 1)[..., None]
    img = np.asarray(spec.background) * (1 - cov) + np.asarray(PALETTE[color]) * cov
    img = ndimage.gaussian_filter(img, (0.6, 0.6, 0)) + rng.normal(0, 0.03, img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
