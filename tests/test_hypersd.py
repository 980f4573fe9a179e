"""Hyper-SD style: the stage schedule, ReFL hinge weighting, the fake score's frozen stages, toy2d learning,
ReFL tilting a toy reward, resume across stage boundaries, and every shipped config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from baselines.hypersd import Stage, stage_at, stage_plan
from rtdmd import config as C
from rtdmd.api import make_config, run_training
from rtdmd.errors import UserError
from rtdmd.methods import blocks
from runhelp import checkpoint_tensors
from test_lcm import assert_toy2d_resume_is_exact

TOY_TARGET = torch.tensor([2.5, 0.0])


def toy_reward(x, prompts):
    """A differentiable toy2d reward: closeness to the mode at (2.5, 0)."""
    return -((x - TOY_TARGET.to(x.device)) ** 2).sum(dim=1)


@pytest.fixture(autouse=True)
def _toy_reward_registered():
    from rtdmd.rewards.registry import register_reward, unregister_reward

    register_reward("hypersd_toy", toy_reward, differentiable=True)
    yield
    unregister_reward("hypersd_toy")


# ---------------------------------------------------------------------------- the stage schedule
def test_stage_plan_and_lookup_by_hand():
    plan = stage_plan([8, 4, 2, 1], [3, 3, 3, 3], refl_steps=2)
    assert [(s.name, s.kind, s.segments, s.start) for s in plan] == [
        ("tscd8", "tscd", 8, 0), ("tscd4", "tscd", 4, 3), ("tscd2", "tscd", 2, 6), ("tscd1", "tscd", 1, 9),
        ("refl", "refl", 1, 12), ("unified", "unified", 1, 14)]
    names = [stage_at(plan, i).name for i in range(16)]
    assert names == ["tscd8"] * 3 + ["tscd4"] * 3 + ["tscd2"] * 3 + ["tscd1"] * 3 + ["refl"] * 2 + ["unified"] * 2
    assert stage_at(plan, 10_000).name == "unified"  # the unified stage runs until train.max_steps
    # zero-length stages are skipped; no ReFL stage when refl_steps = 0
    plan2 = stage_plan([4, 1], [0, 5], refl_steps=0)
    assert plan2 == [Stage(0, "tscd1", "tscd", 1, 0), Stage(1, "unified", "unified", 1, 5)]


def test_option_errors():
    with pytest.raises(UserError, match="segment_steps"):
        make_config("hypersd", backend="toy2d", overrides={"method": {"segment_steps": [1, 2]}})
    with pytest.raises(UserError, match="refl_margins"):
        make_config("hypersd", backend="toy2d", overrides={"method": {"refl_steps": 5}})
    with pytest.raises(UserError, match="refl_stop_range"):
        make_config("hypersd", backend="toy2d", overrides={"method": {
            "refl_steps": 5, "refl_margins": {"hypersd_toy": 1.0}, "refl_stop_range": [6, 8]}})


# ---------------------------------------------------------------------------- ReFL hinge weighting
class _Fixed:
    differentiable = True

    def __init__(self, scale, offset):
        self.scale, self.offset = scale, offset

    def __call__(self, images, prompts):
        return self.scale * images[:, 0] + self.offset


def test_refl_hinge_weighting_by_hand():
    images = torch.tensor([[1.0], [3.0], [0.0]], requires_grad=True)
    rewards = {"a": _Fixed(1.0, 0.0), "b": _Fixed(2.0, -1.0)}  # a = x, b = 2x - 1
    margins = {"a": 2.0, "b": 2.0}
    loss, logs = blocks.RewardHinge(rewards, margins, 1e-3)(images, ["p"] * 3)
    # rows: a = [1, 3, 0], b = [1, 5, -1]; hinge relu(2 - a) + relu(2 - b) = [1 + 1, 0 + 0, 2 + 3]
    assert loss.item() == pytest.approx(1e-3 * (2 + 0 + 5) / 3)
    assert logs["reward/a"] == pytest.approx(4 / 3) and logs["reward/b"] == pytest.approx(5 / 3)
    loss.backward()
    # d/dx: rows below both margins get -(1 + 2) * 1e-3 / 3; the row above both margins gets nothing
    assert images.grad[:, 0].tolist() == pytest.approx([-1e-3, 0.0, -1e-3])


# ---------------------------------------------------------------------------- toy2d runs
def _toy(steps, method=None, backend=None, **train):
    return {"method": method or {}, "backend": backend or {},
            "train": {"max_steps": steps, "device": "cpu", "num_threads": 1, **train}, "tracking": {"enabled": False}}


TINY_REFL = {"segments": [2, 1], "segment_steps": [3, 3], "solver_steps": 10, "refl_steps": 2, "prefetch": 0,
             "refl_margins": {"hypersd_toy": 0.0},
             "refl_total_steps": 4, "refl_stop_range": [2, 3], "fake_warmup": False}


def test_fake_score_is_untouched_before_the_unified_stage(tmp_path):
    # 8 steps: TSCD 2 (3) + TSCD 1 (3) + ReFL (2); AdamW with weight decay must not move the fake score
    over = _toy(8, dict(TINY_REFL, fake_optim={"lr": 0.1, "weight_decay": 0.5}), {"hidden": 16, "depth": 2},
                batch_size=8)
    res = run_training(make_config("hypersd", backend="toy2d", overrides=over), out=tmp_path / "a", show_progress=False)
    t = checkpoint_tensors(res.checkpoint)
    assert not [k for k in t if k.startswith("optim_fake_score/") and "param_groups" not in k]  # never stepped
    # the same run one step into the unified stage does update it
    res2 = run_training(make_config("hypersd", backend="toy2d", overrides=dict(over, train=dict(over["train"], max_steps=9))),
                        out=tmp_path / "b", show_progress=False)
    t2 = checkpoint_tensors(res2.checkpoint)
    fake = [k for k in t2 if k.startswith("net_fake_score/")]
    assert fake and any(not torch.equal(t[k], t2[k]) for k in fake)
    assert [k for k in t2 if k.startswith("optim_fake_score/") and k.endswith("/step")]


def test_toy2d_resume_is_exact_across_stage_boundaries(tmp_path):
    # 11 steps cross TSCD 2 -> TSCD 1 -> ReFL -> unified; the interrupted run stops inside TSCD 1 (step 4)
    over = _toy(11, dict(TINY_REFL, fake_warmup=True), {"hidden": 16, "depth": 2}, batch_size=8, checkpoint_every=4)
    res = assert_toy2d_resume_is_exact("hypersd", over, 4, tmp_path)
    assert res.last_logs["stage/index"] == 3.0 and "dmd/loss" in res.last_logs


def test_refl_stage_raises_a_toy_reward(tmp_path):
    from rtdmd import checkpoint as ckpt
    from rtdmd.generate import SamplingConfig, generate

    # only the ReFL stage (no TSCD): the student starts from the same seeded weights either way
    method = dict(TINY_REFL, segments=[1], segment_steps=[0], refl_steps=60, dmd_weight=0.0, ema_decay=None,
                  optim={"lr": 3e-3})
    over = _toy(60, method, batch_size=64)
    before = run_training(make_config("hypersd", backend="toy2d", overrides=dict(over, train=dict(over["train"], max_steps=1))),
                          out=tmp_path / "before", show_progress=False)
    after = run_training(make_config("hypersd", backend="toy2d", overrides=over), out=tmp_path / "after", show_progress=False)
    scores = []
    for r in (before, after):
        _, b, net, meta = ckpt.load_for_inference(r.checkpoint)
        x = generate(b, net, [""] * 500, [(0, "t", i) for i in range(500)], SamplingConfig(kind="euler", steps=8))
        scores.append(float(toy_reward(x, None).mean()))
    assert scores[1] > scores[0] + 1.0, scores


def test_toy2d_four_step_hypersd_matches_the_mixture_teacher(tmp_path):
    from benchmarks.toy2d_metrics import matches_teacher
    from rtdmd import checkpoint as ckpt
    from rtdmd.generate import SamplingConfig, generate

    over = {"train": {"device": "cpu", "num_threads": 1}, "tracking": {"enabled": False}}  # the shipped toy2d config
    res = run_training(make_config("hypersd", backend="toy2d", overrides=over), out=tmp_path / "run", show_progress=False)
    assert res.last_logs["stage/index"] == 4.0 and "dmd/loss" in res.last_logs  # ended in the unified stage
    _, b, net, meta = ckpt.load_for_inference(res.checkpoint)
    assert meta["sampler"] == {"kind": "cps", "steps": 4, "guidance": 1.0, "eta": 1.0}
    n = 2000
    keys = lambda seed: [(seed, "toy", i) for i in range(n)]  # noqa: E731
    a = generate(b, b.teacher, [""] * n, keys(1), SamplingConfig(kind="euler", steps=200))
    c = generate(b, b.teacher, [""] * n, keys(2), SamplingConfig(kind="euler", steps=200))
    x = generate(b, net, [""] * n, keys(3), SamplingConfig.from_meta(meta["sampler"]))
    ok, m, ref = matches_teacher(x, a, c)
    print(f"toy2d hypersd: MMD {m:.4f} vs teacher-teacher {ref:.4f} (ratio {m / ref:.2f}, criterion 2)")  # shown with -s
    assert ok, (m, ref)


# ---------------------------------------------------------------------------- configs
CONFIG_DIR = Path(C.CONFIG_DIR)


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*/hypersd*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_hypersd_config_resolves(path):
    preset = path.stem.split("@", 1)[1] if "@" in path.stem else None
    cfg = make_config("hypersd", backend=path.parent.name, preset=preset)
    plan = stage_plan(cfg.method.segments, cfg.method.segment_steps, cfg.method.refl_steps)
    assert plan[-1].kind == "unified" and plan[-1].start < cfg.train.max_steps  # every stage is reached
