"""The preference oracle: the shapes world's "human taste", a fixed function of (image, prompt).

    oracle = 0.6 F + 0.4 Q
    Q      = 0.30 background + 0.25 edges + 0.15 frame + 0.15 overlap + 0.15 size

every term in [0, 1] (docs/shapes-rewards.md). F is GenEval-shapes partial credit (the
fraction of include / colour / position / exclude checks met, benchmarks.geneval.rules)
with the shapes detector. The quality terms are measured on the detector's parts: every
part it finds is a "part"; a part scoring > 0.3 (GenEval's threshold) is an "object".

- background = exp(-m / 0.08), m the mean RGB distance ||p - #999999|| over pixels more
  than 2 px from every object (stains, noise, tints and shapeless blobs raise m);
- edges = exp(-max(w - 1, 0) / 1.0), w = sum 4 a (1 - a) / perimeter the edge width of an
  object (a its colour's coverage near it). The renderer's 1 px ramp gives w = 4 u (1 - u)
  for an edge at sub-pixel offset u: 2/3 on average, 1 at most, so every crisp render
  scores 1; a Gaussian blur of sigma gives about 2.26 sigma. Score-weighted mean over objects;
- frame = 1 - share of parts whose mask touches the image border;
- overlap = 1 - mean over parts of max_j area(box_i & box_j) / area(box_i);
- size = 1 inside the world's size range [lo, hi], linear to 0 at 0.5 lo and 1.5 hi,
  score-weighted mean over objects.
edges and size are 0 when there is no object (an empty canvas has neither). Deterministic.
The oracle plays the human raters: it is never a training signal
(rtdmd.rewards.registry.training_reward refuses it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from benchmarks.geneval.detection import Detection
from benchmarks.geneval.rules import assess
from benchmarks.shapes.detector import ShapesDetector
from rtdmd.errors import UserError
from rtdmd.world.shapes import (ALL_CLASSES, CROSS_ARM, GENEVAL_COLORS, PALETTE, RING_BAND, WorldSpec, parse_caption,
                                to_uint8)

VERSION = "1"

#: oracle = sum of WEIGHTS[k] * term k; the quality part Q = sum of QUALITY_WEIGHTS[k] * term k
WEIGHTS = {"faithfulness": 0.6, "quality": 0.4}
QUALITY_WEIGHTS = {"background": 0.30, "edges": 0.25, "frame": 0.15, "overlap": 0.15, "size": 0.15}

OBJECT_THRESHOLD = 0.3  # GenEval's detection threshold: a part above it is an object
BG_SCALE = 0.08  # RGB distance at which the background term falls to 1/e
BG_CLEARANCE = 2.0  # px around objects excluded from the background
RAMP_MEAN_WIDTH = 2.0 / 3.0  # int_0^1 4 u (1 - u) du: mean edge width of the renderer's 1 px ramp
CRISP_WIDTH = 1.0  # max_u 4 u (1 - u): the widest a crisp render's edge gets (an edge through pixel centres)
EDGE_SCALE = 1.0  # px of extra edge width at which the edge term falls to 1/e
EDGE_WINDOW = 3.0  # px around an object where its edge pixels are counted

# Perimeter of each class's shape as a multiple of size (closed forms of rtdmd.world.shapes' SDFs).
PERIMETER_FACTOR = {
    "circle": math.pi,
    "square": 4.0,
    "diamond": 2.0 * math.sqrt(2.0),
    "triangle": 1.0 + math.sqrt(5.0),  # base s and two sides sqrt((s/2)^2 + s^2)
    "cross": 4.0,  # 4 arm ends of width t plus 8 sides of (s - t) / 2
    "ring": math.pi * (2.0 - 2.0 * RING_BAND),  # outer pi s plus inner pi s (1 - 2 band)
}
assert set(PERIMETER_FACTOR) == set(ALL_CLASSES) and 0 < CROSS_ARM < 1


# ---------------------------------------------------------------------------- the terms (pure)


def background_term(mean_distance: float, scale: float = BG_SCALE) -> float:
    """exp(-m / scale): 1 for an exactly #999999 background."""
    return float(math.exp(-max(mean_distance, 0.0) / scale))


