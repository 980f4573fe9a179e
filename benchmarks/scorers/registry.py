"""Scorer registry: name -> real scorer class (loaded once, resident, batched)."""

from __future__ import annotations

import importlib

import torch

from benchmarks.scorers.common import scorer_options
from rtdmd.errors import UserError

# name -> (module, class); imported lazily so that `import benchmarks.scorers` stays light
_SCORERS = {
    "hpsv21": ("benchmarks.scorers.clip_family", "HPSv21"),
    "imagereward": ("benchmarks.scorers.imagereward", "ImageReward"),
    "pickscore": ("benchmarks.scorers.clip_family", "PickScore"),
    "clipscore": ("benchmarks.scorers.clip_family", "CLIPScore"),
    "aesthetic": ("benchmarks.scorers.clip_family", "AestheticScore"),
}

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def scorer_names() -> list[str]:
    return list(_SCORERS)


def get_scorer(
    name: str,
    path: str | None = None,
    device: str | torch.device = "cpu",
    differentiable: bool = False,
    dtype: torch.dtype | str = torch.float32,
    batch_size: int = 16,
    **options,
):
    """Build a Reward-protocol scorer. `path`: local file/dir or a hub id in the local HF cache.

    Extra options per scorer: pickscore processor_path; aesthetic clip_path; hpsv21
    tokenizer_path; imagereward med_config, tokenizer_path.
    """
    if name not in _SCORERS:
        raise UserError(f"unknown scorer '{name}'; choose one of {', '.join(_SCORERS)}.")
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise UserError(f"unknown scorer dtype '{dtype}'; choose one of {', '.join(_DTYPES)}.")
        dtype = _DTYPES[dtype]
    module, cls = _SCORERS[name]
    klass = getattr(importlib.import_module(module), cls)
    allowed = scorer_options(klass)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise UserError(f"scorer '{name}' has no option {', '.join(unknown)}; its options are {', '.join(sorted(allowed))}.")
    return klass(path=path, device=device, dtype=dtype, batch_size=batch_size, differentiable=differentiable, **options)
