"""Building blocks shared by the methods: one implementation of each idea.

DMD2, AC-DMD, Hyper-SD's score-distillation term and RTDMD's DM term all call
``dm_generator_loss`` (AC-DMD's estimator; at s = 0 it is exactly DMD2's) and
``fake_score_loss``; Flow-GRPO and RTDMD share ``grouped_prompts``, ``policy_rollout``
(rtdmd.samplers), ``recompute_log_probs`` and the objectives' group advantages and PPO-clip;
ReFL and Hyper-SD share ``refl_loss``. Formulas live in rtdmd.flow / samplers / objectives;
these functions only wire networks to them.

Randomness: ``ctx.generator`` is identical on every process; global-batch draws are made
in full and each process keeps its ``ctx.shard`` rows, so P processes draw what one does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from rtdmd import flow, objectives, samplers
from rtdmd.backends.base import Backend, Cond, index_cond
from rtdmd.errors import UserError
from rtdmd.methods.base import StepContext
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


def generator_sample(backend: Backend, generator_net, p: Prompts, n_global: int, ctx: StepContext,
                     num_steps: int, eta: float, grad: bool = True, tag: str = "gen") -> tuple[torch.Tensor, float]:
    """Run ``num_steps`` CPS steps of the 4-step generator from noise; only the last network call
    keeps gradient (AC-DMD, method.md s3 steps 1-3). Returns (x_s, s) with s the sigma reached
    (s = 0 after all steps). eta = 1 re-noises with fresh noise: DMD2's backward simulation."""
    sigmas = backend.generator_sigmas()
    x1 = global_randn(backend, n_global, ctx, f"{tag}-x1")
    noises = [global_randn(backend, n_global, ctx, f"{tag}-z{i}") for i in range(num_steps)]
    r = samplers.cps_rollout(velocity_fn(backend, generator_net, p.cond), x1, sigmas, eta, noises=noises,
                             num_steps=num_steps, grad_steps={num_steps - 1} if grad else set())
    return r.final, float(sigmas[num_steps])


# ---------------------------------------------------------------------------- distribution matching


def dm_generator_loss(backend: Backend, fake_net, x_s: torch.Tensor, s: float, p: Prompts, guidance: float,
                      n_global: int, ctx: StepContext, eta: float = 0.9, normalize: bool = True,
                      t_range: tuple[float, float] = (0.02, 0.98), tag: str = "dm",
                      t_sampling: str = "subinterval") -> tuple[torch.Tensor, dict]:
    """The (AC-)DMD generator loss at noise level s (method.md s3 steps 4-6).

    Re-noise x_s inside [s, 1], query the teacher (CFG) and the fake score there, map both
    back to s with one CPS step sharing the noise z, and regress x_s on x_s - g with the
    (normalised) DMD gradient g. With s = 0 this is DMD2's x0-space loss (baselines.md).
    ``t_sampling="uniform"`` draws t ~ U[t_range] (DMD2's t ~ U[0.02, 0.98]) instead of
    AC-DMD's clamped sub-interval draw.
    """
    xd = x_s.detach()
    g = torch_generator(ctx.seed, f"{tag}-t")
    if t_sampling == "uniform":
        t_all = t_range[0] + (t_range[1] - t_range[0]) * torch.rand(n_global, generator=g)
    else:
        t_all = objectives.sample_subinterval_t(torch.full((n_global,), s), g, lo=t_range[0], hi=t_range[1])
    t = t_all[ctx.shard(n_global)].to(xd.device)
    n = global_randn(backend, n_global, ctx, f"{tag}-n")
    z = global_randn(backend, n_global, ctx, f"{tag}-z")
    x_t, _, _ = objectives.renoise_subinterval(xd, s, t, n)
    with torch.no_grad():
        v_real = backend.teacher_velocity(x_t, t, p.cond, guidance, p.uncond)
        v_fake = backend.velocity(fake_net, x_t, t, p.cond)
        x_real = samplers.cps_step(x_t, v_real, t, s, eta, z)
        x_fake = samplers.cps_step(x_t, v_fake, t, s, eta, z)
    grad = objectives.dmd_gradient(xd, x_real, x_fake, normalize=normalize)
    loss = objectives.dmd_loss(x_s, grad)
    return loss.float(), {"dm/grad_norm": float(grad.float().pow(2).mean().sqrt())}


