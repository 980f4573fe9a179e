"""Per-task precision of a study: is each GenEval task's score, and each difference against the reference arm,
measured finely enough, and what would it cost to measure it finely enough?

Per arm and task (the stratum the units carry): the mean with its 95 % half-width (flagged above 0.05), the
paired difference against the reference arm with its half-width against the 0.02 target, and the images per
prompt the target would need, n_now x (half-width / 0.02)^2.
"""

from __future__ import annotations

import math

import numpy as np

from benchmarks.study.scores import ArmScores, shared_keys, unit_matrix
from benchmarks.study.spec import Study
from benchmarks.study.stats import mean_interval, paired_difference

TASK_HALF_WIDTH = 0.05  # a task's mean is flagged when its 95 % half-width is above this
DIFF_TARGET = 0.02  # the half-width a difference against the reference should reach


def precision_metric(metrics: list[str], arms: dict[str, ArmScores]) -> str | None:
    """``geneval`` when scored; else the first stratified metric with a 0-1 scale (toy2d/in_mode: its prompt kinds)."""
    for m in ["geneval"] + [m for m in metrics if m != "geneval"]:
        if m in metrics and m != "toy2d/log_density" and unit_matrix(next(iter(arms.values())).final, m)[1] is not None:
            return m
    return None


def images_needed(n_now: int, half_width: float, target: float = DIFF_TARGET) -> int:
    """Images per prompt for a 95 % half-width of ``target``, if it shrinks like 1 / sqrt(images): n_now x (hw / target)^2."""
    return max(n_now, math.ceil(n_now * (half_width / target) ** 2))


def prompts_per_task(arms: dict[str, ArmScores], metric: str) -> dict[str, int]:
    """Distinct prompts (the i of unit key 'i:k') per stratum, on the first arm's first seed."""
    strata = next(iter(arms.values())).final[0].strata.get(metric, {})
    per: dict[str, set] = {}
    for key, task in strata.items():
        per.setdefault(task, set()).add(key.split(":")[0])
    return {t: len(v) for t, v in sorted(per.items())}


def _hw_cell(hw: float, limit: float) -> str:
    return f"**{hw:.3f}**" if hw > limit else f"{hw:.3f}"


def _diff_cells(d, n_now: int) -> list[str]:
    need = "met" if d.half_width <= DIFF_TARGET else f"{images_needed(n_now, d.half_width):,}"
    return [f"{d.diff:+.3f}", _hw_cell(d.half_width, DIFF_TARGET), need]


def arm_precision_rows(study: Study, arms: dict[str, ArmScores], name: str, metric: str) -> list[dict]:
    """One row per task and one 'overall': mean, half-width, and against the reference (None for the reference
    itself) the paired Difference on the units both arms share."""
    n_boot, ref = study.eval.bootstrap, study.reference
    mat, strata, _ = unit_matrix(arms[name].final, metric)
    keys = None if name == ref else shared_keys(arms, name, ref, metric)
    if keys is not None:
        ma, kstrata, _ = unit_matrix(arms[name].final, metric, keys)
        mb, _, _ = unit_matrix(arms[ref].final, metric, keys)
    rows = []
    for task in [*np.unique(strata), "overall"]:
        sel = slice(None) if task == "overall" else strata == task
        mean, lo, hi = mean_interval(mat[:, sel], strata if task == "overall" else None, n_boot=n_boot)
        diff = None
        if keys is not None:
            dsel = slice(None) if task == "overall" else kstrata == task
            diff = paired_difference(ma[:, dsel], mb[:, dsel], kstrata if task == "overall" else None, n_boot=n_boot)
        rows.append({"task": str(task), "mean": mean, "half_width": (hi - lo) / 2, "diff": diff})
    return rows


def _arm_table(study: Study, arms: dict[str, ArmScores], name: str, metric: str) -> list[str]:
    ref, n_now = study.reference, study.eval.images_per_prompt
    lines = [f"**{name}**", "", f"| task | mean | 95 % half-width | {name} - {ref} | its 95 % half-width "
             f"| images per prompt for +-{DIFF_TARGET} |", "|---|---|---|---|---|---|"]
    for r in arm_precision_rows(study, arms, name, metric):
        diff = ["-", "-", "-"] if r["diff"] is None else _diff_cells(r["diff"], n_now)
        lines.append(f"| {r['task']} | {r['mean']:.3f} | {_hw_cell(r['half_width'], TASK_HALF_WIDTH)} | " + " | ".join(diff) + " |")
    return lines + [""]


def precision_section(study: Study, arms: dict[str, ArmScores], metrics: list[str]) -> list[str]:
    metric = precision_metric(metrics, arms)
    if metric is None:
        return []
    n_now = study.eval.images_per_prompt
    counts = prompts_per_task(arms, metric)
    lines = ["", f"## Per-task precision (`{metric}`)", "",
             f"Prompts per task: {', '.join(f'{t} {n}' for t, n in counts.items())} (x {n_now} images each).", "",
             f"Per arm and task (the stratum its units carry): the mean and its 95 % half-width (units and training seeds "
             f"resampled), in bold above {TASK_HALF_WIDTH}; the paired difference against `{study.reference}` and its "
             f"95 % half-width, in bold above the {DIFF_TARGET} target; and what reaching the target would cost: images "
             f"per prompt = {n_now} x (half-width / {DIFF_TARGET})^2. That estimate assumes the half-width shrinks like "
             "1 / sqrt(images), as the image-noise part does; the spread between prompts and between training seeds does "
             "not shrink with more images per prompt, so where those dominate it is too low (more prompts or seeds are "
             "needed instead).", ""]
    for name in arms:
        lines += _arm_table(study, arms, name, metric)
    return lines[:-1]
