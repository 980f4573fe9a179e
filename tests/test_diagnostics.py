"""Training diagnostics (rtdmd.diagnostics): the formulas on hand numbers, the trainer's log window, and
the methods' diagnostics (RTDMD stage 2 per-term gradients and monitor rewards, AC-DMD per stop index,
Flow-GRPO policy / KL terms) without changing a single trained weight."""

from __future__ import annotations

import math

import pytest
import torch

from rtdmd import diagnostics
from rtdmd.api import run_training
from rtdmd.checkpoint import find_checkpoint, load_model_state
from rtdmd.tracking import LogWindow
from tests.runhelp import registered_rewards


def test_flat_grad_and_cosine_by_hand():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    b = torch.tensor([3.0], requires_grad=True)
    loss = (w[0] * w[1]) ** 2  # d/dw = (2 w0 w1^2, 2 w0^2 w1) = (8, 4); b unused
    g = diagnostics.flat_grad(loss, [w, b])
    assert g.tolist() == [8.0, 4.0, 0.0]
    loss.backward()  # the graph was kept for the caller's own backward
    assert w.grad.tolist() == [8.0, 4.0]
    assert diagnostics.cosine(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(1 / math.sqrt(2))
    assert diagnostics.cosine(torch.tensor([1.0, 0.0]), torch.tensor([-2.0, 0.0])) == pytest.approx(-1.0)
    assert diagnostics.cosine(torch.zeros(2), torch.ones(2)) == 0.0
    assert diagnostics.flat_grad(torch.tensor(1.0), [w, b]).tolist() == [0.0, 0.0, 0.0]


def test_term_gradients_accumulate_micro_batches_and_compare_steps():
    w = torch.tensor([1.0, 1.0], requires_grad=True)
    tg = diagnostics.TermGradients("diag", cosine_terms=("a",))
    # two micro-batches, each scaled by 1/2: a = 3 w0 then 5 w0 -> grad (4, 0); b = w1^2 -> grad (0, 2)
    tg.add({"a": 3 * w[0], "b": w[1] ** 2}, [w], scale=0.5)
    tg.add({"a": 5 * w[0], "b": w[1] ** 2}, [w], scale=0.5)
    first = tg.logs()
    assert first == {"diag/grad_norm/a": pytest.approx(4.0), "diag/grad_norm/b": pytest.approx(2.0)}
    tg.add({"a": 2 * w[0] + 2 * w[1], "b": w[1]}, [w])  # a -> (2, 2): cosine with (4, 0) = 1/sqrt(2)
    second = tg.logs()
    assert second["diag/grad_norm/a"] == pytest.approx(math.sqrt(8))
    assert second["diag/grad_cos/a"] == pytest.approx(1 / math.sqrt(2))
    assert "diag/grad_cos/b" not in second and tg.logs() == {}


def test_ratio_stats_by_hand():
    r = torch.tensor([1.0, 1.2, 0.9, 1.0])
    s = diagnostics.ratio_stats(r, clip_eps=0.15)
    assert s["grpo/ratio_mean"] == pytest.approx(1.025)
    assert s["grpo/ratio_std"] == pytest.approx(float(torch.tensor([1.0, 1.2, 0.9, 1.0]).std()))
    assert (s["grpo/ratio_min"], s["grpo/ratio_max"]) == (pytest.approx(0.9), pytest.approx(1.2))
    assert s["grpo/ratio_dev"] == pytest.approx(0.2) and s["grpo/clip_frac"] == pytest.approx(0.25)


def test_log_window_means_each_key_over_the_steps_that_reported_it():
    w = LogWindow()
    w.add({"loss/fake": 1.0})
    w.add({"loss/fake": 3.0, "loss/generator": 10.0})  # the generator steps every other iteration
    assert w.means() == {"loss/fake": 2.0, "loss/generator": 10.0}
    assert w.means() == {}


# ---------------------------------------------------------------------------- the methods, on toy2d

BASE = {"backend": {"hidden": 16, "depth": 2},
        "train": {"device": "cpu", "log_every": 1, "checkpoint_every": 1000, "num_threads": 1},
        "tracking": {"enabled": False}}


def _right(x, prompts):
    return torch.tanh(x[:, 0])


def _truth(x, prompts):  # a monitor: the "oracle" the learned reward stands for
    return x[:, 0]


@pytest.fixture(autouse=True)
def toy_rewards():
    with registered_rewards(diag_right=(_right, True), diag_truth=(_truth, False)):
        yield


def _stage2(**method):
    return {**BASE, "method": {"guidance": 1.0, "group_size": 4, "rewards": {"diag_right": 1.0}, "dm_weight": 0.5,
                               "stage1": {"guidance": 1.0, "ttur": 2, "init": ""},
                               "stage1_train": {"batch_size": 16, "max_steps": 4, "checkpoint_every": 4}, **method},
            "train": {**BASE["train"], "batch_size": 8, "max_steps": 3, "accumulate": 2}}


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    from rtdmd.rewards.registry import register_reward

    register_reward("diag_right", _right, differentiable=True)
    out = tmp_path_factory.mktemp("s1")
    return run_training("rtdmd", backend="toy2d", overrides=_stage2(), stage="1", out=out, show_progress=False)


def test_ac_dmd_logs_the_dm_gradient_norm_under_its_stop_index(stage1_run):
    # ttur 2, log_every 1: generator steps at 0 and 2; the last step (3) is a fake-score step only, so the
    # per-k norm is absent there while a generator step's result carries it
    assert not any(k.startswith("diag/grad_norm/dm_k") for k in stage1_run.last_logs)
    from rtdmd.api import make_config
    from rtdmd.methods.ac_dmd import AcDmdMethod
    from rtdmd.methods.base import StepContext
    from rtdmd.registry import get_backend

    cfg = make_config("ac-dmd", backend="toy2d", overrides={**BASE, "method": {"guidance": 1.0, "ttur": 1, "init": ""}})
    m = AcDmdMethod(cfg, get_backend("toy2d").factory(cfg.backend, "cpu"))
    m.before_step(StepContext(step=0, generator=torch.Generator().manual_seed(0), seed=0))
    assert m.step_logs(StepContext(step=0, generator=torch.Generator(), seed=0), {"grad_norm/generator": 2.5}) == \
        {f"diag/grad_norm/dm_k{m._k}": 2.5}
    assert m.step_logs(StepContext(step=0, generator=torch.Generator(), seed=0), {"loss/fake_score": 1.0}) == {}


def _stage2_method(stage1_run, **method):
    from rtdmd.api import make_config
    from rtdmd.methods.rtdmd import RtdmdMethod
    from rtdmd.registry import get_backend

    cfg = make_config("rtdmd", backend="toy2d", overrides=_stage2(stage=2, init=str(stage1_run.checkpoint), **method))
    return RtdmdMethod(cfg, get_backend("toy2d").factory(cfg.backend, "cpu"))


def test_stage2_term_gradients_sum_to_the_step_gradient_and_monitor_the_truth(stage1_run):
    from rtdmd.methods.base import StepContext
    from rtdmd.seeding import torch_generator

    m = _stage2_method(stage1_run, monitor={"diag_truth": ["diag_right"]})
    ctx = StepContext(step=1, generator=torch_generator(7, 1), seed=1007, micro_batches=2, diagnose=True)
    m.before_step(ctx)
    gen = m.networks["generator"]
    params = list(gen.parameters())
    for j in range(2):  # what the trainer does: each micro-batch's loss / 2, backward
        loss, _ = m.loss("generator", ctx.micro_batch(j))
        (loss / 2).backward()
    total = torch.cat([p.grad.reshape(-1) for p in params])
    sums = dict(m.term_grads.sums)
    assert set(sums) == {"grpo", "bp", "dm"}
    assert torch.allclose(sums["grpo"] + sums["bp"] + sums["dm"], total, atol=1e-6)
    logs = m.step_logs(ctx, {})
    for term, g in sums.items():
        assert logs[f"diag/grad_norm/{term}"] == pytest.approx(float(g.norm()), rel=1e-6)
    assert "diag/grad_cos/grpo" not in logs  # no earlier diagnosed step yet
    images = torch.cat([b.images for b in m.batches])
    learned = torch.cat([b.rewards["diag_right"] for b in m.batches])
    assert logs["monitor/diag_truth"] == pytest.approx(float(images[:, 0].mean()), rel=1e-5)
    assert logs["monitor/gap/diag_right"] == pytest.approx(float((learned - images[:, 0]).mean()), abs=1e-6)
    # the next diagnosed epoch compares its GRPO gradient with this one's
    ctx2 = StepContext(step=2, generator=torch_generator(7, 2), seed=2007, micro_batches=2, diagnose=True)
    m.before_step(ctx2)
    for j in range(2):
        m.loss("generator", ctx2.micro_batch(j))
    logs2 = m.step_logs(ctx2, {})
    assert -1.0 <= logs2["diag/grad_cos/grpo"] <= 1.0
    assert logs2["diag/grad_cos/grpo"] == pytest.approx(diagnostics.cosine(m.term_grads.previous["grpo"], sums["grpo"]))
    # a step that is not diagnosed computes none of it
    ctx3 = StepContext(step=3, generator=torch_generator(7, 3), seed=3007, micro_batches=2)
    m.before_step(ctx3)
    m.loss("generator", ctx3)
    assert m.step_logs(ctx3, {}) == {} and m.term_grads.sums == {}


def test_stage2_monitor_must_name_training_rewards(stage1_run):
    from rtdmd.errors import UserError

    with pytest.raises(UserError, match="method.monitor"):
        _stage2_method(stage1_run, monitor={"diag_truth": ["shapes_pref"]})


@pytest.mark.parametrize("method", ["rtdmd", "flow-grpo"])
def test_diagnostics_change_no_trained_weight(stage1_run, tmp_path, method):
    """The same run with train.diagnostics on and off trains the same weights, bit for bit."""
    if method == "rtdmd":
        over = _stage2(stage=2, init=str(stage1_run.checkpoint), monitor={"diag_truth": ["diag_right"]})
        backend = "toy2d"
    else:
        # the 4-step generator of stage 1 as the policy; the frozen init is the KL reference
        over = {**BASE, "method": {"group_size": 4, "rewards": {"diag_right": 1.0}, "init": str(stage1_run.checkpoint)},
                "train": {**BASE["train"], "batch_size": 8, "max_steps": 3}}
        backend = "toy2d"
    weights, results = [], []
    for on in (True, False):
        o = {**over, "train": {**over["train"], "diagnostics": on}}
        r = run_training(method, backend=backend, overrides=o, out=tmp_path / f"d{on}", show_progress=False)
        weights.append(load_model_state(find_checkpoint(r.run_dir)))
        results.append(r.last_logs)
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    diag = [k for k in results[0] if k.startswith(("diag/", "monitor/"))]
    assert diag and not any(k.startswith(("diag/", "monitor/")) for k in results[1])
    if method == "flow-grpo":
        assert "diag/grad_norm/policy" in results[0] and "diag/grad_norm/kl" in results[0]
    else:
        assert {"diag/grad_norm/grpo", "diag/grad_cos/grpo", "monitor/diag_truth"} <= set(results[0])
