"""Run the project's own training iterations for the perf scripts (gpu_check.py, memory_table.py).

A measured iteration is the one users run: the config comes from ``rtdmd.api.make_config`` (the
shipped YAML of that method and backend), the backend and the method from ``rtdmd.registry``, and
each step is ``rtdmd.trainer.Trainer``'s own step (method.before_step, every due update's
``method.loss`` under the accelerator's autocast, backward, gradient clipping, AdamW, EMA), with
MLflow tracking off. Nothing here computes a loss.

Random-weight real backends are just another backend configuration: ``random_real_backends()``
registers factories for ``sd3`` / ``flux2`` that build the real ``SD3Backend`` / ``Flux2Backend``
classes on randomly initialised diffusers networks of the published sizes (or tiny ones of the same
classes), with random prompt embeddings of the published shapes put into the backend's own prompt
cache (training reads embeddings from that cache; text encoders are never built). Rewards the
shipped configs name (scorers with weights) are replaced by registered stand-ins of the same
compute: randomly initialised CLIP ViT image towers of the scorers' sizes.

Needs torch, diffusers, transformers, peft (accelerate comes with peft); not MLflow.
"""

from __future__ import annotations

import contextlib
import gc
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent.parent))  # the repository root: rtdmd without installing it
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import real_model_configs as RC  # noqa: E402
from rtdmd import registry  # noqa: E402
from rtdmd.backends.flux2 import Flux2Backend  # noqa: E402
from rtdmd.backends.sd3 import SD3Backend  # noqa: E402
from rtdmd.rewards.registry import register_reward, unregister_reward  # noqa: E402
from rtdmd.trainer import Trainer  # noqa: E402

#: GPUs of the paper's runs: a shipped config's train.batch_size is the global batch over them
PAPER_GPUS = 8

# tiny random instances of the same classes (the sizes of tests/tiny_real.py)
TINY_SD3 = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=24,
                pos_embed_max_size=8)
TINY_SD3_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                    norm_num_groups=4, layers_per_block=1, scaling_factor=1.5305, shift_factor=0.0609,
                    use_quant_conv=False, use_post_quant_conv=False)
TINY_FLUX2 = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                  num_attention_heads=2, joint_attention_dim=24, timestep_guidance_channels=16,
                  axes_dims_rope=(2, 2, 2, 2), guidance_embeds=False)
TINY_FLUX2_VAE = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, layers_per_block=1)
TINY_VIT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=14,
                image_size=28, projection_dim=8)
TINY_RESOLUTION = 32

#: the scorer each shipped reward name runs, as an image tower of that size: (tower, differentiable)
REWARD_STANDINS = {"clipscore": ("vit_l", True), "hpsv21": ("vit_h", True), "pickscore": ("vit_h", True),
                   "imagereward": ("vit_l", True), "aesthetic": ("vit_l", True),
                   # GenEval partial credit runs a detector + CLIP without grad: a ViT-L forward stands in
                   "geneval_partial": ("vit_l", False)}
STANDIN_PREFIX = "perf_"

PROMPTS = [f"a photo of {n} {c} {o}" for n in ("one", "two", "three") for c in ("red", "green", "blue", "yellow")
           for o in ("cats", "cups", "cars")]


# ---------------------------------------------------------------------------- random-weight real backends
def real_modules(kind: str, tiny: bool, device) -> dict:
    """Randomly initialised transformer, VAE and scheduler of ``kind`` (published sizes, or tiny)."""
    from diffusers import (AutoencoderKL, AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel,
                           SD3Transformer2DModel)

    with torch.device(device):  # initialised where they run: a 4B network is slow to initialise on CPU
        if kind == "sd3":
            return {"transformer": SD3Transformer2DModel(**(TINY_SD3 if tiny else RC.SD3_TRANSFORMERS["sd3-medium"])),
                    "vae": AutoencoderKL(**(TINY_SD3_VAE if tiny else RC.SD3_VAE)),
                    "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0)}
        return {"transformer": Flux2Transformer2DModel(**(TINY_FLUX2 if tiny else RC.FLUX2_TRANSFORMERS["klein-base-4b"])),
                "vae": AutoencoderKLFlux2(**(TINY_FLUX2_VAE if tiny else RC.FLUX2_VAE)),
                "scheduler": FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)}


