"""GRPO blocks shared by Flow-GRPO and RTDMD stage 2: the sampling policy, the grouped rollout with
its rewards and group advantages, and the PPO-clip policy loss (optionally with a KL to a reference).

A policy is a stochastic sampler whose steps are Gaussians: ``CpsPolicy`` (a few-step generator,
docs/paper.md s2) or ``SdePolicy`` (the Flow-GRPO SDE, docs/paper.md s6). ``GroupRollout`` samples every prompt
K times with it, without gradient; ``PolicyLoss`` recomputes the policy at the stored transitions with
gradient. Formulas live in rtdmd.samplers / objectives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from rtdmd import diagnostics, flow, objectives, samplers
from rtdmd.backends.base import Backend, Cond, index_cond
from rtdmd.distributed import all_gather_tensor
from rtdmd.errors import UserError
from rtdmd.methods.base import StepContext
from rtdmd.methods.blocks import VelocityFn, global_randn, policy_velocity_fn, reward_scores
from rtdmd.seeding import torch_generator


# ---------------------------------------------------------------------------- policies


@dataclass
class CpsPolicy:
    """CPS steps along ``sigmas`` (docs/paper.md s2); the schedule's last step (to sigma 0) is deterministic.
    ``guidance``: the CFG of the policy's velocity; ``log_prob``: "gaussian" or "simplified"."""

    sigmas: object
    eta: float = 0.9
    guidance: float = 1.0
    log_prob: str = "gaussian"

    def rollout(self, fn: VelocityFn, x: torch.Tensor, noises) -> samplers.Rollout:
        return samplers.cps_rollout(fn, x, self.sigmas, self.eta, noises, log_prob_form=self.log_prob)

    def mean_std(self, x: torch.Tensor, v: torch.Tensor, sigmas: list[float], i: int):
        return samplers.cps_mean_std(x, v, sigmas[i], sigmas[i + 1], self.eta)


@dataclass
class SdePolicy:
    """Flow-GRPO SDE steps along ``sigmas`` (docs/paper.md s6), every step stochastic; sigma_t = a sqrt(t/(1-t))."""

    sigmas: object
    a: float = 0.7
    guidance: float = 1.0
    log_prob: str = "gaussian"

    def rollout(self, fn: VelocityFn, x: torch.Tensor, noises) -> samplers.Rollout:
        return samplers.sde_rollout(fn, x, self.sigmas, self.a, noises, log_prob_form=self.log_prob)

    def mean_std(self, x: torch.Tensor, v: torch.Tensor, sigmas: list[float], i: int):
        return samplers.flow_grpo_sde_mean_std(x, v, sigmas[i], sigmas[i + 1], self.a, sigmas[1])


Policy = CpsPolicy | SdePolicy


# ---------------------------------------------------------------------------- the grouped rollout


def grouped_prompts(backend: Backend, n_groups: int, group_size: int, ctx: StepContext,
                    tag: str = "groups") -> tuple[list[str], torch.Tensor]:
    """Every prompt exactly ``group_size`` times in the global batch (GRPO groups); this process's
    rows and their global group ids. The global batch is n_groups * group_size rows."""
    base = backend.training_prompts(n_groups, torch_generator(ctx.seed, tag))
    prompts = [p for p in base for _ in range(group_size)]
    ids = torch.arange(n_groups).repeat_interleave(group_size)
    sl = ctx.shard(len(prompts))
    return prompts[sl], ids[sl]


@dataclass(frozen=True)
class Advantages:
    """Group advantages over the global batch (objectives.group_advantages): per-reward ``weights``,
    clip, eps, and ``normalize`` (per-reward std normalisation and global re-standardisation)."""

    clip: float = 5.0
    eps: float = 1e-4
    weights: Mapping[str, float] | None = None
    normalize: bool = True

    def __call__(self, scores: dict[str, torch.Tensor], n_groups: int, group_size: int) -> torch.Tensor:
        """(global batch,) advantages of this process's (B,) ``scores``, gathered across processes."""
        gathered = {k: all_gather_tensor(v) for k, v in scores.items()}
        ids = torch.arange(n_groups).repeat_interleave(group_size)
        return objectives.group_advantages(gathered, ids, clip=self.clip, eps=self.eps, weights=self.weights,
                                           normalize=self.normalize)


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
    advantages: torch.Tensor | None  # (B,) group advantages over the global batch (GroupRollout.with_advantages)


