"""DMD2 baseline: its losses against docs/paper.md s6 on hand numbers, backward simulation, the two
time-scale rule, the GAN head, configs, a toy2d run that learns the teacher, and exact resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.runhelp import tiny_toy_backend, toy_ctx
from rtdmd.api import make_config, run_training
from rtdmd.config import CONFIG_DIR
from rtdmd.errors import UserError
from rtdmd.methods import blocks
from rtdmd.seeding import torch_generator
from tests.runhelp import assert_same_tensors, checkpoint_tensors
from tests.toy_teacher import fit_mlp_teacher, teacher_samples

TINY = {"backend": {"hidden": 16, "depth": 2},
        "train": {"batch_size": 8, "device": "cpu", "checkpoint_every": 1000, "log_every": 1, "num_threads": 1},
        "tracking": {"enabled": False}}


_ctx = toy_ctx
_toy_backend = tiny_toy_backend


class ConstantX0(nn.Module):
    """A velocity whose x0 prediction x - s v is the constant ``x0`` whatever (x, s): v = (x - x0) / s.
    Records the sigmas it is called with."""

    def __init__(self, x0):
        super().__init__()
        self.register_buffer("x0", torch.as_tensor(x0, dtype=torch.float32))
        self.sigmas: list[torch.Tensor] = []
        self.w = nn.Parameter(torch.zeros(()))  # a parameter, so the trainer can build an optimiser

    def forward(self, x, sigma, mode):
        self.sigmas.append(sigma.detach().clone())
        return (x - self.x0) / sigma.reshape(-1, 1) + 0 * self.w


def test_dm_loss_is_dmd2_formula_on_hand_numbers():
    """docs/paper.md s6.1: g = (x0_fake - x0_real) / mean_{dims} |x - x0_real| (float64), L = 0.5 ||x - sg(x - g)||^2
    (mean over elements, as the DMD2 code's F.mse_loss). Teacher and fake predict constant x0s, so g is known
    whatever t and n are: x = (1, 3), x0_real = (0, 1), x0_fake = (2, 2) -> g = (2, 1) / 1.5."""
    b = _toy_backend()
    b._teacher = ConstantX0([0.0, 1.0])
    fake = ConstantX0([2.0, 2.0])
    x = torch.tensor([[1.0, 3.0], [1.0, 3.0]], requires_grad=True)
    p = blocks.Prompts(["", ""], b.encode_prompts(["", ""]), None)
    loss, _ = blocks.DMLoss(b, 2, 1.0, levels=blocks.NoiseLevels(True, 0.02, 0.98))(fake, x, 0.0, p, _ctx())
    g = torch.tensor([2.0, 1.0]) / 1.5
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(0.5 * (g**2).mean().item(), rel=1e-6)  # = 5/9
    assert loss.item() == pytest.approx(5 / 9, rel=1e-6)
    loss.backward()
    assert torch.allclose(x.grad, (g / x.numel()).expand(2, 2), atol=1e-7)  # gradient g / numel points away from x0_real


def test_dm_loss_uniform_t_covers_its_range_without_atoms():
    """DMD2 draws t ~ U[0.02, 0.98]; AC-DMD's sub-interval draw clamps (atoms at the ends)."""
    b = _toy_backend()
    b._teacher = ConstantX0([0.0, 0.0])
    fake = ConstantX0([0.0, 0.0])
    n = 2000
    x = torch.ones(n, 2)
    p = blocks.Prompts([""] * n, b.encode_prompts([""] * n), None)
    blocks.DMLoss(b, n, 1.0, levels=blocks.NoiseLevels(True, 0.02, 0.98))(fake, x, 0.0, p, _ctx())
    t = b._teacher.sigmas[0]
    assert t.min() >= 0.02 and t.max() <= 0.98
    assert (t == t.min()).sum() <= 2 and (t == t.max()).sum() <= 2  # no clamped atoms at the ends
    assert abs(t.mean().item() - 0.5) < 0.02 and abs(t.var().item() - 0.96**2 / 12) < 0.01


def test_fake_score_loss_is_plain_flow_matching():
    """DMD2's critic: || v(x_t, t) - (n - x) ||^2 with x_t = (1 - t) x + t n, t ~ U(0, 1). A velocity that returns
    (x_t - x) / t + 0.5 = n - x + 0.5 has loss exactly 0.25 (any t, n)."""
    b = _toy_backend()
    x = torch.tensor([[0.5, -1.0], [2.0, 0.25], [1.0, 1.0]])

    class OffByHalf(nn.Module):
        def forward(self, x_t, t, mode):
            self.t = t
            return (x_t - x) / t.reshape(-1, 1) + 0.5

    fake = OffByHalf()
    p = blocks.Prompts([""] * 3, b.encode_prompts([""] * 3), None)
    loss, _ = blocks.FakeScoreLoss(b, 3, blocks.NoiseLevels(True, 0.0, 1.0))(fake, x, 0.0, p, _ctx())
    assert loss.item() == pytest.approx(0.25, rel=1e-5)
    assert ((fake.t > 0) & (fake.t < 1)).all()


def _method(overrides=None, backend="toy2d"):
    from rtdmd import registry
    from rtdmd.config import _deep_merge

    cfg = make_config("dmd2", backend=backend, overrides=_deep_merge(TINY, overrides or {}))
    b = registry.get_backend(backend).factory(cfg.backend, "cpu")
    return registry.get_method("dmd2").factory(cfg, b), b


def test_backward_simulation_state_and_two_time_scales():
    """k ~ U{0..3} shared (from ctx.generator); the generator runs k steps without gradient, re-noising its x0
    prediction with fresh noise (CPS eta 1): x_k = (1 - s_k) x0 + s_k z_{k-1}; its x0 prediction at step k is
    the DM loss's sample."""
    m, b = _method({"method": {"ttur": 5, "fake_first": False}})
    assert [(u.network, u.every) for u in m.updates] == [("generator", 5), ("fake_score", 1)]
    gen = ConstantX0([1.5, -0.5])
    m.networks["generator"] = gen
    sig = b.generator_sigmas(4)
    ks = []
    for step in range(40):
        ctx = _ctx(seed=100 + step, step=step)
        m.before_step(ctx)
        k = m._cache["k"]
        ks.append(k)
        x_k = m._cache["x_k"]
        assert m._cache["s_k"] == pytest.approx(float(sig[k]))
        if k == 0:
            expected = torch.randn((8, 2), generator=torch_generator(ctx.seed, "backsim-x1"))
        else:
            z = torch.randn((8, 2), generator=torch_generator(ctx.seed, f"backsim-z{k - 1}"))
            expected = (1 - sig[k]) * torch.tensor([1.5, -0.5]) + sig[k] * z
        assert torch.allclose(x_k, expected, atol=1e-5)
        assert not x_k.requires_grad
    assert set(ks) == {0, 1, 2, 3}
    # the same step seed gives the same k (shared by all processes)
    m.before_step(_ctx(seed=100, step=0))
    assert m._cache["k"] == ks[0]


def test_fake_first_trains_the_fake_score_on_a_backward_simulation_of_its_own():
    """fake_first (docs/paper.md s4b): the fake score steps first, on a sample with its own k (drawn after the
    generator's from ctx.generator), prompts and noise (tag fake-backsim); the generator's sample is simulated only
    on its own steps."""
    m, b = _method({"method": {"ttur": 5}})
    assert [(u.network, u.every) for u in m.updates] == [("fake_score", 1), ("generator", 5)]
    m.networks["generator"] = ConstantX0([1.5, -0.5])
    sig = b.generator_sigmas(4)
    for step in range(12):
        ctx = _ctx(seed=200 + step, step=step)
        m.before_step(ctx)
        g = torch_generator(ctx.seed)
        k_gen = int(torch.randint(0, 4, (1,), generator=g))
        k = int(torch.randint(0, 4, (1,), generator=g))
        assert m._cache["k"] == k_gen and m._fake_cache["k"] == k
        assert ("x_k" in m._cache) == (step % 5 == 0)
        if k == 0:
            expected = torch.randn((8, 2), generator=torch_generator(ctx.seed, "fake-backsim-x1"))
        else:
            z = torch.randn((8, 2), generator=torch_generator(ctx.seed, f"fake-backsim-z{k - 1}"))
            expected = (1 - sig[k]) * torch.tensor([1.5, -0.5]) + sig[k] * z
        assert torch.allclose(m._fake_cache["x_k"], expected, atol=1e-5)


def test_generator_loss_reaches_generator_weights_only_through_x0():
    m, b = _method()
    m.before_step(_ctx())
    loss, logs = m.loss("generator", _ctx())
    loss.backward()
    gen_grads = [p.grad for p in m.networks["generator"].parameters() if p.grad is not None]
    assert gen_grads and any(g.abs().sum() > 0 for g in gen_grads)
    assert all(p.grad is None for p in m.networks["fake_score"].parameters())
    assert "dm/grad_norm" in logs and logs["dm/k"] in (0.0, 1.0, 2.0, 3.0)
    # the fake score then trains on the same, detached sample
    assert m._cache["x0"] is not None and not m._cache["x0"].requires_grad
    f_loss, _ = m.loss("fake_score", _ctx())
    f_loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.networks["fake_score"].parameters())


