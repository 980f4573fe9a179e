"""Sample-based distances for the toy2d world: RBF-kernel MMD and the "matches the teacher" test.

Used by the toy2d end-to-end tests of every method: a few-step generator matches its teacher
when its MMD to teacher samples is within ``factor`` (2) times the MMD between two independent
teacher sample sets of the same size (the estimator's own floor at that size).
"""

from __future__ import annotations

from typing import Sequence

import torch

#: RBF bandwidth for toy2d: twice the mixture components' std (0.25), well below the mode spacing (1.9),
#: so the kernel sees both the per-mode shape and the mode weights.
DEFAULT_BANDWIDTH = 0.5


def rbf_kernel(x: torch.Tensor, y: torch.Tensor, bandwidth: float | Sequence[float] = DEFAULT_BANDWIDTH) -> torch.Tensor:
    """k(x_i, y_j) = exp(-|x_i - y_j|^2 / (2 h^2)), summed over the bandwidths h when several are given; (N, M)."""
    hs = [float(bandwidth)] if isinstance(bandwidth, (int, float)) else [float(h) for h in bandwidth]
    d2 = torch.cdist(x.double(), y.double()) ** 2
    return sum(torch.exp(-d2 / (2 * h * h)) for h in hs)


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidth: float | Sequence[float] = DEFAULT_BANDWIDTH) -> float:
    """Biased (V-statistic) squared MMD: mean k(x, x') + mean k(y, y') - 2 mean k(x, y).

    The biased form is never negative, so a ratio against the teacher-vs-teacher value is defined.
    """
    x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    v = rbf_kernel(x, x, bandwidth).mean() + rbf_kernel(y, y, bandwidth).mean() - 2 * rbf_kernel(x, y, bandwidth).mean()
    return float(v.clamp(min=0.0))


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidth: float | Sequence[float] = DEFAULT_BANDWIDTH) -> float:
    """sqrt of the biased squared MMD (same units as a distance between the kernel mean embeddings)."""
    return mmd2(x, y, bandwidth) ** 0.5


def matches_teacher(samples: torch.Tensor, teacher_a: torch.Tensor, teacher_b: torch.Tensor, factor: float = 2.0,
                    bandwidth: float | Sequence[float] = DEFAULT_BANDWIDTH) -> tuple[bool, float, float]:
    """(ok, mmd(samples, teacher_a), mmd(teacher_b, teacher_a)): ok when the first is within ``factor`` of the
    second. The three sets must have the same size so the estimator's floor is the same."""
    if not samples.shape[0] == teacher_a.shape[0] == teacher_b.shape[0]:
        raise ValueError("matches_teacher needs equal sample sizes (the MMD floor depends on the size)")
    m = mmd(samples, teacher_a, bandwidth)
    ref = mmd(teacher_b, teacher_a, bandwidth)
    return m <= factor * ref, m, ref
