"""Per-unit scores of one checkpoint: the numbers the study's paired statistics are made of.

A unit is (prompt index, image index); its key is "i:k". Every metric maps unit keys to values, and a
stratum per unit (the GenEval task, or the toy2d prompt kind) lets overall scores average tasks equally.
Image backends are evaluated by the evaluation runner (images on disk, MLflow runs); toy2d, whose samples are
2-D points, by the closed-form scores below. FD-shapes has no per-unit value: its per-unit feature vectors are kept
(``features``) and FD is bootstrapped over them (``feature_difference``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmarks.fid import load_fd_features, save_fd_features
from benchmarks.study.stats import Difference, fd_bootstrap
from benchmarks.suites.fid import FD_FEATURES
from rtdmd.checkpoint import load_for_inference
from rtdmd.errors import UserError
from rtdmd.fileio import atomic_write_bytes
from rtdmd.generate import SamplingConfig, generate_batched, sample_seed


@dataclass
class UnitScores:
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> unit key -> value
    strata: dict[str, dict[str, str]] = field(default_factory=dict)  # metric -> unit key -> stratum ("" : none)
    summary: dict[str, float] = field(default_factory=dict)  # metrics that are not per unit (FD), as logged
    #: distribution metric (FD) -> per-unit features and the reference statistics (benchmarks.fid.load_fd_features);
    #: stored beside the JSON as <stem>.<metric>.npz (save_units / load_units)
    features: dict[str, dict] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"metrics": self.metrics, "strata": self.strata, "summary": self.summary}

    @classmethod
    def from_json(cls, d: dict) -> "UnitScores":
        return cls(d.get("metrics", {}), d.get("strata", {}), d.get("summary", {}))

    def add(self, metric: str, key: str, value: float, stratum: str = "") -> None:
        self.metrics.setdefault(metric, {})[key] = float(value)
        self.strata.setdefault(metric, {})[key] = stratum


def save_units(path: Path, scores: UnitScores) -> None:
    """The unit file (JSON) and, first, one .npz of features per distribution metric beside it, all atomic: the JSON
    is written last, so a unit file on disk always has its feature files."""
    names = {}
    for metric, f in scores.features.items():
        names[metric] = f"{path.stem}.{metric.replace('/', '_')}.npz"
        save_fd_features(path.parent / names[metric], f["units"], f["features"], f["ref_mu"], f["ref_sigma"])
    data = {**scores.to_json(), **({"features": names} if names else {})}
    atomic_write_bytes(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())


def load_units(path: Path) -> UnitScores:
    """A unit file save_units wrote, with its feature files (read without pickle)."""
    data = json.loads(Path(path).read_text())
    out = UnitScores.from_json(data)
    out.features = {m: load_fd_features(Path(path).parent / name) for m, name in data.get("features", {}).items()}
    return out


def unit_order(key: str) -> tuple:
    return tuple(int(x) for x in key.split(":"))


def unit_matrix(scores: list[UnitScores], metric: str, keys: list[str] | None = None):
    """(seeds, units) matrix of ``metric`` on ``keys`` (default: the units every seed has), the strata (None when
    the metric has none) and the keys."""
    if keys is None:
        keys = sorted(set.intersection(*(set(s.metrics.get(metric, {})) for s in scores)), key=unit_order)
    m = np.array([[s.metrics[metric][k] for k in keys] for s in scores], dtype=float)
    strata = [scores[0].strata.get(metric, {}).get(k, "") for k in keys]
    return m, (np.array(strata) if any(strata) else None), keys


def feature_metrics(arms) -> list[str]:
    """Distribution metrics every final checkpoint of every arm (report.ArmScores) has features of."""
    finals = [s for a in arms.values() for s in a.final]
    return sorted(set.intersection(*(set(s.features) for s in finals))) if finals else []


def feature_difference(a: list[UnitScores], b: list[UnitScores] | None, metric: str, n_boot: int) -> Difference:
    """A distribution metric (FD) with its 95 % interval over images (stats.fd_bootstrap): arm a's value (one
    UnitScores per training seed), or with ``b`` the paired difference a - b, on the units every seed of both has."""
    feats = [s.features[metric] for s in a + (b or [])]
    keys = sorted(set.intersection(*({tuple(u) for u in f["units"].tolist()} for f in feats)))
    if len(keys) < 2:
        raise UserError(f"the arms share {len(keys)} evaluation units for '{metric}'; FD needs at least 2, on the same prompts and seeds.")
    mu, sigma = feats[0]["ref_mu"], feats[0]["ref_sigma"]
    if not all(np.allclose(f["ref_mu"], mu) and np.allclose(f["ref_sigma"], sigma) for f in feats):
        raise UserError(f"the evaluations compared on '{metric}' have different reference statistics; score every arm "
                        "on the same prompts and images per prompt.")

    def stack(scores: list[UnitScores]) -> np.ndarray:
        rows = []
        for f in (s.features[metric] for s in scores):
            pos = {tuple(u): j for j, u in enumerate(f["units"].tolist())}
            rows.append(f["features"][[pos[k] for k in keys]])
        return np.stack(rows)

    return fd_bootstrap(stack(a), mu, sigma, None if b is None else stack(b), n_boot=n_boot)


# ---------------------------------------------------------------------------- toy2d


def toy2d_prompts(num_modes: int, n: int) -> list[str]:
    """The toy2d evaluation prompts: the whole mixture ("") then 'mode k' for each mode (the first n when n > 0)."""
    prompts = [""] + [f"mode {k}" for k in range(num_modes)]
    return prompts[:n] if n > 0 else prompts


def toy2d_heldout(num_modes: int, n: int) -> list[tuple[int, str]]:
    """(prompt index, prompt) of the toy2d prompts an evaluation of n prompts leaves out: 'mode n-1' onwards."""
    every = toy2d_prompts(num_modes, 0)
    if n <= 0 or n >= len(every):
        raise UserError(f"eval.prompts {n} leaves none of the {len(every)} toy2d prompts to hold out for a sweep; "
                        f"set eval.prompts between 1 and {len(every) - 1}.")
    return list(enumerate(every))[n:]


def mixture_log_density(x: torch.Tensor, means: torch.Tensor, stds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """log sum_j w_j N(x; mu_j, s_j^2 I) for isotropic 2-D Gaussians (weights normalised here); (N,)."""
    w = weights / weights.sum()
    d2 = ((x[:, None, :] - means[None]) ** 2).sum(-1)  # (N, J)
    log_n = -d2 / (2 * stds[None] ** 2) - 2 * torch.log(stds[None]) - math.log(2 * math.pi)
    return torch.logsumexp(log_n + torch.log(w)[None], dim=1)


def toy2d_units(checkpoint: Path, n_prompts: int, per_prompt: int, seed: int, steps: int | None,
                eta: float | None, kind: str | None = None, held_out: bool = False) -> UnitScores:
    """Sample point k of prompt i with seed (seed, i, k) and score it: the log density under the prompt's target
    (the mixture for "", the mode's Gaussian for 'mode j') and whether it lies within 3 std of the target's modes.
    ``kind`` (euler / cps) overrides the checkpoint's sampler; ``held_out`` scores the prompts the first
    ``n_prompts`` leave out instead (toy2d_heldout)."""
    _, backend, net, meta = load_for_inference(checkpoint)
    sc = SamplingConfig.from_meta(meta.get("sampler", {}), steps=steps, eta=eta, kind=kind)
    o = backend.options
    means, stds = torch.tensor(o.means, dtype=torch.float64), torch.tensor(o.stds, dtype=torch.float64)
    weights = torch.tensor(o.weights, dtype=torch.float64)
    prompts = toy2d_heldout(len(o.means), n_prompts) if held_out else list(enumerate(toy2d_prompts(len(o.means), n_prompts)))
    out = UnitScores()
    for i, p in prompts:
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
        if not per:  # a distribution metric (FD / FID): one number per evaluation, and FD-shapes' per-image features
            out.summary.update({k: float(v) for k, v in r.metrics.items()})
            if "fd_shapes" in r.metrics and (Path(r.eval_dir) / FD_FEATURES).is_file():
                out.features["fd_shapes"] = load_fd_features(Path(r.eval_dir) / FD_FEATURES)
        for metric, triples in per.items():
            for key, value, stratum in triples:
                if not math.isfinite(value):
                    raise UserError(f"unit {key} of {r.suite} has a non-finite score; the evaluation of {r.checkpoint} is broken.")
                out.add(metric, key, value, stratum)
    return out
