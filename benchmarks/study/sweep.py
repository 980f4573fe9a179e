"""Sweeps: a study arm's config value (a learning rate, say) chosen on held-out prompts before the arm trains.

    arms:
      dmd2: {method: dmd2, seeds: [0, 1],
             sweep: {key: method.generator_optim.lr, values: [1e-5, 3e-5, 1e-4], max_steps: 200}}

`study run` first trains one short run per value (training seed 0, ``max_steps`` iterations, the arm's other
settings), scores each on prompts the evaluation never uses, picks the value with the best mean of the sweep's
metric (the first claim's unless ``metric`` is set; ties: the smaller value), writes ``<out>/sweeps/<arm>.json``
and then trains the arm's seeds with the chosen value as one more override.

The choice is only as good as the sweep's power, so ``sweeps/<arm>.json`` and the report also give each value's
paired difference to the chosen one over the same held-out units, with its interval.

The held-out prompts. Image backends: per task, as many prompts as the evaluation takes of it (eval.prompts of the
first suite's default prompts, stratified by task), none of them a prompt the evaluation scores: first the default
prompts the evaluation leaves out, then, for GenEval, new draws of GenEval's recipe on the backend's classes
(benchmarks.geneval.suite.recipe_draws). A task whose every possible prompt is evaluated has none (GenEval-shapes
from eval.prompts = 150: single_object, two_object and counting, with 4, 12 and 12 possible prompts): the sweep's
records and the report name it. Each held-out prompt gets ``images_per_prompt`` images (default: the
evaluation's), seeded as in the evaluation. toy2d: the prompts after the evaluation's first eval.prompts
('mode n-1' onwards; the mixture prompt "" is always evaluated).

    <out>/sweeps/<arm>/value<j>/run/            the short run of value j
    <out>/sweeps/<arm>/value<j>/heldout.jsonl   its held-out prompts (image backends)
    <out>/sweeps/<arm>/value<j>/units.json      its per-unit scores on them
    <out>/sweeps/<arm>/value<j>/score.json      done: the value, its mean [95 % CI], the held-out prompt count
    <out>/sweeps/<arm>.json                     the values, their scores, the choice
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from itertools import chain
from pathlib import Path

from benchmarks.eval_models import describe_checkpoint
from benchmarks.eval_prompts import stratified_indices
from benchmarks.study.spec import ArmSpec, Study
from benchmarks.study.stats import mean_interval, paired_difference
from benchmarks.study.units import UnitScores, feature_difference, load_units, toy2d_heldout, unit_matrix
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


def _key(entry: dict) -> tuple[str, str]:
    return str(entry.get("tag", "")), str(entry.get("prompt", ""))


def heldout_entries(entries: list[dict], n: int, draws: Iterable[list[dict]] = ()) -> tuple[list[dict], list[str]]:
    """The held-out prompts of an evaluation of ``n`` task-stratified prompts of ``entries`` (all when n <= 0), and the
    tasks that have none. Per task, as many as the evaluation takes of it: first the entries it leaves out, then new
    prompts from ``draws`` (more prompt lists from the suite's recipe), never a (task, prompt) the evaluation scores.
    A task whose every possible prompt is evaluated has none (GenEval-shapes: single_object, two_object and
    counting, whose 4, 12 and 12 prompts an evaluation of 150 takes whole)."""
    used_idx = set(stratified_indices(entries, n)) if n > 0 else set(range(len(entries)))
    quota = Counter(str(entries[i].get("tag", "")) for i in used_idx)
    seen = {_key(entries[i]) for i in used_idx}
    held: list[dict] = []
    count: Counter = Counter()
    for e in chain((e for i, e in enumerate(entries) if i not in used_idx), *draws):
        tag = str(e.get("tag", ""))
        if _key(e) in seen or count[tag] >= quota[tag]:
            continue
        seen.add(_key(e))
        held.append(e)
        count[tag] += 1
    if not held:
        raise UserError(f"eval.prompts {n} takes every prompt a sweep could hold out ({len(entries)} in the prompt set); "
                        "lower eval.prompts.")
    return held, sorted(set(quota) - set(count))


def _heldout(study: Study, info) -> tuple[list[dict], list[str]]:
    suite = make_suite(study.eval.suites[0])
    draws = suite.heldout_draws(info) if hasattr(suite, "heldout_draws") else ()
    return heldout_entries(suite.default_prompts(info), study.eval.prompts, draws)


def heldout_prompt_file(study: Study, step_dir: Path, folder: Path) -> tuple[Path, int]:
    """Write the held-out prompts of this checkpoint's backend to ``folder``/heldout.jsonl (GenEval JSONL) and the
    tasks without any to ``folder``/heldout_missing_tasks.json; returns the file and its prompt count (all scored)."""
    held, gone = _heldout(study, describe_checkpoint(step_dir).info)
    _write_json(folder / "heldout_missing_tasks.json", gone)
    path = folder / "heldout.jsonl"
    atomic_write_bytes(path, "".join(json.dumps(e, sort_keys=True) + "\n" for e in held).encode())
    return path, len(held)


def check_heldout(study: Study) -> None:
    """Refuse, before anything trains, a sweep whose evaluation leaves no held-out prompts (from the arm's config)."""
    for a in study.arms.values():
        if not a.sweep.key:
            continue
        cfg = resolve(a.method, backend=study.backend, overrides=a.overrides or {}, preset=a.preset or None)
        if study.backend == "toy2d":
            toy2d_heldout(len(cfg.backend.means), study.eval.prompts)
        else:
            _heldout(study, BackendInfo.from_options(cfg.backend_name, cfg.backend))


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
        values, strata, keys = unit_matrix([scores], m)
        mean, lo, hi = mean_interval(values, strata, n_boot=study.eval.bootstrap)
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


def _scores(study: Study, arm: ArmSpec) -> list[dict] | None:
    """Every value's score.json of the arm's sweep, None while one is missing."""
    files = [value_dir(study, arm.name, j) / "score.json" for j in range(len(arm.sweep.values))]
    if not all(f.is_file() for f in files):
        return None
    return [json.loads(f.read_text()) for f in files]


def current_choice(study: Study, arm: ArmSpec) -> float | None:
    """The value the arm's finished sweep chooses (None while a value is not scored yet)."""
    scores = _scores(study, arm)
    return None if scores is None else choose(list(arm.sweep.values), [s["mean"] for s in scores], arm.sweep.direction)


def paired_to_choice(study: Study, arm: ArmSpec, chosen: int) -> list[dict]:
    """Each value's score minus the chosen value's, paired over the shared held-out units (the same prompts and
    image seeds), with its 95 % bootstrap interval: whether the sweep separated the values at all."""
    m = arm.sweep.metric
    units = [load_units(value_dir(study, arm.name, j) / "units.json") for j in range(len(arm.sweep.values))]
    out = []
    for j, u in enumerate(units):
        if m in u.features:
            d = feature_difference([u], [units[chosen]], m, study.eval.bootstrap)
        else:
            b, strata, keys = unit_matrix([units[chosen]], m)
            a, _, _ = unit_matrix([u], m, keys)
            d = paired_difference(a, b, strata, n_boot=study.eval.bootstrap)
        out.append({"value": arm.sweep.values[j], "diff": d.diff, "lo": d.lo, "hi": d.hi})
    return out


def write_choice(study: Study, arm: ArmSpec) -> float:
    """Read the scores of every value of the arm's sweep, write <out>/sweeps/<arm>.json, return the chosen value."""
    sw = arm.sweep
    scores = _scores(study, arm)
    choice = choose(list(sw.values), [s["mean"] for s in scores], sw.direction)
    _write_json(choice_path(study, arm.name), {
        "arm": arm.name, "key": sw.key, "values": list(sw.values), "max_steps": sw.max_steps, "seed": 0,
        "metric": sw.metric, "direction": sw.direction, "heldout_prompts": scores[0]["heldout_prompts"],
        "tasks_not_held_out": scores[0].get("tasks_not_held_out", []),
        "scores": [{k: s[k] for k in ("value", "mean", "lo", "hi", "units", "iterations") if k in s} for s in scores],
        "versus_choice": paired_to_choice(study, arm, list(sw.values).index(choice)),
        "choice": choice})
    return choice


def sweep_lines(study: Study) -> list[str]:
    """The report's sweep section: per swept arm and value, the held-out score with its interval, its paired
    difference to the chosen value, and the choice."""
    rows, notes = [], []
    for a in study.arms.values():
        f = choice_path(study, a.name)
        if not a.sweep.key or not f.is_file():
            continue
        c = json.loads(f.read_text())
        edge = grid_edge(c["values"], c["choice"])
        if edge:
            notes.append(f"- {a.name}: the chosen {c['choice']:g} is the {edge} value of its grid, so the best value "
                         f"may lie beyond it.")
        gone = c.get("tasks_not_held_out") or []
        held = f"{c['heldout_prompts']}" + (f" (no {', '.join(gone)}: the evaluation takes them whole)" if gone else "")
        versus = {v["value"]: v for v in c.get("versus_choice", [])}
        for s in c["scores"]:
            chosen = s["value"] == c["choice"]
            v = versus.get(s["value"])
            paired = "-" if chosen or v is None else f"{v['diff']:+.3f} [{v['lo']:+.3f}, {v['hi']:+.3f}]"
            rows.append(f"| {a.name} | {c['key']} = {s['value']:g} | {c['metric']} ({c['direction']} is better) | "
                        f"{s['mean']:.3f} [{s['lo']:.3f}, {s['hi']:.3f}] | {paired} | {held} | "
                        f"{'**chosen**' if chosen else ''} |")
    if not rows:
        return []
    return ["", "## Sweeps", "", "Each value trained once (seed 0, the sweep's iterations) and scored on held-out prompts "
            "the evaluation never uses; the arm trained with the chosen value (the best mean; ties: the smaller). "
            "The paired difference to the chosen value is taken over the same held-out prompts and image seeds: an "
            "interval that holds 0 means the sweep did not separate that value from the choice.", "",
            "| arm | value | metric | held-out score [95 % CI] | minus the chosen value [95 % CI] | held-out prompts | |",
            "|---|---|---|---|---|---|---|", *rows, *([""] + notes if notes else [])]


def grid_edge(values: list[float], choice: float) -> str:
    """'largest' or 'smallest' when the chosen value is an end of the grid, else ''."""
    if choice == max(values):
        return "largest"
    return "smallest" if choice == min(values) else ""
