"""Run a study: train every (arm, training seed) in dependency order, then score its checkpoints per unit.

Everything a finished job produced is a file under the study's ``out`` folder, written atomically, so the same
command continues after Ctrl-C, kill -9 or a restart: a finished job is skipped, an interrupted training run
resumes from its last checkpoint (exactly, see rtdmd.trainer), an interrupted evaluation regenerates only the
images that are missing.

    <out>/arms/<arm>/seed<s>/run/                  the training run (checkpoints every eval curve point)
    <out>/arms/<arm>/seed<s>/train.json            done: checkpoint, budget, CPU-seconds, commit
    <out>/arms/<arm>/seed<s>/units/step_NNNNNN.json   per-unit scores of that checkpoint
    <out>/arms/<arm>/seed<s>/units/step_NNNNNN.fd_shapes.npz   its per-unit FD-shapes features (fid suite, shapes)
    <out>/eval/                                    generated images (the evaluation runner's layout)
    <out>/sweeps/<arm>/value<j>/ and <arm>.json    an arm's sweep: short runs, held-out scores, the choice (sweep.py)

With ``jobs`` > 1 independent jobs run as separate processes with one torch thread each.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rtdmd import registry
from rtdmd.api import make_config, run_training
from rtdmd.checkpoint import find_checkpoint, read_meta
from rtdmd.config import _deep_merge, config_to_dict, flatten, load_resolved
from rtdmd.errors import UserError
from rtdmd.fileio import atomic_write_bytes
from rtdmd.tracking import git_commit

from benchmarks.runner import EvalOptions, run_eval
from benchmarks.study.spec import ArmSpec, Study, generator_budget, load_study
from benchmarks.study import records, sweep
from benchmarks.study.units import UnitScores, image_units, load_units, save_units, toy2d_units


@dataclass(frozen=True)
class Job:
    kind: str  # "sweep" | "train" | "eval"
    arm: str
    seed: int  # the training seed; of a sweep job, the index of its value (its run trains seed 0)

    @property
    def label(self) -> str:
        if self.kind == "sweep":
            return f"sweep {self.arm} value #{self.seed}"
        return f"{self.kind} {self.arm} seed {self.seed}"


def arm_dir(study: Study, arm: str, seed: int) -> Path:
    return study.out / "arms" / arm / f"seed{seed}"


def _write_json(path: Path, data) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def seeds_of(arm: ArmSpec) -> list[int]:
    return list(arm.seeds) if arm.trains else [0]


def plan(study: Study) -> list[Job]:
    """Every job of the study, in an order that respects dependencies (train before eval, init_from first)."""
    jobs = []
    for arm in study.order():
        jobs += [Job("sweep", arm.name, j) for j in range(len(arm.sweep.values) if arm.sweep.key else 0)]
        for s in seeds_of(arm):
            if arm.trains:
                jobs.append(Job("train", arm.name, s))
            jobs.append(Job("eval", arm.name, s))
    return jobs


def _record(study: Study, job: Job) -> tuple[Path, str]:
    """The file whose presence marks ``job`` done, and what to delete to redo it."""
    if job.kind == "sweep":
        d = sweep.value_dir(study, job.arm, job.seed)
        return d / "score.json", f"{d} and {d.parent.parent / (job.arm + '.json')}"
    d = arm_dir(study, job.arm, job.seed)
    if job.kind == "train":
        return d / "train.json", str(d)
    return d / "eval.json", f"{d / 'eval.json'} and {d / 'units'}"


def done_record(study: Study, job: Job) -> dict | None:
    """The record of a done ``job`` (None while it is not done, or while a job it depends on is not: a train job of a
    swept arm waits for the sweep's choice); a record made from other study-file settings stops the study
    (benchmarks.study.records)."""
    path, remove = _record(study, job)
    if not path.is_file() or not all(is_done(study, d) for d in depends_on(study, job)):
        return None
    record = _read_json(path)
    if not isinstance(record, dict):
        return {}
    records.check(study, job.kind, study.arms[job.arm], record, job.label, remove)
    return record


def is_done(study: Study, job: Job) -> bool:
    return done_record(study, job) is not None


def missing_jobs(study: Study) -> list[Job]:
    """The jobs of the study that are not done, in plan order."""
    return [j for j in plan(study) if not is_done(study, j)]


def depends_on(study: Study, job: Job) -> list[Job]:
    arm = study.arms[job.arm]
    if job.kind == "eval":
        return [Job("train", job.arm, job.seed)] if arm.trains else []
    seed = 0 if job.kind == "sweep" else job.seed  # a sweep run trains seed 0
    init = [Job("train", arm.init_from, seed)] if arm.init_from else []
    if job.kind == "train" and arm.sweep.key:  # the arm trains with the value its sweep chose
        init += [Job("sweep", arm.name, j) for j in range(len(arm.sweep.values))]
    return init


# ---------------------------------------------------------------------------- training


def _train_overrides(study: Study, arm: ArmSpec, seed: int, device: str) -> dict:
    over = _deep_merge(arm.overrides or {}, {
        "train": {"seed": seed, "num_threads": 1, "device": device, **({"keep_checkpoints": 0} if study.eval.curves else {})},
        "tracking": {"experiment": study.experiment, "run_name": f"{study.name}/{arm.name}/seed{seed}",
                     "tags": {"study": study.name, "arm": arm.name, "seed": str(seed)}}})
    options = registry.get_method(arm.method).options
    names = set(getattr(options, "__dataclass_fields__", {}))
    if "stage1_train" in names:  # a multi-stage method: its first stage has its own loop settings
        over = _deep_merge(over, {"method": {"stage1_train": {"seed": seed}}})
    if arm.init_from:
        init = json.loads((arm_dir(study, arm.init_from, seed) / "train.json").read_text())["checkpoint"]
        over = _deep_merge(over, {"method": {"init": str(study.out / init)}})
    return over


def _earlier_stages(stage_dir: Path) -> list[Path]:
    """The stage folders trained before ``stage_dir`` in a multi-stage run folder (stage1 before stage2, ...)."""
    m = re.fullmatch(r"stage(\d+)", stage_dir.name)
    if m is None:
        return []
    return [p for k in range(1, int(m.group(1))) if (p := stage_dir.parent / f"stage{k}").is_dir()]


def _segment(step_dir: Path) -> dict:
    """One stage's cost up to the checkpoint ``step_dir``, from that checkpoint's meta.json and config.yaml: its step,
    generator updates (``method.ttur``: one every ttur-th iteration), images per update (``train.batch_size`` x
    ``train.accumulate``) and this run's CPU-seconds (``run_train_cpu_seconds``; None when the checkpoint predates it)."""
    meta = read_meta(step_dir)
    cfg = load_resolved(step_dir / "config.yaml")
    n = int(meta.get("step", 0))
    updates, per_update = generator_budget(cfg, n)
    cpu = meta.get("run_train_cpu_seconds")
    return {"iterations": n, "generator_updates": updates, "generator_images": updates * per_update,
            "run_train_cpu_seconds": None if cpu is None else float(cpu)}


def checkpoint_cost(step_dir: Path) -> dict:
    """What the weights of ``step_dir`` cost inside their run folder: iterations, generator updates, generator images
    and CPU-seconds of this checkpoint's stage up to it plus every earlier stage's final checkpoint (a two-stage
    rtdmd run: stage 1 + stage 2 so far). Weights the run started from (``method.init``) are not counted here."""
    step_dir = Path(os.path.normpath(step_dir))
    parts = [_segment(find_checkpoint(p)) for p in _earlier_stages(step_dir.parent.parent)] + [_segment(step_dir)]
    out = {k: sum(p[k] for p in parts) for k in ("iterations", "generator_updates", "generator_images")}
    cpu = [p["run_train_cpu_seconds"] for p in parts]
    out["run_train_cpu_seconds"] = None if None in cpu else round(sum(cpu), 2)
    return out


def run_budget(run_dir: Path) -> dict:
    """Iterations trained, generator updates, generator images and CPU-seconds of a run folder (every stage), at its
    newest checkpoint (a run stopped by train.max_minutes counts what it trained)."""
    return checkpoint_cost(find_checkpoint(run_dir))


def _train(study: Study, arm: ArmSpec, overrides: dict, run_dir: Path, progress: bool) -> dict:
    """Train (or continue) one run; its checkpoint (relative to the study's folder), cost, commit and budget."""
    cfg = make_config(arm.method, backend=study.backend, overrides=overrides, preset=arm.preset or None)
    result = run_training(cfg, out=run_dir, resume="auto", command=f"rtdmd-bench study run {study.path}",
                          show_progress=progress)
    meta = read_meta(find_checkpoint(run_dir))
    # train_cpu_seconds: the final checkpoint's (every attempt, every stage, plus what its method.init weights cost);
    # run_train_cpu_seconds (from run_budget): this run folder's stages alone; train_seconds: wall-clock
    return {"checkpoint": str(Path(result.checkpoint).relative_to(study.out)),
            "train_cpu_seconds": meta.get("train_cpu_seconds"),
            "train_seconds": meta.get("train_seconds"), "git_commit": meta.get("git_commit") or git_commit(),
            **run_budget(run_dir)}


def _check_partial_run(run: Path, key: str, value: float) -> None:
    """Refuse to continue an interrupted run trained with another value of the swept key than the sweep now chooses
    (the trainer lets a learning rate change on resume, so the run would silently mix the two)."""
    try:
        before = flatten(config_to_dict(load_resolved(find_checkpoint(run) / "config.yaml"))).get(key)
    except UserError:  # nothing trained yet
        return
    if before is not None and float(before) != float(value):
        raise UserError(f"{run} was started with {key} = {before:g}, but the sweep now chooses {value:g}; delete {run} "
                        "to train the arm with the new choice.")


def train_job(study: Study, arm: ArmSpec, seed: int, device: str = "cpu", progress: bool = True) -> dict:
    d = arm_dir(study, arm.name, seed)
    chosen = {}
    if arm.sweep.key:  # the value the arm's sweep chose on held-out prompts (<out>/sweeps/<arm>.json)
        chosen = {arm.sweep.key: sweep.write_choice(study, arm)}
    if (record := done_record(study, Job("train", arm.name, seed))) is not None:
        return record  # trained before its sweep was redone, and the sweep chose the same value
    over = _train_overrides(study, arm, seed, device)
    if chosen:
        over = _deep_merge(over, arm.sweep.nested(chosen[arm.sweep.key]))
        _check_partial_run(run_dir(study, Job("train", arm.name, seed)), arm.sweep.key, chosen[arm.sweep.key])
    record = {**_train(study, arm, over, run_dir(study, Job("train", arm.name, seed)), progress),
              **({"sweep": chosen} if chosen else {}),
              "inputs": records.inputs(study, "train", arm)}
    _write_json(d / "train.json", record)
    return record


def sweep_job(study: Study, arm: ArmSpec, j: int, device: str = "cpu", progress: bool = True) -> dict:
    """Value j of the arm's sweep: a short run (seed 0), scored on the held-out prompts (benchmarks.study.sweep)."""
    d = sweep.value_dir(study, arm.name, j)
    over = sweep.run_overrides(study, arm, j, _train_overrides(study, arm, 0, device))
    run = _train(study, arm, over, run_dir(study, Job("sweep", arm.name, j)), progress)
    if not (d / "units.json").is_file():
        save_units(d / "units.json", score_checkpoint(study, arm, 0, study.out / run["checkpoint"], device, progress,
                                                      held_out=d))
    record = {**sweep.score_record(study, arm, j, load_units(d / "units.json")), **run,
              "inputs": records.inputs(study, "sweep", arm)}
    _write_json(d / "score.json", record)
    if sweep.current_choice(study, arm) is not None:  # the last value scored: the choice (train jobs write it too)
        sweep.write_choice(study, arm)
    return record


# ---------------------------------------------------------------------------- evaluation


def curve_checkpoints(study: Study, arm: ArmSpec, seed: int) -> list[Path]:
    """The checkpoints an arm is scored at: its final one, and with eval.curves every kept checkpoint before it on the
    run's train.checkpoint_every grid (not the extra ones an interruption writes: every seed shares the grid's steps,
    which the learning curves need)."""
    if not arm.trains:
        return [find_checkpoint(arm.checkpoint)]
    final = study.out / json.loads((arm_dir(study, arm.name, seed) / "train.json").read_text())["checkpoint"]
    if not study.eval.curves:
        return [final]
    every = int(load_resolved(final / "config.yaml").train.checkpoint_every)
    kept = sorted(p for p in final.parent.glob("step_*") if p.is_dir() and ".tmp" not in p.name and (p / "meta.json").is_file())
    return [p for p in kept if p == final or (every > 0 and int(p.name.removeprefix("step_")) % every == 0)]


def score_checkpoint(study: Study, arm: ArmSpec, seed: int, step_dir: Path, device: str, progress: bool,
                     held_out: Path | None = None) -> UnitScores:
    """Per-unit scores of one checkpoint with the arm's sampler on the evaluation's units; with ``held_out`` (a sweep
    value's folder), on the held-out prompts instead (benchmarks.study.sweep)."""
    e = study.eval
    steps = arm.steps or e.steps
    eta = None if arm.eta < 0 else arm.eta
    kind = arm.sampler or None
    per_prompt = (arm.sweep.images_per_prompt or e.images_per_prompt) if held_out else e.images_per_prompt
    if study.backend == "toy2d":
        return toy2d_units(step_dir, e.prompts, per_prompt, e.seed, steps, eta, kind, held_out is not None)
    prompts_file, n = sweep.heldout_prompt_file(study, step_dir, held_out) if held_out else (None, e.prompts or None)
    opts = EvalOptions(suites=list(e.suites), steps=steps, guidance=e.guidance if arm.guidance < 0 else arm.guidance,
                       eta=eta, sampler=kind, seed=e.seed, images_per_prompt=per_prompt,
                       max_prompts=n, prompts_file=prompts_file,
                       out=study.out / "eval", experiment=study.experiment, device=device, threads=1,
                       command=f"rtdmd-bench study run {study.path}", progress=progress,
                       tags={"study": study.name, "arm": arm.name, "seed": str(seed),
                             **({"split": "held-out"} if held_out else {})})
    return image_units(run_eval([step_dir], opts))


def eval_job(study: Study, arm: ArmSpec, seed: int, device: str = "cpu", progress: bool = True) -> dict:
    d = arm_dir(study, arm.name, seed)
    points = []
    for step_dir in curve_checkpoints(study, arm, seed):
        meta = read_meta(step_dir)
        step = int(meta.get("step", 0))
        f = d / "units" / f"step_{step:06d}.json"
        if not f.is_file():
            save_units(f, score_checkpoint(study, arm, seed, step_dir, device, progress))
        points.append({"step": step, "units": str(f.relative_to(study.out)), "train_seconds": meta.get("train_seconds"),
                       **({"cost": checkpoint_cost(step_dir)} if arm.trains else {})})
    record = {"points": points, "final": points[-1]["units"], "inputs": records.inputs(study, "eval", arm)}
    _write_json(d / "eval.json", record)
    return record


# ---------------------------------------------------------------------------- the scheduler


def run_job(study: Study, job: Job, device: str = "cpu", progress: bool = True) -> None:
    arm = study.arms[job.arm]
    if job.kind == "sweep":
        sweep_job(study, arm, job.seed, device, progress)
    elif job.kind == "train":
        train_job(study, arm, job.seed, device, progress)
    else:
        eval_job(study, arm, job.seed, device, progress)


def _say(msg: str) -> None:
    print(f"[study] {msg}", file=sys.stderr, flush=True)


def with_needs(study: Study, arms: list[str]) -> set[str]:
    """The named arms and every arm they start from (init_from, transitively); an unknown name stops with the list."""
    unknown = [a for a in arms if a not in study.arms]
    if unknown:
        raise UserError(f"--arms names {', '.join(unknown)}, not an arm of {study.path}; use some of: "
                        f"{', '.join(study.arms)}.")
    out: set[str] = set()
    for a in arms:
        while a and a not in out:
            out.add(a)
            a = study.arms[a].init_from
    return out


def run_study(path: str | Path, jobs: int = 1, device: str = "cpu", progress: bool = True,
              arms: list[str] | None = None) -> Study:
    """Run every job not done yet (of ``arms`` and the arms they start from, when given); with jobs > 1, independent
    jobs run in parallel processes."""
    study = load_study(path)
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}.")
    sweep.check_heldout(study)
    todo = missing_jobs(study)
    _say(f"{study.name}: {len(plan(study)) - len(todo)} of {len(plan(study))} jobs already done")
    if arms:
        keep = with_needs(study, arms)
        todo = [j for j in todo if j.arm in keep]
        _say(f"running the {len(todo)} jobs left of {', '.join(a for a in study.arms if a in keep)}")
    if jobs == 1:
        for k, job in enumerate(todo, 1):
            _say(f"({k}/{len(todo)}) {job.label}")
            run_job(study, job, device, progress)
        return study
    _run_parallel(study, todo, jobs, device)
    return study


