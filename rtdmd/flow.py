"""Rectified-flow conventions: noising, v <-> x0 <-> eps, sigma shifts and schedules, CFG, conditionings.

x_s = (1 - s) x0 + s eps,  v = eps - x0,  s in [0, 1],  model timestep = 1000 s
(docs/paper.md s0). Every conversion between v, x0 and eps in the project lives here.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence, Union

import torch

from rtdmd.errors import UserError

SigmaLike = Union[float, int, torch.Tensor]

#: The model timestep of sigma = 1 (SD3 / FLUX convention: t = 1000 s).
NUM_TRAIN_TIMESTEPS = 1000

#: A conditioning: a dict of batch-first tensors (rtdmd.backends.base.Backend.encode_prompts).
Cond = dict[str, torch.Tensor]


def cat_cond(conds: list[Cond]) -> Cond:
    """Concatenate conditionings along the batch dimension."""
    keys = conds[0].keys()
    return {k: torch.cat([c[k] for c in conds], dim=0) for k in keys}


def index_cond(cond: Cond, index) -> Cond:
    """Select batch rows (an int tensor, a slice or a bool mask) of a conditioning."""
    return {k: v[index] for k, v in cond.items()}


def expand_sigma(sigma: SigmaLike, x: torch.Tensor) -> torch.Tensor:
    """sigma (float, 0-d or (B,) tensor) as a tensor that broadcasts against x (B, ...)."""
    if not torch.is_tensor(sigma):
        return torch.tensor(float(sigma), device=x.device, dtype=x.dtype)
    sigma = sigma.to(device=x.device, dtype=x.dtype)
    if sigma.dim() == 0:
        return sigma
    if sigma.dim() == 1 and sigma.shape[0] in (1, x.shape[0]):
        return sigma.reshape(sigma.shape[0], *([1] * (x.dim() - 1)))
    if sigma.dim() == x.dim():  # already broadcast-shaped
        return sigma
    raise ValueError(f"sigma of shape {tuple(sigma.shape)} does not broadcast against x of shape {tuple(x.shape)}")


def add_noise(x0: torch.Tensor, eps: torch.Tensor, sigma: SigmaLike) -> torch.Tensor:
    """x_s = (1 - s) x0 + s eps."""
    s = expand_sigma(sigma, x0)
    return (1 - s) * x0 + s * eps


def x0_from_v(x: torch.Tensor, v: torch.Tensor, sigma: SigmaLike) -> torch.Tensor:
    """x0_hat = x_s - s v."""
    return x - expand_sigma(sigma, x) * v


def eps_from_v(x: torch.Tensor, v: torch.Tensor, sigma: SigmaLike) -> torch.Tensor:
    """eps_hat = x_s + (1 - s) v."""
    return x + (1 - expand_sigma(sigma, x)) * v


def v_from_x0_eps(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """v = eps - x0."""
    return eps - x0


def v_from_x0(x: torch.Tensor, x0: torch.Tensor, sigma: SigmaLike) -> torch.Tensor:
    """v = (x_s - x0) / s (inverse of x0_from_v; undefined at s = 0)."""
    return (x - x0) / expand_sigma(sigma, x)


def v_from_eps(x: torch.Tensor, eps: torch.Tensor, sigma: SigmaLike) -> torch.Tensor:
    """v = (eps - x_s) / (1 - s) (inverse of eps_from_v; undefined at s = 1)."""
    return (eps - x) / (1 - expand_sigma(sigma, x))


def flow_matching_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The flow-matching regression target eps - x0."""
    return v_from_x0_eps(x0, eps)


def shift_sigma(sigma: SigmaLike, shift: float) -> SigmaLike:
    """SD3 time shift s' = k s / (1 + (k - 1) s)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def exponential_time_shift(sigma: SigmaLike, mu: float) -> SigmaLike:
    """FLUX time shift s' = e^mu / (e^mu + (1/s - 1)), with s = 0 -> 0."""
    em = math.exp(mu)
    if torch.is_tensor(sigma):
        safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
        out = em / (em + (1 / safe - 1))
        return torch.where(sigma > 0, out, torch.zeros_like(out))
    if sigma <= 0:
        return 0.0
    return em / (em + (1 / sigma - 1))


