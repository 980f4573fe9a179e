"""Fault injection: SIGKILLed and resumed training, corrupted checkpoints, concurrent runs in one place.

    python -m benchmarks.perf.fault_injection --kills 20

1. Kills. A tiny toy2d teacher run (the CLI in a subprocess, a checkpoint every step, every checkpoint
   kept) is SIGKILLed ``--kills`` times at random moments (a random delay after the run has written its
   first new checkpoint, so kills land inside steps, checkpoint writes and renames), then resumed with
   ``--resume-if-exists`` until it finishes. Every checkpoint it wrote is compared tensor by tensor
   (weights, EMA copies, optimiser moments, step) with an uninterrupted run's: ``diverged`` counts the
   checkpoints that differ.
2. Corruption. Each file of the final checkpoint (model, each state file, the trainer state, meta.json,
   config.yaml) gets one flipped byte, and each state file is also deleted, in a copy of the run; ``--resume``
   must refuse every one (exit 2, one ``error:`` line, nothing trained): ``corrupt files refused: M/M``.
3. Concurrency. Two trainings (different seeds) start together into one ``--out`` and one new MLflow
   store, and ``--evals`` evaluations of two tiny shapes checkpoints into one ``--out`` and the same store.
   A result is lost when a process exits 0 but its checkpoint, summary or MLflow run is missing or is
   another process's, or when a process fails other than by a one-sentence refusal.

Prints progress to stderr and one line to stdout:
``kills: N, diverged: 0, corrupt files refused: M/M, lost results: 0``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from rtdmd import checkpoint as ckpt
from rtdmd.checkpoint import checkpoint_tensors, read_meta
from rtdmd.config import dump, load_resolved, resolve
from rtdmd.registry import get_backend

ROOT = Path(__file__).resolve().parents[2]
TOY_SETS = ("backend.hidden=16", "backend.depth=2", "train.batch_size=8", "train.device=cpu", "train.num_threads=1",
            "method.ema_decay=0.9", "method.optim.lr=0.01", "train.checkpoint_every=1", "train.keep_checkpoints=0")
TINY_SHAPES = {"image_size": 16, "size_range": [4, 6], "max_objects": 2, "unet_channels": [8, 16],
               "unet_attention_head_dim": 4, "text_width": 16, "text_heads": 2, "text_layers": 1}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def cli_args(*args: str) -> list[str]:
    return [sys.executable, "-m", "rtdmd_bench.cli", *args]


def train_cmd(out: Path, steps: int, *sets: str, tracking: str | None = None) -> list[str]:
    args = ["train", "teacher", "--backend", "toy2d", "--out", str(out), "--max-steps", str(steps), "--quiet"]
    track = (f"tracking.uri={tracking}",) if tracking else ("tracking.enabled=false",)
    for s in (*TOY_SETS, *track, *sets):
        args += ["--set", s]
    return cli_args(*args)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def step_dirs(run: Path) -> dict[int, Path]:
    root = run / "checkpoints"
    return {int(p.name[5:]): p for p in root.glob("step_*") if p.name[5:].isdigit()} if root.is_dir() else {}


# ---------------------------------------------------------------------------- 1. kills


def _newest_step(run: Path) -> int:
    try:
        return int((run / "checkpoints" / "latest").read_text().strip()[5:])
    except (OSError, ValueError):
        return -1


def _tmp_entry(root: Path) -> bool:
    try:
        return any(".tmp" in e.name for e in os.scandir(root))
    except OSError:
        return False


def _kill_once(run: Path, steps: int, rng: random.Random, in_write: bool) -> bool:
    """Start (or resume) the run and SIGKILL it once it trains: at a random moment, or (``in_write``) as soon
    as a checkpoint or latest file is being written. False if the run finished first."""
    before = _newest_step(run)
    proc = subprocess.Popen(train_cmd(run, steps, "train.seed=0") + ["--resume-if-exists"], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _newest_step(run) <= before and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if in_write:
        until = time.monotonic() + 5
        while not _tmp_entry(run / "checkpoints") and proc.poll() is None and time.monotonic() < until:
            pass
    else:
        time.sleep(rng.uniform(0.0, 0.25))
    if proc.poll() is not None:
        err = proc.stderr.read()
        if proc.returncode != 0:
            raise RuntimeError(f"training failed before it could be killed: {err[-2000:]}")
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def _diverged(run: Path, ref: Path, steps: int) -> int:
    """Checkpoints of ``run`` that differ from the uninterrupted run's, plus temporary leftovers and a missing end."""
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if ".tmp" in p.name]
    ref_steps, got = step_dirs(ref), step_dirs(run)
    log(f"compared {len(got)} checkpoints with the uninterrupted run's; temporary leftovers: {leftovers}")
    return sum(not same(checkpoint_tensors(d), checkpoint_tensors(ref_steps[s])) for s, d in got.items()) \
        + len(leftovers) + (steps not in got)


