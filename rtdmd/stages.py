"""Multi-stage runs: a method whose options declare stages trains them in order.

A method's options may define ``stages(cfg) -> [(name, RunConfig), ...]`` (e.g. RTDMD: ``stage1``, an
``ac-dmd`` run, then ``stage2``). ``plan`` is the one place where each stage's RunConfig, its TrainConfig
included, is fixed. One stage trains straight into ``out``; several train into ``out/<name>`` in order,
each later stage's ``method.init`` set to the previous stage's checkpoint, under one parent MLflow run
whose children are the stages' own runs; ``out/checkpoints/latest`` then points at the final checkpoint,
so ``out`` works wherever a run directory is expected. ``--resume`` skips finished stages and continues
the interrupted one.
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rtdmd import checkpoint as ckpt
from rtdmd import distributed
from rtdmd import tracking
from rtdmd.config import RunConfig, config_to_dict, flatten
from rtdmd.trainer import TrainResult, default_run_dir, train


@dataclass
class Stage:
    name: str
    cfg: RunConfig


@dataclass
class StagesResult(TrainResult):
    """A multi-stage run's result: ``steps`` and ``seconds`` add up every stage; ``stage_steps`` gives each one's."""

    stage_steps: dict = field(default_factory=dict)


def announce(message: str) -> None:
    """A line on stderr between stages (main process only)."""

    if distributed.rank() == 0:
        print(message, file=sys.stderr, flush=True)


def plan(cfg: RunConfig) -> list[Stage]:
    """The stages of ``cfg``: its options' ``stages(cfg)``, or the run itself when they declare none."""
    hook = getattr(cfg.method, "stages", None)
    if hook is None:
        return [Stage("", cfg)]
    stages = [Stage(name, c) for name, c in hook(cfg)]
    if len(stages) > 1:
        base = cfg.tracking.run_name or f"train-{cfg.method_name}-{cfg.backend_name}"
        for st in stages:
            st.cfg = copy.deepcopy(st.cfg)
            st.cfg.tracking.run_name = f"{base}/{st.name}"
    return stages


def has_run(cfg: RunConfig, out: Path) -> bool:
    """Whether ``out`` holds a run (or a stage's run) of ``cfg`` to resume."""
    names = {"", *(st.name for st in plan(cfg))}  # a one-stage run trains straight into out
    return any((out / name / "checkpoints" / "latest").is_file() for name in names)


def run_stages(cfg: RunConfig, out: Path | None = None, resume: bool = False, command: str = "",
               show_progress: bool = True) -> TrainResult:
    """Train ``cfg``'s stages in order (see the module docstring)."""
    out = Path(out) if out is not None else default_run_dir(cfg)
    stages = plan(cfg)
    if len(stages) == 1:
        return train(stages[0].cfg, out=out, resume=resume, command=command, show_progress=show_progress)
    if resume is True:  # --resume on a folder without a run is an error, not a fresh start
        ckpt.require_checkpoint(out / stages[0].name, shown=out)
    out.mkdir(parents=True, exist_ok=True)
    parent = _open_parent(cfg, out, command, [st.name for st in stages])
    seconds, init, result, steps = 0.0, None, None, {}
    try:
        for i, st in enumerate(stages, start=1):
            run_dir = out / st.name
            head = f"stage {i} of {len(stages)} ({st.cfg.method_name})"
            if init is not None:
                st.cfg.method.init = str(init)
            if resume and _finished(run_dir, st.cfg.train.max_steps):
                init = ckpt.find_checkpoint(run_dir)
                meta = ckpt.read_meta(init)
                steps[st.name] = int(meta.get("step", 0))
                seconds += float(meta.get("run_train_seconds") or 0.0)
                announce(f"{head}: finished earlier ({steps[st.name]} steps in {run_dir}), skipped")
                continue
            announce(f"{head}: {st.cfg.train.max_steps} steps into {run_dir}"
                     + (f", starting from {init}" if init is not None else ""))
            result = train(st.cfg, out=run_dir, resume=resume and (run_dir / "checkpoints" / "latest").is_file(),
                           command=command, show_progress=show_progress)
            seconds += result.seconds
            steps[st.name] = result.steps
            _adopt(cfg, parent, result, st.name)
            if st is not stages[-1] and result.steps < st.cfg.train.max_steps:  # stopped by train.max_minutes
                _end(cfg, parent, "KILLED")
                return StagesResult(result.run_dir, result.checkpoint, sum(steps.values()), seconds, result.last_logs, steps)
            init = ckpt.find_checkpoint(run_dir)
    except BaseException:
        _end(cfg, parent, "FAILED")
        raise
    if result is None:  # every stage had finished before this --resume
        result = TrainResult(out, init, 0, 0.0, {})
    _point_latest(out, result.checkpoint)
    _end(cfg, parent, "FINISHED", result.checkpoint)
    return StagesResult(out, result.checkpoint, sum(steps.values()), seconds, result.last_logs, steps)


def _finished(run_dir: Path, max_steps: int) -> bool:
    if not (run_dir / "checkpoints" / "latest").is_file():
        return False
    return int(ckpt.read_meta(ckpt.find_checkpoint(run_dir)).get("step", 0)) >= max_steps


def _point_latest(out: Path, step_dir: Path) -> None:
    """out/checkpoints/latest -> the final stage's checkpoint (read by rtdmd.checkpoint.find_checkpoint)."""
    root = out / "checkpoints"
    root.mkdir(exist_ok=True)
    tmp = root / f"latest.tmp{os.getpid()}"
    tmp.write_text(os.path.relpath(Path(step_dir).resolve(), root.resolve()) + "\n")
    os.replace(tmp, root / "latest")


# ---------------------------------------------------------------------------- the parent MLflow run


def _open_parent(cfg: RunConfig, out: Path, command: str, names: list[str]) -> str | None:
    t = cfg.tracking
    if not t.enabled:
        return None
    tags = {"method": cfg.method_name, "backend": cfg.backend_name, "kind": "train", "git_commit": tracking.git_commit(),
            "run_dir": str(out.resolve()), "command": command[:5000], "stages": ",".join(names)}
    return tracking.open_parent_run(t.uri, t.experiment, out / "mlflow_parent.json",
                                    t.run_name or f"train-{cfg.method_name}-{cfg.backend_name}", tags,
                                    flatten(config_to_dict(cfg)))


def _adopt(cfg: RunConfig, parent: str | None, result: TrainResult, stage: str) -> None:
    if parent is None:
        return
    child = ckpt.read_meta(ckpt.find_checkpoint(result.run_dir)).get("mlflow_run_id")
    tracking.adopt_child_run(cfg.tracking.uri, parent, child, stage, result.seconds / 60, result.checkpoint)


def _end(cfg: RunConfig, parent: str | None, status: str, checkpoint: Path | None = None) -> None:
    if parent is not None:
        tracking.end_parent_run(cfg.tracking.uri, parent, status, checkpoint)