def fake_score_loss(backend: Backend, fake_net, x_s: torch.Tensor, s: float, p: Prompts, n_global: int,
                    ctx: StepContext, weighting: str = "ambient", t_sampling: str = "subinterval",
                    consistency_weight: float = 0.0, consistency_max_delta: int = 200, eta: float = 0.9,
                    weight_clamp: float = 10.0, tag: str = "fake",
                    t_range: tuple[float, float] | None = None) -> tuple[torch.Tensor, dict]:
    """Train the fake score on detached generator samples x_s at level s (method.md s3).

    ``weighting="ambient"`` with ``t_sampling="subinterval"`` is AC-DMD's ambient denoising
    score matching (target v*, weight min(1, clamp sigma_ts^2)); ``weighting="none"`` with
    ``t_sampling="uniform"`` and s = 0 is DMD2's plain flow matching on x0 (baselines.md).
    ``consistency_weight`` > 0 adds the two-sample consistency regulariser (gamma).
    ``t_range``: the noise levels trained (subinterval: the clamp, default [0.02, 0.98]; uniform:
    U[lo, hi], default U(0, 1)), e.g. where the DM term queries the fake score.
    """
    xd = x_s.detach()
    g = torch_generator(ctx.seed, f"{tag}-t")
    if t_sampling == "uniform":
        lo, hi = t_range if t_range is not None else (0.0, 1.0)
        t_all = lo + (hi - lo) * torch.rand(n_global, generator=g)
    else:
        lo, hi = t_range if t_range is not None else (0.02, 0.98)
        t_all = objectives.sample_subinterval_t(torch.full((n_global,), s), g, lo=lo, hi=hi)
    t = t_all[ctx.shard(n_global)].to(xd.device)
    n = global_randn(backend, n_global, ctx, f"{tag}-n")
    x_t, _, sigma_ts = objectives.renoise_subinterval(xd, s, t, n)
    target = objectives.ambient_dsm_target(xd, s, t, n)
    v = backend.velocity(fake_net, x_t, t, p.cond)
    w = objectives.ambient_weight(sigma_ts, weight_clamp) if weighting == "ambient" else None
    loss = objectives.weighted_mse(v, target, w)
    logs = {"fake/dsm": float(loss.detach())}
    if consistency_weight > 0:
        t2 = objectives.sample_consistency_t(t, torch_generator(ctx.seed, f"{tag}-delta"), consistency_max_delta)
        anchor = flow.x0_from_v(x_t, v, t)
        v_sg = v.detach()
        h = []
        for j in range(2):  # two independent CPS moves from x_t to t' with the stop-gradient velocity
            zj = global_randn(backend, n_global, ctx, f"{tag}-cons{j}")
            x2 = samplers.cps_step(x_t, v_sg, t, t2, eta, zj)
            h.append(flow.x0_from_v(x2, backend.velocity(fake_net, x2, t2, p.cond), t2))
        cons = objectives.consistency_regulariser(h[0], h[1], anchor)
        loss = loss + consistency_weight * cons
        logs["fake/consistency"] = float(cons.detach())
    return loss, logs


# ---------------------------------------------------------------------------- rewards


def load_rewards(names, backend: Backend, differentiable: bool = False) -> dict[str, object]:
    """Training rewards by registry name (rtdmd.rewards.registry.training_reward; user rewards added with
    register_reward included): name -> Reward on the backend's device."""
    from rtdmd.rewards.registry import training_reward

    return {n: training_reward(n, backend=backend, device=backend.device, differentiable=differentiable) for n in names}


