"""Loss blocks shared by the methods: one implementation of each idea, wired to the networks.

Each block is a small object built once from a method's options and called each step with tensors,
e.g. ``dm = DMLoss(backend, n, guidance=4.0, eta=0.9)`` then ``loss, logs = dm(fake_net, x_s, s, p, ctx)``.
DMD2, AC-DMD, Hyper-SD's score-distillation term and RTDMD's DM term all use ``DMLoss`` (AC-DMD's
estimator; at s = 0 it is exactly DMD2's) and ``FakeScoreLoss``; ReFL, DMD2, Hyper-SD and RTDMD share
``RewardHinge``; the GRPO blocks (Flow-GRPO, RTDMD) are in rtdmd.methods.grpo. Formulas live in
rtdmd.flow / samplers / objectives; these blocks only wire networks to them.

Randomness: ``ctx.generator`` is identical on every process; global-batch draws are made
in full and each process keeps its ``ctx.shard`` rows, so P processes draw what one does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from rtdmd import flow, objectives, samplers
from rtdmd.backends.base import Backend, Cond
from rtdmd.methods.base import StepContext
from rtdmd.rewards.registry import training_reward
from rtdmd.seeding import torch_generator

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------- prompts and noise


@dataclass
class Prompts:
    prompts: list[str]  # this process's prompts
    cond: Cond
    uncond: Cond | None  # for CFG (None when guidance == 1)


def draw_prompts(backend: Backend, n_global: int, ctx: StepContext, guidance: float = 1.0, tag: str = "prompts") -> Prompts:
    """The global batch's training prompts for this step; this process keeps its shard."""
    all_prompts = backend.training_prompts(n_global, torch_generator(ctx.seed, tag))
    mine = all_prompts[ctx.shard(n_global)]
    return Prompts(mine, backend.encode_prompts(mine), backend.uncond(len(mine)) if guidance != 1.0 else None)


def global_randn(backend: Backend, n_global: int, ctx: StepContext, tag: str) -> torch.Tensor:
    """Standard normal states for the whole global batch, this process's rows, on the backend's device."""
    z = torch.randn((n_global, *backend.state_shape()), generator=torch_generator(ctx.seed, tag))
    return z[ctx.shard(n_global)].to(backend.device)


def global_rand(n_global: int, ctx: StepContext, tag: str) -> torch.Tensor:
    """U(0, 1) per global row, this process's rows (CPU)."""
    return torch.rand(n_global, generator=torch_generator(ctx.seed, tag))[ctx.shard(n_global)]


def velocity_fn(backend: Backend, net, cond: Cond) -> VelocityFn:
    return lambda x, s: backend.velocity(net, x, s, cond)


def policy_velocity_fn(backend: Backend, net, cond: Cond, guidance: float = 1.0, uncond: Cond | None = None) -> VelocityFn:
    """The velocity of ``net`` with CFG w (one network call when w == 1)."""
    if guidance == 1.0:
        return velocity_fn(backend, net, cond)
    return lambda x, s: flow.guided_velocity(lambda a, b, c: backend.velocity(net, a, b, c), x, s, cond, guidance, uncond)


def teacher_fn(backend: Backend, cond: Cond, guidance: float, uncond: Cond | None) -> VelocityFn:
    return lambda x, s: backend.teacher_velocity(x, s, cond, guidance, uncond)


# ---------------------------------------------------------------------------- few-step generator samples


@dataclass
class GeneratorSample:
    """k CPS steps (eta) of the few-step generator from noise; only the last network call keeps gradient
    (AC-DMD, docs/paper.md s3 steps 1-3). eta = 1 re-noises with fresh noise: DMD2's backward simulation."""

    backend: Backend
    n_global: int
    eta: float
    tag: str = "gen"

    def __call__(self, net, p: Prompts, ctx: StepContext, num_steps: int, grad: bool = True) -> tuple[torch.Tensor, float]:
        """(x_s, s): the state after ``num_steps`` steps and the sigma reached (0 after all steps)."""
        b, n = self.backend, self.n_global
        sigmas = b.generator_sigmas()
        x1 = global_randn(b, n, ctx, f"{self.tag}-x1")
        noises = [global_randn(b, n, ctx, f"{self.tag}-z{i}") for i in range(num_steps)]
        r = samplers.cps_rollout(velocity_fn(b, net, p.cond), x1, sigmas, self.eta, noises=noises,
                                 num_steps=num_steps, grad_steps={num_steps - 1} if grad else set())
        return r.final, float(sigmas[num_steps])


# ---------------------------------------------------------------------------- distribution matching


