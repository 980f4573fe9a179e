"""Image I/O: tensors in [0, 1] <-> PNG files (written atomically), grids."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rtdmd.errors import UserError
from rtdmd.fileio import atomic_write_bytes


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [0, 1] -> (B, H, W, 3) uint8."""
    arr = (images.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(arr: np.ndarray) -> torch.Tensor:
    """(H, W, 3) or (B, H, W, 3) uint8 -> float tensor (B, 3, H, W) in [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(arr)).float() / 255.0
    if t.ndim == 3:
        t = t.unsqueeze(0)
    return t.permute(0, 3, 1, 2)


def save_png(path: Path, image) -> None:
    """Write one image ((H, W, 3) uint8 array or PIL image) as PNG, atomically."""
    if not isinstance(image, Image.Image):
        arr = np.asarray(image)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise UserError(f"images must be (H, W, 3) uint8 arrays or PIL images, got {arr.dtype} {arr.shape}; convert first.")
        image = Image.fromarray(arr)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def load_png(path: Path) -> np.ndarray:
    """Read an image as (H, W, 3) uint8; a missing or corrupt file is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image {path} does not exist; regenerate it or point --images at the right folder.")
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("RGB"))
    except Exception as exc:
        raise UserError(f"image {path} is unreadable or corrupt ({type(exc).__name__}); delete it and rerun to regenerate it.") from None


def make_grid(arrays: list[np.ndarray] | np.ndarray, ncols: int | None = None, pad: int = 2, upscale: int = 1,
              fill: int = 255) -> np.ndarray:
    """Tile (H, W, 3) uint8 images into one image with ``fill``-valued padding; optional nearest upscaling."""
    arrays = list(arrays)
    if not arrays:
        raise ValueError("no images to tile")
    n = len(arrays)
    ncols = ncols or int(math.ceil(math.sqrt(n)))
    nrows = int(math.ceil(n / ncols))
    h, w = arrays[0].shape[:2]
    h, w = h * upscale, w * upscale
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), fill, dtype=np.uint8)
    for i, a in enumerate(arrays):
        if upscale > 1:
            a = a.repeat(upscale, 0).repeat(upscale, 1)
        r, c = divmod(i, ncols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = a
    return grid
