"""The embedded backends: toy2d (closed-form mixture velocity, MLP, data) and shapes (tokenizer, pixels,
schedules, data, networks, the shipped teacher)."""

from __future__ import annotations

import math

import pytest
import torch

from rtdmd import flow
from rtdmd.backends.toy2d import ExactMixtureVelocity, Toy2DBackend, Toy2DOptions, gmm_velocity
from rtdmd.errors import UserError

# ============================================================================ toy2d: gmm_velocity


def test_gmm_velocity_one_component_hand_computed():
    # mu = (1, 2), c = 0.5, s = 0.5, x = (0.3, -0.2): tau^2 = 0.25 * 0.25 + 0.25 = 0.3125, m = (0.5, 1),
    # x - m = (-0.2, -1.2); E[eps|x] = s / tau^2 (x - m) = 1.6 (x - m) = (-0.32, -1.92);
    # E[x0|x] = mu + (1 - s) c^2 / tau^2 (x - m) = mu + 0.4 (x - m) = (0.92, 1.52); v = (-1.24, -3.44).
    v = gmm_velocity(torch.tensor([[0.3, -0.2]], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64),
                     torch.tensor([[1.0, 2.0]], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64),
                     torch.zeros(1, dtype=torch.float64))
    assert torch.allclose(v, torch.tensor([[-1.24, -3.44]], dtype=torch.float64), atol=1e-12)


def _mixture(dtype=torch.float64):
    means = torch.tensor([[2.0, 0.0], [-1.0, 1.5], [0.5, -2.0]], dtype=dtype)
    stds = torch.tensor([0.3, 0.6, 0.45], dtype=dtype)
    w = torch.tensor([0.5, 0.2, 0.3], dtype=dtype)
    return means, stds, w


def test_gmm_velocity_equals_the_score_formula():
    """Tweedie for x_s = (1-s) x0 + s eps: E[eps|x] = -s grad log p_s(x), so v = (-s grad log p_s(x) - x) / (1 - s),
    with p_s the mixture of N((1-s) mu_k, ((1-s)^2 c_k^2 + s^2) I) (torch.distributions, autograd)."""
    D = torch.distributions
    means, stds, w = _mixture()
    g = torch.Generator().manual_seed(0)
    x = 2.5 * torch.randn(64, 2, generator=g, dtype=torch.float64)
    s = torch.rand(64, generator=g, dtype=torch.float64) * 0.98 + 0.01
    v = gmm_velocity(x, s, means, stds, torch.log(w))
    for i in range(0, 64, 7):
        si = s[i]
        tau = torch.sqrt((1 - si) ** 2 * stds ** 2 + si ** 2)
        p = D.MixtureSameFamily(D.Categorical(probs=w),
                                D.Independent(D.Normal((1 - si) * means, tau[:, None].expand(-1, 2)), 1))
        xi = x[i].clone().requires_grad_(True)
        (score,) = torch.autograd.grad(p.log_prob(xi), xi)
        expected = (-si * score - x[i]) / (1 - si)
        assert torch.allclose(v[i], expected, atol=1e-9), (i, v[i], expected)


def test_gmm_velocity_endpoints():
    """s = 1: x is pure noise, v = x - E[x0] = x - sum_k w_k mu_k; s = 0: x = x0, eps independent, v = -x."""
    means, stds, w = _mixture()
    x = torch.tensor([[0.7, -0.4], [3.0, 1.0]], dtype=torch.float64)
    v1 = gmm_velocity(x, torch.ones(2, dtype=torch.float64), means, stds, torch.log(w))
    assert torch.allclose(v1, x - (w[:, None] * means).sum(0), atol=1e-12)
    v0 = gmm_velocity(x, torch.zeros(2, dtype=torch.float64), means, stds, torch.log(w))
    assert torch.allclose(v0, -x, atol=1e-12)