def reward_scores(rewards: Mapping[str, object], images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Every reward on the same images: name -> (B,) scores."""
    return {name: r(images, prompts) for name, r in rewards.items()}


def refl_loss(rewards: Mapping[str, object], margins: Mapping[str, float], images: torch.Tensor,
              prompts: list[str], weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """ReFL-style hinge on differentiable rewards: weight * mean sum_j relu(margin_j - r_j(x))
    (baselines.md ReFL / Hyper-SD human feedback; method.md s4 uses the hinge on the summed rewards
    instead: pass margins={"__sum__": 3.0})."""
    scores = reward_scores(rewards, images, prompts)
    logs = {f"reward/{k}": float(v.detach().mean()) for k, v in scores.items()}
    if "__sum__" in margins:
        total = torch.stack(list(scores.values())).sum(0)
        hinge = objectives.refl_hinge(total, margins["__sum__"])
    else:
        hinge = sum(objectives.refl_hinge(scores[k], margins[k]) for k in scores)
    return weight * hinge.mean(), logs


def late_state(backend: Backend, net, p: Prompts, n_global: int, ctx: StepContext, total_steps: int,
               stop_range: tuple[int, int], guidance: float = 1.0, tag: str = "refl") -> tuple[torch.Tensor, float]:
    """ReFL's start point: Euler with ``net`` over ``total_steps`` sigmas, stopped without gradient after
    m ~ U{stop_range} steps (baselines.md ReFL: 40 steps, m in 30..39). Returns (x_s, s)."""
    sigmas = backend.sampling_sigmas(total_steps)
    lo, hi = stop_range
    m = int(torch.randint(lo, hi + 1, (1,), generator=torch_generator(ctx.seed, f"{tag}-m")))
    x = global_randn(backend, n_global, ctx, f"{tag}-x1")
    fn = (lambda xx, ss: flow.guided_velocity(lambda a, b, c: backend.velocity(net, a, b, c), xx, ss, p.cond, guidance, p.uncond))
    with torch.no_grad():
        x = samplers.euler_sample(fn, x, sigmas[: m + 1])
    return x, float(sigmas[m])


# ---------------------------------------------------------------------------- GRPO


def grouped_prompts(backend: Backend, n_groups: int, group_size: int, ctx: StepContext,
                    tag: str = "groups") -> tuple[list[str], torch.Tensor]:
    """Every prompt exactly ``group_size`` times in the global batch (GRPO groups); this process's
    rows and their global group ids. The global batch is n_groups * group_size rows."""
    base = backend.training_prompts(n_groups, torch_generator(ctx.seed, tag))
    prompts = [p for p in base for _ in range(group_size)]
    ids = torch.arange(n_groups).repeat_interleave(group_size)
    sl = ctx.shard(len(prompts))
    return prompts[sl], ids[sl]


def recompute_log_probs(backend: Backend, policy, cond: Cond, rollout: samplers.Rollout, steps: list[int],
                        kernel: str, eta: float = 0.9, a: float = 0.7, form: str = "gaussian",
                        guidance: float = 1.0, uncond: Cond | None = None) -> torch.Tensor:
    """log pi_theta of the stored transitions at ``steps``, with gradient: (B, len(steps)).
    ``guidance`` != 1: the policy is the CFG velocity of ``policy`` (Flow-GRPO samples with CFG)."""
    fn = policy_velocity_fn(backend, policy, cond, guidance, uncond)
    sig = rollout.sigmas
    sigma_max = sig[1] if len(sig) > 1 else None
    cols = [samplers.step_log_prob(fn, rollout.states[i].detach(), rollout.states[i + 1].detach(), sig[i], sig[i + 1],
                                   kernel=kernel, eta=eta, a=a, sigma_max=sigma_max, form=form) for i in steps]
    return torch.stack(cols, dim=1)


def old_log_probs(rollout: samplers.Rollout, steps: list[int]) -> torch.Tensor:
    """The behaviour policy's log-probs at ``steps`` (columns of rollout.log_probs)."""
    idx = [rollout.stochastic_steps.index(i) for i in steps]
    return rollout.log_probs[:, idx].detach()


def subset_cond(cond: Cond, mask: torch.Tensor) -> Cond:
    return index_cond(cond, mask)


@dataclass
class GRPOBatch:
    """One GRPO rollout: K samples per prompt, their rewards and group advantages (this process's rows)."""

    prompts: list[str]
    group_ids: torch.Tensor  # (B,) global group index of each row
    cond: Cond
    uncond: Cond | None  # the policy's CFG conditioning (None when guidance == 1)
    rollout: samplers.Rollout  # states x_0..x_N, means, stds, behaviour log-probs, noises (no grad)
    images: torch.Tensor  # decoded final states (toy2d: the points)
    rewards: dict[str, torch.Tensor]  # reward name -> (B,) scores
    advantages: torch.Tensor  # (B,) objectives.group_advantages over the global batch


def grpo_rollout(backend: Backend, policy, rewards: Mapping[str, object], n_groups: int, group_size: int,
                 ctx: StepContext, *, sigmas, kernel: str = "sde", eta: float = 0.9, a: float = 0.7,
                 guidance: float = 1.0, noises: list[torch.Tensor | None] | None = None, deterministic_last: bool = False,
                 log_prob_form: str = "gaussian", reward_weights: Mapping[str, float] | None = None,
                 advantage_clip: float = 5.0, advantage_eps: float = 1e-4, tag: str = "grpo") -> GRPOBatch:
    """Sample every prompt ``group_size`` times with the stochastic ``kernel`` (no gradient), score, and
    compute group advantages over the GLOBAL batch (rewards are gathered across processes).

    ``noises``: per-step noise for this process's rows (None entries: drawn per global row), e.g.
    SubGRPO's group-shared noise (objectives.group_shared_noise); ``deterministic_last``: the last
    step draws no noise (RTDMD's CPS rollout) -- Flow-GRPO's SDE uses False (all steps stochastic).
    """
    from rtdmd.distributed import all_gather_tensor

    n_global = n_groups * group_size
    prompts, gids = grouped_prompts(backend, n_groups, group_size, ctx, tag=f"{tag}-groups")
    cond = backend.encode_prompts(prompts)
    uncond = backend.uncond(len(prompts)) if guidance != 1.0 else None
    n_steps = len(sigmas) - 1
    noises = list(noises) if noises is not None else [None] * n_steps
    noises = [z if z is not None else global_randn(backend, n_global, ctx, f"{tag}-z{i}") for i, z in enumerate(noises)]
    x1 = global_randn(backend, n_global, ctx, f"{tag}-x1")
    with torch.no_grad():
        r = samplers.policy_rollout(policy_velocity_fn(backend, policy, cond, guidance, uncond), x1, sigmas, kernel=kernel,
                                    eta=eta, a=a, noises=noises, deterministic_last=deterministic_last,
                                    log_prob_form=log_prob_form)
        images = backend.decode(r.final).float()
        scores = {k: v.detach().float().reshape(-1).to(backend.device) for k, v in reward_scores(rewards, images, prompts).items()}
    gathered = {k: all_gather_tensor(v) for k, v in scores.items()}
    global_ids = torch.arange(n_groups).repeat_interleave(group_size)
    adv = objectives.group_advantages(gathered, global_ids, clip=advantage_clip, eps=advantage_eps, weights=reward_weights)
    return GRPOBatch(prompts, gids, cond, uncond, r, images, scores, adv[ctx.shard(n_global)].to(backend.device))


def policy_step_stats(backend: Backend, policy, cond: Cond, rollout: samplers.Rollout, steps: list[int], kernel: str,
                      eta: float = 0.9, a: float = 0.7, form: str = "gaussian", guidance: float = 1.0,
                      uncond: Cond | None = None, velocity: VelocityFn | None = None,
                      ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Recompute the policy at the stored transitions ``steps`` (gradient where the caller allows):
    ((B, len(steps)) log-probs, the step means, the step stds). ``velocity`` overrides the policy's
    velocity function (e.g. the frozen reference for the KL term)."""
    fn = velocity or policy_velocity_fn(backend, policy, cond, guidance, uncond)
    sig = rollout.sigmas
    sigma_max = sig[1] if len(sig) > 1 else None
    lps, means, stds = [], [], []
    for i in steps:
        x = rollout.states[i].detach()
        v = fn(x, flow.batch_sigma(sig[i], x))
        mean, std = samplers.step_mean_std(kernel, x, v, sig[i], sig[i + 1], eta, a, sigma_max)
        lps.append(samplers.log_prob(rollout.states[i + 1].detach(), mean, std, form))
        means.append(mean)
        stds.append(std)
    return torch.stack(lps, dim=1), means, stds


def grpo_policy_loss(backend: Backend, policy, batch: GRPOBatch, steps: list[int], *, kernel: str, eta: float = 0.9,
                     a: float = 0.7, guidance: float = 1.0, clip_eps: float = 1e-4, kl_weight: float = 0.0,
                     reference: Callable[[Cond, Cond | None], VelocityFn] | None = None, log_prob_form: str = "gaussian", mean_over_dims: bool = False,
                     drop_zero_advantage: bool = False) -> tuple[torch.Tensor, dict]:
    """PPO-clip on the stored transitions at ``steps`` with the batch's advantages, plus
    ``kl_weight`` * the Gaussian-mean KL to ``reference`` ((cond, uncond) -> velocity function, run without
    gradient; e.g. ``lambda c, u: teacher_fn(backend, c, w, u)``)
    (baselines.md Flow-GRPO; method.md s4 with kl_weight 0). ``mean_over_dims`` divides both
    log-probs by the state size: the Flow-GRPO code averages the per-dimension log-density, which
    sets the scale of the policy term against its per-dimension KL. ``drop_zero_advantage``
    skips rows whose advantage is 0 (method.md s4)."""
    missing = [i for i in steps if i not in batch.rollout.stochastic_steps]
    if missing:
        raise UserError(f"GRPO steps {missing} are deterministic in this rollout (no log-prob); train only stochastic steps "
                        f"{batch.rollout.stochastic_steps}.")
    adv = batch.advantages
    keep = torch.ones_like(adv, dtype=torch.bool)
    if drop_zero_advantage and bool((adv != 0).any()):
        keep = adv != 0
    r = batch.rollout
    if not bool(keep.all()):
        idx = keep.nonzero().reshape(-1)
        r = samplers.Rollout(states=[x[idx] for x in r.states], means=[], stds=[], log_probs=r.log_probs[idx],
                             velocities=[], sigmas=r.sigmas, noises=[], stochastic_steps=r.stochastic_steps)
        cond, uncond, adv = index_cond(batch.cond, idx), (index_cond(batch.uncond, idx) if batch.uncond is not None else None), adv[idx]
    else:
        cond, uncond = batch.cond, batch.uncond
    logp, means, stds = policy_step_stats(backend, policy, cond, r, steps, kernel, eta, a, log_prob_form, guidance, uncond)
    logp_old = old_log_probs(r, steps)
    if mean_over_dims:
        d = r.states[0][0].numel()
        logp, logp_old = logp / d, logp_old / d
    loss = objectives.ppo_clip_loss(logp, logp_old, adv, clip_eps)
    ratio = torch.exp(logp.detach() - logp_old)
    logs = {"grpo/policy_loss": float(loss.detach()), "grpo/ratio_dev": float((ratio - 1).abs().max()),
            "grpo/clip_frac": float(((ratio - 1).abs() > clip_eps).float().mean()), "grpo/rows": float(adv.shape[0])}
    if kl_weight > 0:
        if reference is None:
            raise UserError("a positive GRPO kl_weight needs a reference policy; pass one or set kl_weight to 0.")
        with torch.no_grad():
            _, ref_means, _ = policy_step_stats(backend, None, cond, r, steps, kernel, eta, a, log_prob_form,
                                                velocity=reference(cond, uncond))
        kl = torch.stack([objectives.gaussian_mean_kl(m, mr, sd) for m, mr, sd in zip(means, ref_means, stds)], dim=1).mean()
        loss = loss + kl_weight * kl
        logs["grpo/kl"] = float(kl.detach())
    return loss, logs