@dataclass
class GroupRollout:
    """Sample every prompt ``group_size`` times with ``policy`` (no gradient), score with ``rewards``, and
    compute the group ``advantages`` over the GLOBAL batch of n_groups * group_size rows."""

    backend: Backend
    rewards: Mapping[str, object]
    policy: Policy
    n_groups: int
    group_size: int
    advantages: Advantages = Advantages()
    tag: str = "grpo"

    def __call__(self, net, ctx: StepContext, noises: list[torch.Tensor | None] | None = None) -> GRPOBatch:
        """``noises``: per-step noise for this process's rows (None entries: drawn per global row), e.g.
        SubGRPO's group-shared noise (objectives.group_shared_noise)."""
        return self.with_advantages([self.sample(net, ctx, noises)], ctx)[0]

    def with_advantages(self, batches: list[GRPOBatch], ctx: StepContext) -> list[GRPOBatch]:
        """``batches`` (the micro-batches of one optimiser step, each ``sample``d with its own context) with
        their group advantages computed over all of them together: the global batch is every micro-batch's
        rows on every process (docs/paper.md s4b), in micro-batch order."""
        n_global = self.n_groups * self.group_size
        gathered = [{k: all_gather_tensor(v) for k, v in b.rewards.items()} for b in batches]
        joint = {k: torch.cat([g[k] for g in gathered]) for k in gathered[0]} if gathered else {}
        a = self.advantages
        ids = torch.arange(self.n_groups * len(batches)).repeat_interleave(self.group_size)
        adv = objectives.group_advantages(joint, ids, clip=a.clip, eps=a.eps, weights=a.weights, normalize=a.normalize)
        for j, b in enumerate(batches):
            b.advantages = adv[j * n_global:(j + 1) * n_global][ctx.shard(n_global)].to(self.backend.device)
        return batches

    def sample(self, net, ctx: StepContext, noises: list[torch.Tensor | None] | None = None) -> GRPOBatch:
        """The rollout and its rewards, without advantages (``with_advantages`` sets them)."""
        b, tag, w = self.backend, self.tag, self.policy.guidance
        n_global = self.n_groups * self.group_size
        prompts, gids = grouped_prompts(b, self.n_groups, self.group_size, ctx, tag=f"{tag}-groups")
        cond = b.encode_prompts(prompts)
        uncond = b.uncond(len(prompts)) if w != 1.0 else None
        noises = list(noises) if noises is not None else [None] * (len(self.policy.sigmas) - 1)
        noises = [z if z is not None else global_randn(b, n_global, ctx, f"{tag}-z{i}") for i, z in enumerate(noises)]
        x1 = global_randn(b, n_global, ctx, f"{tag}-x1")
        with torch.no_grad():
            r = self.policy.rollout(policy_velocity_fn(b, net, cond, w, uncond), x1, noises)
            images = b.decode(r.final).float()
            scores = {k: v.detach().float().reshape(-1).to(b.device) for k, v in reward_scores(self.rewards, images, prompts).items()}
        return GRPOBatch(prompts, gids, cond, uncond, r, images, scores, None)


# ---------------------------------------------------------------------------- the policy loss


def step_stats(policy: Policy, fn: VelocityFn, rollout: samplers.Rollout, steps: list[int]):
    """The policy recomputed at the stored transitions ``steps`` (gradient where the caller allows):
    ((B, len(steps)) log-probs, the step means, the step stds)."""
    sig = rollout.sigmas
    lps, means, stds = [], [], []
    for i in steps:
        x = rollout.states[i].detach()
        mean, std = policy.mean_std(x, fn(x, flow.batch_sigma(sig[i], x)), sig, i)
        lps.append(samplers.log_prob(rollout.states[i + 1].detach(), mean, std, policy.log_prob))
        means.append(mean)
        stds.append(std)
    return torch.stack(lps, dim=1), means, stds


