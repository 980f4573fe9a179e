"""Flow-GRPO baseline and the shared GRPO blocks: groups and advantages of a rollout, the PPO-clip and KL
terms on hand numbers, the policy sources (teacher SDE / few-step CPS generator), configs, a toy2d run
whose reward rises while the KL keeps it near the teacher, and exact resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from rtdmd import objectives
from rtdmd.api import make_config, run_training
from rtdmd.config import CONFIG_DIR, _deep_merge
from rtdmd.errors import UserError
from rtdmd.methods import grpo
from rtdmd.methods.base import StepContext
from rtdmd.rewards.registry import register_reward, unregister_reward
from rtdmd.seeding import torch_generator
from tests.runhelp import assert_same_tensors, checkpoint_tensors
from tests.toy_teacher import fit_mlp_teacher, teacher_samples

MODE01 = torch.tensor([[2.5, 0.0], [2.5 * math.cos(math.pi / 4), 2.5 * math.sin(math.pi / 4)]])


def near_modes_01(x, prompts):
    """A toy reward that prefers modes 0 and 1: minus the distance to the nearer of their means."""
    return -torch.cdist(x.float(), MODE01).min(dim=1).values


@pytest.fixture(autouse=True)
def _toy_reward():
    register_reward("near01", near_modes_01)
    yield
    unregister_reward("near01")


def _ctx(seed: int = 3, step: int = 0) -> StepContext:
    return StepContext(step=step, generator=torch_generator(seed), seed=seed)


class ConstantVelocity(nn.Module):
    """v(x, s) = theta (a learnable constant vector)."""

    def __init__(self, theta):
        super().__init__()
        self.theta = nn.Parameter(torch.as_tensor(theta, dtype=torch.float32))

    def forward(self, x, sigma, mode):
        return self.theta.expand_as(x)


def _toy_backend():
    from rtdmd.backends.toy2d import Toy2DOptions, make_toy2d

    return make_toy2d(Toy2DOptions(hidden=16, depth=2))


def test_grpo_rollout_groups_rewards_and_advantages():
    b = _toy_backend()
    policy = ConstantVelocity([0.3, -0.2])
    rewards = {"near01": near_modes_01, "x": lambda x, p: x[:, 0]}
    batch = grpo.GroupRollout(b, rewards, grpo.SdePolicy(b.sampling_sigmas(5)), n_groups=3, group_size=4,
                              advantages=grpo.Advantages(weights={"near01": 1.0, "x": 0.5}))(policy, _ctx())
    assert batch.group_ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert len(batch.prompts) == 12 and batch.rollout.stochastic_steps == [0, 1, 2, 3, 4]  # every SDE step is stochastic
    assert batch.rollout.log_probs.shape == (12, 5)
    assert torch.equal(batch.images, batch.rollout.final)  # toy2d "images" are the points
    assert torch.allclose(batch.rewards["near01"], near_modes_01(batch.rollout.final, batch.prompts))
    expected = objectives.group_advantages(batch.rewards, batch.group_ids, weights={"near01": 1.0, "x": 0.5})
    assert torch.allclose(batch.advantages, expected)
    # the same step seed gives the same rollout (the draws depend only on (seed, tag))
    again = grpo.GroupRollout(b, rewards, grpo.SdePolicy(b.sampling_sigmas(5)), 3, 4,
                              grpo.Advantages(weights={"near01": 1.0, "x": 0.5}))(policy, _ctx())
    assert torch.equal(again.rollout.final, batch.rollout.final)


def test_grpo_policy_loss_and_kl_on_hand_numbers():
    """One SDE step s = 1 -> 0.5 with v = theta (docs/paper.md s6.5; at s = 1 sigma_t uses the next sigma):
    sigma_t^2 = 0.49 / (1 - 0.5) = 0.98, dt = -0.5, std = sigma_t sqrt(0.5) = 0.7,
    mean = x (1 + 0.98 / 2 * dt) + theta dt = 0.755 x - 0.5 theta.
    At the behaviour policy rho = 1: L_PPO = -mean(A); d log p / d theta = (x' - mean) / std^2 * (-0.5) = -z / 1.4,
    so dL/dtheta = mean_b(A_b z_b) / 1.4. KL to v_ref = theta + 1: mean_dims (0.5)^2 / (2 * 0.49) = 0.25 / 0.98."""
    b = _toy_backend()
    policy = ConstantVelocity([0.3, -0.2])
    batch = grpo.GroupRollout(b, {"near01": near_modes_01}, grpo.SdePolicy([1.0, 0.5]), 2, 4)(policy, _ctx())
    z = batch.rollout.noises[0]
    x0, x1 = batch.rollout.states
    assert torch.allclose(x1, 0.755 * x0 - 0.5 * policy.theta.detach() + 0.7 * z, atol=1e-6)
    A = batch.advantages
    ref = lambda c, u: (lambda x, s: (policy.theta.detach() + 1.0).expand_as(x))  # noqa: E731
    loss, logs = grpo.PolicyLoss(b, grpo.SdePolicy([1.0, 0.5]), clip_eps=1e-4, kl_weight=0.1, reference=ref)(policy, batch, [0])
    kl = 0.25 / 0.98
    assert logs["grpo/ratio_dev"] == pytest.approx(0.0, abs=1e-6)
    assert logs["grpo/kl"] == pytest.approx(kl, rel=1e-5)
    assert loss.item() == pytest.approx(-A.mean().item() + 0.1 * kl, rel=1e-4, abs=1e-6)
    loss.backward()
    # KL gradient per dim: d/dtheta_d (1/D) (0.5 + ...)^2 / 0.98 -> 2 * 0.5 * (-0.5) / 0.98 / D
    d = 2
    hand = (A[:, None] * z).mean(0) / 1.4 + 0.1 * (-0.5 / 0.98 / d)
    assert torch.allclose(policy.theta.grad, hand, atol=1e-5)
    # mean_over_dims: the Flow-GRPO code's per-dimension log-density divides the policy term's gradient by D
    policy.theta.grad = None
    loss2, _ = grpo.PolicyLoss(b, grpo.SdePolicy([1.0, 0.5]), mean_over_dims=True)(policy, batch, [0])
    loss2.backward()
    assert torch.allclose(policy.theta.grad, (A[:, None] * z).mean(0) / 1.4 / d, atol=1e-6)


def test_grpo_policy_loss_refuses_deterministic_steps_and_drops_zero_advantages():
    b = _toy_backend()
    policy = ConstantVelocity([0.3, -0.2])
    sig = b.generator_sigmas(4)
    batch = grpo.GroupRollout(b, {"near01": near_modes_01}, grpo.CpsPolicy(sig), 2, 4)(policy, _ctx())
    assert batch.rollout.stochastic_steps == [0, 1, 2]
    with pytest.raises(UserError, match="deterministic"):
        grpo.PolicyLoss(b, grpo.CpsPolicy(sig))(policy, batch, [3])
    batch.advantages[:3] = 0.0
    _, logs = grpo.PolicyLoss(b, grpo.CpsPolicy(sig), drop_zero_advantage=True)(policy, batch, [0, 1, 2])
    assert logs["grpo/rows"] == 5.0


@pytest.fixture(scope="module")
def toy_teacher(tmp_path_factory) -> Path:
    return fit_mlp_teacher(tmp_path_factory.mktemp("toy_teacher") / "teacher")


TOY = {"method": {"rewards": {"near01": 1.0}}, "train": {"num_threads": 1, "device": "cpu", "checkpoint_every": 1000},
       "tracking": {"enabled": False}}


def _rewards_over_training(cfg, out):
    from rtdmd.trainer import Trainer

    tr = Trainer(cfg, out, show_progress=False)
    seen = []
    one = tr._one_step

    def step(i, **kw):
        logs = one(i, **kw)
        seen.append((logs["reward/near01"], logs.get("grpo/kl", 0.0)))
        return logs

    tr._one_step = step
    return tr.run(), torch.tensor(seen)


def test_toy2d_flow_grpo_raises_the_reward_and_the_kl_keeps_it_near_the_teacher(toy_teacher, tmp_path):
    """The shipped toy2d config on an MLP teacher: the reward (closeness to modes 0 and 1) rises; with the KL term
    the final policy stays closer to the teacher (MMD of 40-step ODE samples) than the same run with beta = 0."""
    from benchmarks.toy2d_metrics import mmd
    from rtdmd import checkpoint as ckpt
    from rtdmd.generate import SamplingConfig, generate

    runs = {}
    for beta in (0.04, 0.0):
        over = _deep_merge(TOY, {"backend": {"teacher": str(toy_teacher)}, "method": {"kl_weight": beta},
                                 "train": {"max_steps": 60}})
        res, seen = _rewards_over_training(make_config("flow-grpo", backend="toy2d", overrides=over), tmp_path / f"b{beta}")
        runs[beta] = (res, seen)
        assert seen[-10:, 0].mean() > seen[:10, 0].mean() + 0.3, seen[:, 0]
    _, b, net, meta = ckpt.load_for_inference(runs[0.04][0].checkpoint)
    assert meta["sampler"] == {"kind": "euler", "steps": 40, "guidance": 1.0, "eta": 0.9}
    n = 1000
    keys = [("toy", i) for i in range(n)]
    teacher = teacher_samples(b, n, seed=5)
    dist = {}
    for beta, (res, _) in runs.items():
        _, _, net, _ = ckpt.load_for_inference(res.checkpoint)
        dist[beta] = mmd(generate(b, net, [""] * n, keys, SamplingConfig("euler", 40, 1.0)), teacher)
    assert dist[0.04] < dist[0.0], dist


def test_flow_grpo_on_a_few_step_generator_uses_cps(toy_teacher, tmp_path):
    """--init a DMD2 checkpoint: the policy is the 4-step CPS generator (steps 0-2 stochastic, the last step to
    sigma 0 deterministic), the reference is the frozen init, and checkpoints sample with CPS."""
    base = {"backend": {"teacher": str(toy_teacher)}, "train": {"num_threads": 1, "device": "cpu",
                                                                                "batch_size": 16, "max_steps": 2},
            "tracking": {"enabled": False}}
    dmd = run_training("dmd2", backend="toy2d", overrides=base, out=tmp_path / "dmd2", show_progress=False)
    over = _deep_merge(base, {"method": {"rewards": {"near01": 1.0}, "group_size": 4}})
    res = run_training("flow-grpo", backend="toy2d", overrides=over, init=dmd.checkpoint, out=tmp_path / "grpo",
                       show_progress=False)
    from rtdmd import checkpoint as ckpt

    meta = ckpt.read_meta(res.checkpoint)
    assert meta["sampler"] == {"kind": "cps", "steps": 4, "guidance": 1.0, "eta": 0.9}
    assert math.isfinite(res.last_logs["loss/generator"]) and res.last_logs["grpo/kl"] >= 0


def test_flow_grpo_user_errors(tmp_path):
    with pytest.raises(UserError, match="no trainable copy of its teacher"):
        run_training("flow-grpo", backend="toy2d", overrides=_deep_merge(TOY, {"train": {"max_steps": 1, "batch_size": 32}}),
                     out=tmp_path / "a", show_progress=False)
    with pytest.raises(UserError, match="multiple of method.group_size"):
        run_training("flow-grpo", backend="toy2d", overrides=_deep_merge(TOY, {"train": {"max_steps": 1, "batch_size": 20}}),
                     out=tmp_path / "b", show_progress=False)
    with pytest.raises(UserError, match="method.rewards is empty"):
        run_training("flow-grpo", backend="toy2d", overrides={"train": {"max_steps": 1}, "tracking": {"enabled": False}},
                     out=tmp_path / "c", show_progress=False)


def test_resume_is_exact_on_toy2d(toy_teacher, tmp_path):
    over = _deep_merge(TOY, {"backend": {"teacher": str(toy_teacher)},
                             "method": {"group_size": 4, "sampling_steps": 4, "train_steps": 2},
                             "train": {"batch_size": 8, "max_steps": 4, "checkpoint_every": 2}})
    full = run_training("flow-grpo", backend="toy2d", overrides=over, out=tmp_path / "full", show_progress=False)
    run_training("flow-grpo", backend="toy2d", overrides=_deep_merge(over, {"train": {"max_steps": 2}}),
                 out=tmp_path / "half", show_progress=False)
    resumed = run_training("flow-grpo", backend="toy2d", overrides=over, out=tmp_path / "half", resume=True,
                           show_progress=False)
    assert_same_tensors(checkpoint_tensors(full.checkpoint), checkpoint_tensors(resumed.checkpoint))


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*/flow-grpo*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_flow_grpo_yaml_resolves(path):
    backend = path.parent.name
    preset = path.stem.split("@", 1)[1] if "@" in path.stem else None
    cfg = make_config("flow-grpo", backend=backend, preset=preset)
    assert cfg.method.sde_a == 0.7 and cfg.method.clip_eps == 1e-4  # docs/paper.md s6.5
    assert cfg.train.batch_size % cfg.method.group_size == 0


def test_micro_batches_share_advantages_and_average_the_loss(toy_teacher):
    """train.accumulate: each micro-batch is its own grouped rollout, the group advantages are computed over all
    of them together (objectives.group_advantages on the joined rewards), and each loss call trains its own
    micro-batch (the trainer divides each by their number: tests/test_semantics.py)."""
    from rtdmd import objectives
    from rtdmd.registry import get_backend

    over = _deep_merge(TOY, {"backend": {"teacher": str(toy_teacher)},
                             "method": {"group_size": 4, "sampling_steps": 4, "train_steps": 2},
                             "train": {"batch_size": 8, "accumulate": 2}})
    cfg = make_config("flow-grpo", backend="toy2d", overrides=over)
    from baselines.flow_grpo import FlowGRPOMethod

    m = FlowGRPOMethod(cfg, get_backend("toy2d").factory(cfg.backend, "cpu"))
    ctx = StepContext(step=0, generator=torch_generator(3), seed=3, micro_batches=2)
    m.before_step(ctx)
    assert len(m.batches) == 2 and not torch.equal(m.batches[0].rollout.final, m.batches[1].rollout.final)
    joined = {"near01": torch.cat([b.rewards["near01"] for b in m.batches])}
    want = objectives.group_advantages(joined, torch.arange(4).repeat_interleave(4), clip=m.options.advantage_clip,
                                       eps=m.options.advantage_eps, weights=m.options.rewards)
    assert torch.allclose(torch.cat([b.advantages for b in m.batches]), want)
    losses = [m.loss("generator", ctx.micro_batch(j))[0] for j in range(2)]
    assert m.batch is m.batches[1]
    assert all(torch.isfinite(x) for x in losses)