@dataclass(frozen=True)
class NoiseLevels:
    """How a loss draws the re-noising level t of each row: AC-DMD's sub-interval draw t ~ U[s + 0.01, 1]
    clamped to [lo, hi] (objectives.sample_subinterval_t), or, with ``uniform``, t ~ U[lo, hi] (DMD2)."""

    uniform: bool = False
    lo: float = 0.02
    hi: float = 0.98

    def draw(self, s: float, n_global: int, ctx: StepContext, tag: str) -> torch.Tensor:
        """This process's rows of the global batch's t (CPU)."""
        g = torch_generator(ctx.seed, f"{tag}-t")
        if self.uniform:
            t_all = self.lo + (self.hi - self.lo) * torch.rand(n_global, generator=g)
        else:
            t_all = objectives.sample_subinterval_t(torch.full((n_global,), s), g, lo=self.lo, hi=self.hi)
        return t_all[ctx.shard(n_global)]


def kl_level_weight(t: torch.Tensor, dim: int) -> torch.Tensor:
    """D (1 - t)^2 / t^2: the factor that turns the unnormalised DMD gradient at s = 0 and level t,
    g = x0_hat_fake - x0_hat_real, regressed by dmd_loss (a mean over D elements), into grad KL(q_t || p_t)
    (score difference (1 - t) / t^2 (x0_hat_fake - x0_hat_real), dx_t / dx0 = (1 - t); docs/rtdmd.md)."""
    return dim * (1 - t) ** 2 / t**2


@dataclass
class DMLoss:
    """The (AC-)DMD generator loss at noise level s (docs/paper.md s3 steps 4-6).

    Re-noise x_s inside [s, 1] (``levels``), query the teacher (CFG ``guidance``) and the fake score there,
    map both back to s with one CPS step (``eta``) sharing the noise z, and regress x_s on x_s - g with the
    (``normalize``d) DMD gradient g. With s = 0 and uniform levels this is DMD2's x0-space loss (docs/paper.md s6.1).
    ``kl_levels`` (s = 0, unnormalised): each row's g is scaled by kl_level_weight(t, D), so the loss's gradient
    is the mean over rows of grad KL(q_t || p_t) at each row's own t (docs/toy2d-family.md).
    """

    backend: Backend
    n_global: int
    guidance: float
    eta: float = 0.9
    normalize: bool = True
    levels: NoiseLevels = NoiseLevels()
    tag: str = "dm"
    kl_levels: bool = False

    def __call__(self, fake_net, x_s: torch.Tensor, s: float, p: Prompts, ctx: StepContext) -> tuple[torch.Tensor, dict]:
        b, n, tag = self.backend, self.n_global, self.tag
        xd = x_s.detach()
        t = self.levels.draw(s, n, ctx, tag).to(xd.device)
        noise = global_randn(b, n, ctx, f"{tag}-n")
        z = global_randn(b, n, ctx, f"{tag}-z")
        x_t, _, _ = objectives.renoise_subinterval(xd, s, t, noise)
        with torch.no_grad():
            v_real = b.teacher_velocity(x_t, t, p.cond, self.guidance, p.uncond)
            v_fake = b.velocity(fake_net, x_t, t, p.cond)
            x_real = samplers.cps_step(x_t, v_real, t, s, self.eta, z)
            x_fake = samplers.cps_step(x_t, v_fake, t, s, self.eta, z)
        grad = objectives.dmd_gradient(xd, x_real, x_fake, normalize=self.normalize)
        if self.kl_levels:
            w = kl_level_weight(t.to(torch.float64), xd[0].numel()).to(grad.device)
            grad = grad * w.reshape(-1, *([1] * (grad.dim() - 1)))
        loss = objectives.dmd_loss(x_s, grad)
        return loss.float(), {"dm/grad_norm": float(grad.float().pow(2).mean().sqrt())}


@dataclass(frozen=True)
class Consistency:
    """The fake score's two-sample consistency regulariser (docs/paper.md s3): ``weight`` gamma, the second
    level t' = t - delta / 1000 with delta ~ U{1..max_delta}, two CPS moves (``eta``) from x_t to t'."""

    weight: float = 0.01
    max_delta: int = 200
    eta: float = 0.9


