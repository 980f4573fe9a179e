"""Hostile and careless use: planted pickles, corrupt or incomplete checkpoints, concurrent runs, bad values,
unwritable outputs, full disks, leftovers of killed runs, SIGTERM, and file permissions."""

from __future__ import annotations

import ast
import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from runhelp import assert_same_tensors, assert_user_error, checkpoint_tensors, train_args

ROOT = Path(__file__).resolve().parent.parent


def _ok(r):
    assert r.exit_code == 0, (r.exit_code, r.output, r.exception)
    return r


def _step(run: Path, n: int) -> Path:
    return run / "checkpoints" / f"step_{n:06d}"


def _rehash(step_dir: Path) -> None:
    """Rewrite meta.json's manifest for the files as they are now (what an attacker who edits files would do)."""
    from rtdmd import checkpoint as ckpt

    meta = json.loads((step_dir / "meta.json").read_text())
    meta["files"] = ckpt._manifest(step_dir)
    meta["meta_sha256"] = ckpt.meta_digest(meta)
    (step_dir / "meta.json").write_text(json.dumps(meta))


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture()
def toy_run(cli, tmp_path):
    run = tmp_path / "run"
    _ok(cli(*train_args("toy2d", run, 4, "train.checkpoint_every=2")))
    return run


# ---------------------------------------------------------------------------- 1. no pickle runs


def test_planted_pickle_in_trainer_state_does_not_run(cli, tmp_path, toy_run):
    from rtdmd import checkpoint as ckpt
    from rtdmd.errors import UserError

    marker = tmp_path / "pwned"
    step = _step(toy_run, 4)
    with open(step / "state" / "trainer.pt", "wb") as f:
        pickle.dump({"step": 4, "x": _Payload(str(marker))}, f)
    _rehash(step)  # the manifest agrees: only the safe loader stands in the way
    line = assert_user_error(cli(*train_args("toy2d", toy_run, 6, "train.checkpoint_every=2", extra=("--resume",))),
                             "holds more than tensors", "--resume-from")
    with pytest.raises(UserError):  # rtdmd stage 2's --init reads the same state through this function
        ckpt.load_training_state(step)
    assert not marker.exists(), line


# ---------------------------------------------------------------------------- 2. verified training state


@pytest.mark.parametrize("victim", ["state/net_teacher.safetensors", "state/ema_teacher.safetensors",
                                    "state/trainer.pt", "model.safetensors", "config.yaml"])
def test_flipped_byte_anywhere_is_refused(cli, toy_run, victim):
    f = _step(toy_run, 4) / victim
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 1
    f.write_bytes(bytes(data))
    assert_user_error(cli(*train_args("toy2d", toy_run, 6, "train.checkpoint_every=2", extra=("--resume",))),
                      "does not match the sha256", "--resume-from STEP")


@pytest.mark.parametrize("victim", ["state/net_teacher.safetensors", "state/ema_teacher.safetensors"])
@pytest.mark.parametrize("legacy", [False, True])
def test_deleted_state_file_is_refused(cli, toy_run, victim, legacy):
    step = _step(toy_run, 4)
    os.remove(step / victim)
    if legacy:  # no manifest: the trainer's own check of what the method needs still refuses
        meta = json.loads((step / "meta.json").read_text())
        del meta["files"], meta["meta_sha256"]
        (step / "meta.json").write_text(json.dumps(meta))
    assert_user_error(cli(*train_args("toy2d", toy_run, 6, "train.checkpoint_every=2", extra=("--resume",))),
                      "is incomplete", victim)


def test_edited_meta_is_refused(cli, toy_run):
    meta_path = _step(toy_run, 4) / "meta.json"
    meta_path.write_text(meta_path.read_text().replace('"step": 4', '"step": 5'))
    assert_user_error(cli("sample", "--checkpoint", toy_run, "--prompt", "mode 1", "--out", toy_run / "s"),
                      "meta.json is unreadable or corrupt")


def test_resume_from_an_earlier_step_after_corruption_is_exact(cli, tmp_path, toy_run):
    ref = tmp_path / "ref"
    _ok(cli(*train_args("toy2d", ref, 6, "train.checkpoint_every=2")))
    (_step(toy_run, 4) / "state" / "trainer.pt").write_bytes(b"garbage")
    args = train_args("toy2d", toy_run, 6, "train.checkpoint_every=2")
    assert_user_error(cli(*args, "--resume"), "--resume-from STEP")
    assert_user_error(cli(*args, "--resume-from", "3"), "no checkpoint of step 3", "2, 4")
    assert_user_error(cli(*args, "--resume-from", "0"), "positive step")
    _ok(cli(*args, "--resume-from", "2"))
    assert_same_tensors(checkpoint_tensors(_step(toy_run, 6)), checkpoint_tensors(_step(ref, 6)))


