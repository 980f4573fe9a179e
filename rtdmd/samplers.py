"""Samplers over velocity callables ``velocity_fn(x, sigma) -> v`` (sigma a (B,) tensor).

Euler ODE, coefficient-preserving sampling (CPS, method.md section 2) with per-step
Gaussian policies and log-probs, and the Flow-GRPO SDE step (baselines.md, Flow-GRPO).
Random draws take an explicit torch.Generator; noise is drawn on the generator's device
and moved to x's device, so seeds are device-independent for CPU generators.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from rtdmd.errors import UserError
from rtdmd.flow import SigmaLike, batch_sigma, eps_from_v, expand_sigma, x0_from_v

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

LOG_PROB_FORMS = ("gaussian", "simplified")


def _sigma_list(sigmas: Sequence[float] | torch.Tensor) -> list[float]:
    s = [float(v) for v in (sigmas.tolist() if torch.is_tensor(sigmas) else sigmas)]
    if len(s) < 2:
        raise UserError(f"a sampling schedule needs at least 2 sigmas (got {len(s)}); give num_steps >= 1.")
    if any(b > a for a, b in zip(s, s[1:])):
        raise UserError(f"sigmas must be non-increasing (got {s}); pass a schedule from 1 down to 0.")
    return s


def randn_like_gen(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn from ``generator`` on its own device."""
    dev = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=dev, dtype=torch.float32).to(device=x.device, dtype=x.dtype)


def euler_sample(
    velocity_fn: VelocityFn, x: torch.Tensor, sigmas: Sequence[float] | torch.Tensor, progress: bool = False
) -> torch.Tensor:
    """Euler ODE: x_{i+1} = x_i + (s_{i+1} - s_i) v(x_i, s_i); returns x at sigmas[-1]."""
    s = _sigma_list(sigmas)
    steps = range(len(s) - 1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="euler", leave=False)
    for i in steps:
        v = velocity_fn(x, batch_sigma(s[i], x))
        x = x + (s[i + 1] - s[i]) * v
    return x


# ---------------------------------------------------------------------------- CPS
def cps_mean_std(
    x: torch.Tensor, v: torch.Tensor, s: SigmaLike, s_next: SigmaLike, eta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """CPS policy N(mean, std^2) for s -> s' (method.md section 2, arXiv 2509.05952).

    mean = (1 - s') x0_hat + s' cos(eta pi/2) eps_hat,  std = s' sin(eta pi/2) (broadcast-shaped).
    The noise coefficients satisfy cos^2 + sin^2 = 1, so the noise level of x' is s'.
    """
    sn = expand_sigma(s_next, x)
    x0_hat = x0_from_v(x, v, s)
    eps_hat = eps_from_v(x, v, s)
    mean = (1 - sn) * x0_hat + sn * math.cos(eta * math.pi / 2) * eps_hat
    std = sn * math.sin(eta * math.pi / 2)
    return mean, std


def cps_step(
    x: torch.Tensor, v: torch.Tensor, s: SigmaLike, s_next: SigmaLike, eta: float, noise: torch.Tensor | None
) -> torch.Tensor:
    """One CPS step x' = mean + std z (noise may be None only when the step is deterministic)."""
    mean, std = cps_mean_std(x, v, s, s_next, eta)
    if noise is None:
        if bool((std != 0).any()):
            raise ValueError("cps_step needs noise for a stochastic step (s_next > 0 and eta > 0)")
        return mean
    return mean + std * noise


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: SigmaLike) -> torch.Tensor:
    """(B,) log N(x; mean, std^2 I), summed over non-batch dims."""
    std = expand_sigma(std, x).expand_as(x)
    lp = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).sum(dim=1)