@dataclass
class FakeScoreLoss:
    """The fake score trained on detached generator samples x_s at level s (docs/paper.md s3).

    ``ambient_clamp`` set: AC-DMD's ambient denoising score matching (target v*, weight
    min(1, clamp sigma_ts^2)); None: unweighted, which with uniform ``levels`` on [0, 1] and s = 0 is
    DMD2's plain flow matching on x0 (docs/paper.md s6). ``consistency`` adds the regulariser.
    """

    backend: Backend
    n_global: int
    levels: NoiseLevels = NoiseLevels()
    ambient_clamp: float | None = None
    consistency: Consistency | None = None
    tag: str = "fake"

    def __call__(self, fake_net, x_s: torch.Tensor, s: float, p: Prompts, ctx: StepContext) -> tuple[torch.Tensor, dict]:
        b, n, tag = self.backend, self.n_global, self.tag
        xd = x_s.detach()
        t = self.levels.draw(s, n, ctx, tag).to(xd.device)
        noise = global_randn(b, n, ctx, f"{tag}-n")
        x_t, _, sigma_ts = objectives.renoise_subinterval(xd, s, t, noise)
        target = objectives.ambient_dsm_target(xd, s, t, noise)
        v = b.velocity(fake_net, x_t, t, p.cond)
        w = objectives.ambient_weight(sigma_ts, self.ambient_clamp) if self.ambient_clamp is not None else None
        loss = objectives.weighted_mse(v, target, w)
        logs = {"fake/dsm": float(loss.detach())}
        c = self.consistency
        if c is not None and c.weight > 0:
            cons = self._consistency(fake_net, x_t, v, t, p, ctx)
            loss = loss + c.weight * cons
            logs["fake/consistency"] = float(cons.detach())
        return loss, logs

    def _consistency(self, fake_net, x_t, v, t, p: Prompts, ctx: StepContext) -> torch.Tensor:
        b, n, c = self.backend, self.n_global, self.consistency
        t2 = objectives.sample_consistency_t(t, torch_generator(ctx.seed, f"{self.tag}-delta"), c.max_delta)
        anchor = flow.x0_from_v(x_t, v, t)
        v_sg = v.detach()
        h = []
        for j in range(2):  # two independent CPS moves from x_t to t' with the stop-gradient velocity
            zj = global_randn(b, n, ctx, f"{self.tag}-cons{j}")
            x2 = samplers.cps_step(x_t, v_sg, t, t2, c.eta, zj)
            h.append(flow.x0_from_v(x2, b.velocity(fake_net, x2, t2, p.cond), t2))
        return objectives.consistency_regulariser(h[0], h[1], anchor)


# ---------------------------------------------------------------------------- rewards


def load_rewards(names, backend: Backend, differentiable: bool = False) -> dict[str, object]:
    """Training rewards by registry name (rtdmd.rewards.registry.training_reward; user rewards added with
    register_reward included): name -> Reward on the backend's device."""
    return {n: training_reward(n, backend=backend, device=backend.device, differentiable=differentiable) for n in names}


def reward_scores(rewards: Mapping[str, object], images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Every reward on the same images: name -> (B,) scores."""
    return {name: r(images, prompts) for name, r in rewards.items()}


@dataclass
class RewardHinge:
    """ReFL-style hinge on differentiable rewards: weight * mean sum_j relu(margin_j - r_j(x))
    (docs/paper.md s6.4 / Hyper-SD human feedback). docs/paper.md s4 uses the hinge on the summed rewards
    instead: margins={"__sum__": 3.0}."""

    rewards: Mapping[str, object]
    margins: Mapping[str, float]
    weight: float = 1.0

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict]:
        scores = reward_scores(self.rewards, images, prompts)
        logs = {f"reward/{k}": float(v.detach().mean()) for k, v in scores.items()}
        if "__sum__" in self.margins:
            total = torch.stack(list(scores.values())).sum(0)
            hinge = objectives.refl_hinge(total, self.margins["__sum__"])
        else:
            hinge = sum(objectives.refl_hinge(scores[k], self.margins[k]) for k in scores)
        return self.weight * hinge.mean(), logs


@dataclass
class LateState:
    """ReFL's start point: Euler with the network over ``total_steps`` sigmas (CFG ``guidance``), stopped
    without gradient after m ~ U{stop_range} steps (docs/paper.md s6.4: 40 steps, m in 30..39)."""

    backend: Backend
    n_global: int
    total_steps: int
    stop_range: tuple[int, int]
    guidance: float = 1.0
    tag: str = "refl"

    def __call__(self, net, p: Prompts, ctx: StepContext) -> tuple[torch.Tensor, float]:
        """(x_s, s): the stopped state and its sigma."""
        b = self.backend
        sigmas = b.sampling_sigmas(self.total_steps)
        lo, hi = self.stop_range
        m = int(torch.randint(lo, hi + 1, (1,), generator=torch_generator(ctx.seed, f"{self.tag}-m")))
        x = global_randn(b, self.n_global, ctx, f"{self.tag}-x1")
        fn = policy_velocity_fn(b, net, p.cond, self.guidance, p.uncond)
        with torch.no_grad():
            x = samplers.euler_sample(fn, x, sigmas[: m + 1])
        return x, float(sigmas[m])
