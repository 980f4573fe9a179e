"""A whole method in one file (docs/DEVELOPING-methods.md walks through it): one-step DMD.

A one-step generator maps noise x1 to x0 = x1 - v_theta(x1, 1) and learns the teacher's distribution by
distribution matching (blocks.DMLoss at s = 0), against a fake score trained on its detached samples by
plain flow matching (blocks.FakeScoreLoss). Options, the method, its loss blocks and its registration;
tests/test_add_method.py gives it a config and trains it through rtdmd.api.run_training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rtdmd import flow
from rtdmd.config import OptimConfig, RunConfig
from rtdmd.errors import UserError
from rtdmd.methods import blocks
from rtdmd.methods.base import Method, SamplerSpec, StepContext, Update
from rtdmd.registry import register_method


@dataclass
class OneStepDmdOptions:
    guidance: float = 1.0  # teacher CFG in the DM term
    ttur: int = 1  # the generator every ttur-th iteration, the fake score every iteration
    generator_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3))
    fake_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3))
    ema_decay: float | None = None  # EMA of the generator for inference (None: the raw weights)

    def validate(self):
        if self.ttur < 1:
            raise UserError(f"method.ttur must be a positive integer (got {self.ttur}).")


class OneStepDmd(Method):
    inference_network = "generator"

    def __init__(self, cfg: RunConfig, backend):
        super().__init__(cfg, backend)
        o, n = self.options, cfg.train.batch_size
        self.networks = {"generator": backend.make_trainable("generator"),
                         "fake_score": backend.make_trainable("fake_score")}
        self.updates = [Update("generator", every=o.ttur, optim=o.generator_optim, ema_decay=o.ema_decay),
                        Update("fake_score", every=1, optim=o.fake_optim)]
        # the loss blocks, built once from the options
        self.dm = blocks.DMLoss(backend, n, o.guidance, levels=blocks.NoiseLevels(uniform=True))
        self.fake = blocks.FakeScoreLoss(backend, n, blocks.NoiseLevels(True, 0.0, 1.0))
        self.prompts: blocks.Prompts | None = None

    def before_step(self, ctx: StepContext) -> None:
        self.prompts = blocks.draw_prompts(self.backend, self.cfg.train.batch_size, ctx, self.options.guidance)

    def _x0(self, ctx: StepContext, grad: bool) -> torch.Tensor:
        """The generator's sample x0 = x1 - v(x1, 1) from this step's noise x1 (the same in both losses)."""
        x1 = blocks.global_randn(self.backend, self.cfg.train.batch_size, ctx, "x1")
        with torch.set_grad_enabled(grad):
            v = self.backend.velocity(self.networks["generator"], x1, flow.batch_sigma(1.0, x1), self.prompts.cond)
            return flow.x0_from_v(x1, v, 1.0)

    def loss(self, network: str, ctx: StepContext):
        if network == "generator":
            return self.dm(self.networks["fake_score"], self._x0(ctx, grad=True), 0.0, self.prompts, ctx)
        return self.fake(self.networks["fake_score"], self._x0(ctx, grad=False), 0.0, self.prompts, ctx)

    def sampler(self) -> SamplerSpec:
        return SamplerSpec(kind="cps", steps=1, eta=1.0)  # one step from sigma 1 to 0: the x0 prediction


@register_method("example-one-step-dmd", OneStepDmdOptions, backends=("toy2d", "shapes"), default_backend="toy2d",
                 help="Example: one-step DMD (docs/DEVELOPING-methods.md)")
def make_one_step_dmd(cfg: RunConfig, backend) -> OneStepDmd:
    return OneStepDmd(cfg, backend)
