import math

import pytest
import torch

from rtdmd import flow
from rtdmd.errors import UserError


def _x(b=3, shape=(2, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((b, *shape), generator=g)


def test_expand_sigma_shapes():
    x = _x()
    assert flow.expand_sigma(0.5, x).shape == ()
    assert flow.expand_sigma(torch.tensor(0.5), x).shape == ()
    s = flow.expand_sigma(torch.tensor([0.1, 0.2, 0.3]), x)
    assert s.shape == (3, 1, 1, 1) and s.dtype == x.dtype
    assert torch.equal((s * x)[1], 0.2 * x[1])
    with pytest.raises(ValueError):
        flow.expand_sigma(torch.tensor([0.1, 0.2]), x)


def test_add_noise_hand_values():
    x0 = torch.tensor([[2.0, -1.0]])
    eps = torch.tensor([[0.5, 3.0]])
    # (1 - 0.25) * x0 + 0.25 * eps
    assert torch.allclose(flow.add_noise(x0, eps, 0.25), torch.tensor([[1.625, 0.0]]))
    assert torch.allclose(flow.add_noise(x0, eps, torch.tensor([1.0])), eps)
    assert torch.allclose(flow.add_noise(x0, eps, torch.tensor([0.0])), x0)


def test_conversions_round_trip():
    x0, eps = _x(seed=1), _x(seed=2)
    s = torch.tensor([0.2, 0.5, 0.9])
    x = flow.add_noise(x0, eps, s)
    v = flow.v_from_x0_eps(x0, eps)
    assert torch.allclose(v, eps - x0)
    assert torch.allclose(flow.flow_matching_target(x0, eps), eps - x0)
    assert torch.allclose(flow.x0_from_v(x, v, s), x0, atol=1e-5)
    assert torch.allclose(flow.eps_from_v(x, v, s), eps, atol=1e-5)
    assert torch.allclose(flow.v_from_x0(x, x0, s), v, atol=1e-4)
    assert torch.allclose(flow.v_from_eps(x, eps, s), v, atol=1e-4)
    # hand values: x = 1, v = 2, s = 0.25 -> x0 = 1 - 0.5, eps = 1 + 1.5
    one = torch.ones(1, 1)
    assert flow.x0_from_v(one, 2 * one, 0.25).item() == pytest.approx(0.5)
    assert flow.eps_from_v(one, 2 * one, 0.25).item() == pytest.approx(2.5)


def test_shift_sigma_sd3():
    s = torch.tensor([1.0, 0.75, 0.5, 0.25])
    assert torch.allclose(flow.shift_sigma(s, 3.0), torch.tensor([1.0, 0.9, 0.75, 0.5]))
    assert flow.shift_sigma(0.5, 1.0) == 0.5


def test_exponential_time_shift():
    # mu = 0 is the identity; mu = log 3 equals SD3 shift 3 (e^mu / (e^mu + 1/s - 1) = 3s / (3s + 1 - s))
    s = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    assert torch.allclose(flow.exponential_time_shift(s, 0.0), s)
    assert torch.allclose(flow.exponential_time_shift(s, math.log(3.0)), flow.shift_sigma(s, 3.0))
    assert flow.exponential_time_shift(0.0, 1.2) == 0.0
    assert flow.exponential_time_shift(0.5, 1.0) == pytest.approx(math.e / (math.e + 1.0))


def test_sampling_sigmas():
    s = flow.sampling_sigmas(4)
    assert s.dtype == torch.float32 and s.shape == (5,)
    assert torch.allclose(s, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    assert torch.allclose(flow.sampling_sigmas(4, shift=3.0), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))
    assert torch.allclose(flow.sampling_sigmas(2, mu=0.0), torch.tensor([1.0, 0.5, 0.0]))
    with pytest.raises(UserError):
        flow.sampling_sigmas(0)


def test_timesteps_to_sigmas():
    s = flow.timesteps_to_sigmas([1000, 750, 500, 250], 3.0)
    assert s.dtype == torch.float32
    assert torch.allclose(s, torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))
    with pytest.raises(UserError):
        flow.timesteps_to_sigmas([1200], 1.0)
    assert flow.timestep_from_sigma(0.25) == 250.0
    assert flow.sigma_from_timestep(750.0) == 0.75


def test_cfg_hand_values():
    vu, vc = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])
    assert torch.allclose(flow.cfg(vu, vc, 4.0), torch.tensor([9.0, -2.0]))
    assert torch.allclose(flow.cfg(vu, vc, 1.0), vc)


def test_guided_velocity_one_call_and_batched():
    calls = []

    def fn(x, sigma, cond):
        calls.append((x.shape[0], sigma.shape[0], cond["emb"].shape[0]))
        return x * sigma[:, None] + cond["emb"]

    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    sigma = torch.tensor([0.5, 0.25])
    cond = {"emb": torch.tensor([[1.0, 1.0], [2.0, 2.0]])}
    uncond = {"emb": torch.zeros(2, 2)}
    v1 = flow.guided_velocity(fn, x, sigma, cond, 1.0, uncond)
    assert calls == [(2, 2, 2)]
    assert torch.allclose(v1, x * sigma[:, None] + cond["emb"])
    v = flow.guided_velocity(fn, x, sigma, cond, 3.0, uncond)
    assert calls[1] == (4, 4, 4) and len(calls) == 2  # one batched call
    vu = x * sigma[:, None]
    assert torch.allclose(v, vu + 3.0 * cond["emb"])
    with pytest.raises(ValueError):
        flow.guided_velocity(fn, x, sigma, cond, 3.0, None)


def test_batch_sigma():
    x = torch.zeros(3, 2)
    assert torch.equal(flow.batch_sigma(0.5, x), torch.full((3,), 0.5))
    s = torch.tensor([0.1, 0.2, 0.3])
    assert torch.equal(flow.batch_sigma(s, x), s)
