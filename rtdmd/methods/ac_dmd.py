"""RTDMD stage 1, AC-DMD (docs/paper.md s3): ambient-consistent distribution matching, DM term only.

Registered as ``ac-dmd``; ``rtdmd`` (rtdmd.methods.rtdmd) runs it as its first stage. ``objective: dmd2``
is the plain-DMD2 ablation. Formulas live in rtdmd.flow / samplers / objectives; the loss blocks that
wire them to the networks in rtdmd.methods.blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from rtdmd import checkpoint as ckpt
from rtdmd import flow
from rtdmd.config import OptimConfig, RunConfig
from rtdmd.errors import UserError
from rtdmd.methods import blocks
from rtdmd.methods.base import Method, SamplerSpec, StepContext, Update
from rtdmd.registry import register_method

BACKENDS = ("shapes", "toy2d", "sd3", "flux2")


@dataclass
class AcDmdOptions:
    """Stage 1 (docs/paper.md s3). ``objective: dmd2`` is the plain-DMD2 ablation (docs/paper.md s6.1):
    backward simulation with eta 1, the DM loss always at s = 0, plain flow matching for the fake score."""

    objective: Literal["ac-dmd", "dmd2"] = "ac-dmd"
    guidance: float = 4.0  # teacher CFG (shapes teacher is sampled at CFG 4; SD3-M 7, SD3.5-M 4.5, FLUX.2 4)
    num_steps: int = 4  # the few-step generator (docs/paper.md s2)
    eta: float = 0.9  # CPS stochasticity of the generator's own steps and of the map back to s (docs/paper.md s2-s3)
    t_min: float = 0.02  # re-noising t clamped to [t_min, t_max] (docs/paper.md s3 step 4)
    t_max: float = 0.98
    normalize: bool = True  # DMD normalisation g / mean|x_s - x_s^R| (docs/paper.md s3 step 6)
    adsm_weight_clamp: float = 10.0  # ADSM weight min(1, 10 sigma_ts^2) (docs/paper.md s3, code)
    consistency_weight: float = 0.01  # gamma (docs/paper.md s3)
    consistency_max_delta: int = 200  # delta ~ U{1..200} timesteps (docs/paper.md s3)
    ttur: int = 10  # fake score every iteration, generator every ttur-th (docs/paper.md s3)
    #: the reference's order (docs/paper.md s4b): the fake score first, on a generator rollout of its own (own
    #: prompts, k and noise), then the generator; false: the generator first, the fake score then on its sample
    fake_first: bool = True
    generator_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-5))  # SD3/3.5 lr (docs/paper.md s3)
    fake_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-5))
    ema_decay: float = 0.999  # EMA generator for inference (docs/paper.md s3; the decay is our choice)
    #: a checkpoint whose inference weights initialise the generator and the fake score instead of the
    #: teacher's (toy2d with the exact teacher has no weights to copy: start from a flow-matching MLP)
    init: str = ""

    def validate(self):
        if self.num_steps < 1:
            raise UserError(f"method.num_steps must be at least 1 (got {self.num_steps}); the paper uses 4.")
        if not 0.0 <= self.eta <= 1.0:
            raise UserError(f"method.eta must be in [0, 1] (got {self.eta}); the paper uses 0.9.")
        if not 0.0 < self.t_min <= self.t_max < 1.0:
            raise UserError(f"method.t_min/t_max must satisfy 0 < t_min <= t_max < 1 (got {self.t_min}, {self.t_max}).")
        if self.ttur < 1:
            raise UserError(f"method.ttur must be a positive integer (got {self.ttur}); the paper uses 10.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"method.ema_decay must be in [0, 1) (got {self.ema_decay}).")



class AcDmdMethod(Method):
    """Stage 1: the generator learns the teacher with the DM term only (docs/paper.md s3)."""

    inference_network = "generator"

    def __init__(self, cfg: RunConfig, backend, options: AcDmdOptions | None = None):
        super().__init__(cfg, backend)
        o = self.options = options if options is not None else cfg.method
        self.networks["generator"] = backend.make_trainable("generator")
        self.networks["fake_score"] = backend.make_trainable("fake_score")
        if o.init:
            state = ckpt.load_model_state(ckpt.find_checkpoint(o.init))
            for net in self.networks.values():
                try:
                    backend.load_network_state(net, state)
                except (RuntimeError, KeyError) as exc:
                    raise UserError(f"method.init {o.init} does not fit this backend's networks "
                                    f"({str(exc).splitlines()[0][:100]}); pass a checkpoint of the same architecture.") from None
        gen = Update("generator", every=o.ttur, optim=o.generator_optim, ema_decay=o.ema_decay)
        fake = Update("fake_score", every=1, optim=o.fake_optim)
        # fake_first: the reference's order (docs/paper.md s4b); else DMD2's: the generator, then the fake
        # score on the same (detached) sample
        self.updates = [fake, gen] if o.fake_first else [gen, fake]
        n, dmd2 = cfg.train.batch_size, o.objective == "dmd2"
        # DMD2's backward simulation re-noises with fresh noise (eta 1); its DM term and plain flow-matching
        # fake score draw t uniformly (docs/paper.md s6); AC-DMD draws t in the sub-interval above s (docs/paper.md s3)
        self.sample = blocks.GeneratorSample(backend, n, 1.0 if dmd2 else o.eta, tag="s1-gen")
        # the fake score's own rollout (fake_first): draws of its own, apart from the generator's
        self.fake_sample = blocks.GeneratorSample(backend, n, 1.0 if dmd2 else o.eta, tag="s1-fake-gen")
        self.dm = blocks.DMLoss(backend, n, o.guidance, o.eta, o.normalize, blocks.NoiseLevels(dmd2, o.t_min, o.t_max),
                                tag="s1-dm")
        if dmd2:
            self.fake = blocks.FakeScoreLoss(backend, n, blocks.NoiseLevels(True, 0.0, 1.0), tag="s1-fake")
        else:
            self.fake = blocks.FakeScoreLoss(backend, n, blocks.NoiseLevels(), o.adsm_weight_clamp,
                                             blocks.Consistency(o.consistency_weight, o.consistency_max_delta, o.eta),
                                             tag="s1-fake")
        self._k = self._fake_k = o.num_steps
        self._cache: tuple | None = None

    @property
    def dmd2(self) -> bool:
        return self.options.objective == "dmd2"

    def before_step(self, ctx: StepContext) -> None:
        o = self.options
        # the stop index k ~ U{1..num_steps}, shared by every process (docs/paper.md s3 step 1)
        self._k = int(torch.randint(1, o.num_steps + 1, (1,), generator=ctx.generator))
        if o.fake_first:  # the fake score's rollout stops at a k of its own
            self._fake_k = int(torch.randint(1, o.num_steps + 1, (1,), generator=ctx.generator))
        self._cache = None

    def _prompts(self, ctx: StepContext, tag: str = "s1-prompts") -> blocks.Prompts:
        return blocks.draw_prompts(self.backend, self.cfg.train.batch_size, ctx, self.options.guidance, tag=tag)

    def _sample(self, p: blocks.Prompts, ctx: StepContext, grad: bool, fake: bool = False) -> tuple[torch.Tensor, float]:
        """The generator's training sample and its noise level s (docs/paper.md s3 steps 1-3); ``fake``: the fake
        score's own rollout (its own k and noise)."""
        gen, k = self.networks["generator"], self._fake_k if fake else self._k
        sample = self.fake_sample if fake else self.sample
        if not self.dmd2:
            return sample(gen, p, ctx, k, grad=grad)
        # DMD2 backward simulation (docs/paper.md s6): k-1 steps that re-noise with fresh noise (eta = 1)
        # without gradient, then the x0 prediction at the k-th state, so s = 0 always.
        x, s = sample(gen, p, ctx, k - 1, grad=False)
        with torch.set_grad_enabled(grad):
            v = self.backend.velocity(gen, x.detach(), flow.batch_sigma(s, x), p.cond)
        return flow.x0_from_v(x.detach(), v, s), 0.0

    def loss(self, network: str, ctx: StepContext):
        if network == "fake_score" and self.options.fake_first:
            # the reference's order (docs/paper.md s4b): a fresh generator rollout of the fake score's own
            p = self._prompts(ctx, tag="s1-fake-prompts")
            with torch.no_grad():
                x_s, s = self._sample(p, ctx, grad=False, fake=True)
            return self.fake(self.networks["fake_score"], x_s, s, p, ctx)
        p = self._prompts(ctx) if self._cache is None else self._cache[2]
        if network == "generator":
            x_s, s = self._sample(p, ctx, grad=True)
            self._cache = (x_s.detach(), s, p)
            loss, logs = self.dm(self.networks["fake_score"], x_s, s, p, ctx)
            return loss, {**logs, "dm/s": s, "dm/k": float(self._k)}
        # fake score on the (detached) sample of this step: ambient DSM + consistency (docs/paper.md s3), or
        # DMD2's plain flow matching on x0 with t ~ U(0, 1) (docs/paper.md s6)
        if self._cache is None:
            with torch.no_grad():
                x_s, s = self._sample(p, ctx, grad=False)
        else:
            x_s, s = self._cache[0], self._cache[1]
        return self.fake(self.networks["fake_score"], x_s, s, p, ctx)

    def step_logs(self, ctx: StepContext, logs: dict[str, float]) -> dict[str, float]:
        """On a generator step, its gradient norm (the DM term's: the generator's only loss, before clipping)
        under the step's stop index k: ``diag/grad_norm/dm_k<k>`` (logged means are per k)."""
        if "grad_norm/generator" not in logs:
            return {}
        return {f"diag/grad_norm/dm_k{self._k}": logs["grad_norm/generator"]}

    def sampler(self) -> SamplerSpec:
        # inference re-noises as in training: CPS eta 0.9 (docs/paper.md s2); DMD2's backward simulation is eta 1
        return SamplerSpec(kind="cps", steps=self.options.num_steps, eta=1.0 if self.dmd2 else self.options.eta)


@register_method("ac-dmd", AcDmdOptions, backends=BACKENDS, default_backend="shapes",
                 help="RTDMD stage 1: ambient-consistent distribution matching distillation (4-step generator)")
def make_ac_dmd(cfg: RunConfig, backend) -> AcDmdMethod:
    return AcDmdMethod(cfg, backend)
