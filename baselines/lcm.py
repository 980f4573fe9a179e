"""LCM as phased consistency distillation in flow-matching form (docs/paper.md s6.2, "Flow-matching port").

One iteration: a point x_s = (1 - s) x0 + s eps with s on the teacher's solver grid, the
student's jump to the lower edge e of s's phase, x_e = x_s + (e - s) v_theta(x_s), and the
target x_e' = x_prev + (e - s_prev) v_target(x_prev), where x_prev is one Euler step of the
CFG teacher from s to the next grid sigma s_prev; loss pseudo-Huber(x_e - x_e') (c = 0.001).

Phase edges are the backend's few-step generator sigmas for ``phases`` steps
(backend.generator_sigmas(phases); shapes / SD3 with 4 phases: [1, .9, .75, .5, 0], which is
objectives.phase_edges(4, shift=3)), so the 4-phase model is sampled by the checkpoint's
SamplerSpec(kind="cps", steps=4, eta=0): CPS with eta 0 from s to the next edge is exactly
x_s + (e - s) v, the student's own jump. A 1-phase model (a plain consistency model) is
sampled LCM-style: 4 steps, each predicting x0 and re-noising with fresh noise (eta = 1).

The phased machinery (data, the consistency loss, the EMA target) is shared with Hyper-SD
(baselines/hypersd.py). Only the flow port is implemented; the original LCM boundary
parameterisation (objectives.lcm_boundary_coefficients) is not used.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from rtdmd import flow, objectives
from rtdmd.backends.base import Backend
from rtdmd.config import OptimConfig, RunConfig
from rtdmd.data import StepPrefetcher
from rtdmd.ema import ema_update
from rtdmd.errors import UserError
from rtdmd.methods import blocks
from rtdmd.methods.base import Method, SamplerSpec, StepContext, Update
from rtdmd.registry import register_method
from rtdmd.seeding import step_seed, torch_generator


# ---------------------------------------------------------------------------- options


@dataclass
class ConsistencyOptions:
    """Options of the phased consistency distillation shared by LCM and Hyper-SD."""

    solver_steps: int = 100  # N teacher Euler sigmas (backend.sampling_sigmas(N)); the phase edges are added to them
    #: teacher CFG weight w of the solver step; fixed unless guidance_range is set
    guidance: float = 4.0
    #: [lo, hi]: draw w ~ U[lo, hi] per sample instead (LCM's w-range); the students take no w input,
    #: so they then learn the consistency map of the w-averaged teacher
    guidance_range: list[float] = field(default_factory=list)
    huber_c: float = 0.001  # pseudo-Huber c (docs/paper.md s6.2)
    #: consistency target network: an EMA of the student (LCM: decay 0.95) or the online student itself
    target: Literal["ema", "online"] = "ema"
    target_ema_decay: float = 0.95
    #: where x0 comes from: the backend's real (x0, prompt) pairs (LCM's recipe; shapes, toy2d), or the
    #: generator's own 4-step samples (prompt-only backends: sd3, flux2)
    data: Literal["backend", "generator"] = "backend"
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4))
    #: EMA of the generator kept by the trainer and written to checkpoints for sampling (null: the online weights)
    ema_decay: float | None = 0.95
    inference_guidance: float = 1.0  # CFG when sampling the student (1: the teacher's CFG is distilled in)
    prefetch: int = 2  # data batches rendered ahead in a thread (data=backend)

    def validate(self):
        if self.solver_steps < 1:
            raise UserError("method.solver_steps must be at least 1; LCM's flow port uses 100.")
        if self.guidance_range and (len(self.guidance_range) != 2 or self.guidance_range[0] > self.guidance_range[1]):
            raise UserError("method.guidance_range must be [lo, hi] with lo <= hi, or [] for the fixed method.guidance.")
        if self.huber_c <= 0:
            raise UserError("method.huber_c must be positive; LCM uses 0.001.")
        if not 0.0 <= self.target_ema_decay < 1.0:
            raise UserError("method.target_ema_decay must be in [0, 1); LCM uses 0.95.")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise UserError("method.ema_decay must be in [0, 1) or null.")


@dataclass
class LCMOptions(ConsistencyOptions):
    phases: int = 4  # 1, 2 or 4 segments (docs/paper.md s6.2); 4 -> 4-step sampling at the edges
    sample_steps: int = 4  # steps of the LCM-style re-noising sampler of a 1-phase model

    def validate(self):
        super().validate()
        if self.phases < 1:
            raise UserError(f"method.phases must be at least 1 (got {self.phases}); use 1, 2 or 4.")
        if self.sample_steps < 1:
            raise UserError("method.sample_steps must be at least 1.")


# ---------------------------------------------------------------------------- shared machinery


def unwrap(net: nn.Module) -> nn.Module:
    """The module inside a DDP / accelerate wrapper."""
    while isinstance(getattr(net, "module", None), nn.Module):
        net = net.module
    return net


def phased_sampler(phases: int, sample_steps: int, guidance: float, renoise_eta: float = 1.0) -> SamplerSpec:
    """Deterministic CPS (eta 0) over the ``phases`` edges for a phased model; for one phase (a consistency
    model) ``sample_steps`` steps predicting x0 and re-noising with ``renoise_eta`` (1: LCM's multistep sampler)."""
    if phases > 1:
        return SamplerSpec(kind="cps", steps=phases, guidance=guidance, eta=0.0)
    return SamplerSpec(kind="cps", steps=sample_steps, guidance=guidance, eta=renoise_eta)


class PhaseSchedule:
    """Phase edges (the backend's generator sigmas for ``phases`` steps) and the solver grid with the edges on it."""

    def __init__(self, backend: Backend, phases: int, solver_steps: int):
        self.phases = int(phases)
        self.edges = backend.generator_sigmas(self.phases).detach().double().cpu()
        self.grid = objectives.phased_solver_grid(backend.sampling_sigmas(solver_steps).detach().cpu(), self.edges)

    def draw(self, n_global: int, ctx: StepContext, tag: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(s, s_prev, e) float64 for this process's rows: s uniform over the grid's non-final points
        (LCM draws the solver index uniformly), s_prev the next grid sigma, e the phase's lower edge."""
        idx = torch.randint(0, len(self.grid) - 1, (n_global,), generator=torch_generator(ctx.seed, f"{tag}-idx"))
        idx = idx[ctx.shard(n_global)]
        s = self.grid[idx]
        return s, self.grid[idx + 1], objectives.phase_lower_edge(s, self.edges)


@dataclass
class ConsistencyOut:
    loss: torch.Tensor
    x_s: torch.Tensor  # the training points
    s: torch.Tensor  # their sigmas (B,), float32
    v: torch.Tensor  # the student's velocity at (x_s, s), with gradient
    logs: dict


def teacher_solver_velocity(backend: Backend, x: torch.Tensor, s: torch.Tensor, p: blocks.Prompts,
                            guidance: float, w: torch.Tensor | None) -> torch.Tensor:
    """CFG teacher velocity: one batched call at a fixed w, or per-row w (two calls combined by flow.cfg)."""
    if w is None:
        return backend.teacher_velocity(x, s, p.cond, guidance, p.uncond)
    v_u = backend.teacher_velocity(x, s, p.uncond, 1.0)
    v_c = backend.teacher_velocity(x, s, p.cond, 1.0)
    return flow.cfg(v_u, v_c, flow.expand_sigma(w, x))


@dataclass
class PhasedConsistencyLoss:
    """The phased consistency distillation loss of one batch (docs/paper.md s6.2 flow port): the student's
    jump from x_s to its phase's lower edge against the target network's jump from one CFG teacher solver
    step further (``guidance``, or per-row w ~ U[guidance_range]), by pseudo-Huber (``huber_c``) or MSE."""

    backend: Backend
    schedule: PhaseSchedule
    n_global: int
    guidance: float
    guidance_range: list[float] | None = None
    loss: str = "pseudo_huber"
    huber_c: float = 0.001

    def __call__(self, student: nn.Module, target: nn.Module, x0: torch.Tensor, p: blocks.Prompts,
                 ctx: StepContext) -> ConsistencyOut:
        n, tag = self.n_global, "cd"
        s64, s_prev64, e64 = self.schedule.draw(n, ctx, tag)
        dev, dt = x0.device, x0.dtype
        s, s_prev, e = (t.to(device=dev, dtype=dt) for t in (s64, s_prev64, e64))
        eps = blocks.global_randn(self.backend, n, ctx, f"{tag}-eps").to(dtype=dt)
        x_s = flow.add_noise(x0, eps, s)
        w = None
        if self.guidance_range:
            lo, hi = self.guidance_range
            u = torch.rand(n, generator=torch_generator(ctx.seed, f"{tag}-w"))[ctx.shard(n)]
            w = (lo + (hi - lo) * u).to(device=dev, dtype=dt)
        with torch.no_grad():
            v_teacher = teacher_solver_velocity(self.backend, x_s, s, p, self.guidance, w)
            x_prev = objectives.euler_jump(x_s, v_teacher, s, s_prev)  # one teacher solver step
            v_target = self.backend.velocity(target, x_prev, s_prev, p.cond)
            x_e_target = objectives.euler_jump(x_prev, v_target, s_prev, e)
        v = self.backend.velocity(student, x_s, s, p.cond)
        x_e = objectives.euler_jump(x_s, v, s, e)  # boundary by construction: e = s gives x_s
        value = self._distance(x_e, x_e_target)
        logs = {"cd/loss": float(value.detach()), "cd/mean_abs_diff": float((x_e - x_e_target).detach().abs().mean())}
        return ConsistencyOut(value, x_s, s, v, logs)

    def _distance(self, x_e: torch.Tensor, x_e_target: torch.Tensor) -> torch.Tensor:
        if self.loss == "pseudo_huber":
            return objectives.pseudo_huber(x_e - x_e_target, self.huber_c)
        if self.loss == "mse":
            return objectives.weighted_mse(x_e, x_e_target)
        raise UserError(f"unknown consistency loss {self.loss!r}; use 'pseudo_huber' or 'mse'.")


class ConsistencyData:
    """Per-step (x0, prompts) of the global batch, this process's rows.

    source "backend": the backend's real pairs, rendered ahead in a thread (data of step i depends only on
    (seed, i)); source "generator": prompts from the backend and x0 from the generator's own default sampler
    without gradient (for prompt-only backends).
    """

    def __init__(self, backend: Backend, source: str, n_global: int, seed: int, guidance_needed: bool, prefetch: int):
        self.backend, self.source, self.n, self.cfg_needed = backend, source, n_global, guidance_needed
        self.prefetcher = None
        if source == "backend":
            try:
                backend.sample_data(1, torch_generator(seed, "probe"))
            except NotImplementedError:
                raise UserError(f"backend '{backend.name}' has no training images for method.data=backend; "
                                "set method.data=generator to take consistency points from the generator's own samples.") from None
            self.prefetcher = StepPrefetcher(
                lambda i: backend.sample_data(n_global, torch_generator(step_seed(seed, i), "cd-data")), depth=prefetch)

    def get(self, ctx: StepContext, generator_net: nn.Module, sampler: SamplerSpec) -> tuple[torch.Tensor, blocks.Prompts]:
        b = self.backend
        if self.source == "backend":
            data = self.prefetcher.get(ctx.step)
            sl = ctx.shard(self.n)
            prompts = list(data.prompts[sl])
            p = blocks.Prompts(prompts, b.encode_prompts(prompts), b.uncond(len(prompts)) if self.cfg_needed else None)
            return data.x0[sl].to(b.device), p
        p = blocks.draw_prompts(b, self.n, ctx, tag="cd-prompts")
        if self.cfg_needed:
            p.uncond = b.uncond(len(p.prompts))
        sample = blocks.GeneratorSample(b, self.n, sampler.eta, tag="cd-gen")
        x0, _ = sample(unwrap(generator_net), p, ctx, len(b.generator_sigmas()) - 1, grad=False)
        return x0.detach(), p

    def close(self):
        if self.prefetcher is not None:
            self.prefetcher.close()


class EMATarget:
    """The consistency target network: an EMA copy of the student (LCM: decay 0.95) kept by the method.

    A deep copy of the student (for a LoRA handle: another adapter on the shared base), frozen, and
    updated with the trainer's EMA rule after each optimiser step of the student.
    """

    def __init__(self, backend: Backend, student: nn.Module, decay: float):
        self.backend, self.decay = backend, float(decay)
        self.net = copy.deepcopy(unwrap(student)).requires_grad_(False).eval()

    def update(self, student: nn.Module) -> None:
        ema_update(self.net, unwrap(student), self.decay)

    def state_dict(self) -> dict:
        return {k: v.detach().cpu().clone() for k, v in self.backend.network_state(self.net).items()}

    def load_state_dict(self, state: dict) -> None:
        self.backend.load_network_state(self.net, state)


# ---------------------------------------------------------------------------- the method


class ConsistencyMethod(Method):
    """A generator distilled by consistency (LCM, Hyper-SD): its target network and its data stream."""

    inference_network = "generator"

    def _init_target_and_data(self) -> None:
        """Build ``target`` (EMA copy, or None: the student itself) and ``data``; needs ``networks["generator"]``."""
        o, cfg, backend = self.options, self.cfg, self.backend
        self.target = EMATarget(backend, self.networks["generator"], o.target_ema_decay) if o.target == "ema" else None
        cfg_needed = o.guidance != 1.0 or bool(o.guidance_range)
        self.data = ConsistencyData(backend, o.data, cfg.train.batch_size, cfg.train.seed, cfg_needed, o.prefetch)

    def before_step(self, ctx: StepContext) -> None:
        # the target follows the student after each optimiser step (the previous step's update)
        if self.target is not None:
            self.target.update(self.networks["generator"])

    def target_net(self) -> nn.Module:
        return self.target.net if self.target is not None else unwrap(self.networks["generator"])

    def state_dict(self):
        return {"target": self.target.state_dict()} if self.target is not None else {}

    def load_state_dict(self, state):
        if self.target is not None and "target" in state:
            self.target.load_state_dict(state["target"])

    def close(self):
        self.data.close()


class LCMMethod(ConsistencyMethod):
    def __init__(self, cfg: RunConfig, backend: Backend):
        super().__init__(cfg, backend)
        o = self.options
        self.networks["generator"] = backend.make_trainable("generator")
        self.updates = [Update("generator", every=1, optim=o.optim, ema_decay=o.ema_decay)]
        self.consistency = PhasedConsistencyLoss(backend, PhaseSchedule(backend, o.phases, o.solver_steps),
                                                 cfg.train.batch_size, o.guidance, o.guidance_range, "pseudo_huber", o.huber_c)
        self._init_target_and_data()

    def loss(self, network: str, ctx: StepContext):
        gen = self.networks["generator"]
        x0, p = self.data.get(ctx, gen, self.sampler())
        out = self.consistency(gen, self.target_net(), x0, p, ctx)
        return out.loss, out.logs

    def sampler(self) -> SamplerSpec:
        o = self.options
        return phased_sampler(o.phases, o.sample_steps, o.inference_guidance)


@register_method("lcm", LCMOptions, backends=("shapes", "toy2d", "sd3", "flux2"), default_backend="shapes",
                 help="LCM: phased consistency distillation in flow-matching form (pseudo-Huber, EMA target)")
def make_lcm(cfg: RunConfig, backend: Backend) -> LCMMethod:
    return LCMMethod(cfg, backend)
