"""`rtdmd-bench study status STUDY.yaml`: where a study stands, read from its files (it starts nothing).

Each job is done (its record exists and every job it depends on is done), started (a training run folder or a
log exists, no record yet) or waiting (a job with a record waits when a job it depends on was redone: a train job of a
swept arm for the sweep's choice); a started job shows its newest checkpoint and the last line of its log, a done training job its
CPU-seconds. A study that runs over several sessions is followed with this between `study run` calls.
"""

from __future__ import annotations

from pathlib import Path

from rtdmd.checkpoint import find_checkpoint, read_meta
from rtdmd.config import resolve
from rtdmd.errors import UserError

from benchmarks.study.execute import _record, depends_on, done_record, is_done, job_log, last_line, plan, run_dir
from benchmarks.study.scores import own_cost
from benchmarks.study.spec import Study, load_study


def _checkpoint_step(run_dir: Path | None) -> int | None:
    if run_dir is None or not run_dir.is_dir():
        return None
    try:
        return int(read_meta(find_checkpoint(run_dir)).get("step", 0))
    except (UserError, OSError, ValueError):
        return None


def _first_missing(study: Study, job) -> str:
    """The first job ``job`` depends on, directly or not, that is not done."""
    for d in depends_on(study, job):
        if not is_done(study, d):
            return _first_missing(study, d) if _record(study, d)[0].is_file() else d.label
    return job.label


def job_states(study: Study) -> list[dict]:
    """One row per job: label, state (done | started | waiting), CPU-seconds (done training) and what it is at."""
    rows = []
    for job in plan(study):
        log = job_log(study, job)
        row = {"job": job.label, "state": "waiting", "cpu_seconds": None, "detail": ""}
        record = done_record(study, job)
        if record is not None:
            row["state"] = "done"
            cost = own_cost(record) if job.kind != "eval" else None
            row["cpu_seconds"] = None if cost is None else cost["run_train_cpu_seconds"]
        elif _record(study, job)[0].is_file():  # done before a job it depends on was redone: kept if that agrees
            row["detail"] = f"has its record; it counts once '{_first_missing(study, job)}' is done"
        else:
            step = _checkpoint_step(run_dir(study, job))
            if step is not None or log.is_file():
                row["state"] = "started"
                parts = [f"checkpoint at step {step}"] if step is not None else []
                if (line := last_line(log)):
                    parts.append(line[:120])
                row["detail"] = "; ".join(parts)
        rows.append(row)
    return rows


def _iterations(study: Study, job) -> int | None:
    """The iterations a train or sweep job trains to (None for a multi-stage run, whose stages differ in cost)."""
    arm = study.arms[job.arm]
    if job.kind == "sweep":
        return arm.sweep.max_steps
    cfg = resolve(arm.method, backend=study.backend, overrides=arm.overrides or {}, preset=arm.preset or None)
    return None if getattr(cfg.method, "stage", None) == 0 else int(cfg.train.max_steps)


def training_left(study: Study) -> tuple[float, int, int]:
    """CPU-seconds the train and sweep jobs not done yet will take, estimated per job as (iterations it has left) x
    (CPU-seconds per iteration of the done train and sweep runs of its arm, else of its method); the estimate, the
    jobs it covers and the jobs without one (no done run of the arm or method yet, or a multi-stage run)."""
    rates: dict[tuple[str, str], list[float]] = {}
    todo = []
    for job in plan(study):
        if job.kind == "eval":
            continue
        record = done_record(study, job)
        if record is None:
            todo.append(job)
            continue
        cost = own_cost(record)
        if cost and cost.get("run_train_cpu_seconds") and cost.get("iterations"):
            rate = cost["run_train_cpu_seconds"] / cost["iterations"]
            rates.setdefault(("arm", job.arm), []).append(rate)
            rates.setdefault(("method", study.arms[job.arm].method), []).append(rate)
    seconds, covered, unknown = 0.0, 0, 0
    for job in todo:
        r = rates.get(("arm", job.arm)) or rates.get(("method", study.arms[job.arm].method))
        n = _iterations(study, job)
        if not r or n is None:
            unknown += 1
            continue
        left = n - (_checkpoint_step(run_dir(study, job)) or 0)
        seconds += max(0, left) * sum(r) / len(r)
        covered += 1
    return seconds, covered, unknown


def status_lines(path: str | Path) -> list[str]:
    study = load_study(path)
    rows = job_states(study)
    count = {s: sum(r["state"] == s for r in rows) for s in ("done", "started", "waiting")}
    cpu = sum(r["cpu_seconds"] or 0.0 for r in rows)
    out = [f"study {study.name}: {count['done']} of {len(rows)} jobs done, {count['started']} started, "
           f"{count['waiting']} waiting; training CPU-seconds of the done jobs: {cpu:,.0f} ({cpu / 3600:.1f} h)"]
    if count["done"] < len(rows):
        left, covered, unknown = training_left(study)
        evals = sum(r["state"] != "done" and r["job"].startswith("eval ") for r in rows)
        out.append(f"training left: about {left:,.0f} CPU-seconds ({left / 3600:.1f} h) for {covered} train and sweep "
                   f"jobs, at the CPU-seconds per iteration of their arms' (or methods') done runs; not estimated: "
                   f"{unknown} train and sweep jobs without a done run of their arm or method, and {evals} eval jobs")
    width = max(len(r["job"]) for r in rows)
    for r in rows:
        extra = f"{r['cpu_seconds']:,.0f} CPU-s" if r["cpu_seconds"] is not None else r["detail"]
        out.append(f"  {r['state']:<8} {r['job']:<{width}}  {extra}".rstrip())
    if count["done"] < len(rows):
        out.append(f"continue with: rtdmd-bench study run {path} --jobs 2")
    else:
        out.append(f"every job is done; report it with: rtdmd-bench study report {path}")
    return out
