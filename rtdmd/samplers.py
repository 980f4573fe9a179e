"""Samplers over velocity callables ``velocity_fn(x, sigma) -> v`` (sigma a (B,) tensor).

One short free function per sampler: ``euler_sample`` (the ODE), ``cps_rollout``
(coefficient-preserving sampling, docs/paper.md s2) and ``sde_rollout`` (the Flow-GRPO SDE,
docs/paper.md s6); the two stochastic ones record each step's Gaussian policy and log-prob in a
``Rollout`` through one shared ``_Trace``. Each kernel's step formula is its own function
(``cps_mean_std`` / ``cps_step``, ``flow_grpo_sde_mean_std`` / ``flow_grpo_sde_step``).
Random draws take an explicit torch.Generator; noise is drawn on the generator's device
and moved to x's device, so seeds are device-independent for CPU generators.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

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
        steps = tqdm(steps, desc="euler", leave=False)
    for i in steps:
        v = velocity_fn(x, batch_sigma(s[i], x))
        x = x + (s[i + 1] - s[i]) * v
    return x


# ---------------------------------------------------------------------------- CPS
def cps_mean_std(
    x: torch.Tensor, v: torch.Tensor, s: SigmaLike, s_next: SigmaLike, eta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """CPS policy N(mean, std^2) for s -> s' (docs/paper.md s2, arXiv 2509.05952).

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
    """(B,) -mean over non-batch dims of (x - mean)^2 (the RTDMD reference code's form, docs/paper.md s2)."""
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
    """A trajectory of cps_rollout or sde_rollout.

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


class _Trace:
    """The states, step Gaussians and log-probs of a rollout, gathered step by step (shared by the kernels)."""

    def __init__(self, x: torch.Tensor, generator: torch.Generator | None, noises, log_prob_form: str):
        if log_prob_form not in LOG_PROB_FORMS:
            raise UserError(f"unknown log_prob form {log_prob_form!r}; use one of {LOG_PROB_FORMS}.")
        self.generator, self.given, self.form = generator, noises, log_prob_form
        self.states, self.means, self.stds, self.vels, self.noises = [x], [], [], [], []
        self.lps, self.stoch = [], []

    def add(self, i: int, v: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | None, s_next: float) -> None:
        """Step i to s_next: x_{i+1} = mean + std z (noise given for step i, else drawn), or the mean when the
        step is deterministic (std None)."""
        x = self.states[-1]
        if std is not None:
            z = self.given[i] if self.given is not None and self.given[i] is not None else randn_like_gen(x, self.generator)
            z = z.to(device=x.device, dtype=x.dtype)
            x_next = mean + std * z
            self.lps.append(log_prob(x_next.detach(), mean, std, self.form))
            self.stoch.append(i)
        else:
            z, std, x_next = None, torch.zeros_like(expand_sigma(s_next, x)), mean
        for seq, item in ((self.states, x_next), (self.means, mean), (self.stds, std), (self.vels, v), (self.noises, z)):
            seq.append(item)

    def rollout(self, sigmas: list[float]) -> Rollout:
        return Rollout(states=self.states, means=self.means, stds=self.stds,
                       log_probs=torch.stack(self.lps, dim=1) if self.lps else None, velocities=self.vels,
                       sigmas=sigmas[: len(self.states)], noises=self.noises, stochastic_steps=self.stoch)


def _step_count(s: list[float], num_steps: int | None, noises) -> int:
    n_total = len(s) - 1
    n = n_total if num_steps is None else int(num_steps)
    if not 0 <= n <= n_total:
        raise UserError(f"num_steps={num_steps} is outside 0..{n_total} for a {n_total}-step schedule; fix the stop index.")
    if noises is not None and len(noises) < n:
        raise ValueError(f"noises has {len(noises)} entries for {n} steps")
    return n


def _grad(enabled: bool):
    """A context that keeps gradient only when ``enabled`` (the rollouts' grad_steps)."""
    return contextlib.nullcontext() if enabled else torch.no_grad()


def cps_rollout(velocity_fn: VelocityFn, x: torch.Tensor, sigmas, eta: float, noises=None,
                generator: torch.Generator | None = None, *, grad_steps: Iterable[int] = (),
                log_prob_form: str = "gaussian", num_steps: int | None = None, detach_inputs: bool = True) -> Rollout:
    """CPS trajectory (docs/paper.md s2) from x at sigmas[0]: every step to a sigma above 0 is stochastic when
    eta > 0; the schedule's last step draws no noise (it goes to sigma 0 in docs/paper.md s4).

    noises: optional per-step noise (None entries are drawn from ``generator``), e.g. group-shared noise for
    SubGRPO. grad_steps: steps whose network call keeps gradient (the others run under no_grad).
    num_steps: stop after this many steps (AC-DMD's stop index k, docs/paper.md s3 step 2). detach_inputs: each
    step's input state is detached, so a step's gradient flows only through its own network call.
    Log-probs score the detached x_{i+1} under the step's (possibly grad-carrying) mean.
    """
    s = _sigma_list(sigmas)
    n, grad_steps = _step_count(s, num_steps, noises), set(grad_steps)
    trace = _Trace(x, generator, noises, log_prob_form)
    noisy = math.sin(eta * math.pi / 2) > 0
    for i in range(n):
        xi = trace.states[-1].detach() if detach_inputs else trace.states[-1]
        with _grad(i in grad_steps):
            v = velocity_fn(xi, batch_sigma(s[i], xi))
            mean, std = cps_mean_std(xi, v, s[i], s[i + 1], eta)
        trace.add(i, v, mean, std if noisy and s[i + 1] > 0 and i < len(s) - 2 else None, s[i + 1])
    return trace.rollout(s)


def sde_rollout(velocity_fn: VelocityFn, x: torch.Tensor, sigmas, a: float = 0.7, noises=None,
                generator: torch.Generator | None = None, *, grad_steps: Iterable[int] = (),
                log_prob_form: str = "gaussian") -> Rollout:
    """Flow-GRPO SDE trajectory (docs/paper.md s6) from x at sigmas[0]: every step is stochastic; noises and
    grad_steps as in cps_rollout. At s = 1 the step uses sigma_max = sigmas[1], as the Flow-GRPO code."""
    s = _sigma_list(sigmas)
    n, grad_steps = _step_count(s, None, noises), set(grad_steps)
    trace = _Trace(x, generator, noises, log_prob_form)
    for i in range(n):
        xi = trace.states[-1].detach()
        with _grad(i in grad_steps):
            v = velocity_fn(xi, batch_sigma(s[i], xi))
            mean, std = flow_grpo_sde_mean_std(xi, v, s[i], s[i + 1], a, s[1])
        trace.add(i, v, mean, std, s[i + 1])
    return trace.rollout(s)


def cps_step_log_prob(velocity_fn: VelocityFn, x: torch.Tensor, x_next: torch.Tensor, s: float, s_next: float,
                      eta: float = 0.9, form: str = "gaussian") -> torch.Tensor:
    """log pi_theta(x_next | x) of one stored CPS transition, recomputed with gradient (GRPO's new log-prob)."""
    v = velocity_fn(x, batch_sigma(s, x))
    mean, std = cps_mean_std(x, v, s, s_next, eta)
    return log_prob(x_next.detach(), mean, std, form)


@torch.no_grad()
def few_step_sample(
    velocity_fn: VelocityFn,
    x: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    eta: float = 0.9,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Few-step generator inference: CPS without gradient (docs/paper.md s2: eta 0.9; eta 1 is
    DMD2's backward-simulation re-noising x' = (1 - s') x0_hat + s' z). Returns the final sample."""
    return cps_rollout(velocity_fn, x, sigmas, eta, generator=generator).final


# ---------------------------------------------------------------------------- Flow-GRPO SDE
def flow_grpo_sde_mean_std(
    x: torch.Tensor, v: torch.Tensor, s: SigmaLike, s_next: SigmaLike, a: float = 0.7, sigma_max: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow-GRPO SDE step s -> s' (docs/paper.md s6): the marginal-preserving SDE
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
    r = sde_rollout(velocity_fn, x, sigmas, a, generator=generator, log_prob_form=log_prob_form)
    return r.final, r.log_probs
