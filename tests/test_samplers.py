import math

import pytest
import torch

from rtdmd import flow, samplers
from rtdmd.errors import UserError

# 1-D Gaussian data x0 ~ N(M, C^2) and its exact velocity.
# x_s = (1 - s) x0 + s eps is Gaussian with mean (1 - s) M and variance V_s = (1 - s)^2 C^2 + s^2.
# v(x, s) = E[eps - x0 | x_s = x]; (eps - x0, x_s) are jointly Gaussian with E[eps - x0] = -M and
# Cov(eps - x0, x_s) = s - (1 - s) C^2, so by Gaussian conditioning
#     v(x, s) = -M + (s - (1 - s) C^2) / V_s * (x - (1 - s) M).
# Check: the ODE path x(s) = (1 - s) M + sqrt(V_s) z has dx/ds = -M + (V_s' / (2 V_s)) (x - (1 - s) M)
# with V_s' / 2 = s - (1 - s) C^2, the same field; so the exact flow maps N(0, 1) at s = 1 to N(M, C^2).
M, C = 1.5, 0.5


def gaussian_velocity(x, sigma, m=M, c=C):
    s = flow.expand_sigma(sigma, x)
    var = (1 - s) ** 2 * c**2 + s**2
    return -m + (s - (1 - s) * c**2) / var * (x - (1 - s) * m)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_euler_hand_values():
    # v(x, s) = x: x_1 = x_0 + (0.5 - 1) x_0 = 0.5 x_0; x_2 = x_1 + (0 - 0.5) x_1 = 0.25 x_0
    x = torch.tensor([[2.0, -4.0]])
    seen = []

    def fn(xx, s):
        seen.append(s.clone())
        return xx

    out = samplers.euler_sample(fn, x, torch.tensor([1.0, 0.5, 0.0]))
    assert torch.allclose(out, 0.25 * x)
    assert seen[0].shape == (1,) and seen[1].item() == 0.5
    with pytest.raises(UserError):
        samplers.euler_sample(fn, x, [0.0, 1.0])


def test_cps_mean_std_hand_values():
    # x = 1, v = 2, s = 0.5, s' = 0.25, eta = 0.5: x0_hat = 0, eps_hat = 2,
    # mean = 0.75 * 0 + 0.25 * cos(pi/4) * 2, std = 0.25 * sin(pi/4)
    x, v = torch.ones(1, 1), 2 * torch.ones(1, 1)
    mean, std = samplers.cps_mean_std(x, v, 0.5, 0.25, 0.5)
    assert mean.item() == pytest.approx(0.5 * math.sqrt(0.5))
    assert float(std) == pytest.approx(0.25 * math.sqrt(0.5))
    z = torch.full((1, 1), -1.0)
    assert samplers.cps_step(x, v, 0.5, 0.25, 0.5, z).item() == pytest.approx(0.5 * math.sqrt(0.5) - 0.25 * math.sqrt(0.5))


def test_cps_eta0_is_deterministic_remix_and_euler():
    g = _gen(1)
    x, v = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    s, sn = torch.tensor([0.9, 0.8, 0.7, 0.6]), 0.3
    mean, std = samplers.cps_mean_std(x, v, s, sn, 0.0)
    remix = (1 - sn) * flow.x0_from_v(x, v, s) + sn * flow.eps_from_v(x, v, s)
    assert float(std) == 0.0
    assert torch.allclose(mean, remix, atol=1e-6)
    assert torch.allclose(mean, x + (sn - s[:, None]) * v, atol=1e-6)  # DDIM == Euler for rectified flow
    assert torch.allclose(samplers.cps_step(x, v, s, sn, 0.0, None), remix, atol=1e-6)
    # s' = 0 is deterministic whatever eta: x' = x0_hat
    assert torch.allclose(samplers.cps_step(x, v, s, 0.0, 0.9, None), flow.x0_from_v(x, v, s))
    with pytest.raises(ValueError):
        samplers.cps_step(x, v, s, 0.3, 0.9, None)


def test_gaussian_log_prob_matches_torch_normal():
    g = _gen(2)
    x, mean = torch.randn(5, 2, 3, generator=g), torch.randn(5, 2, 3, generator=g)
    std = torch.tensor([0.3, 0.5, 1.0, 2.0, 0.1])
    ref = torch.distributions.Normal(mean, std[:, None, None]).log_prob(x).sum(dim=(1, 2))
    assert torch.allclose(samplers.gaussian_log_prob(x, mean, std), ref, atol=1e-5)
    ref_scalar = torch.distributions.Normal(mean, 0.7).log_prob(x).sum(dim=(1, 2))
    assert torch.allclose(samplers.log_prob(x, mean, 0.7, "gaussian"), ref_scalar, atol=1e-5)
    simp = samplers.simplified_log_prob(x, mean)
    assert torch.allclose(simp, -((x - mean) ** 2).mean(dim=(1, 2)))
    assert torch.allclose(samplers.log_prob(x, mean, 0.7, "simplified"), simp)
    with pytest.raises(UserError):
        samplers.log_prob(x, mean, 0.7, "bogus")


