"""The reward protocol: images in [0, 1] and prompts in, one score per image out.

Real scorers (benchmarks.scorers: HPSv2.1, ImageReward, PickScore, CLIPScore, LAION
aesthetic) and shapes-world scorers (GenEval-shapes partial credit, learned preference and
aesthetic models, the oracle) all implement it, so training and evaluation treat them alike.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Reward(Protocol):
    #: short name used in configs, metrics and reports ("hpsv21", "pickscore", "shapes_pref"...)
    name: str
    #: True when __call__ is differentiable w.r.t. images (usable for reward back-propagation)
    differentiable: bool
    #: identity of the weights (path and sha256 prefix, or a version), recorded in MLflow tags
    identity: str

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1], len(prompts) == B -> scores (B,), higher is better."""
