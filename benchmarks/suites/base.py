"""What every evaluation suite shares: the model description it scores for, image items, results.

A suite turns images already on disk (GenEval layout, benchmarks.geneval.layout) into
metrics; generation is the runner's job, so suites that use the same prompts score the
same images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from rtdmd.errors import UserError
from rtdmd.images import from_uint8, load_png


@dataclass
class BackendInfo:
    """What suites need to know about a backend, without building its networks.

    ``name`` and ``options`` (the backend's options dataclass); ``spec`` is the shapes
    world spec (None elsewhere). Duck-types the ``backend`` argument of
    benchmarks.geneval.suite.default_metadata / default_detector.
    """

    name: str
    options: Any
    spec: Any = None

    @classmethod
    def from_options(cls, name: str, options) -> "BackendInfo":
        spec = options.world_spec() if hasattr(options, "world_spec") else None
        return cls(name, options, spec)


@dataclass
class ImageItem:
    index: int  # prompt index (the prompt folder's number)
    k: int  # image number within the prompt
    metadata: dict  # the prompt's entry ({"prompt": ...} at least)
    path: Path


@dataclass
class SuiteResult:
    metrics: dict[str, float]  # logged to MLflow
    per_image: list[dict]  # one row per image (the results table artifact)
    per_prompt: list[dict]  # one row per prompt: index, prompt, tag, n_images + one column per metric
    tags: dict[str, str] = field(default_factory=dict)  # scorer / detector identities
    extra: dict = field(default_factory=dict)  # summary details written to summary.json


class Suite(Protocol):
    name: str
    #: True when the suite needs GenEval entries (tag/include), not just prompts
    needs_geneval_metadata: bool

    def default_prompts(self, info: BackendInfo) -> list[dict]:
        """The prompt set used when --prompts is not given."""

    def load(self, info: BackendInfo, device: str, workers: int) -> None:
        """Build detectors / scorers once (and fail on missing weights before anything is generated)."""

    def score(self, items: Sequence[ImageItem], info: BackendInfo, seed: int, progress: bool, work_dir: Path | None) -> SuiteResult:
        """Score the images."""


def load_images(items: Sequence[ImageItem]) -> torch.Tensor:
    """PNG files -> (B, 3, H, W) float in [0, 1]; a missing or unreadable file is a UserError naming it."""
    if not items:
        return torch.empty(0)
    arrays = []
    for it in items:
        if not Path(it.path).is_file():
            raise UserError(f"image {it.path} is missing; rerun the eval without --images to generate it, or remove that prompt.")
        arrays.append(load_png(it.path))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise UserError(f"images under {Path(items[0].path).parents[2]} have different sizes {sorted(shapes)}; "
                        "score one model's images at a time.")
    return from_uint8(np.stack(arrays))


def per_prompt_means(items: Sequence[ImageItem], values: dict[str, Sequence[float]]) -> list[dict]:
    """Mean of each per-image value over each prompt's images (rows ordered by prompt index)."""
    rows: dict[int, dict] = {}
    sums: dict[int, dict[str, float]] = {}
    for j, it in enumerate(items):
        r = rows.setdefault(it.index, {"index": it.index, "prompt": it.metadata["prompt"],
                                       "tag": it.metadata.get("tag", ""), "n_images": 0})
        r["n_images"] += 1
        s = sums.setdefault(it.index, {})
        for name, v in values.items():
            s[name] = s.get(name, 0.0) + float(v[j])
    out = []
    for i in sorted(rows):
        r = rows[i]
        r.update({name: sums[i][name] / r["n_images"] for name in values})
        out.append(r)
    return out


def finite_mean(values: Sequence[float], what: str) -> float:
    m = float(np.mean(np.asarray(values, dtype=np.float64)))
    if not math.isfinite(m):
        raise RuntimeError(f"{what} produced a non-finite mean score ({m})")
    return m