def test_cps_rollout_structure_noise_and_grad_steps():
    sig = flow.timesteps_to_sigmas([1000, 750, 500, 250], 3.0)
    w = torch.tensor(0.5, requires_grad=True)
    calls = []

    def fn(x, s):
        calls.append(torch.is_grad_enabled())
        return w * x

    x = torch.randn(2, 3, generator=_gen(3))
    noises = [torch.ones(2, 3), None, None, None]
    r = samplers.cps_rollout(fn, x, sig, 0.9, noises=noises, generator=_gen(4), grad_steps={1})
    assert len(r.states) == 5 and len(r.means) == len(r.stds) == len(r.velocities) == 4
    assert r.stochastic_steps == [0, 1, 2] and r.log_probs.shape == (2, 3)
    assert calls == [False, True, False, False]
    assert r.noises[3] is None and torch.equal(r.noises[0], noises[0])
    # step 0 replayed by hand with the injected noise
    x1 = samplers.cps_step(x, 0.5 * x, 1.0, 0.9, 0.9, torch.ones(2, 3))
    assert torch.allclose(r.states[1], x1, atol=1e-6)
    # last step deterministic: x_4 = x0_hat of x_3
    assert torch.allclose(r.states[4], flow.x0_from_v(r.states[3], r.velocities[3], 0.5), atol=1e-6)
    assert r.states[2].requires_grad and not r.states[1].requires_grad and not r.states[3].requires_grad
    # log-prob of step 1 keeps gradient through its mean only
    (g1,) = torch.autograd.grad(r.log_probs[:, 1].sum(), w, retain_graph=True)
    (g0,) = torch.autograd.grad(r.log_probs[:, 0].sum(), w, allow_unused=True, materialize_grads=True)
    assert g1.abs() > 0 and g0 == 0
    # the recorded log-prob is the Gaussian density of the realised step
    lp0 = samplers.gaussian_log_prob(r.states[1], r.means[0], r.stds[0])
    assert torch.allclose(r.log_probs[:, 0], lp0)
    # same generator seed -> same rollout; stop index k = 2 gives the same first two steps
    r2 = samplers.cps_rollout(fn, x, sig, 0.9, noises=noises, generator=_gen(4), num_steps=2)
    assert len(r2.states) == 3 and torch.allclose(r2.states[2], r.states[2])
    with pytest.raises(UserError):
        samplers.cps_rollout(fn, x, sig, 0.9, num_steps=5)


def test_cps_rollout_eta0_has_no_log_probs_and_equals_euler():
    sig = flow.sampling_sigmas(4, 3.0)
    x = torch.randn(6, 1, generator=_gen(5))
    r = samplers.cps_rollout(gaussian_velocity, x, sig, 0.0)
    assert r.log_probs is None and r.stochastic_steps == []
    assert torch.allclose(r.final, samplers.euler_sample(gaussian_velocity, x, sig), atol=1e-5)


def _linear_coeffs(s):
    # exact Gaussian velocity is affine: v = p x + q
    var = (1 - s) ** 2 * C**2 + s**2
    p = (s - (1 - s) * C**2) / var
    return p, -M - p * (1 - s) * M


def test_cps_rollout_exact_velocity_matches_closed_form_marginals():
    # With the exact velocity every CPS step is affine-Gaussian: x' = alpha x + beta + std z, so the
    # state's mean/variance follow mu' = alpha mu + beta, V' = alpha^2 V + std^2. Note CPS is not
    # marginal-preserving for spread-out data (x0_hat, eps_hat are posterior means): the 4-step output
    # variance is well below C^2; it is exact only when the velocity is the per-sample one (next test).
    sig = flow.timesteps_to_sigmas([1000, 750, 500, 250], 3.0).tolist()
    eta = 0.9
    n = 40000
    x = torch.randn(n, 1, generator=_gen(6))
    r = samplers.cps_rollout(gaussian_velocity, x, sig, eta, generator=_gen(7))
    mu, var = 0.0, 1.0
    for k, (s, sn) in enumerate(zip(sig[:-1], sig[1:])):
        p, q = _linear_coeffs(s)
        c, si = math.cos(eta * math.pi / 2), math.sin(eta * math.pi / 2)
        alpha = (1 - sn) * (1 - s * p) + sn * c * (1 + (1 - s) * p)
        beta = (1 - sn) * (-s * q) + sn * c * (1 - s) * q
        std = sn * si if k < len(sig) - 2 else 0.0
        mu, var = alpha * mu + beta, alpha**2 * var + std**2
        xs = r.states[k + 1]
        assert xs.mean().item() == pytest.approx(mu, abs=5 * math.sqrt(var / n) + 1e-4)
        assert xs.var().item() == pytest.approx(var, rel=0.04)
    assert var < 0.5 * C**2  # documented variance loss (4 steps, eta 0.9)


