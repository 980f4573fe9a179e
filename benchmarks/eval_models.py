"""The models an evaluation covers: checkpoints described without building their networks, and the
default set (the newest checkpoint of every method trained in an MLflow experiment, then the shipped
shapes teacher).
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.suites.base import BackendInfo
from rtdmd import registry
from rtdmd.backends.shapes import SHIPPED_TEACHER
from rtdmd.checkpoint import find_checkpoint, online_file, read_meta
from rtdmd.config import load_resolved
from rtdmd.errors import UserError
from rtdmd.tracking import search_runs

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def tracking_uri(explicit: str | None = None) -> str:
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


@dataclass
class Model:
    """A checkpoint described without building its networks."""

    checkpoint: Path | None  # the step directory (None: images given without a checkpoint)
    method: str
    info: BackendInfo
    meta: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)  # extra MLflow tags (a pipeline's id, class, LoRA, scheduler options)
    weights: str = "ema"  # "ema": model.safetensors; "online": the training weights (rtdmd.checkpoint.load_online_state)

    @property
    def label(self) -> str:
        """The method as eval runs and report rows name it: ``<method>-online`` for the online weights."""
        return f"{self.method}-online" if self.weights == "online" else self.method

    @property
    def weights_sha256(self) -> str:
        """The sha256 of the evaluated weights file."""
        if self.weights == "online" and self.checkpoint is not None:
            return str(self.meta.get("files", {}).get(online_file(self.checkpoint, self.meta), ""))
        return str(self.meta.get("model_sha256", ""))

    @property
    def train_seconds(self) -> float | None:
        v = self.meta.get("train_seconds")
        return float(v) if v is not None else None

    @property
    def slug(self) -> str:
        if self.checkpoint is None:
            return f"images-{self.info.name}"
        sha = (self.meta.get("model_sha256") or hashlib.sha256(str(self.checkpoint).encode()).hexdigest())[:8]
        return f"{self.label}-step{self.meta.get('step', 0)}-{sha}"


def describe_checkpoint(path: str | Path, weights: str = "ema") -> Model:
    """``weights``: "ema" or "online" (checked here: the online file exists and the manifest lists it)."""
    step_dir = find_checkpoint(path).resolve()
    meta = read_meta(step_dir)
    cfg = load_resolved(step_dir / "config.yaml")
    if weights == "online":
        online_file(step_dir, meta)
    return Model(step_dir, meta.get("method", cfg.method_name), BackendInfo.from_options(cfg.backend_name, cfg.backend), meta,
                 weights=weights)


def images_only_model(backend: str) -> Model:
    """The model of --images without --checkpoint: only the backend (its default options) is known."""
    entry = registry.get_backend(backend)
    return Model(None, "images", BackendInfo.from_options(backend, entry.options()), {})


def default_checkpoints(experiment: str, uri: str | None = None, include_teacher: bool = True,
                        warn=lambda msg: print(msg, file=sys.stderr)) -> list[Path]:
    """The newest checkpoint of every (method, backend) trained in ``experiment``, then the shipped teacher.

    Training runs are the runs tagged kind=train; their run_dir tag locates the checkpoints.
    """
    df = search_runs(tracking_uri(uri), experiment, "tags.kind = 'train'")
    out: list[Path] = []
    if df is not None:
        seen: set[tuple[str, str]] = set()
        for _, row in df.iterrows():
            key = (row.get("tags.method"), row.get("tags.backend"))
            run_dir = row.get("tags.run_dir")
            if key in seen or not isinstance(run_dir, str):
                continue
            if key[1] == "toy2d":
                continue  # 2-D points: no images to evaluate
            try:
                ckpt = find_checkpoint(run_dir)
            except UserError:
                warn(f"skipping training run {row['run_id']} ({key[0]}): no checkpoint in {run_dir}")
                continue
            seen.add(key)
            out.append(ckpt.resolve())
    if include_teacher:
        teacher = find_checkpoint(SHIPPED_TEACHER).resolve()
        if teacher not in out:
            out.append(teacher)
    return out


def default_models(experiment: str, uri: str | None = None, weights: str = "ema") -> list[Model]:
    """The models of ``default_checkpoints``, the students with ``weights``; the shipped teacher, the reference,
    always with its EMA weights."""
    teacher = find_checkpoint(SHIPPED_TEACHER).resolve()
    return [describe_checkpoint(c, "ema" if c == teacher else weights) for c in default_checkpoints(experiment, uri)]
