"""The study report: arms with their budgets, paired differences against the reference arm, the verdict per
claim and learning curves, from the files `study run` wrote (no MLflow query needed).

    rtdmd-bench study report studies/shapes.yaml      # -> reports/<study name>/report.md
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rtdmd.errors import UserError

from benchmarks.study.execute import arm_dir, is_done, plan, seeds_of
from benchmarks.study.spec import Study, load_study
from benchmarks.study.stats import Difference, arm_mean, mean_interval, paired_difference, verdict
from benchmarks.study.sweep import sweep_lines
from benchmarks.study.units import UnitScores, feature_difference, feature_metrics, load_units

#: what each per-unit metric measures, and its range (shown under the tables)
METRIC_LEGEND = {
    "geneval": "GenEval(-shapes) accuracy: share of images whose objects, counts, colours and positions match the "
               "prompt under the official rules; overall = mean of the task accuracies; 0-1, higher is better",
    "reward/oracle": "shapes preference oracle (ground-truth faithfulness and quality of the rendered scene); 0-1, higher is better",
    "reward/shapes_pref": "learned shapes preference model (trained on oracle-labelled pairs); about 0-1, higher is better",
    "reward/shapes_aes": "learned shapes aesthetic model; about 0-1, higher is better",
    "toy2d/in_mode": "share of toy2d samples within 3 std of a mode of the prompt's target; 0-1, higher is better",
    "toy2d/log_density": "log density of toy2d samples under the prompt's true target; higher is better",
}


@dataclass
class ArmScores:
    name: str
    seeds: list[int]
    final: list[UnitScores]  # one per training seed
    curves: dict[int, list[dict]]  # seed -> [{"step", "train_seconds", "scores": UnitScores}]
    train: list[dict]  # train.json per seed ({} for a fixed checkpoint)


def load_scores(study: Study) -> dict[str, ArmScores]:
    missing = [j.label for j in plan(study) if not is_done(study, j)]
    if missing:
        raise UserError(f"study '{study.name}' is not finished ({len(missing)} jobs left, e.g. '{missing[0]}'); "
                        f"run 'rtdmd-bench study run {study.path}' first.")
    out = {}
    for arm in study.order():
        seeds = seeds_of(arm)
        finals, curves, trains = [], {}, []
        for s in seeds:
            d = arm_dir(study, arm.name, s)
            ev = json.loads((d / "eval.json").read_text())
            finals.append(load_units(study.out / ev["final"]))
            curves[s] = [{"step": p["step"], "train_seconds": p.get("train_seconds"),
                          "scores": load_units(study.out / p["units"])}
                         for p in ev["points"]]
            t = d / "train.json"
            trains.append(json.loads(t.read_text()) if t.is_file() else {})
        out[arm.name] = ArmScores(arm.name, seeds, finals, curves, trains)
    return out


def unit_matrix(scores: list[UnitScores], metric: str, keys: list[str] | None = None):
    """(seeds, units) matrix of ``metric`` on ``keys`` (default: the units every seed has) and the strata."""
    if keys is None:
        common = set.intersection(*(set(s.metrics.get(metric, {})) for s in scores))
        keys = sorted(common, key=lambda k: tuple(int(x) for x in k.split(":")))
    m = np.array([[s.metrics[metric][k] for k in keys] for s in scores], dtype=float)
    strata = [scores[0].strata.get(metric, {}).get(k, "") for k in keys]
    return m, (np.array(strata) if any(strata) else None), keys


def metrics_of(arms: dict[str, ArmScores]) -> list[str]:
    names = None
    for a in arms.values():
        for s in a.final:
            names = set(s.metrics) if names is None else names & set(s.metrics)
    return sorted(names or [])


def compare(arms: dict[str, ArmScores], a: str, b: str, metric: str, n_boot: int) -> Difference:
    """Paired difference a - b on the units both arms were scored on."""
    if all(metric in s.features for s in arms[a].final + arms[b].final):  # FD: bootstrapped over the units' features
        return feature_difference(arms[a].final, arms[b].final, metric, n_boot)
    keys = sorted(set.intersection(*(set(s.metrics.get(metric, {})) for s in arms[a].final + arms[b].final)),
                  key=lambda k: tuple(int(x) for x in k.split(":")))
    if not keys:
        raise UserError(f"arms '{a}' and '{b}' share no evaluation units for '{metric}'; evaluate them on the same prompts and seeds.")
    ma, strata, _ = unit_matrix(arms[a].final, metric, keys)
    mb, _, _ = unit_matrix(arms[b].final, metric, keys)
    return paired_difference(ma, mb, strata, n_boot=n_boot)


def _fmt(v: float) -> str:
    return f"{v:.3f}"


def _budget(t: list[dict]) -> str:
    if not t or not t[0]:
        return "fixed checkpoint"
    r = t[0]
    secs = [x.get("train_seconds") for x in t if x.get("train_seconds") is not None]
    cost = f"{np.mean(secs) / 60:.1f} min" if secs else "?"
    return f"{r['generator_updates']} x {r['generator_images'] // max(r['generator_updates'], 1)} ({r['iterations']} it), {cost}"


def _arm_table(study: Study, arms: dict[str, ArmScores], metrics: list[str]) -> list[str]:
    n_boot = study.eval.bootstrap
    lines = ["| arm | method | seeds | budget: generator updates x batch (iterations), training minutes | "
             + " | ".join(metrics) + " |", "|" + "---|" * (4 + len(metrics))]
    for name, a in arms.items():
        spec = study.arms[name]
        cells = []
        for m in metrics:
            mat, strata, _ = unit_matrix(a.final, m)
            mean, lo, hi = mean_interval(mat, strata, n_boot=n_boot)
            per_seed = [arm_mean(r[None], strata) for r in mat]
            spread = "" if len(a.seeds) == 1 else f" (seeds {min(per_seed):.3f} to {max(per_seed):.3f})"
            cells.append(f"{_fmt(mean)} [{_fmt(lo)}, {_fmt(hi)}]{spread}")
        lines.append(f"| {name} | {spec.method or spec.checkpoint} | {len(a.seeds)} | {_budget(a.train)} | " + " | ".join(cells) + " |")
    return lines


def _diff_table(study: Study, arms: dict[str, ArmScores], metrics: list[str]) -> list[str]:
    ref = study.reference
    lines = [f"| arm - {ref} | " + " | ".join(metrics) + " |", "|" + "---|" * (1 + len(metrics))]
    for name in arms:
        if name == ref:
            continue
        cells = []
        for m in metrics:
            d = compare(arms, name, ref, m, study.eval.bootstrap)
            cells.append(f"{d.diff:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _claims_table(study: Study, arms: dict[str, ArmScores]) -> list[str]:
    lines = ["| claim | comparison | metric | difference [95 % CI] | verdict |", "|---|---|---|---|---|"]
    for c in study.claims:
        d = compare(arms, c.arm, c.versus, c.metric, study.eval.bootstrap)
        sign = ">" if c.direction == "greater" else "<"
        lines.append(f"| {c.name} | {c.arm} {sign} {c.versus} | {c.metric} | {d.diff:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}] "
                     f"| **{verdict(d, c.direction)}** |")
    return lines


def plot_curves(study: Study, arms: dict[str, ArmScores], metric: str, path: Path) -> Path | None:
    """Metric against the final stage's training iterations and against training minutes, one line per arm with
    its 95 % band (units and seeds resampled at each checkpoint)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    drawn = False
    for name, a in arms.items():
        if not study.arms[name].trains:
            continue
        steps = sorted(set.intersection(*(set(p["step"] for p in a.curves[s]) for s in a.seeds)))
        rows = []
        for st in steps:
            pts = [next(p for p in a.curves[s] if p["step"] == st) for s in a.seeds]
            mat, strata, _ = unit_matrix([p["scores"] for p in pts], metric)
            mean, lo, hi = mean_interval(mat, strata, n_boot=200)
            secs = [p["train_seconds"] or 0.0 for p in pts]
            rows.append((st, float(np.mean(secs)) / 60, mean, lo, hi))
        if len(rows) < 1:
            continue
        r = np.array(rows)
        for ax, x in ((axes[0], r[:, 0]), (axes[1], r[:, 1])):
            ax.plot(x, r[:, 2], marker="o", label=name)
            ax.fill_between(x, r[:, 3], r[:, 4], alpha=0.2)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    axes[0].set_xlabel("training iterations (final stage)")
    axes[1].set_xlabel("training minutes (all stages)")
    for ax in axes:
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{study.name}: {metric} over training (95 % bands)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_study_report(path: str | Path, out: Path | None = None) -> Path:
    study = load_study(path)
    arms = load_scores(study)
    metrics = metrics_of(arms)
    out = Path(out) if out is not None else Path("reports") / study.name / "report.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    e = study.eval
    lines = [f"# Study: {study.name}", "",
             f"Made by `rtdmd-bench study report {study.path}` from `rtdmd-bench study run {study.path}`. "
             f"Backend `{study.backend}`; evaluation: suites {', '.join(e.suites)}, {e.steps} sampling steps unless an arm "
             f"says otherwise, {e.prompts or 'all'} prompts x {e.images_per_prompt} images, image seed {e.seed}; "
             f"every arm is scored on the same (prompt, image seed) units.",
             "", "## Arms", "",
             "Mean over training seeds and units with its 95 % bootstrap interval (units and training seeds resampled); "
             "the seed range shows the spread of the training seeds' own means.", ""]
    lines += _arm_table(study, arms, metrics)
    lines += sweep_lines(study)
    lines += ["", f"## Paired differences against `{study.reference}`", "",
              "Difference of means on the shared units, 95 % paired bootstrap interval.", ""]
    lines += _diff_table(study, arms, metrics + feature_metrics(arms))
    if study.claims:
        lines += ["", "## Verdicts", "", "supported: the interval excludes 0 on the claimed side; not supported: it excludes "
                  "0 on the other side; inconclusive: it contains 0.", ""]
        lines += _claims_table(study, arms)
    lines += ["", "## Learning curves", ""]
    for m in metrics:
        p = plot_curves(study, arms, m, out.parent / f"curve_{m.replace('/', '_')}.png")
        if p is not None:
            lines.append(f"![{m}]({p.name})")
    lines += ["", "## What the metrics measure", ""]
    lines += [f"- `{m}`: {METRIC_LEGEND.get(m, 'per-unit score of the suite')}" for m in metrics]
    commits = sorted({t.get("git_commit", "") for a in arms.values() for t in a.train if t})
    lines += ["", f"Trained at commit(s): {', '.join(c[:10] for c in commits if c) or 'n/a'}.", ""]
    out.write_text("\n".join(lines))
    return out
