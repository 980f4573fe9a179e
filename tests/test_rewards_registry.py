"""The reward registry: names, the oracle's refusal for training, identities, suites, lazy imports."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from benchmarks import rewards as BR
from rtdmd.errors import UserError
from rtdmd.rewards import registry as R
from rtdmd.rewards.base import Reward
from rtdmd.world.shapes import Scene, ShapeObject, WorldSpec, render

SCENE = Scene([ShapeObject("circle", "red", 9, 16, 12), ShapeObject("square", "blue", 24, 16, 11)])
PROMPTS = ["a photo of a red circle and a blue square", "a photo of two crosses"]


from tests.eval_fixtures import one_torch_thread_per_module  # noqa: E402,F401  (autouse)


def _images():
    return render([SCENE, SCENE], WorldSpec()).images


def test_names():
    assert R.reward_names() == ["aesthetic", "clipscore", "geneval_partial", "hpsv21", "imagereward", "oracle",
                                "pickscore", "shapes_aes", "shapes_pref"]
    with pytest.raises(UserError, match="unknown reward 'hps'"):
        R.get_reward("hps")


def test_oracle_is_evaluation_only():
    oracle = R.get_reward("oracle", backend="shapes")
    assert isinstance(oracle, Reward) and oracle.name == "oracle" and not oracle.differentiable
    assert oracle.identity.startswith("shapes-oracle-v")
    with pytest.raises(UserError) as err:
        R.training_reward("oracle", backend="shapes")
    assert "never a training signal" in str(err.value) and "shapes_pref / shapes_aes / geneval_partial" in str(err.value)
    with pytest.raises(UserError, match="not differentiable"):
        R.get_reward("oracle", differentiable=True)


def test_geneval_partial_on_shapes():
    r = R.training_reward("geneval_partial", backend="shapes")
    assert isinstance(r, Reward) and r.name == "geneval_partial" and not r.differentiable
    assert r.identity.startswith("geneval_partial[shapes-detector-v")
    scores = r(_images(), PROMPTS)
    # the render is exactly the first prompt; for the second, "fewer than 3 crosses" is the one check met
    assert scores.tolist() == [1.0, 0.5]
    # GenEval-format metadata can replace the grammar
    meta = [{"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "p0"}]
    r2 = R.get_reward("geneval_partial", metadata=meta)
    assert r2(_images()[:1], ["p0"]).tolist() == [1.0]
    with pytest.raises(UserError, match="differentiable"):
        R.get_reward("geneval_partial", differentiable=True)
    with pytest.raises(UserError, match="no option"):
        R.get_reward("geneval_partial", detector="x")


def test_learned_rewards_load_the_shipped_weights():
    pref = R.training_reward("shapes_pref", backend="shapes", differentiable=True)
    aes = R.get_reward("shapes_aes")
    assert pref.name == "shapes_pref" and pref.differentiable and not aes.differentiable
    assert "shapes_rewards" in pref.identity and "@sha256:" in pref.identity and aes.identity.startswith("shapes_aes[")
    x = _images().requires_grad_(True)
    s = pref(x, PROMPTS[:1] * 2)
    s.sum().backward()
    assert s.shape == (2,) and x.grad.abs().sum() > 0
    with pytest.raises(UserError, match="no option"):
        R.get_reward("shapes_aes", weights="x")


def test_backend_checks():
    class FakeShapes:
        name = "shapes"
        spec = WorldSpec(classes=("circle", "square"))

    assert R.get_reward("oracle", backend=FakeShapes()).spec.classes == ("circle", "square")
    for name in BR.SHAPES_ONLY:
        with pytest.raises(UserError, match="only in the shapes world"):
            R.get_reward(name, backend="sd3")
    with pytest.raises(UserError, match="has none"):
        R.get_reward("oracle", backend="toy2d")


def test_real_scorers_are_delegated(tmp_path):
    # no weights here: the scorer registry's own error names the missing path
    with pytest.raises(UserError, match=str(tmp_path / "nope")):
        R.get_reward("clipscore", backend="sd3", path=str(tmp_path / "nope"))
    with pytest.raises(UserError, match="has no option"):
        R.get_reward("pickscore", backend="flux2", colour="red")


def test_suite_rewards():
    assert BR.suite_rewards("shapes", "preference") == ["oracle", "shapes_pref"]
    assert BR.suite_rewards("shapes", "aesthetic") == ["shapes_aes"]
    assert BR.suite_rewards("sd3", "preference") == ["hpsv21", "imagereward", "pickscore", "clipscore"]
    assert BR.suite_rewards("flux2", "aesthetic") == ["aesthetic"]
    with pytest.raises(UserError, match="reports no rewards"):
        BR.suite_rewards("shapes", "geneval")
    with pytest.raises(UserError):
        BR.suite_rewards("toy2d", "preference")
    for b in ("shapes", "sd3"):
        for suite in ("preference", "aesthetic"):
            assert set(BR.suite_rewards(b, suite)) <= set(R.reward_names())


def test_registry_imports_no_benchmarks_module():
    code = ("import sys, rtdmd.rewards.registry, rtdmd.registry, rtdmd.cli; "
            "bad = [m for m in sys.modules if m.split('.')[0] == 'benchmarks']; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_scores_are_float32_on_the_image_device():
    r = R.get_reward("geneval_partial")
    out = r(_images(), PROMPTS)
    assert out.dtype == torch.float32 and out.device == _images().device
    assert np.isfinite(out.numpy()).all()
