"""What made an image folder: ``generation.json`` beside the GenEval layout, written by generation and read by
``eval --images`` to name the row.

    {"format": 1,
     "model": {"name", "backend", "checkpoint", "sha256", "train_seconds", "tags"},
     "sampler": {"kind", "steps", "guidance", "eta"},
     "seed", "seeding", "images_per_prompt",
     "prompt_set": {"name", "sha", "count"},
     "rtdmd_bench": {"version", "commit"}}

``seeding`` states how image k of prompt i is seeded (rtdmd.generate.sample_seed), so the folder can be
regenerated or extended elsewhere. A folder holds one model's images at one sampler setting and seed: a
second generation into it with other settings is refused instead of mixing images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path

from benchmarks.eval_models import Model
from benchmarks.suites.base import BackendInfo
from rtdmd import registry
from rtdmd.errors import UserError
from rtdmd.fileio import atomic_write_bytes
from rtdmd.generate import SamplingConfig
from rtdmd.tracking import git_commit

RECORD = "generation.json"
SEEDING = "image k of prompt i: torch generator seeded by rtdmd.seeding.derive_seed(seed, 'sample', i, k)"
_IDENTITY = ("model", "sampler", "seed", "prompt_set")


def _version() -> str:
    try:
        return importlib_metadata.version("rtdmd-bench")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def make_record(model: Model, sc: SamplingConfig, prompt_set, seed: int, images_per_prompt: int) -> dict:
    """The record of ``model`` generating ``prompt_set`` (an eval_prompts.PromptSet) with ``sc`` and ``seed``."""
    return {
        "format": 1,
        "model": {"name": model.method, "backend": model.info.name, "checkpoint": str(model.checkpoint or ""),
                  "sha256": str(model.meta.get("model_sha256", "")), "train_seconds": model.train_seconds,
                  "tags": dict(model.tags)},
        "sampler": {"kind": sc.kind, "steps": sc.steps, "guidance": sc.guidance, "eta": sc.eta},
        "seed": seed, "seeding": SEEDING, "images_per_prompt": images_per_prompt,
        "prompt_set": {"name": prompt_set.name, "sha": prompt_set.id, "count": len(prompt_set.entries)},
        "rtdmd_bench": {"version": _version(), "commit": git_commit()},
    }


def read_record(folder: Path) -> dict | None:
    """The folder's generation.json, or None when it has none."""
    path = Path(folder) / RECORD
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({e}); delete it (the images stay usable) or regenerate.") from None
    if not isinstance(rec, dict) or not all(isinstance(rec.get(k), dict) for k in ("model", "sampler", "prompt_set")):
        raise UserError(f"{path} lacks its model, sampler or prompt_set entries; delete it or regenerate the folder.")
    return rec


def write_record(folder: Path, record: dict) -> Path:
    """Write (or extend) the folder's record; another model, sampler, seed or prompt set there is a UserError."""
    folder = Path(folder)
    old = read_record(folder)
    if old is not None:
        for key in _IDENTITY:
            if _comparable(old.get(key)) != _comparable(record.get(key)):
                raise UserError(f"{folder / RECORD} records other {key.replace('_', ' ')} settings ({_brief(old, key)}); "
                                "generate into a fresh --out folder.")
        record = {**record, "images_per_prompt": max(int(old.get("images_per_prompt", 0)), record["images_per_prompt"])}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / RECORD, (json.dumps(record, indent=1, default=str) + "\n").encode("utf-8"))
    return folder / RECORD


def _comparable(value):
    if isinstance(value, dict):  # the model's tags and train_seconds may change without changing the images
        return {k: v for k, v in value.items() if k not in ("tags", "train_seconds", "name")}
    return value


def _brief(record: dict, key: str) -> str:
    v = record.get(key)
    if key == "model":
        return f"model {v.get('name')} {v.get('checkpoint')}"
    return json.dumps(v, sort_keys=True)[:120]


@dataclass
class RecordedModel(Model):
    """The model named by an image folder's generation.json (``eval --images``)."""

    sampler: dict = field(default_factory=dict)

    def sampling(self, opts) -> SamplingConfig:
        s = self.sampler
        for flag, given, key in (("--steps", opts.steps, "steps"), ("--guidance", opts.guidance, "guidance"),
                                 ("--eta", opts.eta, "eta")):
            if given is not None and float(given) != float(s.get(key, given)):
                raise UserError(f"the images were generated with {key} {s.get(key)} ({RECORD}); drop {flag} or "
                                "pass the recorded value.")
        return SamplingConfig(kind=str(s.get("kind", "images")), steps=int(s.get("steps", 0)),
                              guidance=float(s.get("guidance", 1.0)), eta=float(s.get("eta", 0.0)))


def recorded_model(folder: Path) -> RecordedModel | None:
    """The model of an --images folder from its generation.json (None without one)."""
    rec = read_record(folder)
    if rec is None:
        return None
    m = rec["model"]
    backend = str(m.get("backend", ""))
    options = registry.get_backend(backend).options()  # an unknown backend is the registry's UserError
    meta = {"model_sha256": m.get("sha256", ""), "train_seconds": m.get("train_seconds")}
    checkpoint = Path(m["checkpoint"]) if m.get("checkpoint") else None
    return RecordedModel(checkpoint, str(m.get("name", "images")), BackendInfo.from_options(backend, options), meta,
                         tags={**{str(k): str(v) for k, v in (m.get("tags") or {}).items()}, "generation_record": "yes"},
                         sampler=dict(rec["sampler"]))
