"""AC-DMD (RTDMD stage 1): the DM loss at s = 0 is DMD2's, the stop index, the method's wiring, configs,
a toy2d run that learns the teacher, and exact resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.runhelp import tiny_toy_backend, toy_ctx
from rtdmd import objectives
from rtdmd.api import make_config, run_training
from rtdmd.methods import blocks
from rtdmd.seeding import torch_generator

# init "": random MLPs (the shipped toy2d configs start from a flow-matching MLP run)
TINY_TOY = {"backend": {"hidden": 16, "depth": 2}, "method": {"init": ""},
            "train": {"batch_size": 8, "device": "cpu", "checkpoint_every": 1000, "log_every": 1, "num_threads": 1},
            "tracking": {"enabled": False}}


_ctx = toy_ctx
_toy_backend = tiny_toy_backend


def test_dm_loss_at_s0_is_dmd2_formula_on_the_same_draws():
    """blocks.DMLoss at s = 0 against docs/paper.md s6's DMD2 formula written out directly:
    x_t = (1-t) x + t n; x0_fake = x_t - t v_fake; x0_real = x_t - t v_cfg; g = (x0_fake - x0_real) /
    mean|x - x0_real|; L = 0.5 mean (x - sg(x - g))^2, so dL/dx = g / numel."""
    b = _toy_backend()
    torch.manual_seed(0)
    fake = b.make_trainable("fake_score")
    n, ctx, w = 6, _ctx(), 3.0
    prompts = [f"mode {i % 8}" for i in range(n)]
    p = blocks.Prompts(prompts, b.encode_prompts(prompts), b.uncond(n))
    x = (2.0 * torch.randn(n, 2, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
    loss, _ = blocks.DMLoss(b, n, w, tag="dm")(fake, x, 0.0, p, ctx)
    loss.backward()
    # the same draws, then the DMD2 formula by hand
    t = objectives.sample_subinterval_t(torch.zeros(n), torch_generator(ctx.seed, "dm-t"))
    noise = torch.randn((n, 2), generator=torch_generator(ctx.seed, "dm-n"))
    xd = x.detach()
    x_t = (1 - t[:, None]) * xd + t[:, None] * noise
    with torch.no_grad():
        v_fake = fake(x_t, t, b.encode_prompts(prompts)["mode"])
        v_u = b.teacher(x_t, t, torch.zeros(n, dtype=torch.long))
        v_c = b.teacher(x_t, t, b.encode_prompts(prompts)["mode"])
    v_real = v_u + w * (v_c - v_u)
    x0_fake, x0_real = x_t - t[:, None] * v_fake, x_t - t[:, None] * v_real
    g = (x0_fake - x0_real).double() / (xd - x0_real).abs().double().mean(dim=1, keepdim=True)
    assert torch.allclose(x.grad.double(), g / x.numel(), rtol=1e-4, atol=1e-9)
    assert loss.item() == pytest.approx(0.5 * (g**2).mean().item(), rel=1e-4)


def test_stop_index_is_uniform_and_a_function_of_the_step():
    cfg = make_config("ac-dmd", backend="toy2d", overrides=TINY_TOY)
    from rtdmd.methods.ac_dmd import AcDmdMethod

    m = AcDmdMethod(cfg, _toy_backend())
    ks = []
    for step in range(800):
        m.before_step(_ctx(seed=1000 + step, step=step))
        ks.append(m._k)
    counts = torch.bincount(torch.tensor(ks), minlength=5)[1:].float() / len(ks)
    assert counts.min() > 0.2 and counts.max() < 0.3  # U{1..4}: 0.25 each
    m.before_step(_ctx(seed=1003, step=3))
    assert m._k == ks[3]  # the same step seed gives the same k on every process and after a resume


def test_generator_loss_uses_the_kth_state_and_fake_update_reuses_it():
    """The generator's sample is the CPS state after k steps (s = sigma_k); the fake score then trains on that
    same sample, detached; for the DMD2 ablation s = 0 always and the sampler re-noises with eta 1."""
    b = _toy_backend()
    from rtdmd.methods.ac_dmd import AcDmdMethod

    cfg = make_config("ac-dmd", backend="toy2d", overrides=TINY_TOY)
    m = AcDmdMethod(cfg, b)
    sig = b.generator_sigmas().tolist()
    seen = set()
    for step in range(40):
        ctx = _ctx(seed=50 + step, step=step)
        m.before_step(ctx)
        loss, logs = m.loss("generator", ctx)
        assert logs["dm/s"] == pytest.approx(sig[m._k]) and logs["dm/k"] == m._k
        x_cached = m._cache[0]
        p = blocks.draw_prompts(b, 8, ctx, m.options.guidance, tag="s1-prompts")
        x_ref, s_ref = blocks.GeneratorSample(b, 8, m.options.eta, tag="s1-gen")(m.networks["generator"], p, ctx, m._k,
                                                                                 grad=False)
        assert torch.equal(x_cached, x_ref) and s_ref == logs["dm/s"]
        seen.add(m._k)
        fl, flogs = m.loss("fake_score", ctx)
        assert math.isfinite(fl.item()) and "fake/consistency" in flogs
    assert seen == {1, 2, 3, 4}
    cfg2 = make_config("ac-dmd", backend="toy2d", overrides={**TINY_TOY, "method": {"init": "", "objective": "dmd2"}})
    m2 = AcDmdMethod(cfg2, b)
    for step in range(8):
        ctx = _ctx(seed=90 + step, step=step)
        m2.before_step(ctx)
        _, logs = m2.loss("generator", ctx)
        assert logs["dm/s"] == 0.0
        _, flogs = m2.loss("fake_score", ctx)
        assert "fake/consistency" not in flogs
    assert m2.sampler().eta == 1.0 and m.sampler().eta == 0.9


def test_every_shipped_config_resolves():
    """Every shipped YAML (and preset) of ac-dmd and rtdmd builds with the options dataclasses."""
    from rtdmd.config import CONFIG_DIR

    files = sorted(p for kind in ("shapes", "toy2d", "sd3", "flux2") for p in (CONFIG_DIR / kind).glob("*.yaml")
                   if p.stem.split("@")[0] in ("ac-dmd", "rtdmd"))
    assert {f.parent.name for f in files} == {"shapes", "toy2d", "sd3", "flux2"}
    for f in files:
        method, _, preset = f.stem.partition("@")
        cfg = make_config(method, backend=f.parent.name, preset=preset or None)
        assert cfg.method_name == method
        if method == "rtdmd":
            assert cfg.method.stage1_train_config(cfg.train).max_steps > 0


def test_user_errors():
    from rtdmd.errors import UserError

    with pytest.raises(UserError, match="method.ttur"):
        make_config("ac-dmd", backend="toy2d", overrides={"method": {"ttur": 0}})
    with pytest.raises(UserError, match="stage1_train"):
        make_config("rtdmd", backend="toy2d", overrides={"method": {"stage1_train": {"max_stepz": 3}}})
    with pytest.raises(UserError, match="--stage applies to rtdmd only"):
        run_training("ac-dmd", backend="toy2d", stage="1", overrides=TINY_TOY)


def _train(tmp: Path, steps: int, resume: bool = False, **method):
    over = {**TINY_TOY, "method": {"init": "", "ttur": 2, **method}, "train": {**TINY_TOY["train"], "max_steps": steps,
                                                                  "checkpoint_every": 3}}
    return run_training("ac-dmd", backend="toy2d", overrides=over, out=tmp, resume=resume, show_progress=False)


def test_resume_is_exact(tmp_path):
    from tests.runhelp import checkpoint_tensors

    full = _train(tmp_path / "full", 6)
    _train(tmp_path / "cut", 3)
    resumed = _train(tmp_path / "cut", 6, resume=True)
    a, b = checkpoint_tensors(full.checkpoint), checkpoint_tensors(resumed.checkpoint)
    assert set(a) == set(b) and any(k.startswith("net_fake_score/") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_rtdmd_stage1_block_is_the_ac_dmd_config():
    """rtdmd.yaml's stage-1 options and loop are the backend's ac-dmd.yaml (so `train rtdmd` stage 1 == `train ac-dmd`)."""
    from rtdmd.config import CONFIG_DIR

    for kind in ("shapes", "toy2d", "sd3", "flux2"):
        if not (CONFIG_DIR / kind / "rtdmd.yaml").is_file():
            continue
        two = make_config("rtdmd", backend=kind)
        one = make_config("ac-dmd", backend=kind)
        assert two.method.stage1 == one.method, kind
        t1 = two.method.stage1_train_config(two.train)
        for key in ("max_steps", "batch_size", "ema_every", "seed", "grad_clip"):
            assert getattr(t1, key) == getattr(one.train, key), (kind, key)


@pytest.mark.slow  # ~35 s: a flow-matching init, then AC-DMD
def test_toy2d_ac_dmd_learns_the_teacher(tmp_path):
    """From a flow-matching MLP of a 4-mode mixture (the analogue of the teacher's weights), AC-DMD with the
    exact teacher reaches an MMD to the teacher within 2x the teacher-vs-teacher MMD (n = 1000, RBF 0.5)."""
    from benchmarks.toy2d_metrics import matches_teacher
    from rtdmd.checkpoint import load_for_inference
    from rtdmd.generate import SamplingConfig, generate

    world = {"means": [[2.0, 0.0], [0.0, 2.0], [-2.0, 0.0], [0.0, -2.0]], "stds": [0.35] * 4, "weights": [0.25] * 4,
             "hidden": 128, "depth": 3}
    common = {"backend": world, "tracking": {"enabled": False}}
    run_training("teacher", backend="toy2d", out=tmp_path / "init", show_progress=False,
                 overrides={**common, "train": {"max_steps": 2000, "batch_size": 256, "checkpoint_every": 2000,
                                                "num_threads": 1}})
    r = run_training("ac-dmd", backend="toy2d", out=tmp_path / "s1", show_progress=False,
                     overrides={**common, "method": {"init": str(tmp_path / "init"), "ttur": 5},
                                "train": {"max_steps": 1500, "batch_size": 256, "checkpoint_every": 1500,
                                          "num_threads": 1}})
    _, b, net, meta = load_for_inference(r.checkpoint)
    n = 1000
    x = generate(b, net, [""] * n, [(1, i) for i in range(n)], SamplingConfig.from_meta(meta["sampler"]))
    ta, _ = b.sample_mixture(n, torch.Generator().manual_seed(1))
    tb, _ = b.sample_mixture(n, torch.Generator().manual_seed(2))
    ok, m, ref = matches_teacher(x, ta, tb)
    print(f"toy2d ac-dmd: MMD {m:.4f} vs teacher-teacher {ref:.4f} (ratio {m / ref:.2f}, criterion 2)")  # shown with -s
    assert ok, (m, ref)