def run_kills(work: Path, kills: int, rng: random.Random, steps_per_kill: int = 30) -> tuple[int, int]:
    """(kills done, checkpoints that differ from the uninterrupted run's); every other kill aims at a write.

    A run that finishes before its kill lands (fast steps) is compared as it is and started again, until
    ``kills`` kills have landed (at most 5 starts per kill)."""
    steps = steps_per_kill * (kills + 1)
    ref, run = work / "reference", work / "killed"
    subprocess.run(train_cmd(ref, steps, "train.seed=0"), env=_env(), check=True, capture_output=True)
    done, in_write, diverged = 0, 0, 0
    for _ in range(5 * kills):
        if done == kills:
            break
        if not _kill_once(run, steps, rng, in_write=done % 2 == 1):
            diverged += _diverged(run, ref, steps)
            shutil.rmtree(run)
            continue
        done += 1
        in_write += any(".tmp" in p.name for p in (run / "checkpoints").iterdir())
    log(f"kills: {done} ({in_write} left a half-written checkpoint or latest file behind)")
    p = subprocess.run(train_cmd(run, steps, "train.seed=0") + ["--resume-if-exists"], env=_env(), capture_output=True,
                       text=True)
    if p.returncode != 0:
        raise RuntimeError(f"the final resume failed: {p.stderr[-2000:]}")
    return done, diverged + _diverged(run, ref, steps)


# ---------------------------------------------------------------------------- 2. corruption