def run_dir(study: Study, job: Job) -> Path | None:
    """The training run folder of a train or sweep job (None for an eval job)."""
    if job.kind == "sweep":
        return sweep.value_dir(study, job.arm, job.seed) / "run"
    return arm_dir(study, job.arm, job.seed) / "run" if job.kind == "train" else None


def job_log(study: Study, job: Job) -> Path:
    """Where a parallel job's output (progress bars, errors) goes: beside its record, appended per attempt."""
    if job.kind == "sweep":
        return sweep.value_dir(study, job.arm, job.seed) / "sweep.log"
    return arm_dir(study, job.arm, job.seed) / f"{job.kind}.log"


def last_line(path: Path, tail: int = 4096) -> str:
    """The last non-empty line of a log, progress-bar updates (carriage returns) counted as lines."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - tail))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in re.split(r"[\r\n]", text) if ln.strip()]
    return lines[-1] if lines else ""


def _run_parallel(study: Study, todo: list[Job], jobs: int, device: str, status_every: float = 60.0) -> None:
    """Run ``todo`` in up to ``jobs`` worker processes. Each writes its progress bars and errors to its job_log; every
    ``status_every`` seconds one line per running job repeats the last line of its log."""
    running: dict[Job, subprocess.Popen] = {}
    # one torch thread per job; progress bars redrawn every 10 s at most, as they go to a file
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_MININTERVAL": "10"}
    pending = list(todo)
    done = set(plan(study)) - set(todo)  # records checked by run_study; a job joins when its worker succeeds
    last_status = time.monotonic()
    try:
        while pending or running:
            for job, proc in list(running.items()):
                if proc.poll() is not None:
                    del running[job]
                    if proc.returncode != 0:
                        log = job_log(study, job)
                        raise UserError(f"study job '{job.label}' failed (exit {proc.returncode}: "
                                        f"'{last_line(log)[:300]}'; its whole output is in {log}); "
                                        "fix it and run the same command to continue.")
                    done.add(job)
                    _say(f"done: {job.label}")
            ready = [j for j in pending if all(d in done for d in depends_on(study, j))]
            for job in ready[:max(0, jobs - len(running))]:
                pending.remove(job)
                log = job_log(study, job)
                log.parent.mkdir(parents=True, exist_ok=True)
                _say(f"start: {job.label} (output: {log})")
                with open(log, "ab") as out:
                    running[job] = subprocess.Popen([sys.executable, "-m", "benchmarks.study.execute", str(study.path),
                                                     job.kind, job.arm, str(job.seed), device],
                                                    env=env, stdout=out, stderr=subprocess.STDOUT)
            if pending and not running and not ready:
                raise UserError("study jobs wait on each other and none can start; check the arms' init_from.")
            if running and time.monotonic() - last_status >= status_every:
                last_status = time.monotonic()
                for job in running:
                    _say(f"{job.label}: {last_line(job_log(study, job))[:160] or 'starting'}")
            time.sleep(0.5)
    except KeyboardInterrupt:
        for proc in running.values():
            proc.terminate()
        for proc in running.values():
            proc.wait()
        raise UserError("study interrupted; run the same command to continue where it stopped.") from None


def _worker(argv: list[str]) -> int:
    path, kind, arm, seed, device = argv
    study = load_study(path)
    try:
        run_job(study, Job(kind, arm, int(seed)), device, progress=True)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
