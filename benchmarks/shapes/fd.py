"""FD-shapes: the Frechet distance (benchmarks.fid.frechet_distance) in the shapes encoder's feature space.

The reference set is renders of the same prompts (rtdmd.world.shapes.scene_for_metadata:
exactly the prompt's objects, on the world's background), so FD-shapes measures how far
generated images are from what the world draws for those prompts: the FID analogue with
the project's encoder (benchmarks.shapes.reward_nets.ShapesEncoder) in place of Inception.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from benchmarks.fid import feature_statistics, frechet_distance
from benchmarks.shapes import reward_models
from rtdmd.errors import UserError
from rtdmd.seeding import numpy_generator
from rtdmd.world.shapes import WorldSpec, render, scene_for_metadata


def _as_float_images(images) -> torch.Tensor:
    """(N, 3, H, W) float in [0, 1] (tensor or array) or (N, H, W, 3) uint8 -> float tensor (N, 3, H, W)."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3:
        return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], np.ndarray):
        return _as_float_images(np.stack(images))
    x = torch.as_tensor(images) if not isinstance(images, torch.Tensor) else images
    if x.ndim == 4 and x.shape[1] == 3 and x.is_floating_point():
        return x.detach().float()
    raise UserError(f"FD-shapes takes (N, 3, H, W) float images in [0, 1] or (N, H, W, 3) uint8 arrays, got "
                    f"{type(images).__name__} {tuple(getattr(images, 'shape', ()))}; convert them first.")


@torch.no_grad()
def encoder_features(images, encoder=None, batch_size: int = 256) -> np.ndarray:
    """(N, D) float64 features of the shapes encoder (the shipped one by default)."""
    if encoder is None:
        encoder = reward_models.load_bundle().encoder
    x = _as_float_images(images)
    device = next(encoder.parameters()).device
    feats = [encoder.features(x[i:i + batch_size].to(device)).double().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(feats).numpy() if feats else np.zeros((0, 0))


def fd_shapes(gen_images, ref_images, encoder=None, batch_size: int = 256) -> float:
    """Squared Frechet distance between the encoder features of two image sets (>= 2 images each)."""
    return fd_shapes_parts(gen_images, ref_images, encoder, batch_size)[0]


def fd_shapes_parts(gen_images, ref_images, encoder=None, batch_size: int = 256):
    """FD-shapes with its parts: (value, the generated images' features (N, D), reference mean, reference
    covariance), so a study can bootstrap FD over the generated images against the fixed reference."""
    gen = encoder_features(gen_images, encoder, batch_size)
    ref = encoder_features(ref_images, encoder, batch_size)
    if len(gen) < 2 or len(ref) < 2:
        raise UserError(f"FD-shapes needs at least 2 images per set, got {len(gen)} generated and {len(ref)} reference.")
    mu1, s1 = feature_statistics(gen)
    mu2, s2 = feature_statistics(ref)
    return frechet_distance(mu1, s1, mu2, s2), gen, mu2, s2


def reference_renders(metadata_list: Sequence[dict], per_prompt: int = 4, seed: int = 0,
                      spec: WorldSpec | None = None, batch_size: int = 256) -> torch.Tensor:
    """Renders of each prompt's scene, ``per_prompt`` per prompt (prompt-major order), (N, 3, H, W) in [0, 1].

    Image k of prompt i draws its layout and free colours from (seed, i, k) alone, so any
    subset is reproducible. ``spec`` defaults to the world the shipped encoder was trained on.
    """
    if per_prompt < 1:
        raise UserError(f"per_prompt must be at least 1, got {per_prompt}.")
    if spec is None:
        spec = reward_models.load_bundle().spec
    scenes = [scene_for_metadata(meta, numpy_generator(seed, "fd-shapes-reference", i, k), spec)
              for i, meta in enumerate(metadata_list) for k in range(per_prompt)]
    if not scenes:
        raise UserError("reference_renders got no prompts; pass GenEval-format metadata records.")
    return torch.cat([render(scenes[i:i + batch_size], spec).images for i in range(0, len(scenes), batch_size)])