def test_a_checkpoint_that_fails_verification_prunes_nothing(tmp_path, monkeypatch):
    from rtdmd import checkpoint as ckpt
    from rtdmd.errors import UserError

    def write(step):
        return ckpt.write_checkpoint(tmp_path, step, config_yaml="a: 1\n", sampler={"kind": "euler"}, method="teacher",
                                     backend="toy2d", inference_state={"w": torch.full((2,), float(step))},
                                     training_state=None, keep=1)

    write(1)
    real = ckpt._manifest
    monkeypatch.setattr(ckpt, "_manifest", lambda d: {k: "0" * 64 for k in real(d)})  # the disk returns other bytes
    with pytest.raises(UserError, match="does not match"):
        write(2)
    assert _step(tmp_path, 1).is_dir()  # the last verified checkpoint stays


def test_nan_from_corrupt_weights_writes_no_checkpoint(cli, tmp_path, monkeypatch):
    """A non-finite loss with non-finite weights: nothing is saved over the last good checkpoint."""
    from rtdmd.trainer import Trainer

    monkeypatch.setattr(Trainer, "_weights_finite", lambda self: False)
    run = tmp_path / "run"
    line = assert_user_error(cli(*train_args("toy2d", run, 20, "method.optim.lr=1e30")), "became nan")
    assert "no checkpoint was written" in line and not (run / "checkpoints" / "latest").exists()


# ---------------------------------------------------------------------------- 3. locks


def test_a_second_run_in_a_locked_directory_is_refused(cli, tmp_path):
    from rtdmd.runlock import DirLock

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from rtdmd.runlock import DirLock\n"
                               f"with DirLock({str(run)!r}):\n print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = assert_user_error(cli(*train_args("toy2d", run, 2)), "is in use by", f"pid {holder.pid}", "another --out")
    finally:
        holder.kill()
        holder.wait()
    assert not (run / "checkpoints").exists(), line
    _ok(cli(*train_args("toy2d", run, 2)))  # the kernel dropped the dead holder's lock
    with DirLock(run):
        pass


def _create_store(uri: str, queue) -> None:
    try:
        import mlflow

        from rtdmd.tracking import open_store

        open_store(mlflow, uri, "exp")
        queue.put("ok")
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        queue.put(repr(exc))