def test_cps_rollout_per_sample_exact_velocity_preserves_marginals():
    # Coefficient preservation (arXiv 2509.05952): with the exact per-sample velocity v = (x - x0) / s
    # (eps_hat = the true eps), x' = (1 - s') x0 + s' (cos eps + sin z) and cos eps + sin z ~ N(0, 1),
    # so every state is distributed as x_{s_k} = (1 - s_k) x0 + s_k eps: N((1-s)M, (1-s)^2 C^2 + s^2).
    n = 40000
    g = _gen(8)
    x0 = M + C * torch.randn(n, 1, generator=g)
    x = torch.randn(n, 1, generator=g)
    sig = flow.timesteps_to_sigmas([1000, 750, 500, 250], 3.0).tolist()
    r = samplers.cps_rollout(lambda xx, s: (xx - x0) / flow.expand_sigma(s, xx), x, sig, 0.9, generator=g)
    for s, xs in zip(sig, r.states):
        var = (1 - s) ** 2 * C**2 + s**2
        assert xs.mean().item() == pytest.approx((1 - s) * M, abs=5 * math.sqrt(var / n))
        assert xs.std().item() == pytest.approx(math.sqrt(var), rel=0.03)
    assert torch.allclose(r.final, x0, atol=1e-5)


def test_flow_grpo_sde_hand_values():
    # s = 0.5, s' = 0.25, a = 0.7: sigma_t = 0.7, dt = -0.25,
    # mean = x (1 + 0.49 / 1 * -0.25) + v (1 + 0.49 * 0.5 / 1) * -0.25, std = 0.7 * 0.5
    x, v = torch.full((1, 1), 2.0), torch.full((1, 1), -1.0)
    mean, std = samplers.flow_grpo_sde_mean_std(x, v, 0.5, 0.25)
    assert mean.item() == pytest.approx(2 * (1 - 0.1225) + 0.25 * 1.245)
    assert float(std) == pytest.approx(0.35)
    xn, mean2, std2 = samplers.flow_grpo_sde_step(x, v, 0.5, 0.25, torch.ones(1, 1))
    assert xn.item() == pytest.approx(mean.item() + 0.35)
    # s = 1 uses sigma_max in the denominator: sigma_t = 0.7 sqrt(1 / (1 - 0.9))
    mean, std = samplers.flow_grpo_sde_mean_std(x, v, 1.0, 0.9, sigma_max=0.9)
    st2 = 0.49 / 0.1
    assert float(std) == pytest.approx(math.sqrt(st2 * 0.1))
    assert mean.item() == pytest.approx(2 * (1 - st2 / 2 * 0.1) + 0.1, rel=1e-5)  # v dt = +0.1
    with pytest.raises(ValueError):
        samplers.flow_grpo_sde_mean_std(x, v, 1.0, 0.9)


def test_sde_and_ode_marginals_match_gaussian_data():
    # Exact velocity: the Euler ODE and the Flow-GRPO SDE both carry N(0,1) to N(M, C^2) (up to
    # O(1/N) discretisation: 200 steps leave < 1% bias in the std).
    n, steps = 20000, 200
    sig = flow.sampling_sigmas(steps)
    x = torch.randn(n, 1, generator=_gen(9))
    x_ode = samplers.euler_sample(gaussian_velocity, x, sig)
    x_sde, lps = samplers.sde_sample(gaussian_velocity, x, sig, a=0.7, generator=_gen(10))
    assert lps.shape == (n, steps) and torch.isfinite(lps).all()
    se_mean, se_std = C / math.sqrt(n), C / math.sqrt(2 * n)
    for xs in (x_ode, x_sde):
        assert xs.mean().item() == pytest.approx(M, abs=5 * se_mean)
        assert xs.std().item() == pytest.approx(C, abs=5 * se_std + 0.005)
    assert x_sde.mean().item() == pytest.approx(x_ode.mean().item(), abs=7 * se_mean)
    assert x_sde.std().item() == pytest.approx(x_ode.std().item(), abs=7 * se_std + 0.005)
    # the SDE is really stochastic: same start, different noise -> different sample
    assert (x_sde - samplers.sde_sample(gaussian_velocity, x, sig, generator=_gen(11))[0]).abs().mean() > 0.1


def test_few_step_sample_eta1_is_dmd2_backward_simulation():
    sig = [1.0, 0.5, 0.0]
    x = torch.randn(3, 2, generator=_gen(12))
    out = samplers.few_step_sample(gaussian_velocity, x, sig, eta=1.0, generator=_gen(13))
    z = samplers.randn_like_gen(x, _gen(13))
    x1 = 0.5 * flow.x0_from_v(x, gaussian_velocity(x, 1.0), 1.0) + 0.5 * z
    x2 = flow.x0_from_v(x1, gaussian_velocity(x1, 0.5), 0.5)
    assert torch.allclose(out, x2, atol=1e-6) and not out.requires_grad
