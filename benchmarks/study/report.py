"""The study report: what each arm cost and scored, paired differences against the reference arm, the verdict per
claim, per-task precision, learning curves and training losses, from the files `study run` wrote (and, for the
losses, the study's MLflow experiment).

    rtdmd-bench study report studies/shapes.yaml      # -> reports/<study name>/report.md (+ PNGs beside it)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rtdmd.errors import UserError
from rtdmd.tracking import portable_path

from benchmarks.metric_legend import legend
from benchmarks.study import plots
from benchmarks.study.execute import Job, missing_jobs, plan
from benchmarks.study.precision import precision_section
from benchmarks.study.scores import ArmScores, compare, final_cost, load_scores, metrics_of, own_cost, unit_matrix
from benchmarks.study.spec import Study, load_study
from benchmarks.study.stats import arm_mean, mean_interval, verdict
from benchmarks.study.sweep import sweep_lines
from benchmarks.study.units import feature_difference, feature_metrics


def _fmt(v: float) -> str:
    return f"{v:.3f}"


def _count(values: list) -> str:
    """Mean over training seeds of a count, with the seeds' range when they differ; '?' when one is unknown."""
    if not values or None in values:
        return "?"
    if len(set(values)) == 1:
        return f"{values[0]:,.0f}"
    return f"{np.mean(values):,.0f} (seeds {min(values):,.0f} to {max(values):,.0f})"


def _seconds(values: list) -> str:
    """Mean CPU-seconds over training seeds, with the seeds' range when there are several."""
    if not values or None in values:
        return "?"
    digits = 0 if max(values) >= 100 else 1 if max(values) >= 10 else 2
    f = lambda v: f"{v:,.{digits}f}"  # noqa: E731
    return f(np.mean(values)) + (f" (seeds {f(min(values))} to {f(max(values))})" if len(values) > 1 else "")


def _short_commits(train: list[dict]) -> str:
    commits = sorted({t.get("git_commit") or "" for t in train if t})
    return ", ".join(f"`{c[:10]}{'+dirty' if c.endswith('+dirty') else ''}`" for c in commits if c) or "?"


def _cost_cells(study: Study, arms: dict[str, ArmScores], name: str) -> list[str]:
    """Generator updates x batch = images, iterations and CPU-seconds of a training arm: its own run, and for an
    init_from arm also the total with the arm it starts from."""
    a, parent = arms[name], study.arms[name].init_from
    own = [own_cost(t) or {} for t in a.train]
    tot = [final_cost(study, arms, name, s) or {} for s in a.seeds]

    def col(costs, key):
        return [c.get(key) for c in costs]

    batch = (own[0].get("generator_images") or 0) // max(own[0].get("generator_updates") or 1, 1)
    cells = [f"{_count(col(own, 'generator_updates'))} x {batch:,} = {_count(col(own, 'generator_images'))}",
             _count(col(own, "iterations")), _seconds(col(own, "run_train_cpu_seconds"))]
    if parent:
        cells[0] += f"; with `{parent}`: {_count(col(tot, 'generator_updates'))} updates, {_count(col(tot, 'generator_images'))} images"
        cells[1] += f"; with `{parent}`: {_count(col(tot, 'iterations'))}"
        cells[2] += f"; with `{parent}`: {_seconds(col(tot, 'run_train_cpu_seconds'))}"
    meta = [t.get("train_cpu_seconds") for t in a.train]
    study_cpu = col(tot, "run_train_cpu_seconds")
    if None not in meta and None not in study_cpu and np.mean(meta) - np.mean(study_cpu) > 0.02 + 0.005 * np.mean(study_cpu):
        cells[2] += f"; {_seconds([float(np.mean(meta))])} counting the weights it started from outside the study"
    return cells


def _budget_table(study: Study, arms: dict[str, ArmScores]) -> list[str]:
    lines = ["| arm | trains | seeds | starts from | generator updates x batch = generator images | iterations "
             "| CPU-seconds | trained at |", "|---|---|---|---|---|---|---|---|"]
    for name, a in arms.items():
        spec = study.arms[name]
        if spec.trains:
            cells = _cost_cells(study, arms, name)
            what, commit = f"`{spec.method}`" + (f" (preset `{spec.preset}`)" if spec.preset else ""), _short_commits(a.train)
        else:
            cells = ["no cost shown"] + ["-"] * 2
            what, commit = f"no: checkpoint `{portable_path(spec.checkpoint)}`", "-"
        lines.append(f"| {name} | {what} | {len(a.seeds)} | {spec.init_from or '-'} | " + " | ".join(cells) + f" | {commit} |")
    return lines