def _refused(run: Path, steps: int) -> bool:
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    r = subprocess.run(train_cmd(run, steps + 2, "train.seed=0") + ["--resume"], capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    one_line = len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr
    return r.returncode == 2 and one_line and sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def run_corruption(work: Path, source: Path) -> tuple[int, int]:
    """(refused, cases): one flipped byte in every file of the newest checkpoint, and every state file deleted."""
    step = _newest_step(source)
    files = sorted(p.relative_to(step_dirs(source)[step]).as_posix() for p in step_dirs(source)[step].rglob("*") if p.is_file())
    cases = [("flip", f) for f in files] + [("delete", f) for f in files if f.startswith("state/")]
    refused = 0
    for i, (how, rel) in enumerate(cases):
        run = work / f"corrupt{i}"
        (run / "checkpoints").mkdir(parents=True)
        shutil.copytree(step_dirs(source)[step], run / "checkpoints" / f"step_{step:06d}")
        shutil.copy(source / "checkpoints" / "latest", run / "checkpoints" / "latest")
        f = run / "checkpoints" / f"step_{step:06d}" / rel
        if how == "delete":
            f.unlink()
        else:
            data = bytearray(f.read_bytes())
            data[len(data) // 2] ^= 1
            f.write_bytes(bytes(data))
        ok = _refused(run, step)
        refused += ok
        log(f"{how} {rel}: {'refused' if ok else 'NOT REFUSED'}")
    return refused, len(cases)


# ---------------------------------------------------------------------------- 3. concurrency


def _tiny_shapes_checkpoint(run_dir: Path, seed: int) -> Path:
    cfg = resolve("teacher", backend="shapes", overrides={"backend": dict(TINY_SHAPES), "tracking": {"enabled": False}})
    backend = get_backend("shapes").factory(cfg.backend, "cpu")
    torch.manual_seed(seed)
    net = backend.make_trainable("teacher")
    return ckpt.write_checkpoint(run_dir, 3, config_yaml=dump(cfg), method="teacher", backend="shapes",
                                 sampler={"kind": "cps", "steps": 2, "guidance": 1.0, "eta": 0.9},
                                 inference_state=dict(backend.network_state(net)), training_state=None,
                                 extra_meta={"role": "teacher"})


def _one_sentence_refusal(p) -> bool:
    lines = [ln for ln in p.stderr.strip().splitlines() if " INFO mlflow" not in ln]
    return p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")


def _start_together(cmds: list[list[str]]) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen(c, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    outs = [p.communicate(timeout=600) for p in procs]
    return [subprocess.CompletedProcess(c, p.returncode, o, e) for c, p, (o, e) in zip(cmds, procs, outs)]


def _mlflow_runs(uri: str):
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(search_all_experiments=True)


def run_concurrency(work: Path, evals: int) -> int:
    """Lost results of two trainings and ``evals`` evaluations sharing one directory and one MLflow store."""
    uri = f"sqlite:///{work / 'shared.db'}"
    out = work / "shared_run"
    train_ps = _start_together([train_cmd(out, 40, f"train.seed={s}", tracking=uri) for s in (1, 2)])
    lost = sum(p.returncode != 0 and not _one_sentence_refusal(p) for p in train_ps)
    winners = [s for s, p in zip((1, 2), train_ps) if p.returncode == 0]

    for s in winners:  # the winner's checkpoint holds the winner's run
        d = step_dirs(out).get(40)
        lost += d is None or load_resolved(d / "config.yaml").train.seed != s or len(winners) > 1
    runs = _mlflow_runs(uri)
    lost += max(0, len(winners) - int((runs["status"] == "FINISHED").sum()))
    log(f"trainings: exit codes {[p.returncode for p in train_ps]}; MLflow runs {list(runs['status'])}")
    return lost + _concurrent_evals(work, uri, evals)


def _concurrent_evals(work: Path, uri: str, evals: int) -> int:
    if evals <= 0:
        return 0
    ckpts = [_tiny_shapes_checkpoint(work / f"shapes{s}", s) for s in range(evals)]
    cmds = [cli_args("eval", "--checkpoint", str(c), "--max-prompts", "2", "--images-per-prompt", "1", "--quiet",
                     "--out", str(work / "shared_eval"), "--tracking-uri", uri, "--experiment", "faults",
                     "--device", "cpu", "--threads", "1") for c in ckpts]
    ps = _start_together(cmds)
    lost = sum(p.returncode != 0 for p in ps)
    runs = _mlflow_runs(uri)
    evals_logged = runs[runs.get("tags.kind") == "eval"] if "tags.kind" in runs else runs.iloc[0:0]

    for c in ckpts:  # eval runs name their checkpoint by its weights' sha256 (params hold no absolute paths)
        mine = evals_logged[evals_logged["tags.checkpoint_sha256"] == read_meta(c)["model_sha256"]]
        lost += len(mine) != 1 or mine.iloc[0]["status"] != "FINISHED" or "metrics.geneval/overall" not in mine
    summaries = list((work / "shared_eval").rglob("summary.json"))
    lost += len({json.loads(p.read_text())["checkpoint"] for p in summaries}) != evals
    log(f"evals: exit codes {[p.returncode for p in ps]}; {len(evals_logged)} eval runs logged, {len(summaries)} summaries")
    return lost


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--evals", type=int, default=2, help="concurrent evaluations into one --out (0: none)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    ap.add_argument("--steps-per-kill", type=int, default=30, help="training steps = this x (kills + 1)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        t0 = time.perf_counter()
        kills, diverged = run_kills(work, args.kills, random.Random(args.seed), args.steps_per_kill)
        log(f"kills took {time.perf_counter() - t0:.0f} s")
        refused, cases = run_corruption(work, work / "killed")
        lost = run_concurrency(work, args.evals)
        log(f"all took {time.perf_counter() - t0:.0f} s")
    line = f"kills: {kills}, diverged: {diverged}, corrupt files refused: {refused}/{cases}, lost results: {lost}"
    print(line, flush=True)
    return line


if __name__ == "__main__":
    main()
