"""DMD2 (Yin et al. 2024, "Improved Distribution Matching Distillation") on rectified flow.

docs/paper.md s6.1: the generator follows the distribution-matching gradient between the
teacher (real score, CFG) and a fake score trained on the generator's own samples by flow
matching; the fake score steps every iteration, the generator every ``ttur``-th (two
time-scale rule). The 4-step generator is trained with backward simulation: a step index k
(shared by all processes) is drawn, the generator runs k steps from noise without gradient
(x0 prediction, re-noised with fresh noise: CPS eta 1), and its x0 prediction at step k is
the sample fed to both losses. Optional: a diffusion-GAN head on the fake score's features
(needs real images: the shapes world) and a ReFL hinge on differentiable rewards.
All formulas come from rtdmd.flow / objectives; the wiring from rtdmd.methods.blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from rtdmd import flow, objectives
from rtdmd.config import OptimConfig, RunConfig
from rtdmd.data import StepPrefetcher
from rtdmd.errors import UserError
from rtdmd.methods import blocks
from rtdmd.methods.base import Method, SamplerSpec, StepContext, Update
from rtdmd.registry import register_method
from rtdmd.seeding import step_seed, torch_generator


@dataclass
class DMD2Options:
    guidance: float = 4.0  # real-score (teacher) CFG; the fake score runs without CFG (docs/paper.md s6.1: fake CFG 1)
    num_steps: int = 4  # generator steps on backend.generator_sigmas(num_steps) (docs/paper.md s6.1: 4-step generator)
    t_min: float = 0.02  # DM loss re-noising t ~ U[t_min, t_max] (docs/paper.md s6.1)
    t_max: float = 0.98
    ttur: int = 5  # generator updated every ttur-th iteration, fake score every iteration (SDXL 5, SD1.5 10)
    #: the fake score first, on a backward-simulated sample of its own (own k, prompts and noise), then the
    #: generator: the order of the RTDMD reference (docs/paper.md s4b), so the baseline trains as AC-DMD does;
    #: false: the DMD2 code's order, the generator first and the fake score on its (pre-update) sample
    fake_first: bool = True
    eta: float = 1.0  # CPS re-noising between the sampler's steps: 1 = fresh noise as DMD2 (docs/paper.md s2)
    gan: bool = False  # diffusion-GAN head on the fake score's features (needs backend.sample_data: shapes)
    gan_generator_weight: float = 5e-3  # lambda_G in L_G = L_DM + lambda_G L_G_gan (docs/paper.md s6.1)
    gan_critic_weight: float = 1e-2  # lambda_D in L_critic = L_fake + lambda_D L_D (docs/paper.md s6.1)
    #: ReFL option: differentiable reward name -> hinge margin, applied to the generator's x0 prediction
    refl_margins: dict[str, float] = field(default_factory=dict)
    refl_weight: float = 1e-3  # ReFL's loss scale (docs/paper.md s6.4: relu(2 - r) * 1e-3)
    generator_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, weight_decay=0.01))
    fake_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, weight_decay=0.01))
    ema_decay: float | None = 0.99  # EMA of the generator, used for inference (None: the raw weights)
    prefetch: int = 2  # real-image batches rendered ahead for the GAN head (0: synchronous)

    def validate(self):
        if self.num_steps < 1:
            raise UserError(f"method.num_steps must be at least 1 (got {self.num_steps}); DMD2's generator uses 4.")
        if self.ttur < 1:
            raise UserError(f"method.ttur must be a positive integer (got {self.ttur}); DMD2 uses 5 (SDXL) or 10 (SD1.5).")
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise UserError(f"method.t_min/t_max must satisfy 0 <= t_min < t_max <= 1 (got {self.t_min}, {self.t_max}).")
        if not 0.0 <= self.eta <= 1.0:
            raise UserError(f"method.eta must be in [0, 1] (got {self.eta}); DMD2 re-noises with 1.")


class DiscriminatorHead(nn.Module):
    """DMD2's classifier branch in miniature: one logit per image from a feature map (B, C, H, W)
    (strided conv, GroupNorm, SiLU, pooled) or from tokens (B, N, D) (MLP, mean over tokens)."""

    def __init__(self, feature_shape: tuple[int, ...]):
        super().__init__()
        if len(feature_shape) == 3:
            c = feature_shape[0]
            groups = math.gcd(32, c)
            self.net = nn.Sequential(
                nn.Conv2d(c, c, 4, 2, 1), nn.GroupNorm(groups, c), nn.SiLU(),
                nn.Conv2d(c, c, 3, 1, 1), nn.GroupNorm(groups, c), nn.SiLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 1))
            self.tokens = False
        elif len(feature_shape) == 2:
            d = feature_shape[1]
            self.net = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.SiLU())
            self.out = nn.Linear(d, 1)
            self.tokens = True
        else:
            raise UserError(f"the GAN head needs (C, H, W) or (tokens, dim) features, got shape {feature_shape}; "
                            "set method.gan=false for this backend.")

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if self.tokens:
            return self.out(self.net(f).mean(dim=1)).reshape(-1)
        return self.net(f).reshape(-1)


class ScoreWithHead(nn.Module):
    """The fake score plus a discriminator head on its intermediate features (diffusion GAN, docs/paper.md s6.1).

    ``forward`` is the score's forward (so ``backend.velocity`` works on it unchanged); a forward hook on
    ``backend.feature_module`` captures the features and ``self.logits`` holds the head's output of the
    last call. One module holds both, so L_critic = L_fake + lambda_D L_D trains both with one optimiser.
    """

    def __init__(self, score: nn.Module, backend):
        super().__init__()
        self.score = score
        self._feat: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        backend.feature_module(score).register_forward_hook(self._capture)
        with torch.no_grad():  # one probe call learns the feature shape
            x = torch.zeros((1, *backend.state_shape()), device=backend.device)
            backend.velocity(score, x, torch.full((1,), 0.5, device=backend.device), backend.encode_prompts([""]))
        feat = self._feat
        self._feat = None
        self.head = DiscriminatorHead(tuple(feat.shape[1:])).to(backend.device)

    def _capture(self, module, inputs, output):
        # diffusers' joint transformer blocks return (text tokens, image tokens): the image tokens are last
        self._feat = output[-1] if isinstance(output, tuple) else output

    def forward(self, *args, **kwargs):
        out = self.score(*args, **kwargs)
        feat, self._feat = self._feat, None
        self.logits = self.head(feat) if getattr(self, "head", None) is not None else None
        return out


class DMD2Method(Method):
    inference_network = "generator"

    def __init__(self, cfg: RunConfig, backend):
        super().__init__(cfg, backend)
        o = self.options
        self.n = cfg.train.batch_size
        self.sigmas = backend.generator_sigmas(o.num_steps)
        fake = backend.make_trainable("fake_score")
        self.data = None
        if o.gan:
            fake = ScoreWithHead(fake, backend)
            seed = cfg.train.seed
            self.data = StepPrefetcher(lambda i: backend.sample_data(self.n, torch_generator(step_seed(seed, i), "gan-data")),
                                       depth=o.prefetch)
        self.networks = {"generator": backend.make_trainable("generator"), "fake_score": fake}
        gen = Update("generator", every=o.ttur, optim=o.generator_optim, ema_decay=o.ema_decay)
        fake = Update("fake_score", every=1, optim=o.fake_optim)
        # fake_first (docs/paper.md s4b); else the DMD2 code's order: the generator first, then the fake
        # score on the same (pre-update) sample
        self.updates = [fake, gen] if o.fake_first else [gen, fake]
        rewards = blocks.load_rewards(list(o.refl_margins), backend, differentiable=True) if o.refl_margins else {}
        self.refl = blocks.RewardHinge(rewards, o.refl_margins, o.refl_weight) if rewards else None
        self.backsim = blocks.GeneratorSample(backend, self.n, 1.0, tag="backsim")
        self.fake_backsim = blocks.GeneratorSample(backend, self.n, 1.0, tag="fake-backsim")  # fake_first's own sample
        # DMD2's DM term at s = 0 with t ~ U[t_min, t_max]; the critic is plain flow matching, t ~ U(0, 1)
        self.dm = blocks.DMLoss(backend, self.n, o.guidance, levels=blocks.NoiseLevels(True, o.t_min, o.t_max))
        self.fake = blocks.FakeScoreLoss(backend, self.n, blocks.NoiseLevels(True, 0.0, 1.0))
        self._cache: dict = {}
        self._fake_cache: dict = {}

    def close(self):
        if self.data is not None:
            self.data.close()

    # -- one iteration -----------------------------------------------------------
    def before_step(self, ctx: StepContext) -> None:
        """Backward simulation (docs/paper.md s6.1): k ~ U{0..num_steps-1}, shared by every process; the
        generator runs k CPS steps with eta 1 (x0 prediction re-noised with fresh noise) without gradient."""
        o, b = self.options, self.backend
        k = int(torch.randint(0, o.num_steps, (1,), generator=ctx.generator))
        p = blocks.draw_prompts(b, self.n, ctx, guidance=o.guidance)
        self._cache = {"k": k, "p": p, "x0": None}
        if not o.fake_first or ctx.step % o.ttur == 0:  # fake_first: only the generator uses this sample
            self._cache["x_k"], self._cache["s_k"] = self.backsim(self.networks["generator"], p, ctx, k, grad=False)
        if o.fake_first:  # the fake score's own backward-simulated sample, drawn before either update
            k = int(torch.randint(0, o.num_steps, (1,), generator=ctx.generator))
            p = blocks.draw_prompts(b, self.n, ctx, guidance=o.guidance, tag="fake-prompts")
            x_k, s_k = self.fake_backsim(self.networks["generator"], p, ctx, k, grad=False)
            self._fake_cache = {"k": k, "p": p, "x_k": x_k, "s_k": s_k}

    def _generator_x0(self, grad: bool, c: dict | None = None) -> torch.Tensor:
        """The generator's x0 prediction at step k: x0_hat = x_k - s_k v(x_k, s_k) (flow.x0_from_v)."""
        c, b = c if c is not None else self._cache, self.backend
        with torch.set_grad_enabled(grad):
            x = c["x_k"]
            v = b.velocity(self.networks["generator"], x, flow.batch_sigma(c["s_k"], x), c["p"].cond)
            return flow.x0_from_v(x, v, c["s_k"])

    def _critic_logits(self, x0: torch.Tensor, cond, ctx: StepContext, tag: str) -> torch.Tensor:
        """D on x0 noised at t ~ U(0, 1) (diffusion GAN: real and fake both noised, docs/paper.md s6.1)."""
        b, fake = self.backend, self.networks["fake_score"]
        t = blocks.global_rand(self.n, ctx, f"{tag}-t").to(x0.device)
        x_t = flow.add_noise(x0, blocks.global_randn(b, self.n, ctx, f"{tag}-n"), t)
        b.velocity(fake, x_t, t, cond)
        return getattr(fake, "module", fake).logits

    def loss(self, network: str, ctx: StepContext):
        o, b, c = self.options, self.backend, self._cache
        p = c["p"]
        if network == "generator":
            x0 = self._generator_x0(grad=True)
            c["x0"] = x0.detach()
            loss, logs = self.dm(self.networks["fake_score"], x0, 0.0, p, ctx)
            logs = {**logs, "dm/loss": float(loss.detach()), "dm/k": float(c["k"])}
            if o.gan:
                g_gan = objectives.gan_generator_loss(self._critic_logits(x0, p.cond, ctx, "gan-gen"))
                loss = loss + o.gan_generator_weight * g_gan
                logs["gan/generator"] = float(g_gan.detach())
            if self.refl is not None:
                r_loss, r_logs = self.refl(b.decode(x0), p.prompts)
                loss = loss + r_loss
                logs.update(r_logs)
            return loss, logs
        if network == "fake_score":
            if o.fake_first:
                p = self._fake_cache["p"]
                x0 = self._generator_x0(grad=False, c=self._fake_cache)
            else:
                x0 = c["x0"] if c["x0"] is not None else self._generator_x0(grad=False)
            # DMD2's critic: plain flow matching on the detached sample, t ~ U(0, 1) (docs/paper.md s6.1)
            loss, logs = self.fake(self.networks["fake_score"], x0, 0.0, p, ctx)
            if o.gan:
                data = self.data.get(ctx.step)
                sl = ctx.shard(self.n)
                real_cond = b.encode_prompts(data.prompts[sl])
                d_real = self._critic_logits(data.x0[sl], real_cond, ctx, "gan-real")
                d_fake = self._critic_logits(x0, p.cond, ctx, "gan-fake")
                d_loss = objectives.gan_discriminator_loss(d_real, d_fake)
                loss = loss + o.gan_critic_weight * d_loss
                logs.update({"gan/critic": float(d_loss.detach()),
                             "gan/d_real": float(d_real.detach().mean()), "gan/d_fake": float(d_fake.detach().mean())})
            return loss, logs
        raise KeyError(network)

    def sampler(self):
        # DMD2 samples its multi-step generator by re-noising the x0 prediction with fresh noise (eta 1)
        return SamplerSpec(kind="cps", steps=self.options.num_steps, guidance=1.0, eta=self.options.eta)

    def inference_role(self):
        return "generator"


@register_method("dmd2", DMD2Options, backends=("shapes", "toy2d", "sd3", "flux2"), default_backend="shapes",
                 help="DMD2: distribution matching distillation with a two time-scale fake score (docs/paper.md s6.1)")
def make_dmd2(cfg: RunConfig, backend) -> DMD2Method:
    return DMD2Method(cfg, backend)
