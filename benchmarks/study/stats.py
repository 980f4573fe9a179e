"""Paired statistics of a study: differences between two arms on shared evaluation units.

A unit is one (prompt, image seed) pair: every arm generates the image of unit u from the same initial
noise, so the difference of two arms on u removes the prompt's difficulty and the noise draw from the
comparison. Scores are arrays of shape (training seeds, units); an arm trained once has one row.

The statistic is the difference of the arms' means, where an arm's mean is first taken over its training
seeds and then over units; with ``strata`` (e.g. GenEval tasks) it is the mean over strata of the per-stratum
differences, which is GenEval's "overall = mean of the task scores". The 95 % interval is a percentile
bootstrap that resamples units with replacement (within each stratum, the same resampled units for both arms:
paired) and, independently per arm, training seeds with replacement, so the interval carries both the
prompt/noise sampling error and the seed-to-seed spread of training.

A distribution metric (FD) has no per-unit value: ``fd_bootstrap`` resamples the units' feature vectors instead and
recomputes FD against the fixed reference statistics, with the same pairing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from benchmarks.fid import feature_statistics, frechet_distance


@dataclass
class Difference:
    diff: float  # mean(a) - mean(b)
    lo: float  # 95 % bootstrap interval
    hi: float
    n_units: int
    seeds_a: int
    seeds_b: int
    seed_means_a: list[float]  # each training seed's mean (the spread the interval includes)
    seed_means_b: list[float]

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2


def _stratified_mean(x: np.ndarray, strata: np.ndarray | None) -> np.ndarray:
    """Mean over the last axis; with strata, the mean over strata of each stratum's mean."""
    if strata is None:
        return x.mean(axis=-1)
    return np.mean([x[..., strata == s].mean(axis=-1) for s in np.unique(strata)], axis=0)


def arm_mean(scores: np.ndarray, strata: np.ndarray | None = None) -> float:
    """An arm's score: mean over training seeds, then over units (stratified when strata are given)."""
    return float(_stratified_mean(np.asarray(scores, dtype=float).mean(axis=0), strata))


def _resample_units(strata: np.ndarray | None, n: int, rng: np.random.Generator) -> np.ndarray:
    if strata is None:
        return rng.integers(0, n, size=n)
    out = np.empty(n, dtype=np.int64)
    for s in np.unique(strata):
        idx = np.flatnonzero(strata == s)
        out[idx] = idx[rng.integers(0, len(idx), size=len(idx))]
    return out


def paired_difference(a, b, strata=None, n_boot: int = 2000, seed: int = 0) -> Difference:
    """The difference of arm a over arm b on shared units with its paired 95 % bootstrap interval.

    ``a``: (seeds_a, units) or (units,); ``b`` likewise on the same units in the same order; ``strata``:
    (units,) labels or None."""
    a = np.atleast_2d(np.asarray(a, dtype=float))
    b = np.atleast_2d(np.asarray(b, dtype=float))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"the arms have {a.shape[1]} and {b.shape[1]} units; paired statistics need the same units")
    st = None if strata is None else np.asarray(strata)
    n = a.shape[1]
    rng = np.random.default_rng(seed)
    boots = np.empty(n_boot)
    for i in range(n_boot):
        u = _resample_units(st, n, rng)
        sa = a[rng.integers(0, a.shape[0], size=a.shape[0])][:, u].mean(axis=0)
        sb = b[rng.integers(0, b.shape[0], size=b.shape[0])][:, u].mean(axis=0)
        sub = None if st is None else st[u]
        boots[i] = _stratified_mean(sa, sub) - _stratified_mean(sb, sub)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return Difference(arm_mean(a, st) - arm_mean(b, st), float(lo), float(hi), n,
                      a.shape[0], b.shape[0],
                      [float(_stratified_mean(r, st)) for r in a], [float(_stratified_mean(r, st)) for r in b])


def mean_interval(scores, strata=None, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """One arm's mean with its 95 % bootstrap interval (units and seeds resampled)."""
    d = paired_difference(scores, np.zeros((1, np.atleast_2d(scores).shape[1])), strata, n_boot, seed)
    return d.diff, d.lo, d.hi


def fd_bootstrap(a, ref_mu, ref_sigma, b=None, n_boot: int = 2000, seed: int = 0) -> Difference:
    """FD (benchmarks.fid.frechet_distance) of arm a's image features against fixed reference statistics, or with
    ``b`` the paired difference FD(a) - FD(b), with its 95 % percentile bootstrap interval over images.

    ``a``, ``b``: (seeds, units, D) or (units, D) features, b on the same units in the same order. An arm's FD is
    the mean over its training seeds of each seed's FD. Each resample draws units with replacement, the same unit
    indices for both arms (paired: a unit is one (prompt, image seed) pair of both), and, independently per arm,
    training seeds with replacement; the reference statistics stay fixed. A resample's FD carries FD's upward
    small-sample bias (repeated images), so for an FD near 0 the interval can lie above the point estimate."""
    arms = [np.asarray(x, dtype=float) for x in ((a,) if b is None else (a, b))]
    arms = [x[None] if x.ndim == 2 else x for x in arms]
    if any(x.ndim != 3 or x.shape[1:] != arms[0].shape[1:] for x in arms):
        raise ValueError(f"fd_bootstrap needs (seeds, units, D) features on the same units, got {[x.shape for x in arms]}")

    def fd(x: np.ndarray, rows, units: np.ndarray) -> float:  # mean over the drawn seed rows, each row's FD once
        per_row = {r: frechet_distance(*feature_statistics(x[r, units]), ref_mu, ref_sigma) for r in set(rows)}
        return float(np.mean([per_row[r] for r in rows]))

    def stat(units, rows) -> float:
        return fd(arms[0], rows[0], units) - (fd(arms[1], rows[1], units) if len(arms) == 2 else 0.0)

    n = arms[0].shape[1]
    rng = np.random.default_rng(seed)
    boots = [stat(rng.integers(0, n, size=n), [list(rng.integers(0, len(x), size=len(x))) for x in arms])
             for _ in range(n_boot)]
    lo, hi = np.percentile(boots, [2.5, 97.5])
    every = np.arange(n)
    per_seed = [[fd(x, [r], every) for r in range(len(x))] for x in arms]
    b_seeds = per_seed[1] if len(arms) == 2 else []
    return Difference(stat(every, [list(range(len(x))) for x in arms]), float(lo), float(hi), n,
                      len(arms[0]), len(b_seeds), per_seed[0], b_seeds)


def verdict(d: Difference, direction: str = "greater") -> str:
    """'supported' when the interval excludes 0 on the claimed side, 'not supported' when it excludes 0 on the
    other side, 'inconclusive' otherwise. ``direction``: 'greater' (a > b claimed) or 'less'."""
    if direction not in ("greater", "less"):
        raise ValueError(f"direction must be 'greater' or 'less', not {direction!r}")
    sign = 1.0 if direction == "greater" else -1.0
    lo, hi = sorted((sign * d.lo, sign * d.hi))
    if lo > 0:
        return "supported"
    if hi < 0:
        return "not supported"
    return "inconclusive"
