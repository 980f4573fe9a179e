"""The detector interface the GenEval rule engine consumes.

Two detectors implement it: the shapes-world detector (benchmarks.shapes.detector) and
Mask2Former + CLIP colour classifier (benchmarks.geneval.mask2former). Images are
(H, W, 3) uint8 numpy arrays, as read from the PNGs on disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass
class Detection:
    label: str  # class name, in GenEval's naming (for shapes: the world's class names)
    score: float  # confidence in [0, 1]
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels (x right, y down)
    mask: np.ndarray | None = None  # (H, W) bool


@runtime_checkable
class Detector(Protocol):
    #: identity recorded with every result (name + weights hash or version)
    name: str

    def detect(self, image: np.ndarray) -> list[Detection]:
        """All detections in the image, any class, sorted by decreasing score."""

    def classify_colors(self, image: np.ndarray, detections: list[Detection], class_name: str) -> list[str]:
        """One colour name (from GenEval's 10 colours) per detection."""
