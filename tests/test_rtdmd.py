"""RTDMD stage 2 on toy2d: multi-reward advantages with the zero-advantage drop, SubGRPO's step subsets and
group-shared noise (inspected in the rollout), the PPO / back-propagation / DM terms against hand
computation, init from stage 1, the two-stage run (layout, resume, nested MLflow runs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rtdmd import objectives
from rtdmd.api import make_config, run_training
from rtdmd.backends.base import index_cond
from rtdmd.errors import UserError
from rtdmd.methods import blocks
from rtdmd.methods.base import StepContext
from rtdmd.rewards.registry import register_reward, unregister_reward
from rtdmd.seeding import torch_generator
from tests.runhelp import registered_rewards

BASE = {"backend": {"hidden": 16, "depth": 2},
        "train": {"device": "cpu", "log_every": 1, "checkpoint_every": 1000, "num_threads": 1},
        "tracking": {"enabled": False}}


def _right(x, prompts):  # smooth, differentiable
    return torch.tanh(x[:, 0])


def _upper(x, prompts):  # piecewise constant: whole groups can tie (zero advantage)
    return (x[:, 1] > 0).float()


@pytest.fixture(autouse=True)
def toy_rewards():
    with registered_rewards(test_right=(_right, True), test_upper=(_upper, False)):
        yield


def _over(**method):
    return {**BASE, "method": {"guidance": 1.0, "group_size": 4, "rewards": {"test_right": 1.0, "test_upper": 0.5},
                               "stage1": {"guidance": 1.0, "ttur": 1, "init": ""},
                               "stage1_train": {"batch_size": 16, "max_steps": 4, "checkpoint_every": 4}, **method},
            "train": {**BASE["train"], "batch_size": 16, "max_steps": 4}}


@pytest.fixture(scope="module")
def stage1_ckpt(tmp_path_factory):
    register_reward("test_right", _right, differentiable=True)
    register_reward("test_upper", _upper, differentiable=False)
    out = tmp_path_factory.mktemp("s1")
    r = run_training("rtdmd", backend="toy2d", overrides=_over(), stage="1", out=out, show_progress=False)
    return r.checkpoint


def _method(stage1_ckpt, **method):
    from rtdmd.methods.rtdmd import RtdmdMethod
    from rtdmd.registry import get_backend

    cfg = make_config("rtdmd", backend="toy2d", overrides=_over(stage=2, init=str(stage1_ckpt), **method))
    b = get_backend("toy2d").factory(cfg.backend, "cpu")
    return RtdmdMethod(cfg, b)


def _ctx(step=0, seed=7):
    return StepContext(step=step, generator=torch_generator(seed, step), seed=seed + 1000 * step)


def test_init_loads_stage1_generator_ema_and_fake_score(stage1_ckpt):
    from rtdmd import checkpoint as ckpt

    m = _method(stage1_ckpt)
    model = ckpt.load_model_state(stage1_ckpt)
    fake = ckpt.load_training_state(stage1_ckpt)["tensors"]["net_fake_score"]
    for k, v in m.networks["generator"].state_dict().items():
        assert torch.equal(v, model[k])
    for k, v in m.networks["fake_score"].state_dict().items():
        assert torch.equal(v, fake[k])
    assert [u.network for u in m.updates] == ["fake_score", "generator"]  # fake first (docs/paper.md s4)


def test_multi_reward_advantages_and_zero_advantage_drop(stage1_ckpt):
    m = _method(stage1_ckpt, grpo_steps="all")
    ctx = _ctx(step=0)
    m.before_step(ctx)
    batch = m.batch
    x0 = batch.rollout.final
    r1, r2 = torch.tanh(x0[:, 0]), (x0[:, 1] > 0).float()
    assert torch.allclose(batch.rewards["test_right"], r1) and torch.equal(batch.rewards["test_upper"], r2)
    # by hand: per-reward group centring / global std, weighted sum, global re-standardisation, clip 5
    gid = torch.arange(4).repeat_interleave(4)
    def centred(r):
        r = r.double()
        return (r - torch.stack([r[gid == g].mean() for g in range(4)])[gid]) / (r.std(unbiased=False) + 1e-4)
    total = centred(r1) + 0.5 * centred(r2)
    expected = (total / (total.std(unbiased=False) + 1e-4)).clamp(-5, 5).float()
    assert torch.allclose(batch.advantages, expected, atol=1e-5)
    # make one group's advantages exactly zero (both rewards constant in it), then check the PPO loss
    # averages over the other rows only (docs/paper.md s4: zero-advantage samples are dropped)
    batch.advantages[:4] = 0.0
    loss, logs = m.loss("generator", ctx)
    assert logs["grpo/rows"] == 12.0
    steps = m.selected
    keep = torch.arange(4, 16)
    from rtdmd import samplers

    r = batch.rollout
    fn = blocks.velocity_fn(m.backend, m.networks["generator"], index_cond(batch.cond, keep))
    logp = torch.stack([samplers.cps_step_log_prob(fn, r.states[i][keep], r.states[i + 1][keep], r.sigmas[i], r.sigmas[i + 1],
                                                   eta=0.9, form="simplified") for i in steps], dim=1)
    old = r.log_probs[keep][:, [r.stochastic_steps.index(i) for i in steps]]
    pg = objectives.ppo_clip_loss(logp, old, batch.advantages[keep], 1e-5)
    assert logs["grpo/policy_loss"] == pytest.approx(pg.item(), rel=1e-5, abs=1e-9)


def test_subgrpo_noise_shared_within_groups_and_distinct_across(stage1_ckpt):
    m = _method(stage1_ckpt)
    seen = set()
    for step in range(6):
        ctx = _ctx(step=step)
        m.before_step(ctx)
        sel = m.selected
        assert sel == objectives.subgrpo_select_steps(3, 2, seed=m.cfg.train.seed, epoch=step)
        seen.add(tuple(sel))
        noises = m.batch.rollout.noises
        assert noises[3] is None  # the last step is deterministic
        for i in range(3):
            z = noises[i].reshape(4, 4, 2)  # (group, member, dim)
            same_in_group = bool((z == z[:, :1]).all())
            if i in sel:  # trained step: every sample its own noise
                assert not same_in_group and len({tuple(v.tolist()) for v in noises[i]}) == 16
            else:  # not trained: one noise per group, different across groups (all prompts here are "")
                assert same_in_group
                assert len({tuple(g.tolist()) for g in z[:, 0]}) == 4
                assert torch.equal(z[0, 0], objectives.group_shared_noise(f"0:{m.batch.prompts[0]}", i, step, (2,),
                                                                          seed=m.cfg.train.seed))
    assert len(seen) > 1
    m_all = _method(stage1_ckpt, grpo_steps="all")
    m_all.before_step(_ctx(step=0))
    assert m_all.selected == [0, 1, 2]
    assert all(len({tuple(v.tolist()) for v in m_all.batch.rollout.noises[i]}) == 16 for i in range(3))


def test_back_propagation_and_dm_terms_by_hand(stage1_ckpt):
    """loss = L_BP + dm_weight L_DM with GRPO off: L_BP = w mean relu(margin - sum_j r_j(x0)) on
    x0 = x_t3 - s3 v_theta(x_t3), only differentiable rewards; the DM term is blocks.DMLoss at s = 0."""
    m = _method(stage1_ckpt, grpo_weight=0.0, bp_weight=0.3, bp_margin=2.0, dm_weight=0.7)
    assert list(m.bp_rewards) == ["test_right"]
    ctx = _ctx(step=1)
    m.before_step(ctx)
    loss, logs = m.loss("generator", ctx)
    r = m.batch.rollout
    x3, s3 = r.states[3], r.sigmas[3]
    with torch.no_grad():
        x0 = x3 - s3 * m.networks["generator"](x3, torch.full((16,), s3), m.batch.cond["mode"])
    assert torch.allclose(x0, r.final, atol=1e-6)
    bp = 0.3 * torch.relu(2.0 - torch.tanh(x0[:, 0])).mean()
    p = blocks.Prompts(m.batch.prompts, m.batch.cond, None)
    dm, _ = blocks.DMLoss(m.backend, 16, 1.0, tag="rt-dm")(m.networks["fake_score"], x0, 0.0, p, ctx)
    assert logs["loss/bp"] == pytest.approx(bp.item(), rel=1e-5)
    assert loss.item() == pytest.approx(bp.item() + 0.7 * dm.item(), rel=1e-5)
    # the gradient reaches the generator only through the last step's network call
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.networks["generator"].parameters())


def test_stage2_loss_divides_each_trained_step_by_their_number(stage1_ckpt):
    """step_average (docs/paper.md s4b): 2 SubGRPO steps + the last step -> 2/3 PPO + 1/3 (BP + DM);
    step_average false: the terms summed. Micro-batches (ctx.micro) each get their own rollout."""
    for average, (w_pg, w_last) in ((True, (2 / 3, 1 / 3)), (False, (1.0, 1.0))):
        m = _method(stage1_ckpt, dm_weight=0.7, step_average=average)
        ctx = StepContext(step=1, generator=torch_generator(7, 1), seed=1007, micro_batches=2)
        m.before_step(ctx)
        assert len(m.batches) == 2 and not torch.equal(m.batches[0].rollout.final, m.batches[1].rollout.final)
        assert len(m.selected) == 2
        loss, logs = m.loss("generator", ctx.micro_batch(1))
        assert m.batch is m.batches[1]
        expected = w_pg * logs["grpo/policy_loss"] + w_last * (logs["loss/bp"] + 0.7 * logs["loss/dm"])
        assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_dm_grad_all_replays_the_rollout(stage1_ckpt):
    m = _method(stage1_ckpt, dm_grad="all")
    m.before_step(_ctx(step=2))
    x0 = m.replayed_x0()
    assert torch.allclose(x0, m.batch.rollout.final, atol=1e-6) and x0.requires_grad
    # the replay's gradient includes the earlier steps, so it differs from the last step's alone
    w = m.networks["generator"].inp.weight
    g_all = torch.autograd.grad(x0.sum(), w)[0]
    x_last = m.last_step_x0()
    assert torch.allclose(x_last, m.batch.rollout.final, atol=1e-6)
    g_last = torch.autograd.grad(x_last.sum(), w)[0]
    assert not torch.allclose(g_all, g_last, atol=1e-4)


def test_stage2_needs_init_and_known_rewards(stage1_ckpt, tmp_path):
    with pytest.raises(UserError, match="--init"):
        run_training("rtdmd", backend="toy2d", overrides=_over(), stage="2", out=tmp_path / "a", show_progress=False)
    with pytest.raises(UserError, match="unknown reward 'nope'"):
        run_training("rtdmd", backend="toy2d", overrides=_over(rewards={"nope": 1.0}), out=tmp_path / "b",
                     show_progress=False)
    assert not (tmp_path / "b" / "stage1").exists()  # checked before stage 1 spends any time
    with pytest.raises(UserError, match="not differentiable"):
        _method(stage1_ckpt, bp_rewards=["test_upper"])


def test_two_stage_run_layout_and_exact_resume(tmp_path):
    from rtdmd import checkpoint as ckpt
    from tests.runhelp import checkpoint_tensors

    over = _over()
    over["train"]["checkpoint_every"] = 2
    full = run_training("rtdmd", backend="toy2d", overrides=over, out=tmp_path / "full", show_progress=False)
    assert full.checkpoint.parent.parent.name == "stage2"
    # <out> resolves to the final stage's checkpoint; stage 1 is an ac-dmd run
    assert ckpt.find_checkpoint(tmp_path / "full").resolve() == full.checkpoint.resolve()
    m1 = ckpt.read_meta(ckpt.find_checkpoint(tmp_path / "full" / "stage1"))
    assert m1["method"] == "ac-dmd"
    # the final checkpoint's cost includes stage 1's (reports compare methods at total training cost)
    m2 = ckpt.read_meta(full.checkpoint)
    assert m2["train_seconds"] == pytest.approx(m1["train_seconds"] + m2["run_train_seconds"], abs=0.02)
    assert m2["run_train_seconds"] > 0
    # the same for CPU-seconds (process time, every thread): stage 1's plus stage 2's own
    assert m2["train_cpu_seconds"] == pytest.approx(m1["train_cpu_seconds"] + m2["run_train_cpu_seconds"], abs=0.02)
    assert m1["train_cpu_seconds"] > 0 and m2["run_train_cpu_seconds"] > 0
    # interrupted in stage 2 after its step-2 checkpoint: --resume skips stage 1 and ends in the same state
    cut = dict(over, train={**over["train"], "max_steps": 2})
    run_training("rtdmd", backend="toy2d", overrides=cut, out=tmp_path / "cut", show_progress=False)
    first = ckpt.read_meta(ckpt.find_checkpoint(tmp_path / "cut"))["run_train_cpu_seconds"]
    resumed = run_training("rtdmd", backend="toy2d", overrides=over, out=tmp_path / "cut", resume=True,
                           show_progress=False)
    # a resumed run's CPU-seconds continue from its checkpoint's
    assert ckpt.read_meta(resumed.checkpoint)["run_train_cpu_seconds"] > first
    a, b = checkpoint_tensors(full.checkpoint), checkpoint_tensors(resumed.checkpoint)
    assert set(a) == set(b) and any(k.startswith("ema_generator/") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # an interruption inside stage 1 resumes stage 1, then runs stage 2
    cut1 = _over()
    cut1["method"]["stage1_train"]["max_steps"] = 2
    run_training("rtdmd", backend="toy2d", overrides=cut1, stage="1", out=tmp_path / "cut1" / "stage1",
                 show_progress=False)
    again = run_training("rtdmd", backend="toy2d", overrides=over, out=tmp_path / "cut1", resume=True,
                         show_progress=False)
    a2 = checkpoint_tensors(again.checkpoint)
    for k in a:
        assert torch.equal(a[k], a2[k]), k


@pytest.mark.slow  # creating the MLflow sqlite schema takes seconds
def test_two_stage_run_is_a_parent_mlflow_run_with_two_children(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    over = _over()
    over["tracking"] = {"enabled": True, "uri": uri, "experiment": "t"}
    result = run_training("rtdmd", backend="toy2d", overrides=over, out=tmp_path / "run", show_progress=False)
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    parent = [r for r in runs if r.data.tags.get("stages")]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parent) == 1 and len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent[0].info.run_id}
    assert sorted(c.info.run_name.rsplit("/", 1)[1] for c in children) == ["stage1", "stage2"]
    assert parent[0].info.status == "FINISHED" and parent[0].data.tags["checkpoint"] == str(result.checkpoint)
    assert parent[0].data.params["method.stage"] == "0"


def test_custom_reward_example_and_api_sample(tmp_path):
    """examples/toy2d_custom_reward.py in --quick mode (docs/api.md), api.sample, and the reward shape check."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("example", Path(__file__).parent.parent / "examples" / "toy2d_custom_reward.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    try:
        report = example.main(tmp_path, quick=True)
    finally:
        unregister_reward("right_half")
    assert set(report) == {"teacher", "stage 1 (AC-DMD)", "stage 2 (RTDMD)"}
    from rtdmd.api import sample

    pts = sample(tmp_path / "rtdmd", ["", "mode 3"], seed=4)
    assert pts.shape == (2, 2) and torch.equal(pts, sample(tmp_path / "rtdmd", ["", "mode 3"], seed=4))
    from rtdmd.rewards.registry import get_reward

    register_reward("bad_shape", lambda x, p: x, differentiable=True)
    try:
        with pytest.raises(UserError, match="must return a tensor of shape"):
            get_reward("bad_shape", backend="toy2d")(torch.zeros(3, 2), [""] * 3)
        with pytest.raises(UserError, match="new non-empty name"):
            register_reward("oracle", _right)
    finally:
        unregister_reward("bad_shape")
