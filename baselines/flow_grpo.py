"""Flow-GRPO (Liu et al. 2025): group-relative policy optimisation of a flow model's sampler.

docs/paper.md s6.5: the ODE sampler becomes a marginal-preserving SDE (rtdmd.samplers,
kernel "sde") whose steps are Gaussian policies; every prompt is sampled K times, rewards are
turned into group advantages, and the policy takes a PPO-clip step plus a KL to the frozen
reference policy. The policy is the teacher (N SDE steps with CFG) or, with ``init``, a
distilled few-step generator sampled with CPS (docs/paper.md s2; its last step, to sigma 0, is
deterministic and gets no policy gradient). The rollout runs once per iteration in
``before_step`` (no gradient); ``loss`` recomputes the new log-probs with gradient
(rtdmd.methods.grpo.GroupRollout / PolicyLoss, shared with RTDMD).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from rtdmd import checkpoint as ckpt
from rtdmd import diagnostics
from rtdmd.config import OptimConfig, RunConfig
from rtdmd.errors import UserError
from rtdmd.methods import blocks, grpo
from rtdmd.methods.base import Method, SamplerSpec, StepContext, Update
from rtdmd.registry import register_method


@dataclass
class FlowGRPOOptions:
    #: checkpoint of a trained network to start from ("" = the teacher); a few-step generator is sampled with CPS
    init: str = ""
    #: "auto": CPS for a few-step (cps) checkpoint, the Flow-GRPO SDE otherwise
    kernel: Literal["auto", "sde", "cps"] = "auto"
    sampling_steps: int = 10  # SDE steps in training (docs/paper.md s6.5: 10); a CPS policy uses its own 4 steps
    eval_steps: int = 40  # ODE steps written into the checkpoint's sampler (docs/paper.md s6.5: 40 at evaluation)
    guidance: float = 4.5  # CFG of the SDE policy (Flow-GRPO on SD3.5-M: 4.5); a CPS policy samples as its checkpoint says
    sde_a: float = 0.7  # sigma_t = a sqrt(t / (1 - t)) (docs/paper.md s6.5)
    eta: float = 0.9  # CPS stochasticity of a few-step policy (docs/paper.md s2)
    group_size: int = 24  # K samples per prompt (docs/paper.md s6.5: 24); train.batch_size = groups x K
    #: stochastic steps trained per iteration: 0 = all; n > 0 = a random subset of n, shared by all processes
    #: (the Flow-GRPO code's timestep_fraction)
    train_steps: int = 0
    clip_eps: float = 1e-4  # PPO clip range (docs/paper.md s6.5)
    kl_weight: float = 0.04  # beta: 0.04 GenEval/OCR, 0.01 PickScore (docs/paper.md s6.5)
    advantage_clip: float = 5.0
    advantage_eps: float = 1e-4
    rewards: dict[str, float] = field(default_factory=lambda: {"geneval_partial": 1.0})  # registry name -> weight
    #: per-dimension mean of the Gaussian log-density, as the Flow-GRPO code (sets the policy term's scale vs the KL)
    mean_over_dims: bool = True
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4))
    ema_decay: float | None = None

    def validate(self):
        if self.group_size < 2:
            raise UserError(f"method.group_size must be at least 2 (got {self.group_size}); Flow-GRPO uses 24.")
        if self.sampling_steps < 1 or self.eval_steps < 1:
            raise UserError("method.sampling_steps and method.eval_steps must be positive; Flow-GRPO uses 10 and 40.")
        if self.train_steps < 0:
            raise UserError(f"method.train_steps must be 0 (all steps) or positive (got {self.train_steps}).")


class FlowGRPOMethod(Method):
    inference_network = "generator"
    accumulates = True  # train.accumulate micro-batches of grouped rollouts per optimiser step, advantages over all

    def __init__(self, cfg: RunConfig, backend):
        super().__init__(cfg, backend)
        o = self.options
        n = cfg.train.batch_size
        if not o.rewards:
            raise UserError("method.rewards is empty; name at least one reward (registry name or one added with "
                            "register_reward), e.g. --set method.rewards={geneval_partial: 1.0}.")
        if n % o.group_size:
            raise UserError(f"train.batch_size={n} is not a multiple of method.group_size={o.group_size}; "
                            "set the batch to (prompts per step) x group_size.")
        self.n_groups = n // o.group_size
        policy = backend.make_trainable("generator")
        init_sampler = None
        if o.init:
            step_dir = ckpt.find_checkpoint(o.init)
            init_sampler = ckpt.read_meta(step_dir).get("sampler", {})
            state = ckpt.load_model_state(step_dir)
            backend.load_network_state(policy, state)
            reference = backend.make_trainable("generator")
            backend.load_network_state(reference, state)
            self.reference_net = reference.eval().requires_grad_(False)
        else:
            self.reference_net = None
            _check_starts_at_teacher(backend, policy)
        few_step = init_sampler is not None and init_sampler.get("kind") == "cps"
        self.kernel = ("cps" if few_step else "sde") if o.kernel == "auto" else o.kernel
        if self.kernel == "cps":
            steps = int(init_sampler.get("steps", 4)) if init_sampler else 4
            self.sigmas = backend.generator_sigmas(steps)
            self.policy_guidance = float(init_sampler.get("guidance", 1.0)) if init_sampler else 1.0
        else:
            self.sigmas = backend.sampling_sigmas(o.sampling_steps)
            self.policy_guidance = o.guidance
        self.networks = {"generator": policy}
        self.updates = [Update("generator", every=1, optim=o.optim, ema_decay=o.ema_decay)]
        self.rewards = blocks.load_rewards(list(o.rewards), backend, differentiable=False)
        if self.kernel == "cps":
            policy = grpo.CpsPolicy(self.sigmas, o.eta, self.policy_guidance)
        else:
            policy = grpo.SdePolicy(self.sigmas, o.sde_a, self.policy_guidance)
        self.rollout = grpo.GroupRollout(backend, self.rewards, policy, self.n_groups, o.group_size,
                                         grpo.Advantages(o.advantage_clip, o.advantage_eps, o.rewards))
        self.policy_loss = grpo.PolicyLoss(backend, policy, o.clip_eps, o.kl_weight, self._reference(), o.mean_over_dims)
        self.batches: list[grpo.GRPOBatch] = []  # this step's micro-batches (train.accumulate)
        self.batch: grpo.GRPOBatch | None = None
        self.term_grads = diagnostics.TermGradients("diag", cosine_terms=("policy",))

    def _reference(self):
        w, b = self.policy_guidance, self.backend
        if self.reference_net is None:
            return lambda c, u: blocks.teacher_fn(b, c, w, u)
        return lambda c, u: blocks.policy_velocity_fn(b, self.reference_net, c, w, u)

    def before_step(self, ctx: StepContext) -> None:
        """The step's rollouts: one grouped rollout per micro-batch (train.accumulate, each from its own context),
        their group advantages over all of them together; the trained steps are shared by the micro-batches."""
        o = self.options
        gen, micro = self.networks["generator"], [ctx.micro_batch(j) for j in range(ctx.micro_batches)]
        self.batches = self.rollout.with_advantages([self.rollout.sample(gen, c) for c in micro], ctx)
        self.batch = self.batches[0]
        stoch = self.batch.rollout.stochastic_steps
        if o.train_steps and o.train_steps < len(stoch):
            pick = torch.randperm(len(stoch), generator=ctx.generator)[: o.train_steps]
            self.steps = sorted(stoch[int(i)] for i in pick)
        else:
            self.steps = list(stoch)

    def loss(self, network: str, ctx: StepContext):
        batch = self.batch = self.batches[ctx.micro]
        terms, logs = self.policy_loss.terms(self.networks["generator"], batch, self.steps)
        loss = self.policy_loss.total(terms)
        if ctx.diagnose:
            self.term_grads.add(terms, list(self.backend.trainable_parameters(self.networks["generator"])),
                                scale=1.0 / ctx.micro_batches)
        logs.update({f"reward/{k}": float(v.mean()) for k, v in batch.rewards.items()})
        logs["grpo/adv_abs"] = float(batch.advantages.abs().mean())
        return loss, logs

    def step_logs(self, ctx: StepContext, logs: dict[str, float]) -> dict[str, float]:
        """On a diagnosed step: the policy and KL terms' gradient norms and the policy gradient's cosine with
        the previous diagnosed step's (rtdmd.diagnostics)."""
        return self.term_grads.logs() if ctx.diagnose else {}

    def sampler(self):
        if self.kernel == "cps":
            return SamplerSpec(kind="cps", steps=len(self.sigmas) - 1, guidance=self.policy_guidance, eta=self.options.eta)
        # Flow-GRPO evaluates its fine-tuned model with the ODE (40 steps, the same CFG)
        return SamplerSpec(kind="euler", steps=self.options.eval_steps, guidance=self.policy_guidance)

    def inference_role(self):
        return "generator"


def _check_starts_at_teacher(backend, policy) -> None:
    """GRPO fine-tunes the teacher: its trainable copy must start with the teacher's velocity."""
    x = torch.randn((2, *backend.state_shape()), generator=torch.Generator().manual_seed(0)).to(backend.device)
    s = torch.full((2,), 0.5, device=backend.device)
    cond = backend.encode_prompts(["", ""])
    with torch.no_grad():
        same = torch.allclose(backend.velocity(policy, x, s, cond), backend.teacher_velocity(x, s, cond), atol=1e-4, rtol=1e-3)
    if not same:
        raise UserError(f"backend '{backend.name}' gives no trainable copy of its teacher (toy2d's exact teacher has no "
                        "network); point backend.teacher at a trained MLP teacher or pass --init CHECKPOINT.")


@register_method("flow-grpo", FlowGRPOOptions, backends=("shapes", "toy2d", "sd3", "flux2"), default_backend="shapes",
                 help="Flow-GRPO: group-relative policy optimisation on the teacher's SDE or a few-step generator (docs/paper.md s6.5)")
def make_flow_grpo(cfg: RunConfig, backend) -> FlowGRPOMethod:
    return FlowGRPOMethod(cfg, backend)