def _rows(batch: GRPOBatch, drop_zero_advantage: bool):
    """(rollout, cond, uncond, advantages) of the rows trained: all, or those with a nonzero advantage
    when ``drop_zero_advantage`` (docs/paper.md s4) and some row has one."""
    adv, r = batch.advantages, batch.rollout
    if not drop_zero_advantage or not bool((adv != 0).any()) or bool((adv != 0).all()):
        return r, batch.cond, batch.uncond, adv
    idx = (adv != 0).nonzero().reshape(-1)
    r = samplers.Rollout(states=[x[idx] for x in r.states], means=[], stds=[], log_probs=r.log_probs[idx],
                         velocities=[], sigmas=r.sigmas, noises=[], stochastic_steps=r.stochastic_steps)
    uncond = index_cond(batch.uncond, idx) if batch.uncond is not None else None
    return r, index_cond(batch.cond, idx), uncond, adv[idx]


@dataclass
class PolicyLoss:
    """PPO-clip on the stored transitions of a GRPOBatch with its advantages (docs/paper.md s6.5;
    docs/paper.md s4), plus ``kl_weight`` * the Gaussian-mean KL to ``reference`` ((cond, uncond) -> velocity
    function, run without gradient). ``mean_over_dims`` divides both log-probs by the state size (the
    Flow-GRPO code's per-dimension log-density, which sets the policy term's scale against its KL);
    ``drop_zero_advantage`` skips rows whose advantage is 0 (docs/paper.md s4)."""

    backend: Backend
    policy: Policy
    clip_eps: float = 1e-4
    kl_weight: float = 0.0
    reference: Callable[[Cond, Cond | None], VelocityFn] | None = None
    mean_over_dims: bool = False
    drop_zero_advantage: bool = False

    def __call__(self, net, batch: GRPOBatch, steps: list[int]) -> tuple[torch.Tensor, dict]:
        terms, logs = self.terms(net, batch, steps)
        return self.total(terms), logs

    @staticmethod
    def total(terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss of ``terms``: the policy term plus, when present, the weighted KL."""
        return terms["policy"] + terms["kl"] if "kl" in terms else terms["policy"]

    def terms(self, net, batch: GRPOBatch, steps: list[int]) -> tuple[dict[str, torch.Tensor], dict]:
        """The loss by term: ``policy`` (PPO-clip) and, with a positive kl_weight, ``kl`` (weighted)."""
        missing = [i for i in steps if i not in batch.rollout.stochastic_steps]
        if missing:
            raise UserError(f"GRPO steps {missing} are deterministic in this rollout (no log-prob); train only "
                            f"stochastic steps {batch.rollout.stochastic_steps}.")
        r, cond, uncond, adv = _rows(batch, self.drop_zero_advantage)
        fn = policy_velocity_fn(self.backend, net, cond, self.policy.guidance, uncond)
        logp, means, stds = step_stats(self.policy, fn, r, steps)
        logp_old = r.log_probs[:, [r.stochastic_steps.index(i) for i in steps]].detach()
        if self.mean_over_dims:
            d = r.states[0][0].numel()
            logp, logp_old = logp / d, logp_old / d
        loss = objectives.ppo_clip_loss(logp, logp_old, adv, self.clip_eps)
        logs = {"grpo/policy_loss": float(loss.detach()), "grpo/rows": float(adv.shape[0]),
                **diagnostics.ratio_stats(torch.exp(logp.detach() - logp_old), self.clip_eps)}
        terms = {"policy": loss}
        if self.kl_weight > 0:
            kl = self._kl(r, cond, uncond, steps, means, stds)
            terms["kl"] = self.kl_weight * kl
            logs["grpo/kl"] = float(kl.detach())
        return terms, logs

    def _kl(self, r: samplers.Rollout, cond, uncond, steps: list[int], means, stds) -> torch.Tensor:
        if self.reference is None:
            raise UserError("a positive GRPO kl_weight needs a reference policy; pass one or set kl_weight to 0.")
        with torch.no_grad():
            _, ref_means, _ = step_stats(self.policy, self.reference(cond, uncond), r, steps)
        return torch.stack([objectives.gaussian_mean_kl(m, mr, sd) for m, mr, sd in zip(means, ref_means, stds)], dim=1).mean()
