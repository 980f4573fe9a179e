#!/usr/bin/env python
"""Seconds per training iteration and peak GPU memory of every method on the real backends.

Full-size, randomly initialised networks from the published configs (benchmarks/perf/
real_model_configs.py): the SD3-Medium transformer at 1024 px and the FLUX.2 klein base 4B
transformer at 512 px, their VAEs, and CLIP ViT-H/14 image towers standing in for the
differentiable rewards. Text encoders are not built: prompt embeddings are random tensors of
the published shapes (training reads them from the prompt cache anyway). LoRA rank 32 /
alpha 64 on the attention projections, bf16 weights, fp32 adapters, gradient checkpointing.

What one iteration is (a backend-level approximation, honest about it): the method classes
are not imported (they pull MLflow and real reward weights); instead each method's iteration
is the sequence of network calls its definition prescribes (method.md, baselines.md), with
the same batch, the same gradient-carrying calls, and the project's own loss functions
(rtdmd.objectives, rtdmd.samplers), all through the real backend (LoRA handles, adapter
switching, CFG). Fixed choices where the method draws at random: stop index k = 3 of 4
(AC-DMD), backward-simulation index 2 (DMD2), SubGRPO trains 2 of 3 stochastic steps.
The counts of network calls per iteration are written to the JSON next to the timings.

    python benchmarks/perf/gpu_real_backends.py --out results.json           # GPU
    python benchmarks/perf/gpu_real_backends.py --tiny --out /tmp/tiny.json  # CPU smoke run

Needs torch, diffusers, transformers, peft; not MLflow.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # the repository root: rtdmd without installing it
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import real_model_configs as RC  # noqa: E402
from rtdmd import flow  # noqa: E402
from rtdmd import objectives as O  # noqa: E402
from rtdmd import samplers as S  # noqa: E402

METHODS = ["dmd2", "ac-dmd", "rtdmd", "lcm", "hypersd", "flow-grpo"]
# update ratios of the two-network methods (generator every r-th iteration): AC-DMD 10
# (method.md s3), DMD2 5 (baselines.md, SDXL reference)
TTUR = {"dmd2": 5, "ac-dmd": 10}
GUIDANCE = {"sd3": 7.0, "flux2": 4.0}  # teacher CFG: SD3-M 7.0, FLUX.2 klein base 4.0 (method.md s3)

TINY_SD3 = dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=24,
                pos_embed_max_size=16)
TINY_SD3_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=16,
                    norm_num_groups=4, layers_per_block=1, scaling_factor=1.5305, shift_factor=0.0609,
                    use_quant_conv=False, use_post_quant_conv=False)
TINY_FLUX2 = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                  num_attention_heads=2, joint_attention_dim=24, timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2),
                  guidance_embeds=False)
TINY_FLUX2_VAE = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, layers_per_block=1)
TINY_VIT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=14,
                image_size=28, projection_dim=8)


# ---------------------------------------------------------------------------- setup
class Counter:
    """Counts network calls (and samples) per kind while an iteration runs."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def add(self, key: str, n: int) -> None:
        self.counts[key] = self.counts.get(key, 0) + n


def build(kind: str, tiny: bool, device: str, dtype: str, checkpointing: bool, rank: int, alpha: float):
    from diffusers import (AutoencoderKL, AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel,
                           SD3Transformer2DModel)

    wdt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    common = dict(dtype=dtype, vae_dtype=dtype, text_encoder_dtype=dtype, lora_rank=rank, lora_alpha=alpha,
                  gradient_checkpointing=checkpointing, prompt_cache_dir="", offload_text_encoders=False)
    with torch.device(device):
        if kind == "sd3":
            from rtdmd.backends.sd3 import SD3Backend, SD3Options

            tr = SD3Transformer2DModel(**(TINY_SD3 if tiny else RC.SD3_TRANSFORMERS["sd3-medium"])).to(wdt)
            vae = AutoencoderKL(**(TINY_SD3_VAE if tiny else RC.SD3_VAE)).to(wdt)
            opts = SD3Options(resolution=32 if tiny else 1024, **common)
            b = SD3Backend(opts, device, modules={"transformer": tr, "vae": vae,
                                                  "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0)},
                           identity="bench-sd3")
        else:
            from rtdmd.backends.flux2 import Flux2Backend, Flux2Options

            tr = Flux2Transformer2DModel(**(TINY_FLUX2 if tiny else RC.FLUX2_TRANSFORMERS["klein-base-4b"])).to(wdt)
            vae = AutoencoderKLFlux2(**(TINY_FLUX2_VAE if tiny else RC.FLUX2_VAE)).to(wdt)
            opts = Flux2Options(resolution=32 if tiny else 512, **common)
            b = Flux2Backend(opts, device, modules={"transformer": tr, "vae": vae, "scheduler":
                                                    FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)},
                             identity="bench-flux2")
    return b


