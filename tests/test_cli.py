"""The CLI contract: every user mistake exits 2 with one 'error:' line on stderr and no traceback."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from runhelp import assert_user_error, train_args

# ---------------------------------------------------------------------------- names and config values

CONFIG_ERRORS = {
    "unknown method": (["train", "nope"], ["unknown method 'nope'", "teacher"]),
    "unknown backend": (["train", "teacher", "--backend", "nope"], ["unknown backend 'nope'", "toy2d"]),
    "method not on backend": (["train", "teacher", "--backend", "sd3"], ["does not run on backend 'sd3'", "shapes, toy2d"]),
    "unknown section": (["--set", "trian.seed=1"], ["unknown config section 'trian'", "train"]),
    "unknown key": (["--set", "train.max_step=5"], ["unknown config key 'train.max_step'", "max_steps"]),
    "unknown nested key": (["--set", "method.optim.learning_rate=1"], ["'method.optim.learning_rate'", "lr"]),
    "bad int": (["--set", "train.batch_size=abc"], ["'train.batch_size'", "an integer", "'abc'"]),
    "bool is not an int": (["--set", "train.batch_size=true"], ["'train.batch_size'", "an integer"]),
    "fractional int": (["--set", "train.batch_size=8.5"], ["'train.batch_size'", "an integer"]),
    "bad float": (["--set", "method.optim.lr=fast"], ["'method.optim.lr'", "a number"]),
    "bad bool": (["--set", "tracking.enabled=maybe"], ["'tracking.enabled'", "true or false"]),
    "bad literal": (["--set", "method.sigma_sampling=gauss"], ["'method.sigma_sampling'", "'uniform', 'logit_normal'"]),
    "bad literal (train)": (["--set", "train.mixed_precision=fp8"], ["'train.mixed_precision'", "'bf16'"]),
    "scalar for a list": (["--set", "method.optim.betas=0.9"], ["'method.optim.betas'", "a list"]),
    "bad list element": (["--set", "method.optim.betas=[0.9, high]"], ["'method.optim.betas[1]'", "a number"]),
    "scalar for a nested section": (["--set", "method.optim=5"], ["'method.optim'"]),
    "malformed --set": (["--set", "train.seed"], ["--set expects key=value", "'train.seed'"]),
    "malformed --set key": (["--set", "train..seed=1"], ["--set key 'train..seed' is malformed"]),
    "conflicting --set": (["--set", "train.seed=1", "--set", "train.seed.x=2"], ["conflicts"]),
    "validate()": (["--set", "method.prompt_dropout=1.5"], ["method.prompt_dropout"]),
    "toy2d validate()": (["--set", "backend.stds=[0.1]"], ["backend.stds"]),
    "unknown preset": (["--preset", "fastest"], ["unknown preset 'fastest'", "teacher on toy2d"]),
    "--stage on teacher": (["--stage", "1"], ["--stage", "drop --stage"]),
    "--init on teacher": (["--init", "somewhere"], ["--init", "drop --init"]),
    "--max-steps 0": (["--max-steps", "0"], ["--max-steps must be a positive integer"]),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_config_and_name_errors(cli, tmp_path, case):
    args, fragments = CONFIG_ERRORS[case]
    if args[0] != "train":
        args = train_args("toy2d", tmp_path / "run", 2) + args
    assert_user_error(cli(*args), *fragments)
    assert not (tmp_path / "run").exists(), "a config error must stop before the run directory is created"


@pytest.mark.parametrize("value", ["5", "0", "[1, 2]"])
@pytest.mark.parametrize("section", ["train", "method", "backend"])
def test_scalar_for_a_section_is_a_user_error(cli, tmp_path, section, value):
    """--set train=5 must not crash (TypeError) nor be silently ignored (train=0 used to train 1000 default steps)."""
    from runhelp import TOY2D_SETS

    args = ["train", "teacher", "--backend", "toy2d", "--out", tmp_path / "run", "--quiet"]
    # tiny settings for the other sections (and train.max_steps=2), so that a regression that ignores the
    # scalar trains for seconds, not minutes
    for s in (*TOY2D_SETS, "train.max_steps=2"):
        if not s.startswith(section + "."):
            args += ["--set", s]
    assert_user_error(cli(*args, "--set", f"{section}={value}"), f"'{section}'")
    assert not (tmp_path / "run").exists()


def test_scalar_section_in_config_file_is_not_silently_ignored(cli, tmp_path):
    """A config file with `train: 5` is an error even when --set also writes train.* keys."""
    f = tmp_path / "c.yaml"
    f.write_text("train: 5\n")
    assert_user_error(cli(*train_args("toy2d", tmp_path / "run", 2, extra=("--config", f))), "'train'")


@pytest.mark.parametrize("text, fragments", [
    (None, ("c.yaml does not exist", "--config")),  # no file written
    ("train:\n  max_steps: 3\n  seed: [1, 2\n", ("not valid YAML", "line")),
    ("- 1\n- 2\n", ("must hold a mapping",)),
    ("backend:\n  hiden: 3\n", ("'backend.hiden'", "hidden")),
    ("method:\n  name: dmd2\n", ("another method",)),
    ("backend:\n  name: shapes\n", ("backend.name",)),
], ids=["missing", "bad-yaml", "sequence", "typo", "other-method", "other-backend"])
def test_config_file_errors(cli, tmp_path, text, fragments):
    run, f = tmp_path / "run", tmp_path / "c.yaml"
    if text is not None:
        f.write_text(text)
    assert_user_error(cli(*train_args("toy2d", run, 2, extra=("--config", f))), *fragments)
    assert not run.exists()


# ---------------------------------------------------------------------------- run directories


def test_resume_without_a_run(cli, tmp_path):
    assert_user_error(cli(*train_args("toy2d", tmp_path / "empty", 2, extra=("--resume",))),
                      "--resume given but", "holds no checkpoint", "drop --resume")


def test_new_run_in_a_directory_that_holds_one(cli, tmp_path):
    run = tmp_path / "run"
    r = cli(*train_args("toy2d", run, 2))
    assert r.exit_code == 0, r.output
    before = (run / "checkpoints" / "step_000002" / "model.safetensors").read_bytes()
    assert_user_error(cli(*train_args("toy2d", run, 2)), "already holds a training run", "--resume")
    assert (run / "checkpoints" / "step_000002" / "model.safetensors").read_bytes() == before


def test_resume_with_a_changed_config(cli, tmp_path):
    run = tmp_path / "run"
    assert cli(*train_args("toy2d", run, 2)).exit_code == 0
    assert_user_error(cli(*train_args("toy2d", run, 4, "train.seed=7", extra=("--resume",))),
                      "different config", "'train.seed'")


def test_resume_from_an_inference_only_checkpoint(cli, tmp_path):
    run = tmp_path / "run"
    assert cli(*train_args("toy2d", run, 2)).exit_code == 0
    shutil.rmtree(run / "checkpoints" / "step_000002" / "state")
    assert_user_error(cli(*train_args("toy2d", run, 4, extra=("--resume",))), "holds no training state")


@pytest.mark.parametrize("victim", ["state/net_teacher.safetensors", "state/trainer.pt"])
def test_resume_from_a_corrupt_training_state(cli, tmp_path, victim):
    run = tmp_path / "run"
    assert cli(*train_args("toy2d", run, 2)).exit_code == 0
    f = run / "checkpoints" / "step_000002" / victim
    f.write_bytes(f.read_bytes()[:64])
    assert_user_error(cli(*train_args("toy2d", run, 4, extra=("--resume",))), "corrupt", "earlier checkpoint")


# ---------------------------------------------------------------------------- checkpoints given to `sample`


@pytest.fixture()
def toy_checkpoint(cli, tmp_path) -> Path:
    run = tmp_path / "toyrun"
    r = cli(*train_args("toy2d", run, 2))
    assert r.exit_code == 0, r.output
    return run / "checkpoints" / "step_000002"


def _sample(cli, ckpt, *extra):
    return cli("sample", "--checkpoint", ckpt, "--prompt", "mode 1", "--num-images", "2", "--out", "samples", *extra)


def test_sample_from_a_toy_checkpoint_works(cli, toy_checkpoint, tmp_path):
    r = _sample(cli, toy_checkpoint.parent.parent)
    assert r.exit_code == 0, r.output
    import numpy as np

    assert np.load(tmp_path / "samples" / "samples.npy").shape == (2, 2)


def test_sample_shows_a_progress_bar_moving_every_sampling_step(cli, toy_checkpoint, monkeypatch):
    import tqdm

    bars = []

    class Bar:
        def __init__(self, total, desc, **kw):
            self.total, self.desc, self.updates = total, desc, []
            bars.append(self)

        def update(self, n):
            self.updates.append(n)

        def close(self):
            pass

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    r = _sample(cli, toy_checkpoint.parent.parent, "--steps", "4")
    assert r.exit_code == 0, r.output
    (bar,) = bars
    assert bar.desc.startswith("sample (") and bar.total == 2 and sum(bar.updates) == 2
    assert len(bar.updates) == 2  # 2 images over 4 steps: one more image every second step, not one jump at the end
    bars.clear()
    assert _sample(cli, toy_checkpoint.parent.parent, "--quiet").exit_code == 0 and not bars


def test_missing_checkpoint(cli, tmp_path):
    assert_user_error(_sample(cli, tmp_path / "nowhere"), "nowhere does not exist")
    (tmp_path / "emptydir").mkdir()
    assert_user_error(_sample(cli, tmp_path / "emptydir"), "no checkpoint found")


def test_truncated_model_file(cli, toy_checkpoint):
    f = toy_checkpoint / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert_user_error(_sample(cli, toy_checkpoint), "model.safetensors", "sha256", "retrain")


def test_truncated_model_file_without_a_recorded_hash(cli, toy_checkpoint):
    meta = json.loads((toy_checkpoint / "meta.json").read_text())
    for key in ("model_sha256", "files", "meta_sha256"):  # a checkpoint written before hashes were recorded
        del meta[key]
    (toy_checkpoint / "meta.json").write_text(json.dumps(meta))
    f = toy_checkpoint / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert_user_error(_sample(cli, toy_checkpoint), "is corrupt")


def test_sha256_mismatch(cli, toy_checkpoint):
    f = toy_checkpoint / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # same length, one weight byte flipped: only the hash can tell
    f.write_bytes(bytes(data))
    assert_user_error(_sample(cli, toy_checkpoint), "does not match the sha256")


def test_missing_meta_json(cli, toy_checkpoint):
    os.remove(toy_checkpoint / "meta.json")
    assert_user_error(_sample(cli, toy_checkpoint), "no checkpoint found")
    assert_user_error(_sample(cli, toy_checkpoint.parent.parent), "no checkpoint found")


def test_corrupt_meta_json(cli, toy_checkpoint):
    (toy_checkpoint / "meta.json").write_text("{not json")
    assert_user_error(_sample(cli, toy_checkpoint), "meta.json is unreadable or corrupt")


def test_missing_checkpoint_config_names_the_checkpoint_not_the_config_option(cli, toy_checkpoint):
    """A checkpoint without config.yaml is an incomplete checkpoint; the user never passed --config."""
    os.remove(toy_checkpoint / "config.yaml")
    line = assert_user_error(_sample(cli, toy_checkpoint), "config.yaml")
    assert "--config" not in line


def test_sample_argument_errors(cli, toy_checkpoint):
    assert_user_error(_sample(cli, toy_checkpoint, "--steps", "0"), "--steps must be positive")
    assert_user_error(cli("sample", "--checkpoint", toy_checkpoint, "--prompt", "x", "--num-images", "0"),
                      "--num-images must be positive")
    assert_user_error(cli("sample", "--checkpoint", toy_checkpoint, "--prompt", "mode 9"), "'mode 9'", "0..7")


def test_shapes_prompt_too_long(cli):
    prompt = " ".join(["a red circle and"] * 5)
    assert_user_error(cli("sample", "--prompt", prompt, "--num-images", "1", "--steps", "1"), "max_tokens")


# ---------------------------------------------------------------------------- failures during training


def test_nan_loss_stops_with_the_last_good_state(cli, tmp_path):
    run = tmp_path / "run"
    line = assert_user_error(cli(*train_args("toy2d", run, 20, "method.optim.lr=1e30")),
                             "became nan", "last good state saved", "learning rate")
    latest = (run / "checkpoints" / "latest").read_text().strip()
    step = int(latest.split("_")[1])
    assert latest in line and 1 <= step < 20
    state = load_file(str(run / "checkpoints" / latest / "state" / "net_teacher.safetensors"))
    assert all(torch.isfinite(v).all() for v in state.values())


def test_nan_advice_can_be_followed(cli, tmp_path, monkeypatch):
    """The NaN message says: lower the learning rate, then --resume. After a loss spike (a NaN at step 3, forced
    here), doing exactly that must work, and the resumed optimiser must use the new learning rate."""
    from rtdmd.methods.teacher import TeacherMethod

    real = TeacherMethod.loss

    def loss(self, network, ctx):
        out, logs = real(self, network, ctx)
        return (out * float("nan") if ctx.step == 3 else out), logs

    run = tmp_path / "run"
    monkeypatch.setattr(TeacherMethod, "loss", loss)
    line = assert_user_error(cli(*train_args("toy2d", run, 6)), "became nan at step 4", "step_000003", "--resume")
    monkeypatch.undo()
    r = cli(*train_args("toy2d", run, 6, "method.optim.lr=1e-3", extra=("--resume",)))
    assert r.exit_code == 0, (line, r.output)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000006"
    objects = torch.load(run / "checkpoints" / "step_000006" / "state" / "trainer.pt", weights_only=False)
    assert objects["optimizers"]["teacher"]["param_groups"][0]["lr"] == pytest.approx(1e-3)


def _interrupt_at(monkeypatch, k: int):
    """Send this process a real SIGINT (Ctrl-C) while the loss of step k is computed (pytest runs in the main
    thread, where Python handles signals)."""
    from rtdmd.methods.teacher import TeacherMethod

    real = TeacherMethod.loss

    def loss(self, network, ctx):
        if ctx.step == k:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, network, ctx)

    monkeypatch.setattr(TeacherMethod, "loss", loss)


def _interrupted_step(line: str) -> int:
    m = re.search(r"interrupted at step (\d+)", line)
    assert m, line
    return int(m.group(1))


def test_keyboard_interrupt_saves_a_checkpoint(cli, tmp_path, monkeypatch):
    run = tmp_path / "run"
    _interrupt_at(monkeypatch, 3)
    line = assert_user_error(cli(*train_args("toy2d", run, 10, "train.checkpoint_every=100")), "--resume")
    step = _interrupted_step(line)
    assert step in (3, 4)  # the interrupted step is either undone or finished, never half-applied
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{step:06d}"
    assert f"step_{step:06d}" in line
    assert json.loads((run / "checkpoints" / f"step_{step:06d}" / "meta.json").read_text())["step"] == step
    monkeypatch.undo()
    r = cli(*train_args("toy2d", run, 5, "train.checkpoint_every=100", extra=("--resume",)))
    assert r.exit_code == 0, r.output
    assert "trained teacher for 5 steps" in r.stdout


def test_keyboard_interrupt_in_the_first_step_can_be_resumed(cli, tmp_path, monkeypatch):
    """The message says 'continue with --resume'; that must work even when Ctrl-C came during step 0."""
    run = tmp_path / "run"
    _interrupt_at(monkeypatch, 0)
    assert_user_error(cli(*train_args("toy2d", run, 10)), "interrupted", "--resume")
    monkeypatch.undo()
    r = cli(*train_args("toy2d", run, 3, extra=("--resume",)))
    assert r.exit_code == 0, r.output


# ---------------------------------------------------------------------------- the real console script


def _script() -> str:
    exe = Path(sys.executable).parent / "rtdmd-bench"
    return str(exe) if exe.exists() else shutil.which("rtdmd-bench")


def test_console_script_user_error(tmp_path):
    p = subprocess.run([_script(), "sample", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and p.stderr.startswith("error: ")
    assert "does not exist" in p.stderr and "Traceback" not in p.stderr
    assert p.stdout == ""


def test_console_script_ctrl_c_checkpoints_and_resumes(tmp_path):
    """A real SIGINT during training: exit 2, one error line, a checkpoint that --resume continues from."""
    run = tmp_path / "run"
    args = [_script(), *train_args("toy2d", run, 10**7, "train.checkpoint_every=1", "train.keep_checkpoints=2")]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        latest = run / "checkpoints" / "latest"  # written once the first step is done
        deadline = time.monotonic() + 90
        while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: training interrupted at step"), err
    assert "--resume" in lines[0] and "Traceback" not in err
    latest = (run / "checkpoints" / "latest").read_text().strip()
    step = int(latest.split("_")[1])
    assert step >= 1 and latest in lines[0]
    meta = json.loads((run / "checkpoints" / latest / "meta.json").read_text())
    assert meta["step"] == step and not math.isnan(meta["train_seconds"])
