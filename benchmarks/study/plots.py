"""The study report's figures: learning curves (a metric against generator updates and against CPU-seconds, one
line per arm with its 95 % band) and training losses as small multiples (one panel per training arm, read from the
study's MLflow experiment).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from rtdmd.config import load_resolved

from benchmarks.study.scores import ArmScores, add_costs, start_cost, unit_matrix
from benchmarks.study.spec import Study
from benchmarks.study.stats import arm_mean, mean_interval

#: metrics that get a learning-curve figure, when the study scored them
CURVE_METRICS = ("geneval", "reward/oracle", "toy2d/in_mode", "toy2d/log_density")
_SEED_STYLES = ("-", "--", ":", "-.")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------- learning curves


def curve_rows(study: Study, arms: dict[str, ArmScores], name: str, metric: str) -> np.ndarray:
    """One row per checkpoint every training seed of ``name`` was scored at: (generator updates, CPU-seconds, mean,
    95 % low, 95 % high). x is each seed's checkpoint cost (its meta and config, see execute.checkpoint_cost) plus
    what the weights it started from cost in the study (init_from), averaged over seeds; the mean and band are over
    training seeds and the units they share (stats.mean_interval). CPU-seconds are NaN where a checkpoint lacks them."""
    a = arms[name]
    steps = sorted(set.intersection(*(set(p["step"] for p in a.curves[s]) for s in a.seeds)))
    rows = []
    for st in steps:
        pts = [next(p for p in a.curves[s] if p["step"] == st) for s in a.seeds]
        costs = [add_costs(start_cost(study, arms, name, s), p["cost"]) for s, p in zip(a.seeds, pts)]
        if None in costs:
            continue
        mat, strata, _ = unit_matrix([p["scores"] for p in pts], metric)
        mean, lo, hi = mean_interval(mat, strata, n_boot=study.eval.bootstrap)
        cpu = [c["run_train_cpu_seconds"] for c in costs]
        rows.append((np.mean([c["generator_updates"] for c in costs]), np.nan if None in cpu else np.mean(cpu), mean, lo, hi))
    return np.array(rows, dtype=float).reshape(-1, 5)


def _sampling(study: Study, name: str) -> tuple:
    a, e = study.arms[name], study.eval
    return (a.steps or e.steps, e.guidance if a.guidance < 0 else a.guidance, a.eta)


def _continues(study: Study, arms: dict[str, ArmScores], name: str) -> bool:
    """Whether an init_from arm's curve may start at its parent's final point: same seeds and the same sampler."""
    parent = study.arms[name].init_from
    return bool(parent) and arms[parent].seeds == arms[name].seeds and _sampling(study, parent) == _sampling(study, name)


def all_curve_rows(study: Study, arms: dict[str, ArmScores], metric: str) -> dict[str, np.ndarray]:
    """curve_rows of every training arm; an init_from arm's line starts at its parent's final point."""
    rows = {}
    for name in arms:  # study order: a parent before the arms that start from it
        if not study.arms[name].trains:
            continue
        r = curve_rows(study, arms, name, metric)
        parent = study.arms[name].init_from
        if _continues(study, arms, name) and len(rows.get(parent, [])) and len(r):
            r = np.vstack([rows[parent][-1:], r])
        rows[name] = r
    return rows


def label_positions(ys: list[float], ylim: tuple[float, float], gap: float = 0.045) -> list[float]:
    """Heights for text labels of horizontal lines at ``ys``: each at its line, moved apart (keeping their order) so
    that neighbours are at least ``gap`` of the y range apart."""
    span = (ylim[1] - ylim[0]) * gap
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    out = list(ys)
    for prev, i in zip(order, order[1:]):
        out[i] = max(out[i], out[prev] + span)
    return out


def plot_curves(study: Study, arms: dict[str, ArmScores], metric: str, path: Path) -> Path | None:
    """``metric`` against generator updates (left) and CPU-seconds (right): one line per training arm with its
    shaded 95 % band, a grey horizontal line per checkpoint arm named at its right end with its value; None when no
    training arm has a curve point."""
    rows = {k: r for k, r in all_curve_rows(study, arms, metric).items() if len(r)}
    if not rows:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for name, r in rows.items():
        line = axes[0].plot(r[:, 0], r[:, 2], marker="o", ms=3, label=name)[0]
        axes[0].fill_between(r[:, 0], r[:, 3], r[:, 4], color=line.get_color(), alpha=0.2)
        ok = np.isfinite(r[:, 1])
        axes[1].plot(r[ok, 1], r[ok, 2], marker="o", ms=3, color=line.get_color(), label=name)
        axes[1].fill_between(r[ok, 1], r[ok, 3], r[ok, 4], color=line.get_color(), alpha=0.2)
    fixed = {}
    for name, a in arms.items():
        if not study.arms[name].trains:
            mat, strata, _ = unit_matrix(a.final, metric)
            fixed[name] = arm_mean(mat, strata)
    for ax in axes:
        for (name, y), ls in zip(fixed.items(), _SEED_STYLES[1:] * len(fixed)):
            ax.axhline(y, ls=ls, color="0.35", lw=1.1)
        for name, y in zip(fixed, label_positions(list(fixed.values()), ax.get_ylim())):
            ax.text(1.01, y, f"{name} {fixed[name]:.3f}", transform=ax.get_yaxis_transform(), va="center", fontsize=7,
                    color="0.25")
    axes[0].set_xlabel("generator updates (with the arm it starts from)")
    axes[1].set_xlabel("training CPU-seconds (with the arm it starts from)")
    for ax in axes:
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{study.name}: {metric}, mean over training seeds with 95 % bands")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- training losses (MLflow)


def tracked_uris(study: Study, arms: dict[str, ArmScores]) -> set[str]:
    """The MLflow stores the study's training runs logged to (their final checkpoints' config: tracking.uri)."""
    uris = set()
    for name, a in arms.items():
        for t in a.train:
            if t and study.arms[name].trains:
                cfg = load_resolved(study.out / t["checkpoint"] / "config.yaml")
                if cfg.tracking.enabled:
                    uris.add(cfg.tracking.uri)
    return uris


def _newest_runs(runs) -> list:
    """The training runs of a search, one per run name (the newest: a study rerun from scratch logs new runs), oldest
    first (a multi-stage arm's stages in the order they trained)."""
    runs = runs.sort_values("start_time", ascending=False)
    runs = runs.drop_duplicates(subset=["tags.mlflow.runName"]) if "tags.mlflow.runName" in runs else runs
    return [r for _, r in runs.sort_values("start_time").iterrows()]


def loss_histories(study: Study, arms: dict[str, ArmScores], prefix: str = "loss/") -> dict[str, dict[int, dict[str, list]]]:
    """arm -> training seed -> metric key -> [(iteration, value)] of the keys starting with ``prefix`` from the study's
    MLflow experiment (runs tagged with the study, arm and seed, not a sweep's); a multi-stage arm's later stages
    continue the iteration count of the earlier ones."""
    from rtdmd.tracking import metric_history, search_runs

    out: dict = {}
    for uri in sorted(tracked_uris(study, arms)):
        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
            continue
        runs = search_runs(uri, study.experiment, f"tags.study = '{study.name}' AND tags.kind = 'train'")
        if runs is None or runs.empty or "tags.arm" not in runs:
            continue
        offsets: dict = {}
        for r in _newest_runs(runs):
            arm, seed = r["tags.arm"], int(r.get("tags.seed") or 0)
            if arm not in arms or not study.arms[arm].trains or not _missing(r.get("tags.sweep")):
                continue  # a sweep's runs train seed 0 with the arm's tags: not the arm's training
            keys = [c[len("metrics."):] for c in runs.columns if c.startswith("metrics." + prefix) and not _missing(r[c])]
            start = offsets.get((arm, seed), 0)
            per_key = out.setdefault(arm, {}).setdefault(seed, {})
            for key in keys:
                per_key.setdefault(key, []).extend((start + s, v) for s, v in metric_history(uri, r["run_id"], key))
            offsets[(arm, seed)] = max([start] + [s for h in per_key.values() for s, _ in h])
    return out


def _missing(v) -> bool:
    return v is None or v == "" or (isinstance(v, float) and math.isnan(v))


def _y_scale(ax, values: np.ndarray) -> bool:
    """Log y when every loss is positive; else symlog, linear within +-(10th percentile of the nonzero |loss|)."""
    if len(values) and np.all(values > 0):
        ax.set_yscale("log")
        return False
    nonzero = np.abs(values[values != 0])
    ax.set_yscale("symlog", linthresh=float(np.percentile(nonzero, 10)) if len(nonzero) else 1e-6)
    return True


def plot_losses(histories: dict, path: Path, log: bool = True) -> tuple[Path, list[str]]:
    """One panel per arm: each key one colour, each training seed one line style; returns the figure and the arms
    whose panel is symlog (a value at or below zero). ``log`` False: linear y in every panel."""
    plt = _pyplot()
    n = len(histories)
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 3.2 * rows), squeeze=False)
    symlog = []
    for ax, (arm, seeds) in zip(axes.flat, histories.items()):
        keys = sorted({k for per in seeds.values() for k in per})
        values = []
        for j, seed in enumerate(sorted(seeds)):
            for i, key in enumerate(keys):
                h = np.array(sorted(seeds[seed].get(key, [])), dtype=float).reshape(-1, 2)
                values.append(h[:, 1])
                ax.plot(h[:, 0], h[:, 1], color=f"C{i}", ls=_SEED_STYLES[j % len(_SEED_STYLES)], lw=1,
                        label=f"{key} (seed {seed})")
        if log and _y_scale(ax, np.concatenate(values) if values else np.zeros(0)):
            symlog.append(arm)
        if not log:
            ax.axhline(0.0, color="0.5", lw=0.6)
        ax.set_title(arm, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, symlog