BUDGET_NOTE = ("Cost per training arm, mean over its training seeds: generator updates (one every `method.ttur`-th "
               "iteration) x images per update (`train.batch_size` x `train.accumulate`), iterations and CPU-seconds, "
               "read from each run's final checkpoint (meta.json, config.yaml) and summed over its stages. An arm with "
               "`starts from` also shows the total with the arm whose checkpoint it starts from. CPU-seconds are process "
               "CPU time (each study job trains with one torch thread), summed over resumed attempts; on a shared machine "
               "contention inflates them, so they compare arms only approximately there, and the committed numbers "
               "should come from a quiet machine. Wall-clock minutes are not shown: they measure the machine's load as "
               "much as the method. Checkpoint arms were trained outside the study: no cost is shown for them, as a "
               "number would compare unlike things; likewise weights an arm starts from outside the study (a teacher as "
               "`method.init`) are not charged in the CPU-seconds column, only noted beside it.")


def _score_table(study: Study, arms: dict[str, ArmScores], metrics: list[str]) -> list[str]:
    """Per arm and metric the mean [95 % CI]; distribution metrics (FD) last, their interval over images."""
    features = feature_metrics(arms)
    lines = ["| arm | " + " | ".join(metrics + features) + " |", "|" + "---|" * (1 + len(metrics) + len(features))]
    for name, a in arms.items():
        cells = []
        for m in metrics:
            mat, strata, _ = unit_matrix(a.final, m)
            mean, lo, hi = mean_interval(mat, strata, n_boot=study.eval.bootstrap)
            per_seed = [arm_mean(r[None], strata) for r in mat]
            spread = "" if len(a.seeds) == 1 else f" (seeds {min(per_seed):.3f} to {max(per_seed):.3f})"
            cells.append(f"{_fmt(mean)} [{_fmt(lo)}, {_fmt(hi)}]{spread}")
        for m in features:
            d = feature_difference(a.final, None, m, study.eval.bootstrap)
            spread = "" if len(a.seeds) == 1 else f" (seeds {min(d.seed_means_a):.2f} to {max(d.seed_means_a):.2f})"
            cells.append(f"{d.diff:.2f} [{d.lo:.2f}, {d.hi:.2f}]{spread}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
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
        sign = ">" if c.direction == "greater" else "<"
        if c.arm not in arms or c.versus not in arms:
            lines.append(f"| {c.name} | {c.arm} {sign} {c.versus} | {c.metric} | - | not run yet |")
            continue
        d = compare(arms, c.arm, c.versus, c.metric, study.eval.bootstrap)
        lines.append(f"| {c.name} | {c.arm} {sign} {c.versus} | {c.metric} | {d.diff:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}] "
                     f"| **{verdict(d, c.direction)}** |")
    return lines


def _curve_section(study: Study, arms: dict[str, ArmScores], metrics: list[str], folder: Path) -> list[str]:
    points = ("every checkpoint of the `train.checkpoint_every` grid and the final one (`eval.curves: true`)"
              if study.eval.curves
              else "the final checkpoint only (`eval.curves: false`, so each training arm is one point)")
    lines = ["", "## Learning curves", "",
             f"Each metric against generator updates (left) and training CPU-seconds (right), scored at {points}. A "
             "point's x is that checkpoint's own cost, read from its meta.json and config.yaml (not interpolated); an "
             "arm that starts from another arm adds that arm's final cost, so its line continues the other's. Lines: "
             "mean over training seeds; shaded: 95 % bootstrap band (units and training seeds resampled). Grey horizontal "
             "lines, named at their right end with their value: checkpoint arms, not trained in the study.", ""]
    drawn = 0
    for m in (m for m in plots.CURVE_METRICS if m in metrics):
        p = plots.plot_curves(study, arms, m, folder / f"curve_{m.replace('/', '_')}.png")
        if p is not None:
            lines += [f"![{m} against generator updates and CPU-seconds]({p.name})", ""]
            drawn += 1
    return lines[:-1] if drawn else lines + ["No training arm has a scored checkpoint with a recorded cost: no curve."]


def _loss_section(study: Study, arms: dict[str, ArmScores], folder: Path) -> list[str]:
    lines = ["", "## Training losses", ""]
    try:
        if not plots.tracked_uris(study, arms):
            return lines + ["The study trained without MLflow tracking (`tracking.enabled: false`): no training losses to show."]
        found = plots.loss_histories(study, arms)
    except UserError as exc:
        return lines + [f"The training losses could not be read from MLflow: {exc}"]
    hist = {a: found[a] for a in arms if any(found.get(a, {}).values())}
    if not hist:
        return lines + [f"MLflow experiment `{study.experiment}` holds no training run of this study with losses "
                        "(was the store moved or cleared?): no training losses to show."]
    path, symlog = plots.plot_losses(hist, folder / "losses.png")
    scale = ("y is logarithmic in every panel" if not symlog else
             f"y is logarithmic, except symlog (linear near 0, logarithmic beyond) in the panels of {', '.join(symlog)}, "
             "whose losses reach 0 or below")
    return lines + [f"The losses each training run logged to MLflow (keys `loss/...`; a logged point is the mean over "
                    f"the iterations since the previous one), one panel per training arm, one colour per loss, one line "
                    f"style per training seed; a later stage continues the iteration count of the earlier; {scale}.", "",
                    f"![training losses]({path.name})"]


def _monitor_section(study: Study, arms: dict[str, ArmScores], folder: Path) -> list[str]:
    """The learned rewards' gap to the oracle over training (``monitor/...``), for the arms that logged it; nothing
    when none did."""
    try:
        found = plots.loss_histories(study, arms, prefix="monitor/") if plots.tracked_uris(study, arms) else {}
    except UserError:
        return []  # the loss section already says that MLflow could not be read
    hist = {a: found[a] for a in arms if any(found.get(a, {}).values())}
    if not hist:
        return []
    path, _ = plots.plot_losses(hist, folder / "monitor.png", log=False)
    return ["", "## Learned rewards against the oracle over training", "",
            "Logged by the RL arms with `method.monitor` on the rollouts of every diagnosed epoch (docs/rtdmd.md, "
            "\"Diagnostics\"): `monitor/<m>` is the mean of a reward m that is never trained on (on shapes the "
            "preference oracle), `monitor/gap/<r>` the mean of r - m for the training reward r that stands for it (the "
            "learned preference model). A gap that grows while the oracle stalls is reward hacking: the generator "
            "learns what the learned model over-scores. Linear y; iterations as in the losses.", "",
            f"![learned rewards against the oracle]({path.name})"]


def _header(study: Study) -> list[str]:
    e, path = study.eval, portable_path(study.path)
    return [f"# Study: {study.name}", "",
            f"Made by `rtdmd-bench study report {path}` from `rtdmd-bench study run {path}`. "
            f"Backend `{study.backend}`; evaluation: suites {', '.join(e.suites)}, {e.steps} sampling steps unless an arm "
            f"says otherwise, {e.prompts or 'all'} prompts x {e.images_per_prompt} images, image seed {e.seed}, "
            f"{e.bootstrap} bootstrap resamples; every arm is scored on the same (prompt, image seed) units."]


def report_lines(study: Study, arms: dict[str, ArmScores], folder: Path) -> list[str]:
    metrics = metrics_of(arms)
    lines = _header(study) + ["", "## Arms", "", BUDGET_NOTE, ""] + _budget_table(study, arms)
    lines += ["", "Scores: mean over training seeds and units with its 95 % bootstrap interval (units and training seeds "
              "resampled); the seed range shows the spread of the training seeds' own means.", ""]
    lines += _score_table(study, arms, metrics)
    lines += sweep_lines(study)
    lines += ["", f"## Paired differences against `{study.reference}`", "",
              "Difference of means on the shared units, 95 % paired bootstrap interval.", ""]
    lines += _diff_table(study, arms, metrics + feature_metrics(arms))
    if study.claims:
        lines += ["", "## Verdicts", "", "supported: the interval excludes 0 on the claimed side; not supported: it excludes "
                  "0 on the other side; inconclusive: it contains 0.", ""]
        lines += _claims_table(study, arms)
    lines += precision_section(study, arms, metrics)
    lines += _curve_section(study, arms, metrics, folder)
    lines += _loss_section(study, arms, folder)
    lines += _monitor_section(study, arms, folder)
    return lines + [""] + legend(metrics)


def _partial_note(study: Study, arms: dict[str, ArmScores], missing: list[Job]) -> list[str]:
    if not missing:
        return []
    total = len(plan(study))
    left = [a for a in study.arms if a not in arms]
    return ["", f"**Partial report: {total - len(missing)} of {total} jobs are done.** Shown are the arms whose every job is done "
            f"(and the arms they start from); not yet: {', '.join(left)}. A claim with an arm not yet run has no verdict. "
            f"`rtdmd-bench study run {portable_path(study.path)}` continues the study."]


def write_study_report(path: str | Path, out: Path | None = None, partial: bool = False) -> Path:
    """The study's report (default reports/<study>/report.md); with ``partial``, of the arms finished so far."""
    study = load_study(path)
    missing = missing_jobs(study)
    arms = load_scores(study, partial=partial, missing=missing)
    out = Path(out) if out is not None else Path("reports") / study.name / "report.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = report_lines(study, arms, out.parent)
    lines[1:1] = _partial_note(study, arms, missing)
    out.write_text("\n".join(lines))
    return out
