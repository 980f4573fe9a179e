"""The training loop: exact resume, seeded runs, atomic checkpoints, pruning, time budget, MLflow logging."""

from __future__ import annotations

import json

import pytest

from runhelp import assert_same_tensors, assert_user_error, checkpoint_tensors, train_args


def _ok(result):
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    return result


def _latest(run):
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


# ---------------------------------------------------------------------------- exact resume


@pytest.fixture()
def toy_reference(cli, tmp_path):
    """An uninterrupted 6-step toy2d run (checkpoints at 3 and 6)."""
    run = tmp_path / "reference"
    _ok(cli(*train_args("toy2d", run, 6, "train.checkpoint_every=3")))
    return run


def test_toy2d_resume_is_bitwise_exact(cli, tmp_path, toy_reference):
    run = tmp_path / "resumed"
    _ok(cli(*train_args("toy2d", run, 3, "train.checkpoint_every=3")))
    assert_same_tensors(checkpoint_tensors(run / "checkpoints" / "step_000003"),
                        checkpoint_tensors(toy_reference / "checkpoints" / "step_000003"))
    _ok(cli(*train_args("toy2d", run, 6, "train.checkpoint_every=3", extra=("--resume",))))
    a, b = checkpoint_tensors(_latest(run)), checkpoint_tensors(_latest(toy_reference))
    assert int(a["step"]) == 6
    assert any(k.startswith("ema_teacher/") for k in a) and any(k.endswith("/exp_avg_sq") for k in a)
    assert_same_tensors(a, b)


def test_same_seed_same_run_other_seed_other_run(cli, tmp_path, toy_reference):
    """train.seed alone fixes the run, network initialisation included (fresh runs in one process)."""
    import torch

    torch.manual_seed(12345)  # the global RNG state must not matter
    again = tmp_path / "again"
    _ok(cli(*train_args("toy2d", again, 6, "train.checkpoint_every=3")))
    assert_same_tensors(checkpoint_tensors(_latest(again)), checkpoint_tensors(_latest(toy_reference)))
    other = tmp_path / "other"
    _ok(cli(*train_args("toy2d", other, 6, "train.checkpoint_every=3", "train.seed=1")))
    a, b = checkpoint_tensors(_latest(other)), checkpoint_tensors(_latest(toy_reference))
    assert not torch.equal(a["model/out.1.weight"], b["model/out.1.weight"])


@pytest.mark.slow  # imports diffusers and builds three tiny UNets
def test_shapes_resume_is_bitwise_exact(cli, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "resumed"
    sets = ("train.checkpoint_every=2", "train.num_threads=1")
    _ok(cli(*train_args("shapes", ref, 4, *sets)))
    _ok(cli(*train_args("shapes", run, 2, *sets)))
    _ok(cli(*train_args("shapes", run, 4, *sets, extra=("--resume",))))
    a, b = checkpoint_tensors(_latest(run)), checkpoint_tensors(_latest(ref))
    assert int(a["step"]) == 4 and any(k.startswith("ema_teacher/text_encoder") for k in a)
    assert_same_tensors(a, b)


# ---------------------------------------------------------------------------- checkpoints on disk


def test_checkpoints_are_complete_and_pruned(cli, tmp_path):
    from rtdmd.checkpoint import sha256_file
    from rtdmd.config import load_resolved

    run = tmp_path / "run"
    _ok(cli(*train_args("toy2d", run, 5, "train.checkpoint_every=1", "train.keep_checkpoints=2")))
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000004", "step_000005"]
    step = _latest(run)
    assert step.name == "step_000005"
    names = sorted(str(p.relative_to(step)) for p in step.rglob("*"))
    assert names == ["config.yaml", "meta.json", "model.safetensors", "state", "state/ema_teacher.safetensors",
                     "state/net_teacher.safetensors", "state/trainer.pt"]
    meta = json.loads((step / "meta.json").read_text())
    assert meta["step"] == 5 and meta["method"] == "teacher" and meta["backend"] == "toy2d"
    assert meta["model_sha256"] == sha256_file(step / "model.safetensors")
    assert meta["sampler"] == {"kind": "euler", "steps": 50, "guidance": 1.0, "eta": 0.9}
    # the inference network is the EMA copy
    t = checkpoint_tensors(step)
    import torch

    assert all(torch.equal(t[f"model/{k}"], t[f"ema_teacher/{k}"]) for k in [k[6:] for k in t if k.startswith("model/")])
    # the checkpoint and the run directory hold the same resolved config
    assert (step / "config.yaml").read_text() == (run / "config.yaml").read_text()
    cfg = load_resolved(step / "config.yaml")
    assert cfg.backend.hidden == 16 and cfg.train.keep_checkpoints == 2 and cfg.train.max_steps == 5


def test_keep_zero_keeps_every_checkpoint(cli, tmp_path):
    run = tmp_path / "run"
    _ok(cli(*train_args("toy2d", run, 4, "train.checkpoint_every=1", "train.keep_checkpoints=0")))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "latest", "step_000001", "step_000002", "step_000003", "step_000004"]