def random_cond(kind: str, tiny: bool, n: int, device: str, dtype: torch.dtype, g: torch.Generator) -> dict:
    if kind == "sd3":
        tokens, width, pooled = (77 + 256, 32, 24) if tiny else (RC.SD3_TOKENS, 4096, 2048)
        return {"prompt_embeds": torch.randn(n, tokens, width, generator=g).to(device, dtype),
                "pooled_prompt_embeds": torch.randn(n, pooled, generator=g).to(device, dtype)}
    tokens, width = (16, 24) if tiny else (RC.FLUX2_TOKENS, 3 * RC.FLUX2_TEXT["klein-base-4b"]["hidden_size"])
    return {"prompt_embeds": torch.randn(n, tokens, width, generator=g).to(device, dtype)}


class RewardTower(torch.nn.Module):
    """A differentiable reward's compute: CLIP ViT image tower -> embedding . fixed text embedding."""

    def __init__(self, tiny: bool, device: str, dtype: torch.dtype):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        cfg = CLIPVisionConfig(**(TINY_VIT if tiny else RC.VIT_H14))
        with torch.device(device):
            self.tower = CLIPVisionModelWithProjection(cfg).to(dtype).eval().requires_grad_(False)
        self.size = cfg.image_size
        self.register_buffer("text", torch.randn(cfg.projection_dim, device=device, dtype=dtype) / cfg.projection_dim ** 0.5)

    def forward(self, images):
        x = F.interpolate(images, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        e = self.tower(pixel_values=(x * 2 - 1).to(self.text.dtype)).image_embeds
        return (F.normalize(e.float(), dim=-1) * self.text.float()).sum(-1)


class Run:
    """One backend's networks and helpers for the iteration definitions."""

    def __init__(self, kind, b, gen, fake, cond, unc, rewards, batch, counter, g):
        self.kind, self.b, self.gen, self.fake, self.cond, self.unc = kind, b, gen, fake, cond, unc
        self.rewards, self.B, self.count, self.g = rewards, batch, counter, g
        self.w = GUIDANCE[kind]
        self.sig = [float(s) for s in b.generator_sigmas(4)]

    def noise(self, like=None):
        shape = (self.B, *self.b.state_shape()) if like is None else like.shape
        return torch.randn(shape, generator=self.g).to(self.b.device)

    def u(self, lo=0.0, hi=1.0):
        return (lo + (hi - lo) * torch.rand(self.B, generator=self.g)).to(self.b.device)

    def v(self, net, name, x, s, guidance=1.0):
        grad = torch.is_grad_enabled()
        calls = 2 if guidance != 1.0 else 1
        self.count.add(f"{name}_{'grad' if grad else 'nograd'}_samples", calls * x.shape[0])
        s = flow.batch_sigma(s, x)
        if guidance == 1.0:
            return self.b.velocity(net, x, s, self.cond)
        return flow.guided_velocity(lambda xx, ss, cc: self.b.velocity(net, xx, ss, cc), x, s, self.cond, guidance, self.unc)

    def teacher(self, x, s):
        with torch.no_grad():
            self.count.add("teacher_nograd_samples", 2 * x.shape[0])
            return self.b.teacher_velocity(x, flow.batch_sigma(s, x), self.cond, self.w, self.unc)

    def reward(self, images):
        self.count.add(f"reward_{'grad' if torch.is_grad_enabled() else 'nograd'}_images", len(self.rewards) * images.shape[0])
        return sum(r(images) for r in self.rewards)

    def decode(self, x):
        self.count.add("vae_decode_grad" if torch.is_grad_enabled() else "vae_decode_nograd", x.shape[0])
        return self.b.decode(x)

    def cps(self, x, v, s, s_next, eta=0.9):
        mean, std = S.cps_mean_std(x, v, s, s_next, eta)
        return mean + std * self.noise(x), mean, std


# ---------------------------------------------------------------------------- one iteration per method
def dm_term(R: Run, x0):
    """DMD2's x0-space distribution-matching loss on x0 (baselines.md DMD2; method.md s3 for s = 0)."""
    t = R.u(0.02, 0.98)
    x_t = flow.add_noise(x0.detach(), R.noise(x0), t)
    real = flow.x0_from_v(x_t, R.teacher(x_t, t), t)
    with torch.no_grad():
        fake = flow.x0_from_v(x_t, R.v(R.fake, "fake", x_t, t), t)
    return O.dmd_loss(x0, O.dmd_gradient(x0, real, fake))


def dmd2_generator(R: Run):
    x, k = R.noise(), 2  # backward simulation to step k (baselines.md DMD2)
    with torch.no_grad():
        for i in range(k):
            x0 = flow.x0_from_v(x, R.v(R.gen, "gen", x, R.sig[i]), R.sig[i])
            x = flow.add_noise(x0, R.noise(x), R.sig[i + 1])
    x0 = flow.x0_from_v(x, R.v(R.gen, "gen", x, R.sig[k]), R.sig[k])
    dm_term(R, x0).backward()


def dmd2_fake(R: Run):
    x = R.noise()
    with torch.no_grad():
        for i in range(3):
            x0 = flow.x0_from_v(x, R.v(R.gen, "gen", x, R.sig[i]), R.sig[i])
            x = flow.add_noise(x0, R.noise(x), R.sig[i + 1])
    t, n = R.u(), R.noise()
    O.flow_matching_loss(R.v(R.fake, "fake", flow.add_noise(x0, n, t), t), x0, n).backward()


def acdmd_rollout(R: Run, k: int, grad_last: bool):
    x = R.noise()
    for i in range(k):
        with torch.set_grad_enabled(grad_last and i == k - 1):
            x, _, _ = R.cps(x, R.v(R.gen, "gen", x, R.sig[i]), R.sig[i], R.sig[i + 1])
    return x, R.sig[k]


def acdmd_generator(R: Run):
    x_s, s = acdmd_rollout(R, 3, grad_last=True)  # method.md s3 steps 1-3, k = 3
    t = O.sample_subinterval_t(s, R.g, n=R.B).to(x_s.device)
    x_t, _, _ = O.renoise_subinterval(x_s.detach(), s, t, R.noise(x_s))
    z = R.noise(x_s)
    vr = R.teacher(x_t, t)
    with torch.no_grad():
        vf = R.v(R.fake, "fake", x_t, t)
    x_r, x_f = (S.cps_step(x_t, v, flow.expand_sigma(t, x_t), s, 0.9, z) for v in (vr, vf))
    O.dmd_loss(x_s, O.dmd_gradient(x_s, x_r, x_f)).backward()


def fake_adsm_cons(R: Run, x_s, s, gamma=0.01):
    """L_ADSM + gamma L_cons (method.md s3): one anchor call and two calls at t' with gradient."""
    t = O.sample_subinterval_t(s, R.g, n=R.B).to(x_s.device)
    n = R.noise(x_s)
    x_t, _, _ = O.renoise_subinterval(x_s, s, t, n)
    v = R.v(R.fake, "fake", x_t, t)
    loss = O.ambient_dsm_loss(v, x_s, s, t, n)
    if gamma:
        anchor = flow.x0_from_v(x_t, v, t)
        t2 = O.sample_consistency_t(t, R.g).to(t.device)
        h = []
        for _ in range(2):
            x2 = S.cps_step(x_t, v.detach(), flow.expand_sigma(t, x_t), flow.expand_sigma(t2, x_t), 0.9, R.noise(x_t))
            h.append(flow.x0_from_v(x2, R.v(R.fake, "fake", x2, t2), t2))
        loss = loss + gamma * O.consistency_regulariser(h[0], h[1], anchor)
    loss.backward()


def acdmd_fake(R: Run):
    with torch.no_grad():
        x_s, s = acdmd_rollout(R, 3, grad_last=False)
    fake_adsm_cons(R, x_s, s)


def rtdmd_iteration(R: Run):
    """Stage 2 (method.md s4): rollout, fake update on x0, SubGRPO on 2 of 3 steps + BP through step 3."""
    states, means_old = [R.noise()], []
    with torch.no_grad():
        for i in range(4):
            x = states[-1]
            x_next, mean, std = R.cps(x, R.v(R.gen, "gen", x, R.sig[i]), R.sig[i], R.sig[i + 1], 0.9 if i < 3 else 0.0)
            states.append(x_next)
            means_old.append((mean, std))
        scores = R.reward(R.decode(states[-1]))  # all rewards on the rollout (group advantages)
        adv = (scores - scores.mean()) / (scores.std() + 1e-4) if R.B > 1 else scores * 0 + 1
    fake_adsm_cons(R, states[-1], 0.0)  # fake score: one update per epoch on the final x0 (s = 0)
    loss = 0.0
    for i in (0, 1):  # SubGRPO: 2 of the 3 stochastic steps
        x = states[i]
        mean, std = S.cps_mean_std(x, R.v(R.gen, "gen", x, R.sig[i]), R.sig[i], R.sig[i + 1], 0.9)
        logp = S.log_prob(states[i + 1], mean, std, "simplified")
        logp_old = S.log_prob(states[i + 1], means_old[i][0], std, "simplified")
        loss = loss + O.ppo_clip_loss(logp, logp_old, adv, 1e-5)
    x3 = states[3].detach()
    x0 = flow.x0_from_v(x3, R.v(R.gen, "gen", x3, R.sig[3]), R.sig[3])  # deterministic last step, back-propagated
    r = R.reward(R.decode(x0))
    loss = loss + 1e-4 * O.refl_hinge(r, 3.0).mean() + 1e-3 * dm_term(R, x0)
    loss.backward()


def flow_grpo_iteration(R: Run, steps: int = 10):
    """Flow-GRPO (baselines.md): 10-step SDE rollout with CFG, then PPO + KL at every step, one backward each."""
    sig = [float(s) for s in R.b.sampling_sigmas(steps)]
    xs, olds = [R.noise()], []
    with torch.no_grad():
        for i in range(steps):
            v = R.v(R.gen, "gen", xs[-1], sig[i], R.w)
            mean, std = S.flow_grpo_sde_mean_std(xs[-1], v, sig[i], sig[i + 1], sigma_max=sig[1])
            xs.append(mean + std * R.noise(mean))
            olds.append(mean)
        scores = R.reward(R.decode(xs[-1])) if R.rewards else torch.randn(R.B, generator=R.g).to(R.b.device)
        adv = (scores - scores.mean()) / (scores.std() + 1e-4) if R.B > 1 else scores * 0 + 1
    for i in range(steps):
        v = R.v(R.gen, "gen", xs[i], sig[i], R.w)
        mean, std = S.flow_grpo_sde_mean_std(xs[i], v, sig[i], sig[i + 1], sigma_max=sig[1])
        mean_ref, _ = S.flow_grpo_sde_mean_std(xs[i], R.teacher(xs[i], sig[i]), sig[i], sig[i + 1], sigma_max=sig[1])
        logp = S.log_prob(xs[i + 1], mean, std)
        logp_old = S.log_prob(xs[i + 1], olds[i], std)
        (O.ppo_clip_loss(logp, logp_old, adv, 1e-4) + 0.04 * O.gaussian_mean_kl(mean, mean_ref, std).mean()).backward()


def consistency_term(R: Run, phases: int = 4):
    """Phased consistency distillation, flow form (baselines.md LCM): student, one teacher CFG step, target."""
    s_grid = [float(s) for s in R.b.sampling_sigmas(100)]
    i = int(torch.randint(0, 99, (1,), generator=R.g))
    s, s_prev = s_grid[i], s_grid[i + 1]
    e = math.floor(s * phases - 1e-9) / phases if s > 0 else 0.0  # lower phase edge (uniform edges)
    x = flow.add_noise(R.noise(), R.noise(), s)  # an encoded image noised to s (random stand-in)
    x_e = x + (e - s) * R.v(R.gen, "gen", x, s)
    with torch.no_grad():
        x_prev = x + (s_prev - s) * R.teacher(x, s)
        target = x_prev + (e - s_prev) * R.v(R.gen, "gen", x_prev, s_prev)
    return O.pseudo_huber(x_e - target, 0.001)


def lcm_iteration(R: Run):
    consistency_term(R).backward()


def hypersd_iteration(R: Run):
    """Hyper-SD style (baselines.md): TSCD consistency + ReFL (late-sigma grad step, decode, rewards) + DMD
    score distillation with a fake score; then the fake score's update."""
    loss = consistency_term(R)
    x = R.noise()
    with torch.no_grad():
        for i in range(3):
            x, _, _ = R.cps(x, R.v(R.gen, "gen", x, R.sig[i]), R.sig[i], R.sig[i + 1])
    x0 = flow.x0_from_v(x, R.v(R.gen, "gen", x, R.sig[3]), R.sig[3])
    loss = loss + 1e-3 * O.refl_hinge(R.reward(R.decode(x0)), 2.0).mean() + dm_term(R, x0)
    loss.backward()
    with torch.no_grad():
        x0d = x0.detach()
    t, n = R.u(), R.noise()
    O.flow_matching_loss(R.v(R.fake, "fake", flow.add_noise(x0d, n, t), t), x0d, n).backward()


ITERATIONS = {
    "dmd2": {"generator": dmd2_generator, "fake": dmd2_fake},
    "ac-dmd": {"generator": acdmd_generator, "fake": acdmd_fake},
    "rtdmd": {"iteration": rtdmd_iteration},
    "flow-grpo": {"iteration": flow_grpo_iteration},
    "lcm": {"iteration": lcm_iteration},
    "hypersd": {"iteration": hypersd_iteration},
}
REWARD_TOWERS = {"rtdmd": 3, "hypersd": 2, "flow-grpo": 1}  # differentiable rewards (method.md s4; baselines.md)


# ---------------------------------------------------------------------------- measurement
def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gib(n: float) -> float:
    return round(n / 2**30, 3)


def measure(fn, R: Run, device: str, repeats: int) -> dict:
    params = [p for net in (R.gen, R.fake) for p in net.parameters()]
    for p in params:
        p.grad = None
    fn(R)  # warm-up (allocator, kernels)
    for p in params:
        p.grad = None
    R.count.counts.clear()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn(R)
        for p in params:
            p.grad = None
    sync(device)
    out = {"seconds": round((time.perf_counter() - t0) / repeats, 4),
           "calls": {k: v // repeats for k, v in R.count.counts.items() if v}}
    if device.startswith("cuda"):
        out["peak_gib"] = gib(torch.cuda.max_memory_allocated())
    return out


def calibrate(R: Run, device: str) -> dict:
    """Activation memory of one generator forward+backward and of one VAE decode with grad, per sample."""
    if not device.startswith("cuda"):
        return {}
    out = {}
    base = R.b.teacher.base
    for ckpt in (True, False):
        if ckpt:
            from rtdmd.backends.lora import enable_gradient_checkpointing

            enable_gradient_checkpointing(base)
        else:
            base.disable_gradient_checkpointing()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        x = R.noise()[:1]
        v = R.b.velocity(R.gen, x, torch.full((1,), 0.5, device=x.device), {k: c[:1] for k, c in R.cond.items()})
        v.float().square().mean().backward()
        for p in R.gen.parameters():
            p.grad = None
        torch.cuda.synchronize()
        out[f"transformer_fwd_bwd_gib_per_sample_ckpt_{ckpt}"] = gib(torch.cuda.max_memory_allocated() - start)
    enable_gradient_checkpointing(base)
    torch.cuda.empty_cache()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    x = R.noise()[:1].requires_grad_(True)
    R.b.decode(x).mean().backward()
    torch.cuda.synchronize()
    out["vae_decode_bwd_gib_per_image"] = gib(torch.cuda.max_memory_allocated() - start)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny configs on CPU (a smoke test of this script)")
    ap.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    ap.add_argument("--backends", default="sd3,flux2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--batch", type=int, default=2, help="samples per GPU (the paper's 9 fits; 2 keeps the run short)")
    ap.add_argument("--repeats", type=int, default=1, help="timed iterations after one warm-up")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--time-budget", type=float, default=480.0, help="skip what is left after this many seconds")
    a = ap.parse_args(argv)
    device = "cpu" if a.tiny or not torch.cuda.is_available() else "cuda"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    t_start = time.perf_counter()
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "tiny": a.tiny,
               "batch": a.batch, "dtype": a.dtype, "lora": {"rank": 32, "alpha": 64},
               "gradient_checkpointing": not a.no_checkpointing, "torch": torch.__version__,
               "definition": "backend-level approximation: network calls of one iteration per method.md/baselines.md",
               "backends": {}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    wdt = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    for kind in [k for k in a.backends.split(",") if k]:
        if time.perf_counter() - t_start > a.time_budget:
            results["backends"][kind] = {"skipped": "time budget"}
            continue
        torch.manual_seed(0)
        b = build(kind, a.tiny, device, a.dtype, not a.no_checkpointing, 32, 64.0)
        gen, fake = b.make_trainable("generator"), b.make_trainable("fake_score")
        g = torch.Generator().manual_seed(0)
        cond, unc = random_cond(kind, a.tiny, a.batch, device, wdt, g), random_cond(kind, a.tiny, a.batch, device, wdt, g)
        towers = [RewardTower(a.tiny, device, wdt)] if any(m in REWARD_TOWERS for m in a.methods.split(",")) else []
        base = b.teacher.base
        entry = {"state_shape": list(b.state_shape()), "resolution": b.options.resolution,
                 "transformer_params": sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n),
                 "lora_params_per_adapter": sum(p.numel() for p in gen.parameters()),
                 "static_gib": gib(torch.cuda.memory_allocated()) if device == "cuda" else None, "methods": {}}
        results["backends"][kind] = entry
        for m in [m for m in a.methods.split(",") if m]:
            if time.perf_counter() - t_start > a.time_budget:
                entry["methods"][m] = {"skipped": "time budget"}
                continue
            R = Run(kind, b, gen, fake, cond, unc, towers * REWARD_TOWERS.get(m, 0), a.batch, Counter(), g)
            res = {name: measure(fn, R, device, a.repeats) for name, fn in ITERATIONS[m].items()}
            if m in TTUR:  # fake score every iteration, generator every r-th
                res["amortised_seconds"] = round(res["fake"]["seconds"] + res["generator"]["seconds"] / TTUR[m], 4)
                res["ttur"] = TTUR[m]
            entry["methods"][m] = res
            a.out.write_text(json.dumps(results, indent=1))
            print(f"{kind:6s} {m:10s} " + "  ".join(f"{k}: {v['seconds']:.3f}s" + (f" {v['peak_gib']:.1f}GiB" if "peak_gib" in v else "")
                                                   for k, v in res.items() if isinstance(v, dict)), flush=True)
        if time.perf_counter() - t_start < a.time_budget:
            entry["calibration"] = calibrate(Run(kind, b, gen, fake, cond, unc, [], a.batch, Counter(), g), device)
        a.out.write_text(json.dumps(results, indent=1))
        del b, gen, fake, towers, base
        if device == "cuda":
            torch.cuda.empty_cache()
    results["total_seconds"] = round(time.perf_counter() - t_start, 1)
    a.out.write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


def table(results: dict) -> str:
    lines = [f"device: {results['device']}  batch/GPU: {results['batch']}  dtype: {results['dtype']}  "
             f"LoRA r32/a64  checkpointing: {results['gradient_checkpointing']}",
             "| backend | method | s/iteration | peak GiB |", "|---|---|---|---|"]
    for kind, e in results["backends"].items():
        for m, r in e.get("methods", {}).items():
            if "skipped" in r:
                lines.append(f"| {kind} | {m} | skipped | |")
                continue
            parts = {k: v for k, v in r.items() if isinstance(v, dict)}
            secs = r.get("amortised_seconds", sum(v["seconds"] for v in parts.values()))
            peak = max((v.get("peak_gib") or 0) for v in parts.values())
            detail = ", ".join(f"{k} {v['seconds']:.2f}" for k, v in parts.items()) if len(parts) > 1 else ""
            lines.append(f"| {kind} | {m} | {secs:.3f}" + (f" ({detail}, TTUR {r['ttur']})" if detail else "")
                         + f" | {peak:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
