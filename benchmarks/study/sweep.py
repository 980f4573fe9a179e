"""Sweeps: a study arm's config value (a learning rate, say) chosen on held-out prompts before the arm trains.

    arms:
      dmd2: {method: dmd2, seeds: [0, 1],
             sweep: {key: method.generator_optim.lr, values: [1e-5, 3e-5, 1e-4], max_steps: 200}}

`study run` first trains one short run per value (training seed 0, ``max_steps`` iterations, the arm's other
settings), scores each on prompts the evaluation never uses, picks the value with the best mean of the sweep's
metric (the first claim's unless ``metric`` is set; ties: the smaller value), writes ``<out>/sweeps/<arm>.json``
and then trains the arm's seeds with the chosen value as one more override.

The held-out prompts. Image backends: the evaluation's prompt set (the first suite's default prompts: GenEval on
shapes) less the eval.prompts ones the evaluation takes (evenly spaced within each task); of the rest, as many as
eval.prompts, chosen the same way, so every task with a prompt left is kept. A task the evaluation takes whole has
none left (GenEval-shapes has 4 single-object prompts, all evaluated from eval.prompts = 24 on): the sweep's
records and the report name it. toy2d:
the prompts after the evaluation's first eval.prompts ('mode n-1' onwards; the mixture prompt "" is always
evaluated), each with eval.images_per_prompt samples seeded as in the evaluation.

    <out>/sweeps/<arm>/value<j>/run/            the short run of value j
    <out>/sweeps/<arm>/value<j>/heldout.jsonl   its held-out prompts (image backends)
    <out>/sweeps/<arm>/value<j>/units.json      its per-unit scores on them
    <out>/sweeps/<arm>/value<j>/score.json      done: the value, its mean [95 % CI], the held-out prompt count
    <out>/sweeps/<arm>.json                     the values, their scores, the choice
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks.eval_models import describe_checkpoint
from benchmarks.eval_prompts import stratified_indices
from benchmarks.study.spec import ArmSpec, Study
from benchmarks.study.stats import mean_interval
from benchmarks.study.units import UnitScores, feature_difference, toy2d_heldout
from benchmarks.suites.base import BackendInfo
from benchmarks.suites.registry import make_suite
from rtdmd.config import _deep_merge, resolve
from rtdmd.errors import UserError
from rtdmd.fileio import atomic_write_bytes


def value_dir(study: Study, arm: str, j: int) -> Path:
    return study.out / "sweeps" / arm / f"value{j}"


def choice_path(study: Study, arm: str) -> Path:
    return study.out / "sweeps" / f"{arm}.json"


def _write_json(path: Path, data) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())


# ---------------------------------------------------------------------------- held-out prompts


def heldout_entries(entries: list[dict], n: int) -> tuple[list[dict], list[str]]:
    """The prompt entries an evaluation of ``n`` task-stratified prompts leaves out, and the tasks it takes whole
    (they have no held-out prompt: GenEval-shapes' 4 single-object prompts are all evaluated from n = 24 on)."""
    used = set(stratified_indices(entries, n)) if n > 0 else set(range(len(entries)))
    rest = [e for i, e in enumerate(entries) if i not in used]
    if not rest:
        raise UserError(f"eval.prompts {n} takes all {len(entries)} prompts, so a sweep has none to hold out; "
                        "lower eval.prompts.")
    tasks = {str(e.get("tag", "")) for e in rest}
    return rest, sorted({str(e.get("tag", "")) for e in entries} - tasks)


def heldout_prompt_file(study: Study, step_dir: Path, folder: Path) -> tuple[Path, int]:
    """Write the held-out prompts of this checkpoint's backend to ``folder``/heldout.jsonl (GenEval JSONL) and the
    tasks without any to ``folder``/heldout_missing_tasks.json; returns the file and how many of its prompts to
    score (eval.prompts, at most all; stratified by task like the evaluation's)."""
    info = describe_checkpoint(step_dir).info
    rest, gone = heldout_entries(make_suite(study.eval.suites[0]).default_prompts(info), study.eval.prompts)
    _write_json(folder / "heldout_missing_tasks.json", gone)
    path = folder / "heldout.jsonl"
    atomic_write_bytes(path, "".join(json.dumps(e, sort_keys=True) + "\n" for e in rest).encode())
    return path, min(study.eval.prompts, len(rest))


def check_heldout(study: Study) -> None:
    """Refuse, before anything trains, a sweep whose evaluation leaves no held-out prompts (from the arm's config)."""
    for a in study.arms.values():
        if not a.sweep.key:
            continue
        cfg = resolve(a.method, backend=study.backend, overrides=a.overrides or {}, preset=a.preset or None)
        if study.backend == "toy2d":
            toy2d_heldout(len(cfg.backend.means), study.eval.prompts)
        else:
            info = BackendInfo.from_options(cfg.backend_name, cfg.backend)
            heldout_entries(make_suite(study.eval.suites[0]).default_prompts(info), study.eval.prompts)


# ---------------------------------------------------------------------------- runs, scores and the choice


def run_overrides(study: Study, arm: ArmSpec, j: int, base: dict) -> dict:
    """The training overrides of value j's run: the arm's (``base``, seed 0) with the value and the sweep budget."""
    sw = arm.sweep
    budget = {"train": {"max_steps": sw.max_steps, "max_steps_cap": sw.max_steps, "keep_checkpoints": 2},
              "tracking": {"run_name": f"{study.name}/{arm.name}/sweep{j}",
                           "tags": {"sweep": f"{sw.key}={sw.values[j]:g}"}}}
    return _deep_merge(_deep_merge(base, sw.nested(sw.values[j])), budget)


def score_record(study: Study, arm: ArmSpec, j: int, scores: UnitScores) -> dict:
    """Value j's mean of the sweep metric on the held-out units with its 95 % interval."""
    m = arm.sweep.metric
    if m in scores.features:
        d = feature_difference([scores], None, m, study.eval.bootstrap)
        mean, lo, hi, units = d.diff, d.lo, d.hi, scores.features[m]["units"][:, 0].tolist()
    elif m in scores.metrics:
        keys = sorted(scores.metrics[m], key=lambda k: tuple(int(x) for x in k.split(":")))
        strata = [scores.strata.get(m, {}).get(k, "") for k in keys]
        values = np.array([[scores.metrics[m][k] for k in keys]])
        mean, lo, hi = mean_interval(values, np.array(strata) if any(strata) else None, n_boot=study.eval.bootstrap)
        units = [int(k.split(":")[0]) for k in keys]
    else:
        have = sorted(set(scores.metrics) | set(scores.features))
        raise UserError(f"arm '{arm.name}' sweeps by metric '{m}', which the evaluation does not score; set sweep.metric "
                        f"to one of: {', '.join(have)}.")
    missing = value_dir(study, arm.name, j) / "heldout_missing_tasks.json"
    return {"value": arm.sweep.values[j], "metric": m, "mean": mean, "lo": lo, "hi": hi, "units": len(units),
            "heldout_prompts": len(set(units)),
            "tasks_not_held_out": json.loads(missing.read_text()) if missing.is_file() else []}


def choose(values: list[float], means: list[float], direction: str) -> float:
    """The value with the best mean (the largest for 'greater', the smallest for 'less'); ties: the smaller value."""
    sign = -1.0 if direction == "greater" else 1.0
    return min(zip(values, means), key=lambda vm: (sign * vm[1], vm[0]))[0]


def write_choice(study: Study, arm: ArmSpec) -> float:
    """Read the scores of every value of the arm's sweep, write <out>/sweeps/<arm>.json, return the chosen value."""
    sw = arm.sweep
    scores = [json.loads((value_dir(study, arm.name, j) / "score.json").read_text()) for j in range(len(sw.values))]
    choice = choose(list(sw.values), [s["mean"] for s in scores], sw.direction)
    _write_json(choice_path(study, arm.name), {
        "arm": arm.name, "key": sw.key, "values": list(sw.values), "max_steps": sw.max_steps, "seed": 0,
        "metric": sw.metric, "direction": sw.direction, "heldout_prompts": scores[0]["heldout_prompts"],
        "tasks_not_held_out": scores[0].get("tasks_not_held_out", []),
        "scores": [{k: s[k] for k in ("value", "mean", "lo", "hi", "units", "iterations") if k in s} for s in scores],
        "choice": choice})
    return choice


def sweep_lines(study: Study) -> list[str]:
    """The report's sweep section: per swept arm and value, the held-out score with its interval and the choice."""
    rows = []
    for a in study.arms.values():
        f = choice_path(study, a.name)
        if not a.sweep.key or not f.is_file():
            continue
        c = json.loads(f.read_text())
        gone = c.get("tasks_not_held_out") or []
        held = f"{c['heldout_prompts']}" + (f" (no {', '.join(gone)}: the evaluation takes them whole)" if gone else "")
        for s in c["scores"]:
            mark = "**chosen**" if s["value"] == c["choice"] else ""
            rows.append(f"| {a.name} | {c['key']} = {s['value']:g} | {c['metric']} ({c['direction']} is better) | "
                        f"{s['mean']:.3f} [{s['lo']:.3f}, {s['hi']:.3f}] | {held} | {mark} |")
    if not rows:
        return []
    return ["", "## Sweeps", "", "Each value trained once (seed 0, the sweep's iterations) and scored on held-out prompts "
            "the evaluation never uses; the arm trained with the chosen value (ties: the smaller).", "",
            "| arm | value | metric | held-out score [95 % CI] | held-out prompts | |", "|---|---|---|---|---|---|", *rows]