def embedding_shapes(kind: str, backend) -> dict[str, tuple[int, ...]]:
    """Per-prompt embedding shapes the family's encode_prompts returns (batch dim dropped)."""
    t = backend.config_of("transformer")
    if kind == "sd3":  # CLIP-L + bigG (77 tokens) then T5 tokens; pooled CLIP projections
        return {"prompt_embeds": (77 + backend.options.max_sequence_length, t["joint_attention_dim"]),
                "pooled_prompt_embeds": (t["pooled_projection_dim"],)}
    return {"prompt_embeds": (backend.options.max_sequence_length, t["joint_attention_dim"])}


def fill_prompt_cache(kind: str, backend, prompts: list[str], seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    shapes = embedding_shapes(kind, backend)
    for p in prompts:
        backend.prompt_cache.put(p, {k: torch.randn(s, generator=g).to(backend.dtype) for k, s in shapes.items()})


def _random_factory(kind: str, cls, tiny: bool):
    def factory(options, device="cpu"):
        b = cls(options, device, modules=real_modules(kind, tiny, device), identity=f"random:{kind}:{'tiny' if tiny else 'full'}")
        fill_prompt_cache(kind, b, [*b.prompt_list(), ""])
        return b

    return factory


@contextlib.contextmanager
def random_real_backends(tiny: bool):
    """Within the block, backends 'sd3' and 'flux2' build random-weight networks (full size or tiny)."""

    saved = {k: registry.get_backend(k) for k in ("sd3", "flux2")}
    try:
        for kind, cls in (("sd3", SD3Backend), ("flux2", Flux2Backend)):
            e = saved[kind]
            registry.register_backend(kind, e.options, help=e.help, extras=e.extras)(_random_factory(kind, cls, tiny))
        yield
    finally:
        for kind, e in saved.items():
            registry.register_backend(kind, e.options, help=e.help, extras=e.extras)(e.factory)


def real_overrides(kind: str, tiny: bool, prompts_file: Path, device: str) -> dict:
    """Config overrides of a random-weight real backend run: prompts from a file, embeddings in memory."""
    backend = {"prompts_file": str(prompts_file), "prompt_cache_dir": "", "offload_text_encoders": False}
    train = {"device": device}
    if tiny:
        backend.update(resolution=TINY_RESOLUTION, dtype="fp32", vae_dtype="fp32", text_encoder_dtype="fp32", tf32=False,
                       lora_rank=4, lora_alpha=8.0, gradient_checkpointing=False, max_sequence_length=16)
        train["mixed_precision"] = "no"
    return {"backend": backend, "train": train}


# ---------------------------------------------------------------------------- reward stand-ins
class RewardTower(torch.nn.Module):
    """A scorer's compute: a CLIP ViT image tower -> embedding . a fixed text embedding, (B,) scores."""

    def __init__(self, cfg: dict, device, dtype: torch.dtype):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        c = CLIPVisionConfig(**cfg)
        with torch.device(device):
            self.tower = CLIPVisionModelWithProjection(c).to(dtype).eval().requires_grad_(False)
            self.register_buffer("text", torch.randn(c.projection_dim, dtype=dtype) / c.projection_dim ** 0.5)
        self.size = c.image_size
        self.calls: dict[str, int] = {}

    def forward(self, images, prompts=None):
        key = "grad" if torch.is_grad_enabled() and images.requires_grad else "nograd"
        self.calls[key] = self.calls.get(key, 0) + images.shape[0]
        x = F.interpolate(images.float(), size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        e = self.tower(pixel_values=(x * 2 - 1).to(self.text.dtype)).image_embeds
        return (F.normalize(e.float(), dim=-1) * self.text.float()).sum(-1)


@contextlib.contextmanager
def standin_rewards(names, tiny: bool, device, dtype: torch.dtype):
    """Register ``perf_<name>`` for each shipped reward name; yields {shipped name: tower}."""

    towers = {}
    try:
        for n in names:
            kind, diff = REWARD_STANDINS[n]
            cfg = TINY_VIT if tiny else (RC.VIT_H14 if kind == "vit_h" else RC.VIT_L14)
            towers[n] = RewardTower(cfg, device, dtype)
            register_reward(STANDIN_PREFIX + n, towers[n], differentiable=diff)
        yield towers
    finally:
        for n in towers:
            unregister_reward(STANDIN_PREFIX + n)


def use_standins(cfg) -> list[str]:
    """Point the config's reward options at the stand-ins; returns the shipped reward names."""
    m = cfg.method
    names: list[str] = []
    if hasattr(m, "rewards") and isinstance(m.rewards, dict):
        names += list(m.rewards)
        m.rewards = {STANDIN_PREFIX + k: v for k, v in m.rewards.items()}
    if hasattr(m, "bp_rewards"):
        m.bp_rewards = [STANDIN_PREFIX + k for k in m.bp_rewards]
    if getattr(m, "refl_margins", None):
        names += [k for k in m.refl_margins if k not in names]
        m.refl_margins = {STANDIN_PREFIX + k: v for k, v in m.refl_margins.items()}
    return names


# ---------------------------------------------------------------------------- the trainer's step
def reset_accelerate() -> None:
    """accelerate keeps one process-wide state; each Trainer here may ask for another mixed precision."""

    AcceleratorState._reset_state(True)


def setup_trainer(cfg, run_dir: Path):
    """A Trainer with its backend, method, optimisers and EMA copies built (no MLflow run started)."""

    reset_accelerate()
    cfg.tracking.enabled = False
    tr = Trainer(cfg, run_dir, show_progress=False)
    tr._setup()
    return tr


def trainer_step(tr, step: int) -> dict:
    """One iteration exactly as Trainer.run does it (its own per-step function)."""
    return tr._one_step(step)


def save_checkpoint(tr, step: int) -> Path:
    """The trainer's own checkpoint of its current state (a stage-2 init, say)."""
    return tr._save(step, 0.0, None)


def due_updates(method, step: int) -> tuple[str, ...]:
    return tuple(u.network for u in method.updates if step % u.every == 0)


def update_period(method) -> int:
    return math.lcm(*[u.every for u in method.updates])


# ---------------------------------------------------------------------------- counting network calls
class CallCounter:
    """Samples through backend.velocity / decode per network, with and without grad, per update."""

    def __init__(self, tr):
        self.tr = tr
        b = tr.backend
        self.names = {id(net): name for name, net in tr.method.networks.items()}
        self.counts: dict[str, int] = {}
        self._velocity, self._decode = b.velocity, b.decode
        b.velocity, b.decode = self.velocity, self.decode

    def _name(self, net) -> str:
        if id(net) in self.names:
            return self.names[id(net)]
        return "teacher" if net is self.tr.backend.teacher else "other"

    def _add(self, key: str, n: int) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def velocity(self, net, x, sigma, cond):
        self._add(f"{self._name(net)}_{'grad' if torch.is_grad_enabled() else 'nograd'}", x.shape[0])
        return self._velocity(net, x, sigma, cond)

    def decode(self, x):
        self._add(f"decode_{'grad' if torch.is_grad_enabled() and x.requires_grad else 'nograd'}", x.shape[0])
        return self._decode(x)

    def close(self) -> None:
        b = self.tr.backend
        del b.velocity, b.decode  # back to the class methods


# ---------------------------------------------------------------------------- measurement
def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


@dataclass
class MethodTiming:
    """Seconds and FLOPs of one method's iterations, per set of due updates, and amortised."""

    method: str
    batch: int
    period: int
    kinds: dict[tuple[str, ...], dict] = field(default_factory=dict)  # due updates -> {seconds, flops, share, steps}
    peak_gib: float | None = None
    static_gib: float | None = None
    calls: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def amortised(self, key: str) -> float | None:
        vals = [(k["share"], k.get(key)) for k in self.kinds.values()]
        if not vals or any(v is None for _, v in vals):
            return None
        return sum(s * v for s, v in vals)


def measure(tr, repeats: int, flops: bool = True, deadline: float = float("inf"), warmup: int = 1,
            first_timed: int | None = None) -> MethodTiming:
    """Time ``repeats`` steps of every distinct set of due updates (after ``warmup`` steps from 0; timed
    steps from ``first_timed``, default ``warmup``, so runs with different warm-ups time the same steps)
    and count FLOPs of one step of each with FlopCounterMode (step 0, a warm-up step, for its own set;
    one more step for the others); seconds and FLOPs amortised over the update period."""
    method, device = tr.method, tr.backend.device
    period = update_period(method)
    shares: dict[tuple[str, ...], int] = {}
    for i in range(period):
        shares[due_updates(method, i)] = shares.get(due_updates(method, i), 0) + 1
    res = MethodTiming(tr.cfg.method_name, tr.cfg.train.batch_size, period)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        res.static_gib = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    counted: dict[tuple[str, ...], int] = {}
    for step in range(warmup):  # the first warm-up step is also the FLOP-counted step of its kind
        if flops and step == 0:
            counted[due_updates(method, 0)] = count_flops(lambda: trainer_step(tr, 0))
        else:
            trainer_step(tr, step)
    sync(device)
    step = warmup if first_timed is None else max(first_timed, warmup)
    wanted = {k: [] for k in shares}
    need = {k: repeats + (1 if flops and k not in counted else 0) for k in shares}
    i = step
    while any(len(wanted[k]) < need[k] for k in shares):
        k = due_updates(method, i)
        if len(wanted[k]) < need[k]:
            wanted[k].append(i)
        i += 1
    counter = CallCounter(tr)
    try:
        for k, steps in wanted.items():
            entry = _time_kind(tr, k, steps[:repeats], deadline, counter, res)
            entry["share"] = shares[k] / period
            if k in counted:
                entry["flops"] = counted[k]
            elif flops and "seconds" in entry and time.perf_counter() < deadline:
                entry["flops"] = count_flops(lambda: trainer_step(tr, steps[-1]))
            res.kinds[k] = entry
    finally:
        counter.close()
    if cuda:
        sync(device)
        res.peak_gib = torch.cuda.max_memory_allocated() / 2**30
    return res


def _time_kind(tr, kind: tuple[str, ...], timed: list[int], deadline: float, counter, res: MethodTiming) -> dict:
    """Wall and CPU seconds (means) and network calls of the ``timed`` steps of one set of due updates."""
    device = tr.backend.device
    entry: dict = {"steps": timed}
    secs, cpu = [], []
    for s in timed:
        if time.perf_counter() > deadline:
            res.skipped.append(f"step {s} ({'+'.join(kind)}): time budget")
            break
        counter.counts.clear()
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        trainer_step(tr, s)
        sync(device)
        secs.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        entry["calls"] = dict(counter.counts)
    if secs:  # wall seconds, and this process's CPU seconds (steadier on a shared machine)
        entry["seconds"] = sum(secs) / len(secs)
        entry["cpu_seconds"] = sum(cpu) / len(cpu)
    return entry


def release(tr) -> None:
    """Free a trainer's networks (before the next method builds its own)."""
    with contextlib.suppress(Exception):
        tr.method.close()
    tr.method = tr.backend = tr.optimizers = tr.emas = None
    release_memory()


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def paper_batch(cfg) -> int:
    """One GPU's share of the shipped (paper) global batch."""
    return max(1, cfg.train.batch_size // PAPER_GPUS)


def prompts_file(directory: Path) -> Path:
    f = Path(directory) / "prompts.txt"
    f.write_text("\n".join(PROMPTS) + "\n")
    return f


def temp_dir():
    return tempfile.TemporaryDirectory(prefix="rtdmd-perf-")
