"""A finished study's scores and costs, read from the files `study run` wrote: the report's tables and figures
(benchmarks.study.report, benchmarks.study.plots) are made from these.

Costs are counted inside the study: an arm's own run (every stage of its run folder, every resumed attempt) plus,
for an ``init_from`` arm, the cost of the parent arm's checkpoint it starts from (recursively). Weights an arm
starts from outside the study (a teacher given as ``method.init``) are not charged, as checkpoint arms are not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rtdmd.errors import UserError

from benchmarks.study.execute import Job, arm_dir, checkpoint_cost, missing_jobs, seeds_of
from benchmarks.study.spec import Study
from benchmarks.study.stats import Difference, paired_difference
from benchmarks.study.units import UnitScores, feature_difference, load_units, unit_matrix, unit_order

#: the cost of a trained checkpoint: summed along an init_from chain
COST_KEYS = ("iterations", "generator_updates", "generator_images", "run_train_cpu_seconds")


@dataclass
class ArmScores:
    name: str
    seeds: list[int]
    final: list[UnitScores]  # one per training seed
    curves: dict[int, list[dict]]  # seed -> [{"step", "cost" (own run, or None), "scores": UnitScores}]
    train: list[dict]  # train.json per seed ({} for a fixed checkpoint)


def _read(path: Path):
    return json.loads(path.read_text())


def _point_cost(study: Study, train: dict, point: dict) -> dict | None:
    """A curve point's own-run cost: recorded by `study run`, or (an eval.json written before costs were recorded)
    read from the checkpoint beside the final one."""
    if "cost" in point or not train:
        return point.get("cost")
    step_dir = (study.out / train["checkpoint"]).parent / f"step_{int(point['step']):06d}"
    return checkpoint_cost(step_dir) if (step_dir / "meta.json").is_file() else None


def _train_record(study: Study, d: Path) -> dict:
    """An arm seed's train.json; one written before CPU-seconds were recorded there takes them from its final
    checkpoint's meta.json, when the trainer recorded them."""
    if not (d / "train.json").is_file():
        return {}
    train = _read(d / "train.json")
    step_dir = study.out / train.get("checkpoint", "")
    if "run_train_cpu_seconds" not in train and (step_dir / "meta.json").is_file():
        train["run_train_cpu_seconds"] = checkpoint_cost(step_dir)["run_train_cpu_seconds"]
    return train


def finished_arms(study: Study, missing: list[Job]) -> list[str]:
    """The arms with no job in ``missing`` whose init_from arms are finished too, in study order."""
    left = {j.arm for j in missing}
    done: list[str] = []
    for arm in study.order():
        if arm.name not in left and (not arm.init_from or arm.init_from in done):
            done.append(arm.name)
    return done


def load_scores(study: Study, partial: bool = False, missing: list[Job] | None = None) -> dict[str, ArmScores]:
    """Every arm's scores; a study with jobs left (``missing``, found here when not given) is refused, or with
    ``partial`` read as its finished arms (finished_arms)."""
    missing = missing_jobs(study) if missing is None else missing
    if missing and not partial:
        raise UserError(f"study '{study.name}' is not finished ({len(missing)} jobs left, e.g. '{missing[0].label}'); "
                        f"run 'rtdmd-bench study run {study.path}' first, or report the finished arms with --partial.")
    names = finished_arms(study, missing)
    if study.reference not in names:
        raise UserError(f"study '{study.name}' has not scored its reference arm '{study.reference}' yet, so no difference "
                        f"can be shown; run 'rtdmd-bench study run {study.path}' until it is done.")
    out = {}
    for arm in (a for a in study.order() if a.name in names):
        seeds = seeds_of(arm)
        finals, curves, trains = [], {}, []
        for s in seeds:
            d = arm_dir(study, arm.name, s)
            ev = _read(d / "eval.json")
            train = _train_record(study, d)
            finals.append(load_units(study.out / ev["final"]))
            curves[s] = [{"step": p["step"], "cost": _point_cost(study, train, p),
                          "scores": load_units(study.out / p["units"])} for p in ev["points"]]
            trains.append(train)
        out[arm.name] = ArmScores(arm.name, seeds, finals, curves, trains)
    return out


def metrics_of(arms: dict[str, ArmScores]) -> list[str]:
    """The per-unit metrics every arm and seed was scored on."""
    names = None
    for a in arms.values():
        for s in a.final:
            names = set(s.metrics) if names is None else names & set(s.metrics)
    return sorted(names or [])


def shared_keys(arms: dict[str, ArmScores], a: str, b: str, metric: str) -> list[str]:
    keys = sorted(set.intersection(*(set(s.metrics.get(metric, {})) for s in arms[a].final + arms[b].final)),
                  key=unit_order)
    if not keys:
        raise UserError(f"arms '{a}' and '{b}' share no evaluation units for '{metric}'; evaluate them on the same prompts and seeds.")
    return keys


def compare(arms: dict[str, ArmScores], a: str, b: str, metric: str, n_boot: int) -> Difference:
    """Paired difference a - b on the units both arms were scored on (FD: bootstrapped over the units' features)."""
    if all(metric in s.features for s in arms[a].final + arms[b].final):
        return feature_difference(arms[a].final, arms[b].final, metric, n_boot)
    keys = shared_keys(arms, a, b, metric)
    ma, strata, _ = unit_matrix(arms[a].final, metric, keys)
    mb, _, _ = unit_matrix(arms[b].final, metric, keys)
    return paired_difference(ma, mb, strata, n_boot=n_boot)


# ---------------------------------------------------------------------------- costs


def add_costs(a: dict | None, b: dict | None) -> dict | None:
    """Cost a + b, None when either is unknown (CPU-seconds alone None when either's are unknown)."""
    if a is None or b is None:
        return None
    out = {k: a.get(k, 0) + b.get(k, 0) for k in COST_KEYS if k != "run_train_cpu_seconds"}
    cpu = [a.get("run_train_cpu_seconds"), b.get("run_train_cpu_seconds")]
    out["run_train_cpu_seconds"] = None if None in cpu else cpu[0] + cpu[1]
    return out


ZERO_COST = {k: 0 for k in COST_KEYS}


def own_cost(train: dict) -> dict | None:
    """An arm's own run cost from its train.json (CPU-seconds None in one written before they were recorded)."""
    if "generator_updates" not in train:
        return None
    return {k: train.get(k) for k in COST_KEYS}


def start_cost(study: Study, arms: dict[str, ArmScores], arm: str, seed: int) -> dict | None:
    """What the weights an arm starts from cost inside the study: its init_from parent's final checkpoint of the same
    training seed, with that parent's own start cost (zero for an arm that does not start from another arm)."""
    parent = study.arms[arm].init_from
    if not parent:
        return dict(ZERO_COST)
    p = arms[parent]
    return add_costs(start_cost(study, arms, parent, seed), own_cost(p.train[p.seeds.index(seed)]))


def final_cost(study: Study, arms: dict[str, ArmScores], arm: str, seed: int) -> dict | None:
    """An arm's final checkpoint's cost inside the study (its start cost + its own run); None for a checkpoint arm."""
    if not study.arms[arm].trains:
        return None
    a = arms[arm]
    return add_costs(start_cost(study, arms, arm, seed), own_cost(a.train[a.seeds.index(seed)]))
