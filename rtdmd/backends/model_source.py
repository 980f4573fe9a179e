"""Where a real-scale model lives: a diffusers-format model directory (a path, or a hub id looked up in
the local Hugging Face cache only; nothing is downloaded) and a check of its layout, so a missing
file is one clear sentence instead of a deep traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from huggingface_hub import snapshot_download

from rtdmd.errors import UserError

#: component kinds and the files that make one loadable
DIFFUSERS_MODEL, TRANSFORMERS_MODEL, TOKENIZER, SCHEDULER = "diffusers", "transformers", "tokenizer", "scheduler"
_WEIGHT_STEMS = {DIFFUSERS_MODEL: ["diffusion_pytorch_model"], TRANSFORMERS_MODEL: ["model", "pytorch_model"]}
_TOKENIZER_FILES = [["tokenizer.json"], ["vocab.json", "merges.txt"], ["spiece.model"]]


class ModelSource:
    """A diffusers-format model directory: where it is, what it is, and whether it is complete."""

    def __init__(self, path: Path, identity: str, family: str, hub_id: str):
        self.path = path
        self.identity = identity  # stable name for caches: hub id + snapshot, or the absolute path
        self.family = family
        self.hub_id = hub_id

    @classmethod
    def locate(cls, model: str, default_hub_id: str, family: str, hub_cache_dir: str = "") -> "ModelSource":
        ref = model or default_hub_id
        p = Path(ref).expanduser()
        if p.is_dir():
            return cls(p.resolve(), f"dir:{p.resolve()}", family, default_hub_id)
        looks_like_id = ref.count("/") == 1 and not ref.startswith((".", "/", "~"))
        if not looks_like_id:
            raise UserError(f"backend.model '{ref}' is not an existing directory; pass the path of a diffusers-format "
                            f"{family} checkpoint (or a hub id already in the local Hugging Face cache).")
        try:
            snap = Path(snapshot_download(ref, local_files_only=True, cache_dir=hub_cache_dir or None))
        except Exception:  # LocalEntryNotFoundError and friends: nothing usable in the cache
            raise UserError(f"model '{ref}' is not in the local Hugging Face cache and nothing is downloaded here; "
                            f"fetch it on a machine with network access ('hf download {ref} --local-dir DIR'), copy DIR "
                            "here and pass --set backend.model=DIR.") from None
        return cls(snap, f"hub:{ref}@{snap.name}", family, ref)

    def missing(self, component: str, kind: str, optional: bool = False) -> str | None:
        """The first missing file of ``component`` (relative path), or None when it looks loadable."""
        d = self.path / component
        if kind == SCHEDULER:
            return None if (d / "scheduler_config.json").is_file() else f"{component}/scheduler_config.json"
        if kind == TOKENIZER:
            if any(all((d / f).is_file() for f in group) for group in _TOKENIZER_FILES):
                return None
            return f"{component}/tokenizer.json"
        if not (d / "config.json").is_file():
            return f"{component}/config.json"
        for stem in _WEIGHT_STEMS[kind]:
            for index in sorted(d.glob(f"{stem}*.index*.json")):
                try:
                    shards = set(json.loads(index.read_text())["weight_map"].values())
                except (OSError, ValueError, KeyError):
                    return f"{component}/{index.name} (unreadable)"
                for shard in sorted(shards):
                    if not (d / shard).is_file():
                        return f"{component}/{shard}"
                return None
            if any(d.glob(f"{stem}*.safetensors")) or any(d.glob(f"{stem}*.bin")):
                return None
        return f"{component}/{_WEIGHT_STEMS[kind][0]}.safetensors"

    def check(self, components: Mapping[str, str], layout: str) -> None:
        """Raise one UserError naming the first missing file of ``components`` ({name: kind})."""
        first = None
        if not (self.path / "model_index.json").is_file():
            first = "model_index.json"
        for name, kind in components.items():
            if first is None:
                first = self.missing(name, kind)
        if first is not None:
            raise UserError(f"model directory {self.path} is missing {first} (a diffusers-format {self.family} checkpoint "
                            f"has {layout}); download the complete model ('hf download {self.hub_id} --local-dir DIR') "
                            "and pass --set backend.model=DIR.")

    def weights_variant(self, component: str) -> str | None:
        """'fp16' when a component ships only fp16-variant weight files (diffusers naming)."""
        d = self.path / component
        plain = [f for f in d.iterdir() if f.is_file() and ".fp16." not in f.name and f.suffix in (".safetensors", ".bin")]
        plain += [f for f in d.glob("*.index.json")]
        return None if plain or not any(d.glob("*.fp16.*")) else "fp16"

    def model_index(self) -> dict:
        try:
            return json.loads((self.path / "model_index.json").read_text())
        except (OSError, ValueError):
            raise UserError(f"{self.path / 'model_index.json'} is unreadable; re-download the model.") from None

    def load(self, cls, component: str, dtype: torch.dtype | None = None, **kwargs):
        """``cls.from_pretrained`` on a component folder, local files only, errors as one sentence."""
        path = self.path / component
        if dtype is not None:
            key = "torch_dtype" if cls.__module__.startswith("diffusers") else "dtype"
            kwargs[key] = dtype
        variant = self.weights_variant(component) if dtype is not None else None
        if variant:
            kwargs["variant"] = variant
        try:
            return cls.from_pretrained(str(path), local_files_only=True, **kwargs)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
            raise UserError(f"could not load {component} of {self.path} as {cls.__name__} ({type(exc).__name__}: {first}); "
                            f"re-download the {component}/ folder of {self.hub_id}.") from None
