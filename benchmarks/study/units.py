"""Per-unit scores of one checkpoint: the numbers the study's paired statistics are made of.

A unit is (prompt index, image index); its key is "i:k". Every metric maps unit keys to values, and a
stratum per unit (the GenEval task, or the toy2d prompt kind) lets overall scores average tasks equally.
Image backends are evaluated by the evaluation runner (images on disk, MLflow runs); toy2d, whose samples are
2-D points, by the closed-form scores below.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rtdmd.checkpoint import load_for_inference
from rtdmd.errors import UserError
from rtdmd.generate import SamplingConfig, generate_batched, sample_seed


@dataclass
class UnitScores:
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> unit key -> value
    strata: dict[str, dict[str, str]] = field(default_factory=dict)  # metric -> unit key -> stratum ("" : none)
    summary: dict[str, float] = field(default_factory=dict)  # metrics that are not per unit (FD), as logged

    def to_json(self) -> dict:
        return {"metrics": self.metrics, "strata": self.strata, "summary": self.summary}

    @classmethod
    def from_json(cls, d: dict) -> "UnitScores":
        return cls(d.get("metrics", {}), d.get("strata", {}), d.get("summary", {}))

    def add(self, metric: str, key: str, value: float, stratum: str = "") -> None:
        self.metrics.setdefault(metric, {})[key] = float(value)
        self.strata.setdefault(metric, {})[key] = stratum


# ---------------------------------------------------------------------------- toy2d


def toy2d_prompts(num_modes: int, n: int) -> list[str]:
    """The toy2d evaluation prompts: the whole mixture ("") then 'mode k' for each mode (the first n when n > 0)."""
    prompts = [""] + [f"mode {k}" for k in range(num_modes)]
    return prompts[:n] if n > 0 else prompts


def mixture_log_density(x: torch.Tensor, means: torch.Tensor, stds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """log sum_j w_j N(x; mu_j, s_j^2 I) for isotropic 2-D Gaussians (weights normalised here); (N,)."""
    w = weights / weights.sum()
    d2 = ((x[:, None, :] - means[None]) ** 2).sum(-1)  # (N, J)
    log_n = -d2 / (2 * stds[None] ** 2) - 2 * torch.log(stds[None]) - math.log(2 * math.pi)
    return torch.logsumexp(log_n + torch.log(w)[None], dim=1)


def toy2d_units(checkpoint: Path, n_prompts: int, per_prompt: int, seed: int, steps: int | None,
                eta: float | None, kind: str | None = None) -> UnitScores:
    """Sample point k of prompt i with seed (seed, i, k) and score it: the log density under the prompt's target
    (the mixture for "", the mode's Gaussian for 'mode j') and whether it lies within 3 std of the target's modes.
    ``kind`` (euler / cps) overrides the checkpoint's sampler."""
    _, backend, net, meta = load_for_inference(checkpoint)
    sc = SamplingConfig.from_meta(meta.get("sampler", {}), steps=steps, eta=eta, kind=kind)
    o = backend.options
    means, stds = torch.tensor(o.means, dtype=torch.float64), torch.tensor(o.stds, dtype=torch.float64)
    weights = torch.tensor(o.weights, dtype=torch.float64)
    prompts = toy2d_prompts(len(o.means), n_prompts)
    out = UnitScores()
    for i, p in enumerate(prompts):
        items = [(p, sample_seed(seed, i, k)) for k in range(per_prompt)]
        x = generate_batched(backend, net, items, sc, batch_size=1024).double()
        modes = list(range(len(o.means))) if p == "" else [backend.parse_prompt(p) - 1]
        sel = torch.tensor(modes)
        logp = mixture_log_density(x, means[sel], stds[sel], weights[sel] if p == "" else torch.ones(1, dtype=torch.float64))
        dist = torch.cdist(x, means[sel]) / stds[sel][None]
        hit = (dist.min(dim=1).values <= 3.0).double()
        tag = "mixture" if p == "" else "mode"
        for k in range(per_prompt):
            out.add("toy2d/log_density", f"{i}:{k}", float(logp[k]), tag)
            out.add("toy2d/in_mode", f"{i}:{k}", float(hit[k]), tag)
    return out


# ---------------------------------------------------------------------------- image backends


def _per_image_metrics(suite: str, rows: list[dict]) -> dict[str, list[tuple[str, float, str]]]:
    """(unit key, value, stratum) per metric from a suite's per-image results."""
    out: dict[str, list] = {}
    for r in rows:
        key = f"{r['index']}:{r['k']}"
        if suite == "geneval":
            out.setdefault("geneval", []).append((key, float(r["correct"]), str(r.get("tag", ""))))
            continue
        for name, v in r.items():
            if name in ("index", "k", "prompt", "tag", "filename") or not isinstance(v, (int, float)):
                continue
            out.setdefault(f"reward/{name}", []).append((key, float(v), ""))
    return out


def image_units(results) -> UnitScores:
    """UnitScores from the evaluation runner's results (one EvalResult per suite): results.jsonl per image."""
    out = UnitScores()
    for r in results:
        path = Path(r.eval_dir) / "results.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
        per = _per_image_metrics(r.suite, rows)
        if not per:  # a distribution metric (FD / FID): one number per evaluation
            out.summary.update({k: float(v) for k, v in r.metrics.items()})
        for metric, triples in per.items():
            for key, value, stratum in triples:
                if not math.isfinite(value):
                    raise UserError(f"unit {key} of {r.suite} has a non-finite score; the evaluation of {r.checkpoint} is broken.")
                out.add(metric, key, value, stratum)
    return out
