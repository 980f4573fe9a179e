"""Hyper-SD style (Ren et al. 2024; docs/paper.md s6.3): TSCD, then human feedback, then score distillation.

The training code is not public; this is a reimplementation from the paper's description,
run as ONE training command whose stage depends only on the step (so resume works across
stage boundaries, and the stage is logged to MLflow as ``stage/index`` and ``stage/segments``):

1. TSCD: phased consistency distillation (baselines/lcm.py, MSE loss) inside k segments,
   k = 8 -> 4 -> 2 -> 1, ``segment_steps[i]`` steps each, each stage continuing from the
   previous one (the teacher solver stays the original teacher; the adversarial term of the
   paper is not implemented).
2. ReFL: from a late state of the generator's own Euler trajectory (blocks.LateState), one
   gradient-carrying step to x0_hat, decode, and L = sum_d relu(margin_d - r_d) over a
   preference and an aesthetic reward (blocks.RewardHinge), for ``refl_steps`` steps.
3. Unified: the last segment count's consistency loss plus the DMD generator loss on the same
   student x0 predictions (blocks.DMLoss at s = 0, DMD2's form) with a trainable fake
   score (blocks.FakeScoreLoss, plain flow matching), until train.max_steps.

The fake score is trained in the unified stage and, with ``fake_warmup``, already in the earlier
one-segment stages; in the other steps its loss is a constant with no path to its weights, so
the optimiser leaves it untouched (no gradient, no weight decay).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from baselines.lcm import (ConsistencyMethod, ConsistencyOptions, PhasedConsistencyLoss, PhaseSchedule, phased_sampler,
                           unwrap)
from rtdmd import flow
from rtdmd.backends.base import Backend
from rtdmd.config import OptimConfig, RunConfig
from rtdmd.errors import UserError
from rtdmd.methods import blocks
from rtdmd.methods.base import SamplerSpec, StepContext, Update
from rtdmd.registry import register_method


@dataclass
class HyperSDOptions(ConsistencyOptions):
    segments: list[int] = field(default_factory=lambda: [8, 4, 2, 1])  # TSCD k per stage (docs/paper.md s6.3 part 1)
    segment_steps: list[int] = field(default_factory=lambda: [300, 300, 300, 300])  # steps of each TSCD stage
    consistency_loss: Literal["mse", "pseudo_huber"] = "mse"  # Hyper-SD: MSE (huber_c applies to pseudo_huber only)
    # --- human feedback (docs/paper.md s6.3 part 2, ReFL)
    refl_steps: int = 200  # length of the ReFL stage (0: skip it)
    #: differentiable reward name -> hinge margin (rtdmd.rewards.registry names, or rewards added with
    #: register_reward, e.g. a Python f(x, prompts) -> (B,) on toy2d)
    refl_margins: dict[str, float] = field(default_factory=lambda: {"shapes_pref": 1.0, "shapes_aes": 1.0})
    refl_weight: float = 1.0e-3  # ReFL loss scale (docs/paper.md s6.4)
    refl_total_steps: int = 8  # late_state: Euler schedule of the generator ...
    refl_stop_range: list[int] = field(default_factory=lambda: [6, 7])  # ... stopped after m ~ U{lo..hi} steps
    refl_consistency_weight: float = 0.0  # add the consistency loss in the ReFL stage (0: pure ReFL)
    # --- unified stage (docs/paper.md s6.3 part 3)
    dmd_weight: float = 1.0  # DMD generator loss added to the consistency loss (weight not published)
    #: DMD2's per-sample gradient normaliser mean|x - x_real| (docs/paper.md s6.1); false: the raw difference
    dmd_normalize: bool = True
    unified_refl_weight: float = 0.0  # keep the ReFL term (times refl_weight) in the unified stage
    #: also train the fake score in the earlier one-segment stages (TSCD k = 1; ReFL with consistency), on the
    #: x0 predictions of the one-segment model, so it already tracks the generator when the DMD term starts
    fake_warmup: bool = True
    fake_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4))
    # --- sampling of the final (1-segment) model
    sample_steps: int = 4
    eta: float = 1.0  # CPS re-noising when sampling the consistency model: 1 = LCM's multistep sampler

    def validate(self):
        super().validate()
        if not self.segments or any(k < 1 for k in self.segments):
            raise UserError("method.segments must be a non-empty list of positive segment counts, e.g. [8, 4, 2, 1].")
        if len(self.segment_steps) != len(self.segments) or any(n < 0 for n in self.segment_steps):
            raise UserError(f"method.segment_steps needs one non-negative step count per entry of method.segments "
                            f"({len(self.segments)}); fix the list.")
        if self.refl_steps < 0:
            raise UserError("method.refl_steps must be >= 0 (0 skips the ReFL stage).")
        if self.uses_refl():
            if not self.refl_margins:
                raise UserError("method.refl_margins names no reward but the ReFL term is on; add {reward: margin} "
                                "or set method.refl_steps=0.")
            lo_hi = self.refl_stop_range
            if len(lo_hi) != 2 or not 0 <= lo_hi[0] <= lo_hi[1] < self.refl_total_steps:
                raise UserError("method.refl_stop_range must be [lo, hi] with 0 <= lo <= hi < method.refl_total_steps.")
        if not 0.0 <= self.eta <= 1.0:
            raise UserError(f"method.eta must be in [0, 1] (got {self.eta}); LCM's multistep sampler uses 1.")

    def uses_refl(self) -> bool:
        return self.refl_steps > 0 or self.unified_refl_weight > 0


# ---------------------------------------------------------------------------- the stage schedule


@dataclass(frozen=True)
class Stage:
    index: int
    name: str  # "tscd8", ..., "refl", "unified"
    kind: str  # "tscd", "refl" or "unified"
    segments: int  # consistency segments of this stage (ReFL / unified: the last TSCD count)
    start: int  # first step (0-based) of the stage


def stage_plan(segments: list[int], segment_steps: list[int], refl_steps: int) -> list[Stage]:
    """TSCD stages (one per segment count), then ReFL (if refl_steps > 0), then the unified stage (open-ended)."""
    plan, start = [], 0
    for k, n in zip(segments, segment_steps):
        if n > 0:
            plan.append(Stage(len(plan), f"tscd{k}", "tscd", int(k), start))
            start += int(n)
    if refl_steps > 0:
        plan.append(Stage(len(plan), "refl", "refl", int(segments[-1]), start))
        start += int(refl_steps)
    plan.append(Stage(len(plan), "unified", "unified", int(segments[-1]), start))
    return plan


def stage_at(plan: list[Stage], step: int) -> Stage:
    """The stage that 0-based ``step`` belongs to."""
    current = plan[0]
    for st in plan:
        if st.start <= step:
            current = st
    return current


# ---------------------------------------------------------------------------- the method


class HyperSDMethod(ConsistencyMethod):
    def __init__(self, cfg: RunConfig, backend: Backend):
        super().__init__(cfg, backend)
        o = self.options
        self.plan = stage_plan(o.segments, o.segment_steps, o.refl_steps)
        self.networks["generator"] = backend.make_trainable("generator")
        self.updates = [Update("generator", every=1, optim=o.optim, ema_decay=o.ema_decay)]
        if o.dmd_weight > 0:
            self.networks["fake_score"] = backend.make_trainable("fake_score")
            self.updates.append(Update("fake_score", every=1, optim=o.fake_optim))
        self.consistency = {k: PhasedConsistencyLoss(backend, PhaseSchedule(backend, k, o.solver_steps), cfg.train.batch_size,
                                                     o.guidance, o.guidance_range, o.consistency_loss, o.huber_c)
                            for k in sorted(set(o.segments))}
        self._init_target_and_data()
        rewards = blocks.load_rewards(list(o.refl_margins), backend, differentiable=True) if o.uses_refl() else {}
        n = cfg.train.batch_size
        self.refl = blocks.RewardHinge(rewards, o.refl_margins, o.refl_weight)
        self.late_state = blocks.LateState(backend, n, o.refl_total_steps, tuple(o.refl_stop_range), o.inference_guidance)
        # unified stage: DMD2's form, t ~ U[0.02, 0.98] at s = 0, x0 re-noised with fresh noise (eta 1);
        # the fake score is plain flow matching, t ~ U(0, 1)
        self.dm = blocks.DMLoss(backend, n, o.guidance, 1.0, o.dmd_normalize, blocks.NoiseLevels(uniform=True), tag="dmd")
        self.fake = blocks.FakeScoreLoss(backend, n, blocks.NoiseLevels(True, 0.0, 1.0), tag="fake")
        self._step = 0
        self._fake_input: tuple[int, torch.Tensor, blocks.Prompts] | None = None

    # -- stages ------------------------------------------------------------------
    def stage(self, step: int | None = None) -> Stage:
        return stage_at(self.plan, self._step if step is None else step)

    def before_step(self, ctx: StepContext) -> None:
        self._step = ctx.step
        super().before_step(ctx)

    # -- losses ------------------------------------------------------------------
    def _consistency(self, ctx: StepContext, segments: int):
        gen = self.networks["generator"]
        x0, p = self.data.get(ctx, gen, self._data_sampler())
        return self.consistency[segments](gen, self.target_net(), x0, p, ctx), p

    def _refl(self, ctx: StepContext) -> tuple[torch.Tensor, dict]:
        """ReFL on the generator: a late state without gradient, one gradient step to x0_hat, decoded, rewarded."""
        o, b, n = self.options, self.backend, self.cfg.train.batch_size
        gen = self.networks["generator"]
        p = blocks.draw_prompts(b, n, ctx, guidance=o.inference_guidance, tag="refl-prompts")
        x_s, s = self.late_state(unwrap(gen), p, ctx)
        v = flow.guided_velocity(lambda a, ss, c: b.velocity(gen, a, ss, c), x_s, flow.batch_sigma(s, x_s), p.cond,
                                 o.inference_guidance, p.uncond)
        images = b.decode(flow.x0_from_v(x_s, v, s))
        loss, logs = self.refl(images, p.prompts)
        logs["refl/loss"] = float(loss.detach())
        logs["refl/sigma"] = s
        return loss, logs

    def loss(self, network: str, ctx: StepContext):
        st = self.stage(ctx.step)
        logs = {"stage/index": float(st.index), "stage/segments": float(st.segments)}
        if network == "fake_score":
            return self._fake_loss(ctx, st, logs)
        o = self.options
        if st.kind == "tscd":
            out, p = self._consistency(ctx, st.segments)
            logs.update(out.logs)
            self._feed_fake(ctx, st, out, p)
            return out.loss, logs
        if st.kind == "refl":
            loss, extra = self._refl(ctx)
            logs.update(extra)
            if o.refl_consistency_weight > 0:
                out, p = self._consistency(ctx, st.segments)
                logs.update(out.logs)
                self._feed_fake(ctx, st, out, p)
                loss = loss + o.refl_consistency_weight * out.loss
            return loss, logs
        # unified: consistency + DMD on the same student x0 predictions (+ optional ReFL)
        out, p = self._consistency(ctx, st.segments)
        logs.update(out.logs)
        loss = out.loss
        if o.dmd_weight > 0:
            x0_hat = flow.x0_from_v(out.x_s, out.v, out.s)
            dm, extra = self.dm(self.networks["fake_score"], x0_hat, 0.0, p, ctx)
            logs.update(extra)
            logs["dmd/loss"] = float(dm.detach())
            loss = loss + o.dmd_weight * dm
            self._fake_input = (ctx.step, x0_hat.detach(), p)
        if o.unified_refl_weight > 0:
            r, extra = self._refl(ctx)
            logs.update(extra)
            loss = loss + o.unified_refl_weight * r
        return loss, logs

    def _feed_fake(self, ctx: StepContext, st: Stage, out, p: blocks.Prompts) -> None:
        """Warm-up: hand a one-segment model's x0 predictions to this step's fake-score update."""
        if self.options.dmd_weight > 0 and self.options.fake_warmup and st.segments == 1:
            self._fake_input = (ctx.step, flow.x0_from_v(out.x_s, out.v, out.s).detach(), p)

    def _fake_loss(self, ctx: StepContext, st: Stage, logs: dict):
        if self._fake_input is None or self._fake_input[0] != ctx.step:
            if st.kind == "unified":
                raise RuntimeError("the fake score update ran before the generator's loss of this step")
            # no path to the fake score's weights: the optimiser skips it (no update, no weight decay)
            return torch.zeros((), device=self.backend.device, requires_grad=True), logs
        _, x0_hat, p = self._fake_input
        loss, extra = self.fake(self.networks["fake_score"], x0_hat, 0.0, p, ctx)
        logs.update(extra)
        return loss, logs

    # -- sampling and state --------------------------------------------------------
    def _data_sampler(self) -> SamplerSpec:
        return self.sampler()

    def sampler(self) -> SamplerSpec:
        """During a TSCD stage with k > 1 segments: the k edges, deterministically; otherwise the consistency
        model's ``sample_steps`` with re-noising ``eta`` (checkpoints record the stage's sampler)."""
        o, st = self.options, self.stage()
        k = st.segments if st.kind == "tscd" else o.segments[-1]
        return phased_sampler(k, o.sample_steps, o.inference_guidance, o.eta)


@register_method("hypersd", HyperSDOptions, backends=("shapes", "toy2d", "sd3", "flux2"), default_backend="shapes",
                 help="Hyper-SD style: TSCD 8->4->2->1, ReFL on rewards, then consistency + DMD (one command)")
def make_hypersd(cfg: RunConfig, backend: Backend) -> HyperSDMethod:
    return HyperSDMethod(cfg, backend)
