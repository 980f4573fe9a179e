"""ReFL building block (blocks.RewardHinge + blocks.LateState): the hinge on hand numbers, the late start
point, and ReFL steps raising a differentiable toy reward on toy2d."""

from __future__ import annotations

import math

import pytest
import torch

from rtdmd import flow
from rtdmd.methods import blocks
from rtdmd.methods.base import StepContext
from rtdmd.seeding import torch_generator

MODE0 = torch.tensor([2.5, 0.0])


def _ctx(seed: int = 3, step: int = 0) -> StepContext:
    return StepContext(step=step, generator=torch_generator(seed), seed=seed)


def test_refl_hinge_on_hand_numbers():
    """docs/paper.md s6.4: L = weight * mean_b sum_j relu(margin_j - r_j)."""
    imgs = torch.zeros(3, 2)
    ra = lambda x, p: torch.tensor([1.0, 2.5, 1.5])  # noqa: E731
    rb = lambda x, p: torch.tensor([0.0, 0.5, 3.0])  # noqa: E731
    loss, logs = blocks.RewardHinge({"a": ra}, {"a": 2.0}, 1e-3)(imgs, ["", "", ""])
    assert loss.item() == pytest.approx(1e-3 * (1.0 + 0.0 + 0.5) / 3)
    assert logs["reward/a"] == pytest.approx(5 / 3)
    loss2, _ = blocks.RewardHinge({"a": ra, "b": rb}, {"a": 2.0, "b": 1.0}, 1.0)(imgs, ["", "", ""])
    assert loss2.item() == pytest.approx(((1.0 + 1.0) + (0.0 + 0.5) + (0.5 + 0.0)) / 3)
    # docs/paper.md s4's form: one hinge on the summed rewards, margin 3
    loss3, _ = blocks.RewardHinge({"a": ra, "b": rb}, {"__sum__": 3.0}, 1e-4)(imgs, ["", "", ""])
    assert loss3.item() == pytest.approx(1e-4 * (2.0 + 0.0 + 0.0) / 3)


def _toy():
    from rtdmd.backends.toy2d import Toy2DOptions, make_toy2d

    return make_toy2d(Toy2DOptions(hidden=32, depth=2))


def test_late_state_stops_on_the_euler_grid():
    """40 Euler steps, m ~ U{30..39}: the state after m steps at sigma_m (closed form: with v = x the Euler
    step multiplies x by 1 + (s_{i+1} - s_i))."""
    b = _toy()

    class Identity(torch.nn.Module):
        def forward(self, x, s, mode):
            return x

    p = blocks.Prompts([""] * 4, b.encode_prompts([""] * 4), None)
    x, s = blocks.LateState(b, 4, total_steps=40, stop_range=(30, 39))(Identity(), p, _ctx())
    sig = b.sampling_sigmas(40)
    m = int((sig - s).abs().argmin())
    assert 30 <= m <= 39 and s == pytest.approx(float(sig[m]))
    x1 = torch.randn((4, 2), generator=torch_generator(_ctx().seed, "refl-x1"))
    factor = math.prod(1 + float(sig[i + 1] - sig[i]) for i in range(m))
    assert torch.allclose(x, x1 * factor, atol=1e-5)


def test_refl_steps_raise_a_differentiable_toy_reward():
    """ReFL on toy2d (docs/paper.md s6): late state without gradient, one gradient step to x0_hat, hinge on a
    differentiable reward (minus the distance to mode 0); 30 Adam steps raise the reward at fixed late states."""
    b = _toy()
    torch.manual_seed(0)
    net = b.make_trainable("generator")
    reward = {"near0": lambda x, p: -(x - MODE0).norm(dim=1)}
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    n = 64
    p = blocks.Prompts([""] * n, b.encode_prompts([""] * n), None)

    def x0_hat(ctx):
        x_s, s = blocks.LateState(b, n, total_steps=40, stop_range=(30, 39))(net, p, ctx)
        v = b.velocity(net, x_s, flow.batch_sigma(s, x_s), p.cond)
        return flow.x0_from_v(x_s, v, s)

    def mean_reward():
        with torch.no_grad():
            return float(torch.stack([reward["near0"](x0_hat(_ctx(seed=1000 + i)), None) for i in range(4)]).mean())

    before = mean_reward()
    for step in range(30):
        loss, _ = blocks.RewardHinge(reward, {"near0": 0.0}, 1.0)(x0_hat(_ctx(seed=step, step=step)), p.prompts)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = mean_reward()
    assert after > before + 0.5, (before, after)
