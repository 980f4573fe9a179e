"""A study file: arms, training seeds, the budget, the evaluation and the claims to decide.

    name: toy2d-demo
    backend: toy2d
    reference: teacher                 # differences are taken against this arm
    budget: {generator_updates: 40, batch: 64}
    eval: {suites: [toy2d], steps: 4, prompts: 8, images_per_prompt: 32, seed: 0}
    arms:
      teacher: {checkpoint: runs/toy2d-teacher, steps: 40}
      dmd2:    {method: dmd2, seeds: [0, 1], overrides: {train: {max_steps: 200}}}
      rtdmd:   {method: rtdmd, init_from: ac-dmd, seeds: [0, 1]}
    claims:
      - {name: "(b) AC-DMD vs DMD2", arm: ac-dmd, versus: dmd2, metric: toy2d/in_mode, direction: greater}

An arm either trains (``method``, with ``preset`` and ``overrides`` as `rtdmd-bench train` takes them, one run
per training seed) or evaluates a fixed ``checkpoint`` (``sampler: cps`` runs a teacher's weights as the few-step
CPS generator). ``sweep`` first chooses one config value of a training arm on held-out prompts (benchmarks.study.sweep). ``init_from`` names an arm whose checkpoint of the same
training seed initialises this arm (``method.init``), so arms train in dependency order. Every training arm
is held to ``budget`` (generator updates x batch, checked from its resolved config when the file is read) unless
it says ``budget: false``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.suites.registry import expand_suites
from rtdmd import registry
from rtdmd.config import _deep_merge, build_dataclass, read_yaml, resolve
from rtdmd.errors import UserError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


@dataclass
class EvalSpec:
    suites: list[str] = field(default_factory=lambda: ["geneval"])
    steps: int = 4  # the generators' sampling steps (arms may override)
    guidance: float = 1.0
    prompts: int = 0  # prompts per evaluation (0: the whole prompt set; every task kept)
    images_per_prompt: int = 4
    seed: int = 0  # image seeds: unit (prompt i, image k) is seeded by (seed, i, k) for every arm
    curves: bool = True  # also evaluate intermediate checkpoints (learning curves)
    bootstrap: int = 2000  # bootstrap resamples of every interval

    def validate(self):
        if self.steps <= 0 or self.images_per_prompt <= 0 or self.prompts < 0 or self.bootstrap < 100:
            raise UserError("eval needs steps > 0, images_per_prompt > 0, prompts >= 0 and bootstrap >= 100; fix the study file.")


@dataclass
class BudgetSpec:
    generator_updates: int = 0  # per training arm held to the budget (0: not fixed)
    batch: int = 0  # generator images per update (train.batch_size x train.accumulate)


@dataclass
class SweepSpec:
    """Short runs of a training arm, one per value of ``key``, scored on held-out prompts; the arm then trains with
    the best value (benchmarks.study.sweep)."""

    key: str = ""  # a dotted config key, e.g. method.generator_optim.lr ("": no sweep)
    values: list[float] = field(default_factory=list)
    max_steps: int = 0  # training iterations of each sweep run (seed 0)
    metric: str = ""  # the metric the choice is made by (default: the first claim's)
    direction: str = ""  # greater | less (default: the first claim's direction; greater without claims)
    images_per_prompt: int = 0  # images per held-out prompt (0: eval.images_per_prompt)

    def validate(self, prefix: str = "sweep"):
        if not self.key:
            return
        if not _KEY.match(self.key):
            raise UserError(f"{prefix}.key '{self.key}' is not a dotted config key like method.generator_optim.lr; fix it.")
        if len(self.values) < 2 or len(set(self.values)) != len(self.values) or not all(math.isfinite(v) for v in self.values):
            raise UserError(f"{prefix}.values needs at least 2 distinct finite numbers; fix the list.")
        if self.max_steps <= 0:
            raise UserError(f"{prefix}.max_steps must be a positive number of training iterations per sweep run; set it.")
        if self.images_per_prompt < 0:
            raise UserError(f"{prefix}.images_per_prompt must be 0 (the evaluation's) or a positive count; fix it.")
        if self.direction not in ("", "greater", "less"):
            raise UserError(f"{prefix}.direction is '{self.direction}'; use 'greater' or 'less'.")

    def nested(self, value: float) -> dict:
        """``{key: value}`` as the nested override mapping a training config takes."""
        out: dict = {}
        *parents, leaf = self.key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
        return out


@dataclass
class ArmSpec:
    name: str = ""
    method: str = ""  # trains this method ...
    checkpoint: str = ""  # ... or evaluates this fixed checkpoint
    preset: str = ""
    overrides: dict = field(default_factory=dict)
    init_from: str = ""
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 0  # sampling steps at evaluation (0: eval.steps)
    guidance: float = -1.0  # CFG at evaluation (-1: eval.guidance)
    eta: float = -1.0  # CPS eta at evaluation (-1: the checkpoint's own)
    sampler: str = ""  # "euler" | "cps" at evaluation ("": the checkpoint's own); cps on a teacher = the students' start
    sweep: SweepSpec = field(default_factory=SweepSpec)  # choose a config value on held-out prompts first
    #: a training arm is held to the study's budget (generator updates x batch), checked before anything runs;
    #: false for arms whose budget is another axis (an RL stage on top of a distilled arm)
    budget: bool = True

    @property
    def trains(self) -> bool:
        return bool(self.method)

    def validate(self):
        if not _NAME.match(self.name):
            raise UserError(f"arm name '{self.name}' must be letters, digits, '.', '_' or '-'; rename it in the study file.")
        if bool(self.method) == bool(self.checkpoint):
            raise UserError(f"arm '{self.name}' needs exactly one of 'method' (train) or 'checkpoint' (evaluate); fix the study file.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"arm '{self.name}' needs a list of distinct training seeds; fix its 'seeds'.")
        if self.init_from and not self.method:
            raise UserError(f"arm '{self.name}' has init_from but trains nothing; give it a method or drop init_from.")
        if self.sampler not in ("", "euler", "cps"):
            raise UserError(f"arm '{self.name}' has sampler '{self.sampler}'; use euler or cps, or leave it out for the checkpoint's own.")
        if self.sampler == "euler" and self.eta >= 0:
            raise UserError(f"arm '{self.name}' sets eta for the euler sampler, which has none; drop eta or use sampler: cps.")


@dataclass
class ClaimSpec:
    name: str = ""
    arm: str = ""
    versus: str = ""
    metric: str = ""
    direction: str = "greater"  # greater: arm > versus is claimed

    def validate(self):
        if self.direction not in ("greater", "less"):
            raise UserError(f"claim '{self.name}' has direction '{self.direction}'; use 'greater' or 'less'.")


@dataclass
class Study:
    name: str
    backend: str
    path: Path
    out: Path
    experiment: str
    reference: str
    budget: BudgetSpec
    eval: EvalSpec
    arms: dict[str, ArmSpec]
    claims: list[ClaimSpec]

    def order(self) -> list[ArmSpec]:
        """Arms in dependency order (an arm after the arm it initialises from)."""
        done: list[str] = []
        pending = list(self.arms)
        while pending:
            ready = [a for a in pending if not self.arms[a].init_from or self.arms[a].init_from in done]
            if not ready:
                raise UserError(f"arms {', '.join(pending)} initialise from each other in a circle; fix their init_from.")
            done += ready
            pending = [a for a in pending if a not in ready]
        return [self.arms[a] for a in done]


_TOP = {"name", "backend", "out", "experiment", "reference", "budget", "eval", "arms", "claims"}


def load_study(path: str | Path) -> Study:
    """Read and check a study file; every mistake is one UserError sentence."""
    path = Path(path)
    data = read_yaml(path, what="study file", missing_fix="pass the path of a study file (studies/ has the shipped ones)",
                     holds="a mapping of study settings (name, backend, eval, arms, claims, ...)")
    unknown = sorted(set(data) - _TOP)
    if unknown:
        raise UserError(f"unknown key '{unknown[0]}' in study file {path}; valid keys are: {', '.join(sorted(_TOP))}.")
    name = str(data.get("name") or path.stem)
    if not _NAME.match(name):
        raise UserError(f"study name '{name}' must be letters, digits, '.', '_' or '-'; rename it in {path}.")
    raw_arms = data.get("arms") or {}
    if not isinstance(raw_arms, dict) or not raw_arms:
        raise UserError(f"study file {path} needs an 'arms' mapping (arm name -> settings).")
    arms = {a: build_dataclass(ArmSpec, {**(v or {}), "name": a}, f"arms.{a}") for a, v in raw_arms.items()}
    claims = [build_dataclass(ClaimSpec, c or {}, "claims") for c in (data.get("claims") or [])]
    study = Study(name=name, backend=str(data.get("backend") or "shapes"), path=path,
                  out=Path(data.get("out") or Path("runs") / "studies" / name),
                  experiment=str(data.get("experiment") or f"study-{name}"),
                  reference=str(data.get("reference") or next(iter(arms))),
                  budget=build_dataclass(BudgetSpec, data.get("budget") or {}, "budget"),
                  eval=build_dataclass(EvalSpec, data.get("eval") or {}, "eval"), arms=arms, claims=claims)
    _check_references(study)
    _check_names(study)
    _check_sweeps(study)
    _check_budgets(study)
    study.order()
    return study


def generator_budget(cfg, iterations: int) -> tuple[int, int]:
    """(generator updates, images per update) of ``iterations`` iterations of a resolved run config: a generator
    update every method.ttur-th iteration (the first included), train.batch_size x train.accumulate images each."""
    every = int(getattr(cfg.method, "ttur", 1) or 1)
    return -(-int(iterations) // every), int(cfg.train.batch_size) * int(getattr(cfg.train, "accumulate", 1) or 1)


def planned_budget(study: Study, arm: ArmSpec) -> tuple[int, int]:
    """(generator updates, images per update) the arm's config will train: train.max_steps iterations with a
    generator update every method.ttur-th, train.batch_size x train.accumulate images each."""
    from rtdmd.api import make_config

    cfg = make_config(arm.method, backend=study.backend, overrides=arm.overrides, preset=arm.preset or None)
    if cfg.train.max_minutes > 0:
        raise UserError(f"arm '{arm.name}' has train.max_minutes={cfg.train.max_minutes}, so its budget would depend on the "
                        "machine; set train.max_minutes: 0 in its overrides (the study budget is in generator updates).")
    return generator_budget(cfg, cfg.train.max_steps)


def _check_budgets(study: Study) -> None:
    """Every training arm held to the budget plans exactly budget.generator_updates x budget.batch images."""
    b = study.budget
    if b.generator_updates <= 0:
        return
    for a in study.arms.values():
        if not (a.trains and a.budget):
            continue
        updates, batch = planned_budget(study, a)
        if updates * batch != b.generator_updates * b.batch:
            raise UserError(f"arm '{a.name}' plans {updates} generator updates x {batch} images = {updates * batch}, not the "
                            f"study budget {b.generator_updates} x {b.batch} = {b.generator_updates * b.batch}; set its "
                            "train.max_steps / train.batch_size in overrides, or budget: false for an arm on another axis.")


def _check_sweeps(study: Study) -> None:
    """A sweep trains (seed 0, from its init_from arm's seed 0), has held-out prompts and a metric to choose by."""
    for a in study.arms.values():
        sw = a.sweep
        if not sw.key:
            continue
        if not a.trains:
            raise UserError(f"arm '{a.name}' sweeps '{sw.key}' but trains nothing; give it a method or drop the sweep.")
        if a.init_from and 0 not in study.arms[a.init_from].seeds:
            raise UserError(f"arm '{a.name}' sweeps with seed 0 from arm '{a.init_from}', which does not train seed 0; add it there.")
        if study.eval.prompts == 0:
            raise UserError(f"arm '{a.name}' sweeps on held-out prompts, but eval.prompts is 0 (every prompt is evaluated), "
                            "so none is left; set eval.prompts below the prompt count.")
        first = study.claims[0] if study.claims else None
        if not sw.metric and first is None:
            raise UserError(f"arm '{a.name}' sweeps '{sw.key}' with no metric to choose by; set its sweep.metric or add a claim.")
        sw.metric = sw.metric or first.metric
        sw.direction = sw.direction or (first.direction if first is not None and first.metric == sw.metric else "greater")
        resolve(a.method, backend=study.backend, overrides=_deep_merge(a.overrides or {}, sw.nested(sw.values[0])),
                preset=a.preset or None)  # an unknown key is one sentence now, not after the first sweep run


def _check_names(study: Study) -> None:
    """Methods and suites are checked before anything trains: a typo is found in seconds, not after hours."""
    for a in study.arms.values():
        if a.trains:
            registry.get_method(a.method)  # an unknown method is one sentence listing the known ones
    if study.backend == "toy2d":
        if list(study.eval.suites) != ["toy2d"]:
            raise UserError("a toy2d study is scored by the toy2d suite only; set eval.suites to [toy2d].")
    else:
        study.eval.suites = expand_suites(study.eval.suites)


def _check_references(study: Study) -> None:
    names = set(study.arms)
    if study.reference not in names:
        raise UserError(f"reference arm '{study.reference}' is not an arm of the study; choose one of: {', '.join(sorted(names))}.")
    for a in study.arms.values():
        if a.init_from and a.init_from not in names:
            raise UserError(f"arm '{a.name}' initialises from unknown arm '{a.init_from}'; choose one of: {', '.join(sorted(names))}.")
        if a.init_from and not set(a.seeds) <= set(study.arms[a.init_from].seeds):
            raise UserError(f"arm '{a.name}' uses training seeds that arm '{a.init_from}' does not train; give it a subset of its seeds.")
    for c in study.claims:
        for arm in (c.arm, c.versus):
            if arm not in names:
                raise UserError(f"claim '{c.name}' names unknown arm '{arm}'; choose one of: {', '.join(sorted(names))}.")
