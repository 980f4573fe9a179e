"""Training diagnostics: how large each loss term's gradient is, whether consecutive policy gradients agree,
and how far the PPO ratio moves. The trainer asks for them on logged steps when ``train.diagnostics`` is on
(``StepContext.diagnose``); methods log them through ``Method.step_logs``.

- ``TermGradients`` keeps, per loss term, the gradient with respect to the trained parameters, summed over
  an optimiser step's micro-batches, and reports each term's norm and the cosine between this step's and the
  previous diagnosed step's gradient of chosen terms (a policy gradient estimated from too few rollouts has
  a cosine near 0 with the next one: the updates are a random walk).
- ``ratio_stats``: mean, spread and extremes of the PPO ratio pi_theta / pi_old over a batch's transitions.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch


def flat_grad(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """d loss / d params as one flat vector (zeros for parameters the loss does not reach); the graph is kept
    so the caller's own backward still runs."""
    if not loss.requires_grad:
        return torch.zeros(sum(p.numel() for p in params), device=params[0].device)
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float() for g, p in zip(grads, params)])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """<a, b> / (|a| |b|); 0 when either vector is zero."""
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(torch.dot(a, b)) / (na * nb)


class TermGradients:
    """Per-term gradients of one optimiser step, accumulated over its micro-batches (``add``), reported by
    ``logs`` as ``<prefix>/grad_norm/<term>`` and ``<prefix>/grad_cos/<term>`` (cosine with the previous
    reported step's gradient of that term, for the terms in ``cosine_terms``)."""

    def __init__(self, prefix: str = "diag", cosine_terms: Iterable[str] = ()):
        self.prefix = prefix
        self.cosine_terms = set(cosine_terms)
        self.sums: dict[str, torch.Tensor] = {}
        self.previous: dict[str, torch.Tensor] = {}

    def add(self, terms: Mapping[str, torch.Tensor], params: list[torch.Tensor], scale: float = 1.0) -> None:
        """Add ``scale`` * d term / d params for every term (``scale``: the trainer's 1 / train.accumulate)."""
        for name, loss in terms.items():
            g = flat_grad(loss, params) * scale
            self.sums[name] = self.sums[name] + g if name in self.sums else g

    def logs(self) -> dict[str, float]:
        """This step's norms (and cosines); the sums are cleared and the cosine terms kept for the next step."""
        out: dict[str, float] = {}
        for name, g in self.sums.items():
            out[f"{self.prefix}/grad_norm/{name}"] = float(g.norm())
            if name in self.cosine_terms:
                if name in self.previous:
                    out[f"{self.prefix}/grad_cos/{name}"] = cosine(g, self.previous[name])
                self.previous[name] = g
        self.sums = {}
        return out


def ratio_stats(ratio: torch.Tensor, clip_eps: float, prefix: str = "grpo") -> dict[str, float]:
    """Mean, standard deviation, min, max of the PPO ratio, its largest |ratio - 1| and the fraction of
    transitions outside [1 - clip_eps, 1 + clip_eps]."""
    r = ratio.detach().float().reshape(-1)
    return {f"{prefix}/ratio_mean": float(r.mean()), f"{prefix}/ratio_std": float(r.std()) if r.numel() > 1 else 0.0,
            f"{prefix}/ratio_min": float(r.min()), f"{prefix}/ratio_max": float(r.max()),
            f"{prefix}/ratio_dev": float((r - 1).abs().max()),
            f"{prefix}/clip_frac": float(((r - 1).abs() > clip_eps).float().mean())}
