"""The toy2d family check (benchmarks/toy2d_family.py): its mixtures, closed-form targets, the DM term's
range-of-levels option, and one tiny end-to-end case."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.toy2d_exact_check import exact_overrides, exact_tilted_weights
from benchmarks.toy2d_family import (linear_reward, linear_tilted_weights, random_mixture, run_mixture, summary, variant_tag,
                                     table)
from rtdmd.api import make_config
from rtdmd.backends.toy2d import Toy2DOptions, make_toy2d
from rtdmd.errors import UserError
from rtdmd.methods import blocks
from rtdmd.methods.base import StepContext


def test_kl_level_weight_hand_values():
    # D (1 - t)^2 / t^2: 2 * 0.81 / 0.01 = 162 (the exact preset's dm_weight), 2 * 0.25 / 0.25 = 2
    w = blocks.kl_level_weight(torch.tensor([0.1, 0.5]), 2)
    assert torch.allclose(w, torch.tensor([162.0, 2.0]))


def test_linear_tilted_weights_hand_value():
    # w = (1/2, 1/2), m = (+-1, 0), s = (0.2, 0.4), a = (0.5, 0), beta 2:
    # log w~ = (1 + 2 * 0.25 * 0.04, -1 + 2 * 0.25 * 0.16) = (1.02, -0.92) -> 1 / (1 + e^-1.94)
    w = linear_tilted_weights([1.0, 1.0], [[1.0, 0.0], [-1.0, 0.0]], [0.2, 0.4], [0.5, 0.0], 2.0)
    p = 1 / (1 + math.exp(-1.94))
    assert torch.allclose(w.double(), torch.tensor([p, 1 - p], dtype=torch.float64), atol=1e-6)


def test_linear_tilted_weights_match_importance_weighting():
    mix = random_mixture(0)
    b = make_toy2d(Toy2DOptions(**mix))
    a = [0.3, -0.4]
    for beta in (1.0, 2.0):
        mc = exact_tilted_weights(b, linear_reward(a), beta, n=200_000)
        closed = linear_tilted_weights(mix["weights"], mix["means"], mix["stds"], a, beta)
        assert float((mc - closed).abs().max()) < 0.01


@pytest.mark.parametrize("seed", range(8))
def test_random_mixture_ranges_and_separation(seed):
    mix = random_mixture(seed)
    k = len(mix["means"])
    assert 3 <= k <= 8 and len(mix["stds"]) == len(mix["weights"]) == k
    assert all(0.15 <= s <= 0.4 for s in mix["stds"]) and all(0.1 <= w <= 0.6 for w in mix["weights"])
    for i in range(k):
        for j in range(i):
            assert math.dist(mix["means"][i], mix["means"][j]) >= 3 * (mix["stds"][i] + mix["stds"][j]) + 0.6 - 1e-3
    assert random_mixture(seed) == mix


def test_range_preset_and_overrides():
    m = make_config("rtdmd", backend="toy2d", preset="exact-range").method
    assert (m.dm_t_min, m.dm_t_max, m.dm_t_draw, m.dm_level_weight, m.normalize) == (0.1, 0.4, "uniform", "kl", False)
    over = exact_overrides(2.0, 16, t0=0.1, t1=0.4)
    assert over["dm_weight"] == 1.0 and over["dm_level_weight"] == "kl" and over["grpo_weight"] == pytest.approx(6.4)
    assert exact_overrides(1.0, 16)["dm_weight"] == pytest.approx(162.0)  # the single-level exact preset
    with pytest.raises(UserError, match="normalize"):
        make_config("rtdmd", backend="toy2d", overrides={"method": {"dm_level_weight": "kl"}}).method.validate()


def test_dm_loss_kl_levels_at_one_level_is_the_scaled_loss():
    """At a single level t0 the per-row KL weight is the constant D (1 - t0)^2 / t0^2 = 162 (t0 = 0.1, D = 2)."""
    b = make_toy2d(Toy2DOptions())
    fake = b.make_trainable("fake_score")
    levels = blocks.NoiseLevels(True, 0.1, 0.1)
    p = blocks.Prompts([""] * 8, b.encode_prompts([""] * 8), None)
    ctx = StepContext(step=0, seed=0, generator=torch.Generator().manual_seed(0), rank=0, world_size=1)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), requires_grad=True)
    plain, _ = blocks.DMLoss(b, 8, 1.0, 0.9, False, levels)(fake, x, 0.0, p, ctx)
    (g_plain,) = torch.autograd.grad(plain, x)
    scaled, _ = blocks.DMLoss(b, 8, 1.0, 0.9, False, levels, kl_levels=True)(fake, x, 0.0, p, ctx)
    (g_scaled,) = torch.autograd.grad(scaled, x)
    assert torch.allclose(g_scaled, 162.0 * g_plain, rtol=1e-4, atol=1e-7)


def test_tiny_family_case_end_to_end(tmp_path):
    """One 3-mode mixture through init, stage 1 and stage 2 (beta 0 and 1, range preset) on a tiny budget:
    rows, targets and the summary line are consistent (the measurement itself is benchmarks/toy2d_family.py)."""
    budget = {"teacher_steps": 150, "stage1_steps": 60, "stage2_steps": 10, "samples": 1000}
    rows = run_mixture(10, tmp_path, "exact-range", betas=(0.0, 1.0), budget=budget)
    mix = random_mixture(10)
    assert [(r["stage"], r["reward"], r["beta"]) for r in rows] == [
        (1, "-", None), (2, "ramp", 0.0), (2, "linear", 0.0), (2, "ramp", 1.0), (2, "linear", 1.0)]
    teacher = torch.tensor(mix["weights"]) / sum(mix["weights"])
    for r in rows:
        assert len(r["weights"]) == 3 and sum(r["weights"]) == pytest.approx(1.0, abs=1e-5)
        assert r["max_error"] == pytest.approx(float((torch.tensor(r["weights"]) - torch.tensor(r["target"])).abs().max()))
    assert torch.allclose(torch.tensor(rows[1]["target"]), teacher, atol=0.01)  # beta 0: the teacher's weights
    assert rows[1]["weights"] == rows[2]["weights"]  # one beta-0 run serves both rewards
    assert (tmp_path / "exact-range" / "stage2-linear-beta1" / "checkpoints" / "latest").is_file()
    line = summary(rows)
    assert line.startswith("cases: 4, passed: ") and "| 10 | 3 | 2 | linear | 1 | 0 |" in table(rows)
    assert "over training seeds" not in line
    # a variant (stage-2 overrides) with two training seeds: its own folder, one row per seed, the spread in the summary
    sets = {"method": {"generator_optim": {"schedule": "cosine"}}}
    rows = run_mixture(10, tmp_path, "exact-range", betas=(0.0,), budget=budget, train_seeds=(0, 1), sets=sets)
    assert [(r["reward"], r.get("train_seed")) for r in rows[1:]] == [("ramp", 0), ("ramp", 1), ("linear", 0), ("linear", 1)]
    variant = tmp_path / ("exact-range" + variant_tag(sets))
    assert variant != tmp_path / "exact-range"
    assert (variant / "stage2-beta0-seed1" / "checkpoints" / "latest").is_file()
    from rtdmd.config import load_resolved
    cfg = load_resolved(variant / "stage2-beta0-seed1" / "config.yaml")
    assert cfg.method.generator_optim.schedule == "cosine" and cfg.train.seed == 1
    assert rows[1]["weights"] != rows[2]["weights"]  # two seeds, two runs
    assert "over training seeds: " in summary(rows) and "largest seed-to-seed range" in summary(rows)


def test_tracking_interval_hand_values():
    from benchmarks.study.stats import mean_interval
    assert mean_interval([[0.25] * 6], n_boot=4000) == pytest.approx((0.25, 0.25, 0.25))
    mean, lo, hi = mean_interval([[0.0, 1.0, 2.0, 3.0]], n_boot=4000)
    assert mean == 1.5 and 0.0 <= lo < 1.5 < hi <= 3.0


def test_fake_score_tracking_smoke(tmp_path):
    """benchmarks/fake_score_tracking.py end to end on a tiny budget: rows per (updates, k), finite CIs."""
    from benchmarks.fake_score_tracking import main
    res = main(["--out", str(tmp_path), "--seeds", "2", "--updates", "1", "3", "--batch", "64",
                "--reference-steps", "5", "--eval-samples", "256", "--teacher-steps", "20"])
    assert [(r["updates"], r["k"]) for r in res["rows"]] == [(u, k) for u in (1, 3) for k in range(1, 5)]
    assert all(math.isfinite(v) for r in res["rows"] for v in (*r["ac_dmd"], *r["dmd2"], *r["difference"]))
    assert (tmp_path / "table.md").is_file()


def test_a_bad_stage2_override_fails_before_any_training(tmp_path):
    from benchmarks.toy2d_family import main

    with pytest.raises(UserError, match="unknown config key 'method.nope'"):
        main(["--out", str(tmp_path / "f"), "--seeds", "0", "--set", "method.nope=1"])
    assert not (tmp_path / "f" / "mixture0").exists()
