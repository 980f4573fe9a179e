"""`rtdmd-bench eval --weights ema|online`: a tiny shapes checkpoint whose EMA (model.safetensors) and online
(state/net_<inference network>.safetensors) weights differ is evaluated both ways; the online weights are
verified by the checkpoint's manifest and named in the MLflow params, the run name and the row name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks import runner
from rtdmd import checkpoint as ckpt
from rtdmd.errors import UserError
from tests.eval_fixtures import TINY_BACKEND, TINY_SAMPLER, one_torch_thread  # noqa: F401 (fixture)


def _two_weights_checkpoint(run_dir: Path) -> Path:
    from rtdmd.config import dump, resolve
    from rtdmd.registry import get_backend

    cfg = resolve("teacher", backend="shapes", overrides={"backend": dict(TINY_BACKEND), "tracking": {"enabled": False}})
    backend = get_backend("shapes").factory(cfg.backend, "cpu")
    torch.manual_seed(0)
    ema = dict(backend.network_state(backend.make_trainable("teacher")))
    online = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in ema.items()}
    state = {"tensors": {"net_teacher": online, "ema_teacher": ema}, "objects": {"step": 3, "optimizers": {}}}
    return ckpt.write_checkpoint(run_dir, 3, config_yaml=dump(cfg), sampler=dict(TINY_SAMPLER), method="teacher",
                                 backend="shapes", inference_state=ema, training_state=state,
                                 extra_meta={"role": "teacher", "inference_network": "teacher", "train_seconds": 60.0})


def _opts(tmp_path, **kw):
    return runner.EvalOptions(**{**dict(max_prompts=3, images_per_prompt=1, tracking=False, out=tmp_path / "evals",
                                        progress=False, batch_size=4), **kw})


def test_online_weights_are_loaded_verified_and_named(tmp_path):
    import mlflow

    step = _two_weights_checkpoint(tmp_path / "run")
    _, _, net_ema, _ = ckpt.load_for_inference(step)
    _, _, net_online, _ = ckpt.load_for_inference(step, weights="online")
    online = ckpt.load_online_state(step)
    for k, v in net_online.state_dict().items():
        assert torch.equal(v, online[k])
    assert any(not torch.equal(a, b) for a, b in zip(net_ema.parameters(), net_online.parameters()))

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    track = dict(tracking=True, tracking_uri=store, experiment="weights-test")
    (e,) = runner.run_eval([step], _opts(tmp_path, **track))
    (o,) = runner.run_eval([step], _opts(tmp_path, weights="online", **track))
    assert (e.method, o.method) == ("teacher", "teacher-online")
    assert e.image_dir != o.image_dir and e.run_id != o.run_id
    png = lambda d: sorted(p.read_bytes() for p in d.rglob("samples/*.png"))  # noqa: E731
    assert png(e.image_dir) != png(o.image_dir)  # different weights, same seeds: different images
    mlflow.set_tracking_uri(store)
    ro, re_ = mlflow.get_run(o.run_id), mlflow.get_run(e.run_id)
    assert ro.data.params["weights"] == "online" and re_.data.params["weights"] == "ema"
    assert ro.data.params["method"] == "teacher-online" and ro.data.tags["mlflow.runName"].startswith("teacher-online-")
    meta = ckpt.read_meta(step)
    assert ro.data.tags["checkpoint_sha256"] == meta["files"]["state/net_teacher.safetensors"]
    assert re_.data.tags["checkpoint_sha256"] == meta["model_sha256"]


def test_online_weights_refused_when_missing_or_modified(tmp_path):
    from tests.eval_fixtures import tiny_checkpoint

    bare = tiny_checkpoint(tmp_path / "bare")  # an inference-only checkpoint: no state/
    with pytest.raises(UserError, match="no online weights"):
        runner.run_eval([bare], _opts(tmp_path, weights="online"))
    step = _two_weights_checkpoint(tmp_path / "run")
    f = step / "state" / "net_teacher.safetensors"
    f.chmod(0o644)
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match the sha256"):
        ckpt.load_for_inference(step, weights="online")
    with pytest.raises(UserError, match="--weights must be ema or online"):
        runner.run_eval([step], _opts(tmp_path, weights="raw"))


def test_cli_offers_the_weights_choice():
    from click.testing import CliRunner

    from benchmarks.cli import eval_cmd

    assert "--weights [ema|online]" in CliRunner().invoke(eval_cmd, ["--help"]).output
    assert CliRunner().invoke(eval_cmd, ["--weights", "raw"]).exit_code == 2
