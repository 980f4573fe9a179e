"""Teacher training: conditional flow matching with prompt dropout (for CFG).

Only the backends that carry their own data (shapes, toy2d) train a teacher; the real
backends load published teachers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from rtdmd import flow
from rtdmd.config import OptimConfig, RunConfig
from rtdmd.data import StepPrefetcher
from rtdmd.errors import UserError
from rtdmd.methods.base import Method, SamplerSpec, StepContext, Update
from rtdmd.objectives import flow_matching_loss
from rtdmd.registry import register_method
from rtdmd.seeding import step_seed, torch_generator


@dataclass
class TeacherOptions:
    prompt_dropout: float = 0.1  # share of captions replaced by "" so the model learns p(x) for CFG
    #: sigma sampling during training: uniform, or logit-normal (SD3's choice, more weight mid-range)
    sigma_sampling: Literal["uniform", "logit_normal"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3))
    ema_decay: float = 0.999
    sample_steps: int = 28
    sample_guidance: float = 4.0
    prefetch: int = 2  # training batches rendered ahead in a background thread (0: synchronous)

    def validate(self):
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise UserError("method.prompt_dropout must be in [0, 1); the paper-style default is 0.1.")


def sample_training_sigmas(n: int, options: TeacherOptions, generator: torch.Generator) -> torch.Tensor:
    if options.sigma_sampling == "uniform":
        return torch.rand(n, generator=generator)
    return torch.sigmoid(options.logit_mean + options.logit_std * torch.randn(n, generator=generator))


class TeacherMethod(Method):
    inference_network = "teacher"

    def __init__(self, cfg: RunConfig, backend):
        super().__init__(cfg, backend)
        o = self.options
        self.networks["teacher"] = backend.make_trainable("teacher")
        self.updates = [Update("teacher", every=1, optim=o.optim, ema_decay=o.ema_decay)]
        n, seed = cfg.train.batch_size, cfg.train.seed
        # data of step i depends only on (seed, i), so it can be rendered ahead of time
        self.data = StepPrefetcher(lambda i: backend.sample_data(n, torch_generator(step_seed(seed, i), "data")),
                                   depth=o.prefetch)

    def close(self):
        self.data.close()

    def loss(self, network, ctx: StepContext):
        o, b = self.options, self.backend
        n = self.cfg.train.batch_size
        g = ctx.generator
        data = self.data.get(ctx.step)
        sl = ctx.shard(n)
        x0 = data.x0[sl]
        prompts = data.prompts[sl]
        drop = (torch.rand(n, generator=g) < o.prompt_dropout)[sl]
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        eps = torch.randn(data.x0.shape, generator=g)[sl].to(x0.device)
        sigma = sample_training_sigmas(n, o, g)[sl].to(x0.device)
        x_s = flow.add_noise(x0, eps, sigma)
        v = b.velocity(self.networks["teacher"], x_s, sigma, b.encode_prompts(prompts))
        loss = flow_matching_loss(v, x0, eps)
        return loss, {}

    def sampler(self):
        return SamplerSpec(kind="euler", steps=self.options.sample_steps, guidance=self.options.sample_guidance)

    def inference_role(self):
        return "teacher"


@register_method("teacher", TeacherOptions, backends=("shapes", "toy2d"), default_backend="shapes",
                 help="train a flow-matching teacher on the backend's own data (shapes, toy2d)")
def make_teacher(cfg: RunConfig, backend) -> TeacherMethod:
    return TeacherMethod(cfg, backend)