def test_feature_module_missing_is_a_user_error():
    b = _toy_backend()
    with pytest.raises(UserError, match="method.gan=false"):
        b.feature_module(b.make_trainable("fake_score"))


def test_gan_head_on_the_shapes_fake_score():
    """The head reads the UNet mid block through a forward hook; the wrapped score's velocity is unchanged;
    the critic's GAN loss trains the head and the score's encoder."""
    from rtdmd import objectives
    from rtdmd.backends.shapes import ShapesOptions, make_shapes
    from baselines.dmd2 import ScoreWithHead

    b = make_shapes(ShapesOptions(image_size=16, size_range=[4.0, 6.0], max_objects=2, unet_channels=[8, 16],
                                  unet_attention_head_dim=4, text_width=16, text_heads=2, text_layers=1), "cpu")
    torch.manual_seed(0)
    score = b.make_trainable("teacher")  # a fresh network of the tiny architecture
    assert b.feature_module(score) is score.denoiser.mid_block
    critic = ScoreWithHead(score, b)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    s = torch.tensor([0.3, 0.8])
    cond = b.encode_prompts(["a red circle", "two blue squares"])
    v = b.velocity(critic, x, s, cond)
    with torch.no_grad():
        assert torch.allclose(v, b.velocity(score, x, s, cond))
    assert critic.logits.shape == (2,)
    loss = objectives.gan_discriminator_loss(critic.logits[:1], critic.logits[1:])
    loss.backward()
    assert critic.head.net[0].weight.grad.abs().sum() > 0
    assert score.denoiser.conv_in.weight.grad.abs().sum() > 0
    assert set(critic.state_dict()) >= {k for k in (f"score.{n}" for n in score.state_dict())}