def edge_width(coverage: np.ndarray, perimeter: float) -> float:
    """sum 4 a (1 - a) over the window / perimeter (px): 4 u (1 - u) for a 1 px ramp at sub-pixel offset u."""
    a = np.clip(coverage, 0.0, 1.0)
    return float((4.0 * a * (1.0 - a)).sum() / max(perimeter, 1e-6))


def edge_term(width: float, crisp: float = CRISP_WIDTH, scale: float = EDGE_SCALE) -> float:
    """exp(-max(w - crisp, 0) / scale)."""
    return float(math.exp(-max(width - crisp, 0.0) / scale))


def frame_term(touching: int, parts: int) -> float:
    """1 - touching / parts (1 with no parts)."""
    return 1.0 - touching / parts if parts else 1.0


def overlap_term(boxes: np.ndarray) -> float:
    """1 - mean_i max_{j != i} area(box_i & box_j) / area(box_i); boxes (n, 4) x0, y0, x1, y1."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    n = len(b)
    if n < 2:
        return 1.0
    iw = np.clip(np.minimum(b[:, None, 2], b[None, :, 2]) - np.maximum(b[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(b[:, None, 3], b[None, :, 3]) - np.maximum(b[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    np.fill_diagonal(inter, 0.0)
    area = np.maximum((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), 1e-6)
    return float(1.0 - np.clip(inter.max(axis=1) / area, 0.0, 1.0).mean())


def size_term(size: float, lo: float, hi: float) -> float:
    """1 on [lo, hi], linear to 0 at 0.5 lo and at 1.5 hi."""
    if size < lo:
        return float(np.clip((size - 0.5 * lo) / (0.5 * lo), 0.0, 1.0))
    if size > hi:
        return float(np.clip((1.5 * hi - size) / (0.5 * hi), 0.0, 1.0))
    return 1.0


def combine(faithfulness: float, terms: dict[str, float]) -> tuple[float, float]:
    """(oracle, Q) from F and the five quality terms."""
    q = sum(QUALITY_WEIGHTS[k] * terms[k] for k in QUALITY_WEIGHTS)
    return WEIGHTS["faithfulness"] * faithfulness + WEIGHTS["quality"] * q, q


# ---------------------------------------------------------------------------- measurement


@dataclass
class OracleScore:
    total: float
    faithfulness: float
    quality: float
    terms: dict[str, float]


class _Replay:
    """A Detector that returns detections computed once (so F and Q share one detection pass)."""

    def __init__(self, detector, detections: list[Detection]):
        self.name = detector.name
        self._detector = detector
        self._detections = detections

    def detect(self, image):
        return list(self._detections)

    def classify_colors(self, image, detections, class_name):
        return self._detector.classify_colors(image, detections, class_name)


class PreferenceOracle:
    """Reward-protocol oracle (evaluation only): images (B, 3, H, W) in [0, 1] + prompts -> (B,)."""

    name = "oracle"
    differentiable = False

    def __init__(self, spec: WorldSpec | None = None, detector=None):
        self.spec = spec or WorldSpec()
        self.detector = detector or ShapesDetector(self.spec)
        self.bg = np.asarray(self.spec.background, dtype=np.float64)
        self.identity = f"shapes-oracle-v{VERSION}[{self.detector.name}]"
        self._palette = {c: np.asarray(PALETTE[c], dtype=np.float64) for c in GENEVAL_COLORS}

    # ------------------------------------------------------------------ metadata
    def metadata(self, prompt_or_meta) -> dict:
        if isinstance(prompt_or_meta, dict):
            return prompt_or_meta
        return parse_caption(prompt_or_meta, WorldSpec(image_size=self.spec.image_size, classes=ALL_CLASSES,
                                                       size_range=self.spec.size_range))

    # ------------------------------------------------------------------ terms on one image
    def quality_terms(self, image: np.ndarray, detections: list[Detection]) -> dict[str, float]:
        """The five quality terms of one (H, W, 3) uint8 image given the detector's parts."""
        H, W = image.shape[:2]
        img = image.astype(np.float64) / 255.0
        objects = [d for d in detections if d.score > OBJECT_THRESHOLD and d.mask is not None and d.mask.any()]
        parts = [d for d in detections if d.mask is not None and d.mask.any()]
        # background: pixels clear of every object
        if objects:
            occupied = np.any([d.mask for d in objects], axis=0)
            far = ndimage.distance_transform_edt(~occupied) > BG_CLEARANCE
        else:
            far = np.ones((H, W), dtype=bool)
        dist = np.linalg.norm(img - self.bg, axis=-1)
        background = background_term(float(dist[far].mean()) if far.any() else 0.0)
        # frame: parts cut by the border
        touching = sum(bool(d.mask[0].any() or d.mask[-1].any() or d.mask[:, 0].any() or d.mask[:, -1].any())
                       for d in parts)
        frame = frame_term(touching, len(parts))
        overlap = overlap_term(np.asarray([d.box for d in parts])) if parts else 1.0
        # edges and size: score-weighted over objects; each pixel near objects belongs to the nearest part
        edges = size = 0.0
        if objects:
            label = np.zeros((H, W), dtype=np.int64)
            for j, d in enumerate(parts):
                label[d.mask] = j + 1
            dnear, (iy, ix) = ndimage.distance_transform_edt(label == 0, return_indices=True)
            owner = np.where(dnear <= EDGE_WINDOW, label[iy, ix], 0)
            lo, hi = self.spec.size_range
            weights, e_terms, s_terms = [], [], []
            for d in objects:
                j = next(i for i, p in enumerate(parts) if p is d) + 1
                color = self.detector.classify_colors(image, [d], d.label)[0]
                ray = self._palette[color] - self.bg
                a = (img[owner == j] - self.bg) @ ray / float(ray @ ray)
                s = float(d.box[2] - d.box[0])
                e_terms.append(edge_term(edge_width(a, PERIMETER_FACTOR[d.label] * s)))
                s_terms.append(size_term(s, lo, hi))
                weights.append(d.score)
            w = np.asarray(weights)
            edges = float(np.dot(w, e_terms) / w.sum())
            size = float(np.dot(w, s_terms) / w.sum())
        return {"background": background, "edges": edges, "frame": frame, "overlap": overlap, "size": size}

    def score_image(self, image: np.ndarray, prompt_or_meta) -> OracleScore:
        """Oracle of one (H, W, 3) uint8 image for a prompt (string in the grammar) or GenEval record."""
        meta = self.metadata(prompt_or_meta)
        detections = self.detector.detect(image)  # validates the image
        faithfulness = assess(image, meta, _Replay(self.detector, detections)).credit
        terms = self.quality_terms(image, detections)
        total, q = combine(faithfulness, terms)
        return OracleScore(total, faithfulness, q, terms)

    # ------------------------------------------------------------------ Reward protocol
    def score_batch(self, images: torch.Tensor | np.ndarray, prompts) -> list[OracleScore]:
        """Scores of (B, 3, H, W) float images in [0, 1] or (B, H, W, 3) uint8 arrays."""
        arrays = _as_uint8(images)
        if len(arrays) != len(prompts):
            raise UserError(f"the oracle got {len(arrays)} images but {len(prompts)} prompts; pass one prompt per image.")
        return [self.score_image(a, p) for a, p in zip(arrays, prompts)]

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        scores = self.score_batch(images, prompts)
        device = images.device if isinstance(images, torch.Tensor) else "cpu"
        return torch.tensor([s.total for s in scores], dtype=torch.float32, device=device)


def _as_uint8(images) -> np.ndarray:
    """(B, 3, H, W) float tensor in [0, 1] or (B, H, W, 3) uint8 -> (B, H, W, 3) uint8."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3:
        return images
    if isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[1] == 3:
        return to_uint8(images)
    raise UserError(f"images must be a (B, 3, H, W) float tensor in [0, 1] or a (B, H, W, 3) uint8 array, got "
                    f"{type(images).__name__} {tuple(getattr(images, 'shape', ()))}; convert them first.")