def sampling_sigmas(num_steps: int, shift: float = 1.0, mu: float | None = None) -> torch.Tensor:
    """(num_steps + 1,) float32 sigmas: linspace(1, 0) then shifted (SD3 shift, or FLUX mu when given)."""
    if int(num_steps) < 1:
        raise UserError(f"num_steps must be at least 1 (got {num_steps}); set a positive number of sampling steps.")
    s = torch.linspace(1.0, 0.0, int(num_steps) + 1, dtype=torch.float64)
    s = exponential_time_shift(s, mu) if mu is not None else shift_sigma(s, shift)
    s[-1] = 0.0
    return s.to(torch.float32)


def timesteps_to_sigmas(timesteps: Sequence[float] | torch.Tensor, shift: float = 1.0) -> torch.Tensor:
    """Model timesteps (e.g. [1000, 750, 500, 250]) -> shifted sigmas with a final 0 appended."""
    t = torch.as_tensor(timesteps, dtype=torch.float64).flatten()
    if t.numel() == 0 or (t < 0).any() or (t > NUM_TRAIN_TIMESTEPS).any():
        raise UserError(f"timesteps must be a non-empty list in [0, {NUM_TRAIN_TIMESTEPS}] (got {t.tolist()}); fix the config.")
    s = shift_sigma(t / NUM_TRAIN_TIMESTEPS, shift)
    return torch.cat([s, s.new_zeros(1)]).to(torch.float32)


def generator_timesteps(num_steps: int, configured: Sequence[float]) -> list[float]:
    """The few-step generator's timesteps: ``configured`` when it has ``num_steps`` entries, else uniform
    1000 (1 - i / num_steps) for i < num_steps (the schedule of docs/paper.md s2, at another step count)."""
    if len(configured) == num_steps:
        return list(configured)
    return [NUM_TRAIN_TIMESTEPS * (1 - i / num_steps) for i in range(num_steps)]


def timestep_from_sigma(sigma: SigmaLike) -> SigmaLike:
    """Model timestep = 1000 s."""
    return NUM_TRAIN_TIMESTEPS * sigma


def sigma_from_timestep(timestep: SigmaLike) -> SigmaLike:
    """Inverse of timestep_from_sigma."""
    return timestep / NUM_TRAIN_TIMESTEPS


def cfg(v_uncond: torch.Tensor, v_cond: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance, Imagen form: v_u + w (v_c - v_u)."""
    return v_uncond + w * (v_cond - v_uncond)


def guided_velocity(
    fn: Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor],
    x: torch.Tensor,
    sigma: SigmaLike,
    cond: dict,
    w: float,
    uncond: dict | None,
) -> torch.Tensor:
    """CFG velocity. w == 1: one call fn(x, sigma, cond). Else one batched call on [uncond; cond]."""
    if w == 1:
        return fn(x, sigma, cond)
    if uncond is None:
        raise ValueError("guided_velocity needs an unconditional Cond when w != 1")
    sigma2 = torch.cat([sigma, sigma]) if torch.is_tensor(sigma) and sigma.dim() == 1 else sigma
    v = fn(torch.cat([x, x]), sigma2, cat_cond([uncond, cond]))
    v_uncond, v_cond = v.chunk(2)
    return cfg(v_uncond, v_cond, w)


def batch_sigma(sigma: SigmaLike, x: torch.Tensor) -> torch.Tensor:
    """A (B,) sigma tensor for x (what velocity callables receive), from a float or 0-d tensor."""
    if torch.is_tensor(sigma) and sigma.dim() == 1 and sigma.shape[0] == x.shape[0]:
        return sigma.to(device=x.device, dtype=x.dtype)
    return torch.full((x.shape[0],), float(sigma), device=x.device, dtype=x.dtype)