def test_dmd2_with_gan_head_trains_on_tiny_shapes(tmp_path):
    """Two iterations of DMD2 + GAN head on a tiny shapes world (own tiny teacher: random weights) run and log
    the critic's real / fake logits."""
    from tests.runhelp import SHAPES_SETS
    from rtdmd.config import parse_set

    sets = parse_set([s for s in SHAPES_SETS if not s.startswith("method.")])
    teacher_dir = tmp_path / "teacher"
    run_training("teacher", backend="shapes", overrides={**sets, "train": {**sets["train"], "max_steps": 1}},
                 out=teacher_dir, show_progress=False)
    over = {**sets, "method": {"gan": True, "ttur": 1, "prefetch": 0, "guidance": 2.0},
            "backend": {**sets["backend"], "teacher": str(teacher_dir)},
            "train": {**sets["train"], "max_steps": 2}}
    res = run_training("dmd2", backend="shapes", overrides=over, out=tmp_path / "dmd2", show_progress=False)
    assert {"gan/critic", "gan/d_real", "gan/d_fake", "gan/generator", "loss/generator", "loss/fake_score"} <= set(res.last_logs)
    assert all(math.isfinite(v) for v in res.last_logs.values())


@pytest.fixture(scope="module")
def toy_teacher(tmp_path_factory) -> Path:
    return fit_mlp_teacher(tmp_path_factory.mktemp("toy_teacher") / "teacher")