def test_gmm_velocity_is_the_conditional_mean_monte_carlo():
    """The residual eps - x0 - v(x_s) is orthogonal to functions of x_s (definition of E[. | x_s])."""
    means, stds, w = _mixture()
    g = torch.Generator().manual_seed(1)
    n = 200_000
    comp = torch.multinomial(w, n, replacement=True, generator=g)
    x0 = means[comp] + stds[comp, None] * torch.randn(n, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(n, 2, generator=g, dtype=torch.float64)
    s = torch.rand(n, generator=g, dtype=torch.float64)
    xs = flow.add_noise(x0, eps, s)
    feats = torch.stack([torch.ones(n, dtype=torch.float64), xs[:, 0], xs[:, 1], s, torch.tanh(xs[:, 0] * xs[:, 1])], 1)

    def z_scores(v):
        r = eps - x0 - v
        prod = (feats[:, :, None] * r[:, None, :]).reshape(n, -1)
        return prod.mean(0) / (prod.std(0) / math.sqrt(n))

    assert z_scores(gmm_velocity(xs, s, means, stds, torch.log(w))).abs().max() < 4.5
    # the check has power: a mixture with 1.5x wider components fails it by far
    assert z_scores(gmm_velocity(xs, s, means, 1.5 * stds, torch.log(w))).abs().max() > 10


def test_exact_mixture_velocity_modes():
    o = Toy2DOptions()
    net = ExactMixtureVelocity(o.means, o.stds, o.weights)
    g = torch.Generator().manual_seed(2)
    x = 2 * torch.randn(6, 2, generator=g)
    s = torch.rand(6, generator=g)
    mode = torch.tensor([0, 1, 3, 8, 0, 5])
    v = net(x, s, mode)
    means, stds = torch.tensor(o.means), torch.tensor(o.stds)
    for i in range(6):
        k = int(mode[i])
        if k == 0:
            ref = gmm_velocity(x[i:i + 1], s[i:i + 1], means, stds, torch.log(torch.tensor(o.weights)))
        else:
            ref = gmm_velocity(x[i:i + 1], s[i:i + 1], means[k - 1:k], stds[k - 1:k], torch.zeros(1))
        assert torch.allclose(v[i], ref[0], atol=1e-5)


# ============================================================================ toy2d: the backend


def _toy(**kw) -> Toy2DBackend:
    return Toy2DBackend(Toy2DOptions(**kw))


def test_toy2d_prompts():
    b = _toy()
    assert b.encode_prompts(["", "mode 0", "mode 7", " mode 3 "])["mode"].tolist() == [0, 1, 8, 4]
    for bad in ("mode 8", "mode -1", "a cat", "mode"):
        with pytest.raises(UserError, match="0..7"):
            b.parse_prompt(bad)


def test_toy2d_schedules():
    b = _toy()
    assert torch.allclose(b.sampling_sigmas(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    assert torch.allclose(b.generator_sigmas(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    assert torch.allclose(b.generator_sigmas(2), torch.tensor([1.0, 0.5, 0.0]))
    # the configured timesteps at their own step count; uniform 1000 (1 - i/n) at any other
    assert flow.generator_timesteps(4, [999.0, 700.0, 400.0, 100.0]) == [999.0, 700.0, 400.0, 100.0]
    assert flow.generator_timesteps(3, [999.0, 700.0, 400.0, 100.0]) == pytest.approx([1000.0, 2000.0 / 3, 1000.0 / 3])
    # shift 3: s' = 3 s / (1 + 2 s): 0.75 -> 0.9, 0.5 -> 0.75, 0.25 -> 0.5
    assert torch.allclose(_toy(shift=3.0).sampling_sigmas(4), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))


def test_toy2d_data():
    b = _toy()
    d1 = b.sample_data(64, torch.Generator().manual_seed(0))
    d2 = b.sample_data(64, torch.Generator().manual_seed(0))
    assert d1.x0.shape == (64, 2) and torch.equal(d1.x0, d2.x0) and d1.prompts == d2.prompts and d1.images is None
    assert not torch.equal(d1.x0, b.sample_data(64, torch.Generator().manual_seed(1)).x0)
    every = _toy(conditional_share=1.0).sample_data(500, torch.Generator().manual_seed(3))
    modes = torch.tensor([int(p.split()[1]) for p in every.prompts])
    assert torch.equal(b.mode_of(every.x0), modes)  # each point lies at its caption's mode (3.8 sigma apart)
    assert set(_toy(conditional_share=0.0).sample_data(50, torch.Generator()).prompts) == {""}
    x, comp = _toy(weights=[3.0] + [1.0] * 7).sample_mixture(40_000, torch.Generator().manual_seed(4))
    freq = torch.bincount(comp, minlength=8).double() / 40_000
    assert abs(freq[0] - 0.3) < 0.015 and (freq[1:] - 0.1).abs().max() < 0.012


def test_toy2d_options_validate():
    with pytest.raises(UserError, match="one entry per mode"):
        Toy2DOptions(stds=[0.1]).validate()
    with pytest.raises(UserError, match="2-D point"):
        Toy2DOptions(means=[[0.0, 0.0, 0.0]], stds=[0.1], weights=[1.0]).validate()
    with pytest.raises(UserError, match="positive"):
        Toy2DOptions(means=[[0.0, 0.0]], stds=[0.0], weights=[1.0]).validate()


def test_toy2d_networks_and_teacher_from_a_checkpoint(tmp_path):
    from rtdmd import checkpoint as ckpt
    from rtdmd.config import dump, resolve

    b = _toy(hidden=16, depth=2)
    assert isinstance(b.teacher, ExactMixtureVelocity) and not any(p.requires_grad for p in b.teacher.parameters())
    net = b.make_trainable("teacher")
    x, s = torch.randn(5, 2), torch.tensor(0.3)
    cond = b.encode_prompts(["", "mode 1", "", "mode 2", "mode 7"])
    v = b.velocity(net, x, s, cond)
    assert v.shape == (5, 2)
    assert torch.allclose(v, b.velocity(net, x, s.expand(5), cond))
    # a checkpoint of that MLP is a teacher; students start as copies of it
    cfg = resolve("teacher", backend="toy2d", overrides={"backend": {"hidden": 16, "depth": 2}})
    step = ckpt.write_checkpoint(tmp_path / "run", 1, config_yaml=dump(cfg), sampler={"kind": "euler", "steps": 8},
                                 method="teacher", backend="toy2d", inference_state=b.network_state(net),
                                 training_state=None)
    b2 = _toy(hidden=16, depth=2, teacher=str(tmp_path / "run"))
    assert torch.allclose(b2.velocity(b2.teacher, x, s, cond), v)
    student = b2.make_trainable("generator")
    assert all(torch.equal(p, q) for p, q in zip(student.parameters(), net.parameters()))
    assert all(p.requires_grad for p in student.parameters())
    fresh = b2.make_trainable("teacher")
    b2.load_network_state(fresh, b2.network_state(student))
    assert torch.allclose(b2.velocity(fresh, x, s, cond), v)
    assert step.name == "step_000001"
    with pytest.raises(UserError, match="does not exist"):
        _ = _toy(teacher=str(tmp_path / "missing")).teacher


# ============================================================================ shapes

TINY = dict(image_size=16, size_range=[4.0, 6.0], max_objects=2, unet_channels=[8, 16], unet_attention_head_dim=4,
            text_width=16, text_heads=2, text_layers=1)


def _shapes(**kw):
    from rtdmd.backends.shapes import ShapesBackend, ShapesOptions

    return ShapesBackend(ShapesOptions(**{**TINY, **kw}))


def test_word_tokenizer():
    from rtdmd.backends.shapes import WordTokenizer

    tok = WordTokenizer(["a", "circle", "red"], max_tokens=6)
    assert tok.vocab_size == 7
    ids, mask = tok(["a red circle", "A Blue circle", ""])
    assert ids.tolist() == [[1, 4, 6, 5, 3, 0], [1, 4, 2, 5, 3, 0], [1, 3, 0, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]]
    with pytest.raises(UserError, match="max_tokens=4"):
        tok(["a a a a a"])


def test_shapes_geometry_and_schedules():
    b = _shapes()
    assert b.state_shape() == (3, 16, 16)
    img = torch.rand(2, 3, 16, 16)
    assert torch.allclose(b.decode(b.encode_images(img)), img, atol=1e-6)
    assert b.decode(torch.tensor([[-3.0, 3.0]])).tolist() == [[0.0, 1.0]]
    # docs/paper.md s2: timesteps [1000, 750, 500, 250] with shift 3 -> [1, 0.9, 0.75, 0.5], then 0
    assert torch.allclose(b.generator_sigmas(), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))
    s = b.sampling_sigmas(28)
    assert s.shape == (29,) and s[0] == 1 and s[-1] == 0 and (s[1:] < s[:-1]).all()
    assert torch.allclose(s, torch.linspace(1, 0, 29))  # shift 1


def test_shapes_data():
    b = _shapes()
    d = b.sample_data(6, torch.Generator().manual_seed(0))
    d2 = b.sample_data(6, torch.Generator().manual_seed(0))
    assert d.x0.shape == (6, 3, 16, 16) and len(d.prompts) == 6 and len(d.scenes) == 6
    assert torch.equal(d.x0, d2.x0) and d.prompts == d2.prompts
    assert d.images.min() >= 0 and d.images.max() <= 1 and torch.allclose(d.x0, 2 * d.images - 1)
    assert not torch.equal(d.x0, b.sample_data(6, torch.Generator().manual_seed(1)).x0)
    ids, _ = b.tokenizer(d.prompts)
    assert (ids != b.tokenizer.UNK).all()  # training captions use the grammar's words only
    assert b.training_prompts(4, torch.Generator().manual_seed(0)) == \
        b.training_prompts(4, torch.Generator().manual_seed(0))


def test_shapes_network_velocity_and_state():
    b = _shapes()
    torch.manual_seed(0)
    net = b.make_trainable("teacher").eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 16, 16, generator=g)
    prompts = ["a red circle", "two squares", ""]
    cond = b.encode_prompts(prompts)
    with torch.no_grad():
        v = b.velocity(net, x, torch.tensor([0.2, 0.5, 0.9]), cond)
        assert v.shape == x.shape
        # a sample's velocity does not depend on the rest of its batch
        v1 = b.velocity(net, x[1:2], torch.tensor([0.5]), b.encode_prompts(prompts[1:2]))
        assert torch.allclose(v[1:2], v1, atol=1e-5)
        vs = b.velocity(net, x, torch.tensor(0.5), cond)
        assert torch.allclose(vs[1], v[1], atol=1e-5)
        other = b.make_trainable("teacher")
        b.load_network_state(other, b.network_state(net))
        assert torch.equal(b.velocity(other.eval(), x, torch.tensor(0.5), cond), vs)


def test_shapes_teacher_from_a_checkpoint(tmp_path):
    from rtdmd import checkpoint as ckpt
    from rtdmd.config import dump, resolve

    b = _shapes()
    torch.manual_seed(0)
    net = b.make_trainable("teacher")
    cfg = resolve("teacher", backend="shapes", overrides={"backend": TINY})
    ckpt.write_checkpoint(tmp_path / "t", 3, config_yaml=dump(cfg), sampler={"kind": "euler", "steps": 8},
                          method="teacher", backend="shapes", inference_state=b.network_state(net), training_state=None)
    b2 = _shapes(teacher=str(tmp_path / "t"))
    assert all(torch.equal(p, q) for p, q in zip(b2.teacher.parameters(), net.parameters()))
    assert not any(p.requires_grad for p in b2.teacher.parameters()) and not b2.teacher.training
    student = b2.make_trainable("generator")
    assert not any(p.requires_grad for p in student.text_encoder.parameters())
    assert all(p.requires_grad for p in student.denoiser.parameters())
    assert all(p.requires_grad for p in _shapes(teacher=str(tmp_path / "t"), train_text_encoder=True)
               .make_trainable("generator").text_encoder.parameters())
    # a backend whose architecture differs from its teacher's is refused, naming the key
    with pytest.raises(UserError, match=r"backend.unet_channels=\[8, 32\] differs from the teacher's"):
        _ = _shapes(teacher=str(tmp_path / "t"), unet_channels=[8, 32]).teacher
    with pytest.raises(UserError, match="does not exist"):
        _ = _shapes(teacher=str(tmp_path / "nope")).teacher


def test_shipped_teacher_loads_and_guides():
    from rtdmd.backends.shapes import ShapesBackend, ShapesOptions

    b = ShapesBackend(ShapesOptions())
    t = b.teacher
    assert sum(p.numel() for p in t.parameters()) > 1_000_000
    with pytest.raises(UserError, match="backend.image_size=16 differs"):
        _ = _shapes().teacher  # tiny world + shipped teacher
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=g)
    s = torch.tensor([0.7, 0.4])
    cond = b.encode_prompts(["a red circle", "a blue square"])
    with torch.no_grad():
        vc = b.velocity(t, x, s, cond)
        vu = b.velocity(t, x, s, b.uncond(2))
        vg = b.teacher_velocity(x, s, cond, guidance=4.0)
    assert torch.allclose(vg, vu + 4.0 * (vc - vu), atol=1e-4)
    assert not torch.allclose(vc, vu, atol=1e-3)  # the prompt matters to a trained teacher