def test_two_processes_create_one_mlflow_store(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    uri = f"sqlite:///{tmp_path / 'new.db'}"
    procs = [ctx.Process(target=_create_store, args=(uri, q)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(60)
    assert results == ["ok", "ok"]


# ---------------------------------------------------------------------------- 4. guidance


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_bad_guidance_is_refused(cli, tmp_path, toy_run, value):
    assert_user_error(cli("sample", "--checkpoint", toy_run, "--prompt", "mode 1", "--guidance", value,
                          "--out", tmp_path / "s"), "--guidance must be a finite number >= 0")
    assert_user_error(cli("eval", "--checkpoint", toy_run, "--guidance", value, "--no-tracking"),
                      "--guidance must be a finite number >= 0")
    assert not (tmp_path / "s").exists()


def test_non_finite_network_output_writes_nothing(cli, tmp_path, toy_run):
    from safetensors.torch import load_file, save_file

    step = _step(toy_run, 4)
    state = {k: torch.full_like(v, float("nan")) for k, v in load_file(str(step / "model.safetensors")).items()}
    save_file(state, str(step / "model.safetensors"))
    _rehash(step)
    assert_user_error(cli("sample", "--checkpoint", toy_run, "--prompt", "mode 1", "--out", tmp_path / "s"),
                      "NaN or infinite")
    assert not list(tmp_path.glob("s/*.npy"))


def test_eval_logs_no_result_from_non_finite_images(cli, tmp_path):
    from safetensors.torch import load_file, save_file

    from tests.eval_fixtures import tiny_checkpoint

    step = tiny_checkpoint(tmp_path / "shapes")
    state = {k: torch.full_like(v, float("nan")) for k, v in load_file(str(step / "model.safetensors")).items()}
    save_file(state, str(step / "model.safetensors"))
    _rehash(step)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert_user_error(cli("eval", "--checkpoint", step, "--tracking-uri", uri, "--experiment", "x", "--max-prompts", "1",
                          "--images-per-prompt", "1", "--quiet", "--out", tmp_path / "ev"), "NaN or infinite")
    assert not list((tmp_path / "ev").rglob("*.png")) and not list((tmp_path / "ev").rglob("summary.json"))
    import mlflow

    mlflow.set_tracking_uri(uri)
    assert mlflow.search_runs(search_all_experiments=True).empty


# ---------------------------------------------------------------------------- 5. one sentence, exit 2


@pytest.mark.parametrize("sets, fragment", [
    (("train.checkpoint_every=0",), "train.checkpoint_every"), (("train.log_every=0",), "train.log_every"),
    (("train.ema_every=0",), "train.ema_every"), (("train.batch_size=0",), "train.batch_size"),
    (("train.batch_size=-4",), "train.batch_size"), (("method.optim.lr=.nan",), "'method.optim.lr'"),
    (("train.grad_clip=.nan",), "train.grad_clip"), (("train.device=banana",), "train.device"),
])
def test_bad_training_values(cli, tmp_path, sets, fragment):
    assert_user_error(cli(*train_args("toy2d", tmp_path / "run", 2, *sets)), fragment)


def test_bad_eval_device(cli, toy_run):
    assert_user_error(cli("eval", "--checkpoint", toy_run, "--device", "banana", "--no-tracking"), "--device")


def test_out_under_a_file_for_every_command(cli, tmp_path, toy_run):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "sub"
    assert_user_error(cli(*train_args("toy2d", out, 2)), "cannot write", "--out")
    assert_user_error(cli("sample", "--checkpoint", toy_run, "--prompt", "mode 1", "--out", out), "cannot write")
    assert_user_error(cli("prompts", "geneval", "--out", out / "p.jsonl"), "cannot write")
    from tests.eval_fixtures import tiny_checkpoint

    shapes = tiny_checkpoint(tmp_path / "shapes")
    assert_user_error(cli("eval", "--checkpoint", shapes, "--no-tracking", "--out", out, "--max-prompts", "1",
                          "--images-per-prompt", "1", "--quiet"), "cannot write")
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    _ok(cli("eval", "--checkpoint", shapes, "--tracking-uri", uri, "--max-prompts", "1", "--images-per-prompt", "1",
            "--quiet", "--out", tmp_path / "ev"))
    assert_user_error(cli("report", "--tracking-uri", uri, "--experiment", "rtdmd-bench", "--bootstrap", "10",
                          "--out", out / "r.md"), "cannot write")


def test_read_only_out(cli, tmp_path, toy_run, monkeypatch):
    """EROFS / EACCES (root ignores a read-only mode, so the OS error is injected)."""
    import pathlib

    def refuse(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(pathlib.Path, "mkdir", refuse)
    assert_user_error(cli("sample", "--checkpoint", toy_run, "--prompt", "mode 1", "--out", tmp_path / "ro"),
                      "read-only file system", "writable --out")


def test_disk_full_during_a_checkpoint_leaves_no_tmp(cli, tmp_path, monkeypatch):
    from rtdmd import checkpoint as ckpt

    run = tmp_path / "run"
    _ok(cli(*train_args("toy2d", run, 2)))

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)
    for _ in range(2):  # each retry cleans up after itself
        assert_user_error(cli(*train_args("toy2d", run, 4, extra=("--resume",))), "no space left", "free disk space")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000002"]


def test_oversized_png_in_an_images_set_is_refused_before_scoring(cli, tmp_path, monkeypatch):
    import numpy as np

    from benchmarks.geneval import layout
    from benchmarks.geneval.prompts import generate_metadata
    from benchmarks.geneval.suite import GenEvalSuite
    from rtdmd.validate import png_size

    def no_scoring(*a, **k):
        raise AssertionError("scored before the size check")

    monkeypatch.setattr(GenEvalSuite, "score", no_scoring)
    entry = generate_metadata(["circle", "square"], seed=43, per_task=1, exclude_color_class=None)[0]
    imgs = tmp_path / "imgs"
    layout.write_prompt_dir(imgs, 0, entry)
    layout.save_image(imgs, 0, 0, np.zeros((32, 32, 3), np.uint8))
    big = layout.save_image(imgs, 0, 1, np.zeros((1024, 1024, 3), np.uint8))
    assert png_size(big) == (1024, 1024)
    assert_user_error(cli("eval", "--images", imgs, "--backend", "shapes", "--images-per-prompt", "2",
                          "--no-tracking", "--quiet"), "1024x1024", "32x32")


def test_a_huge_prompt_is_not_echoed_whole(cli, tmp_path):
    prompt = "a red circle " * 200_000  # 2.6 MB
    r = cli("sample", "--prompt", prompt, "--num-images", "1", "--steps", "1", "--out", tmp_path / "s")
    line = assert_user_error(r)
    assert len(line) < 1000


# ---------------------------------------------------------------------------- 6. leftovers of killed runs


def test_stale_tmp_files_are_cleaned(cli, tmp_path):
    run = tmp_path / "run"
    root = run / "checkpoints"
    root.mkdir(parents=True)
    dead = 2**22 + 12345  # above the default pid_max: no such process
    (root / f"step_000001.tmp{dead}").mkdir()
    (root / f"latest.tmp{dead}").write_text("x")
    live = root / f"step_000001.tmp{os.getppid()}"  # a live process's write in progress is left alone
    live.mkdir()
    _ok(cli(*train_args("toy2d", run, 2)))
    assert sorted(p.name for p in root.iterdir()) == ["latest", live.name, "step_000002"]


# ---------------------------------------------------------------------------- 7. SIGTERM and Ctrl-C


def _script() -> str:
    exe = Path(sys.executable).parent / "rtdmd-bench"
    return str(exe) if exe.exists() else shutil.which("rtdmd-bench")


def test_sigterm_checkpoints_and_ends_the_mlflow_run(tmp_path):
    run = tmp_path / "run"
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    args = [_script(), *train_args("toy2d", run, 10**7, "train.checkpoint_every=1", "tracking.enabled=true",
                                   f"tracking.uri={uri}")]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "latest").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err
    lines = [ln for ln in err.strip().splitlines() if " INFO mlflow" not in ln]  # MLflow's store-creation notes
    assert len(lines) == 1 and lines[0].startswith("error: training interrupted at step"), err
    import mlflow

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(search_all_experiments=True)
    assert list(runs["status"]) == ["KILLED"]


def test_ctrl_c_during_eval_is_one_sentence(cli, toy_run, monkeypatch):
    import benchmarks.runner as runner

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "describe_checkpoint", interrupted)
    assert_user_error(cli("eval", "--checkpoint", toy_run, "--no-tracking"), "interrupted", "rerun the same command")


# ---------------------------------------------------------------------------- 8. --max-steps, --resume


def test_max_steps_caps_rtdmd_stage_1():
    from rtdmd.api import make_config
    from rtdmd.methods.rtdmd import stage1_config

    over = {"train": {"max_steps": 2, "max_steps_cap": 2},
            "method": {"stage1_train": {"max_steps": 1500, "checkpoint_every": 500}}}
    cfg = make_config("rtdmd", backend="toy2d", overrides=over)
    assert cfg.train.max_steps == 2 and stage1_config(cfg).train.max_steps == 2
    uncapped = make_config("rtdmd", backend="toy2d", overrides={"method": over["method"]})
    assert stage1_config(uncapped).train.max_steps == 1500


def test_resume_on_an_empty_directory_is_an_error_for_rtdmd(tmp_path):
    from rtdmd.api import run_training
    from rtdmd.errors import UserError

    from rtdmd.rewards.registry import register_reward, unregister_reward

    (tmp_path / "empty").mkdir()
    register_reward("test_rel_right", lambda x, prompts: torch.tanh(x[:, 0]), differentiable=True)
    try:
        over = {"method": {"rewards": {"test_rel_right": 1.0}}, "tracking": {"enabled": False}}
        with pytest.raises(UserError, match="holds no checkpoint"):
            run_training("rtdmd", backend="toy2d", overrides=over, out=tmp_path / "empty", resume=True)
        with pytest.raises(UserError, match="--resume-from applies to one stage"):
            run_training("rtdmd", backend="toy2d", overrides=over, out=tmp_path / "empty", resume=3)
    finally:
        unregister_reward("test_rel_right")
    assert not (tmp_path / "empty" / "stage1").exists()


# ---------------------------------------------------------------------------- 9. permissions


def test_files_honour_the_umask(cli, tmp_path):
    import numpy as np

    from rtdmd.images import save_png

    old = os.umask(0o022)
    try:
        run = tmp_path / "run"
        _ok(cli(*train_args("toy2d", run, 2)))
        save_png(tmp_path / "x.png", np.zeros((4, 4, 3), np.uint8))
        files = [p for p in (run / "checkpoints").rglob("*") if p.is_file()] + [tmp_path / "x.png"]
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in files}
        assert set(modes.values()) == {"0o644"}, modes
    finally:
        os.umask(old)


# ---------------------------------------------------------------------------- structure


@pytest.mark.parametrize("module", ["rtdmd/trainer.py", "rtdmd/checkpoint.py"])
def test_functions_are_short(module):
    tree = ast.parse((ROOT / module).read_text())
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60]
    assert not long, long


@pytest.mark.slow  # ~6 CLI subprocesses; the full run is `python -m benchmarks.perf.fault_injection --kills 20`
def test_fault_injection_fast(tmp_path):
    from benchmarks.perf import fault_injection

    line = fault_injection.main(["--kills", "2", "--steps-per-kill", "5", "--evals", "0", "--work", str(tmp_path)])
    assert line.startswith("kills: 2, diverged: 0, corrupt files refused: ") and line.endswith("lost results: 0")
    refused, total = line.split("refused: ")[1].split(",")[0].split("/")
    assert refused == total and int(total) >= 5