def test_toy2d_dmd2_generator_matches_the_teacher(toy_teacher, tmp_path):
    """The shipped toy2d config (1500 steps) from an MLP teacher: the 4-step generator (eta 1, as DMD2 samples)
    is within 2x the teacher-vs-teacher MMD (n = 1000, RBF bandwidth 0.5); the teacher itself at 4 steps is not."""
    from benchmarks.toy2d_metrics import matches_teacher
    from rtdmd import checkpoint as ckpt
    from rtdmd.generate import SamplingConfig, generate

    cfg = make_config("dmd2", backend="toy2d", overrides={"backend": {"teacher": str(toy_teacher)},
                                                          "train": {"num_threads": 1, "device": "cpu"},
                                                          "tracking": {"enabled": False}})
    res = run_training(cfg, out=tmp_path / "run", show_progress=False)
    _, b, net, meta = ckpt.load_for_inference(res.checkpoint)
    assert meta["sampler"] == {"kind": "cps", "steps": 4, "guidance": 1.0, "eta": 1.0}
    n = 1000
    ta, tb = teacher_samples(b, n, seed=5), teacher_samples(b, n, seed=6)
    keys = [("toy", i) for i in range(n)]
    x = generate(b, net, [""] * n, keys, SamplingConfig("cps", 4, 1.0, 1.0))
    ok, m, ref = matches_teacher(x, ta, tb)
    print(f"toy2d dmd2: MMD {m:.4f} vs teacher-teacher {ref:.4f} (ratio {m / ref:.2f}, criterion 2)")  # shown with -s
    assert ok, (m, ref)
    teacher4 = generate(b, b.teacher, [""] * n, keys, SamplingConfig("cps", 4, 1.0, 1.0))
    ok_t, m_t, _ = matches_teacher(teacher4, ta, tb)
    assert not ok_t and m < m_t, (m, m_t)
    # the teacher network itself is a faithful teacher: its many-step samples match the mixture
    mix = b.sample_mixture(n, torch.Generator().manual_seed(7))[0]
    assert matches_teacher(ta, mix, b.sample_mixture(n, torch.Generator().manual_seed(8))[0])[0]


def test_resume_is_exact_on_toy2d(tmp_path):
    over = {"method": {"ttur": 2}, "train": {"max_steps": 6, "checkpoint_every": 3}}
    from rtdmd.config import _deep_merge

    full = run_training("dmd2", backend="toy2d", overrides=_deep_merge(TINY, over), out=tmp_path / "full", show_progress=False)
    half = _deep_merge(TINY, {**over, "train": {"max_steps": 3, "checkpoint_every": 3}})
    run_training("dmd2", backend="toy2d", overrides=half, out=tmp_path / "half", show_progress=False)
    resumed = run_training("dmd2", backend="toy2d", overrides=_deep_merge(TINY, over), out=tmp_path / "half", resume=True,
                           show_progress=False)
    assert_same_tensors(checkpoint_tensors(full.checkpoint), checkpoint_tensors(resumed.checkpoint))


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*/dmd2*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_dmd2_yaml_resolves(path):
    backend = path.parent.name
    preset = path.stem.split("@", 1)[1] if "@" in path.stem else None
    cfg = make_config("dmd2", backend=backend, preset=preset)
    assert cfg.method_name == "dmd2" and cfg.method.num_steps == 4
    if backend not in ("shapes",):
        assert cfg.method.gan is False  # the GAN head needs real images: prompt-only backends keep it off