def test_max_minutes_stops_with_a_checkpoint_and_resumes(cli, tmp_path):
    run = tmp_path / "run"
    r = _ok(cli(*train_args("toy2d", run, 50, "train.max_minutes=1e-9", "train.checkpoint_every=1000")))
    assert "trained teacher for 1 steps" in r.stdout
    assert "max_minutes" in r.stderr and "--resume" in r.stderr
    assert _latest(run).name == "step_000001"
    # the budget counts the whole run: resuming with the same budget trains nothing and says how to go on
    r = _ok(cli(*train_args("toy2d", run, 5, "train.max_minutes=1e-9", "train.checkpoint_every=1000", extra=("--resume",))))
    assert "already used" in r.stderr and "train.max_minutes" in r.stderr and _latest(run).name == "step_000001"
    r = _ok(cli(*train_args("toy2d", run, 5, "train.checkpoint_every=1000", extra=("--resume",))))
    assert _latest(run).name == "step_000005"


# ---------------------------------------------------------------------------- MLflow


@pytest.mark.slow  # creating the MLflow sqlite schema takes seconds
def test_mlflow_logging(cli, tmp_path):
    from mlflow.tracking import MlflowClient

    from rtdmd.config import config_to_dict, flatten, load_resolved

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = tmp_path / "run"
    sets = ("tracking.enabled=true", f"tracking.uri={uri}", "tracking.experiment=trainer-test", "train.log_every=1")
    _ok(cli(*train_args("toy2d", run, 3, *sets)))
    first_cfg = config_to_dict(load_resolved(run / "config.yaml"))  # params are those of the first invocation
    _ok(cli(*train_args("toy2d", run, 5, *sets, extra=("--resume",))))
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("trainer-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, "a resumed run continues its MLflow run"
    r = runs[0]
    assert r.info.status == "FINISHED"
    expected = {k: "" if v is None else str(v) for k, v in flatten(first_cfg).items()}
    assert r.data.params == expected
    assert r.data.params["backend.hidden"] == "16" and r.data.params["train.batch_size"] == "8"
    tags = r.data.tags
    assert tags["method"] == "teacher" and tags["backend"] == "toy2d"
    assert tags["git_commit"] and tags["git_commit"] != "" and tags["kind"] == "train"
    hist = client.get_metric_history(r.info.run_id, "loss/teacher")
    assert sorted(m.step for m in hist) == [1, 2, 3, 4, 5]
    assert all(m.value > 0 for m in hist)
    assert [m.step for m in client.get_metric_history(r.info.run_id, "grad_norm/teacher")] == [1, 2, 3, 4, 5]
    meta = json.loads((_latest(run) / "meta.json").read_text())
    assert meta["mlflow_run_id"] == r.info.run_id


@pytest.mark.parametrize("where", ["loss", "ema_update", "write_checkpoint"])
def test_ctrl_c_anywhere_in_a_step_resumes_exactly(cli, tmp_path, toy_reference, monkeypatch, where):
    """SIGINT can land anywhere: before the step's updates (in the loss), between the optimiser step and the
    EMA update, or while a checkpoint is written. The saved state must be a step boundary whatever the
    point, so that --resume repeats the uninterrupted run. A real SIGINT is sent to this process (pytest runs
    tests in the main thread, where Python handles signals)."""
    import os
    import signal

    import rtdmd.trainer as T
    from rtdmd.methods.teacher import TeacherMethod

    fired = []

    def once(real, when):
        def wrapper(*a, **k):
            if when(*a, **k) and not fired:
                fired.append(1)
                os.kill(os.getpid(), signal.SIGINT)
            return real(*a, **k)
        return wrapper

    if where == "loss":
        monkeypatch.setattr(TeacherMethod, "loss", once(TeacherMethod.loss, lambda self, n, ctx: ctx.step == 4))
    elif where == "ema_update":
        calls = []
        monkeypatch.setattr(T, "ema_update", once(T.ema_update, lambda *a: calls.append(1) or len(calls) == 5))
    else:
        monkeypatch.setattr(T.ckpt, "write_checkpoint",
                            once(T.ckpt.write_checkpoint, lambda run_dir, step, **k: step == 3))
    run = tmp_path / "interrupted"
    assert_user_error(cli(*train_args("toy2d", run, 6, "train.checkpoint_every=3")), "interrupted", "--resume")
    monkeypatch.undo()
    _ok(cli(*train_args("toy2d", run, 6, "train.checkpoint_every=3", extra=("--resume",))))
    assert_same_tensors(checkpoint_tensors(_latest(run)), checkpoint_tensors(_latest(toy_reference)))
    assert not [p for p in (run / "checkpoints").iterdir() if ".tmp" in p.name]


def test_git_commit_is_the_code_loaded_not_a_later_commit(tmp_path):
    """A run records the commit of the code it started with: a commit made while it trains does not change it."""
    import subprocess

    from rtdmd.tracking import git_commit

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "one")
    first = git_commit(tmp_path)
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "two")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert len(first) == 40 and first != head and git_commit(tmp_path) == first