def simplified_log_prob(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """(B,) -mean over non-batch dims of (x - mean)^2 (the RTDMD reference code's form, method.md s2)."""
    return -((x - mean) ** 2).flatten(1).mean(dim=1)


def log_prob(x: torch.Tensor, mean: torch.Tensor, std: SigmaLike, form: str = "gaussian") -> torch.Tensor:
    """Per-sample policy log-prob in the chosen form ('gaussian' or 'simplified')."""
    if form == "gaussian":
        return gaussian_log_prob(x, mean, std)
    if form == "simplified":
        return simplified_log_prob(x, mean)
    raise UserError(f"unknown log_prob form {form!r}; use one of {LOG_PROB_FORMS}.")


@dataclass
class Rollout:
    """A CPS trajectory.

    states: x_0 .. x_n (x_0 the input, x_n the last state); means / stds / velocities /
    noises: one per step (noise None on deterministic steps); log_probs: (B, n_stochastic)
    log pi(x_{i+1} | x_i) of the stochastic steps (listed in ``stochastic_steps``), or None.
    """

    states: list[torch.Tensor]
    means: list[torch.Tensor]
    stds: list[torch.Tensor]
    log_probs: torch.Tensor | None
    velocities: list[torch.Tensor]
    sigmas: list[float] = field(default_factory=list)
    noises: list[torch.Tensor | None] = field(default_factory=list)
    stochastic_steps: list[int] = field(default_factory=list)

    @property
    def final(self) -> torch.Tensor:
        return self.states[-1]


KERNELS = ("cps", "sde")


def step_mean_std(kernel: str, x: torch.Tensor, v: torch.Tensor, s: SigmaLike, s_next: SigmaLike, eta: float = 0.9,
                  a: float = 0.7, sigma_max: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian policy of one step: CPS (method.md s2) or the Flow-GRPO SDE (baselines.md)."""
    if kernel == "cps":
        return cps_mean_std(x, v, s, s_next, eta)
    if kernel == "sde":
        return flow_grpo_sde_mean_std(x, v, s, s_next, a, sigma_max)
    raise UserError(f"unknown sampling kernel {kernel!r}; use one of {KERNELS}.")


def policy_rollout(
    velocity_fn: VelocityFn,
    x: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    kernel: str = "cps",
    eta: float = 0.9,
    a: float = 0.7,
    noises: Sequence[torch.Tensor | None] | None = None,
    generator: torch.Generator | None = None,
    grad_steps: Iterable[int] | None = None,
    log_prob_form: str = "gaussian",
    deterministic_last: bool = True,
    num_steps: int | None = None,
    detach_inputs: bool = True,
) -> Rollout:
    """Run a stochastic sampler (``kernel`` "cps" or "sde") along ``sigmas`` from x (at sigmas[0]).

    noises: optional per-step noise (None entries are drawn from ``generator``), e.g.
    group-shared noise for SubGRPO. grad_steps: step indices whose network call keeps
    gradient (all others run under no_grad). deterministic_last: the last step of the
    schedule draws no noise (it goes to sigma 0 in method.md s4). num_steps: stop after
    this many steps (AC-DMD's stop index k, method.md s3 step 2). detach_inputs: each step's
    input state is detached, so a step's gradient flows only through its own network call.
    Log-probs score the detached x_{i+1} under the step's (possibly grad-carrying) mean.
    """
    if log_prob_form not in LOG_PROB_FORMS:
        raise UserError(f"unknown log_prob form {log_prob_form!r}; use one of {LOG_PROB_FORMS}.")
    s = _sigma_list(sigmas)
    n_total = len(s) - 1
    n = n_total if num_steps is None else int(num_steps)
    if not 0 <= n <= n_total:
        raise UserError(f"num_steps={num_steps} is outside 0..{n_total} for a {n_total}-step schedule; fix the stop index.")
    if noises is not None and len(noises) < n:
        raise ValueError(f"noises has {len(noises)} entries for {n} steps")
    grad_steps = set(grad_steps or ())
    sigma_max = s[1]
    noisy_kernel = kernel == "sde" or math.sin(eta * math.pi / 2) > 0

    states, means, stds, vels, used_noises, lps, stoch = [x], [], [], [], [], [], []
    for i in range(n):
        xi = states[-1].detach() if detach_inputs else states[-1]
        ctx = contextlib.nullcontext() if i in grad_steps else torch.no_grad()
        with ctx:
            v = velocity_fn(xi, batch_sigma(s[i], xi))
            mean, std = step_mean_std(kernel, xi, v, s[i], s[i + 1], eta, a, sigma_max)
        stochastic = noisy_kernel and (kernel == "sde" or s[i + 1] > 0) and not (deterministic_last and i == n_total - 1)
        if stochastic:
            z = noises[i] if noises is not None and noises[i] is not None else randn_like_gen(xi, generator)
            z = z.to(device=xi.device, dtype=xi.dtype)
            x_next = mean + std * z
            lps.append(log_prob(x_next.detach(), mean, std, log_prob_form))
            stoch.append(i)
        else:
            z = None
            std = torch.zeros_like(expand_sigma(s[i + 1], xi))
            x_next = mean
        states.append(x_next)
        means.append(mean)
        stds.append(std)
        vels.append(v)
        used_noises.append(z)
    return Rollout(
        states=states,
        means=means,
        stds=stds,
        log_probs=torch.stack(lps, dim=1) if lps else None,
        velocities=vels,
        sigmas=s[: n + 1],
        noises=used_noises,
        stochastic_steps=stoch,
    )


def cps_rollout(velocity_fn: VelocityFn, x: torch.Tensor, sigmas, eta: float, **kwargs) -> Rollout:
    """CPS trajectory (method.md s2); see policy_rollout for the keyword arguments."""
    return policy_rollout(velocity_fn, x, sigmas, kernel="cps", eta=eta, **kwargs)


def step_log_prob(velocity_fn: VelocityFn, x: torch.Tensor, x_next: torch.Tensor, s: float, s_next: float,
                  kernel: str = "cps", eta: float = 0.9, a: float = 0.7, sigma_max: float | None = None,
                  form: str = "gaussian") -> torch.Tensor:
    """log pi_theta(x_next | x) of one stored transition, recomputed with gradient (GRPO's new log-prob)."""
    v = velocity_fn(x, batch_sigma(s, x))
    mean, std = step_mean_std(kernel, x, v, s, s_next, eta, a, sigma_max)
    return log_prob(x_next.detach(), mean, std, form)


@torch.no_grad()
def few_step_sample(
    velocity_fn: VelocityFn,
    x: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    eta: float = 0.9,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Few-step generator inference: CPS without gradient (method.md s2: eta 0.9; eta 1 is
    DMD2's backward-simulation re-noising x' = (1 - s') x0_hat + s' z). Returns the final sample."""
    return cps_rollout(velocity_fn, x, sigmas, eta, generator=generator).final


# ---------------------------------------------------------------------------- Flow-GRPO SDE
def flow_grpo_sde_mean_std(
    x: torch.Tensor, v: torch.Tensor, s: SigmaLike, s_next: SigmaLike, a: float = 0.7, sigma_max: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow-GRPO SDE step s -> s' (baselines.md): the marginal-preserving SDE
    dx = [v + sigma_t^2/(2t) (x + (1-t) v)] dt + sigma_t dw, sigma_t = a sqrt(t/(1-t)),
    discretised with Euler-Maruyama. At s = 1 the denominator uses sigma_max (the schedule's
    next sigma), as the Flow-GRPO code does. Returns (mean, std) with std broadcast-shaped."""
    se = expand_sigma(s, x)
    dt = expand_sigma(s_next, x) - se
    if bool((se >= 1).any()):
        if sigma_max is None:
            raise ValueError("flow_grpo_sde_mean_std needs sigma_max at s = 1 (the schedule's next sigma)")
        denom = 1 - torch.where(se >= 1, torch.as_tensor(float(sigma_max), dtype=se.dtype, device=se.device), se)
    else:
        denom = 1 - se
    sigma_t = a * torch.sqrt(se / denom)
    mean = x * (1 + sigma_t**2 / (2 * se) * dt) + v * (1 + sigma_t**2 * (1 - se) / (2 * se)) * dt
    std = sigma_t * torch.sqrt(-dt)
    return mean, std


def flow_grpo_sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    s: SigmaLike,
    s_next: SigmaLike,
    noise: torch.Tensor,
    a: float = 0.7,
    sigma_max: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Flow-GRPO SDE step: returns (x_next, mean, std), x_next = mean + std * noise."""
    mean, std = flow_grpo_sde_mean_std(x, v, s, s_next, a, sigma_max)
    return mean + std * noise, mean, std


def sde_sample(
    velocity_fn: VelocityFn,
    x: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    a: float = 0.7,
    generator: torch.Generator | None = None,
    log_prob_form: str = "gaussian",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample with the Flow-GRPO SDE along ``sigmas``; returns (final x, (B, N) per-step log-probs)."""
    r = policy_rollout(velocity_fn, x, sigmas, kernel="sde", a=a, generator=generator,
                       log_prob_form=log_prob_form, deterministic_last=False)
    return r.final, r.log_probs
