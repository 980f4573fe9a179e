"""Shared machinery of the real-scale backends (SD3 / SD3.5, FLUX.2 klein).

- ``RealOptions``: the options every real backend has (model location, precision, LoRA,
  memory switches, prompt source and cache).
- ``ModelSource`` (rtdmd.backends.model_source): finds and checks the model directory.
- ``PromptCache`` (rtdmd.backends.prompt_cache): prompt embeddings on disk.
- ``RealBackend``: the Backend surface on top of a family's few specific pieces (loading,
  text encoding, the transformer call, latent <-> image), with LoRA handles sharing one base.

diffusers is imported when a pipeline class is asked for, so that importing a backend stays light.
"""

from __future__ import annotations

import abc
import copy
import gc
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from rtdmd import flow
from rtdmd.backends import lora as L
from rtdmd.backends.base import Backend, Cond
from rtdmd.backends.model_source import ModelSource
from rtdmd.backends.prompt_cache import PromptCache
from rtdmd.errors import UserError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_PROMPT_CACHE = "~/.cache/rtdmd/prompt_embeds"


@dataclass
class RealOptions:
    """Options shared by the real backends (each family adds its variant and defaults)."""

    #: a local diffusers-format directory, or a hub id found in the local HF cache ("" = the variant's published id)
    model: str = ""
    hub_cache_dir: str = ""  # "" = huggingface_hub's default cache
    resolution: int = 1024
    # --- precision: frozen weights in `dtype`; trainable LoRA / full copies keep fp32 master weights
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    vae_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    text_encoder_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    tf32: bool = True  # TF32 matmuls on CUDA
    # --- trainable copies: a LoRA on the teacher's weights (teacher = adapters off) or a full copy
    generator_mode: Literal["lora", "full"] = "lora"
    fake_score_mode: Literal["lora", "full"] = "lora"
    lora_rank: int = 32  # docs/paper.md s3: rank 32, alpha 64 on attention projections
    lora_alpha: float = 64.0
    lora_targets: list[str] = field(default_factory=list)  # [] = the family's attention projections
    lora_dropout: float = 0.0
    lora_seed: int = 0
    # --- memory
    gradient_checkpointing: bool = True
    offload_text_encoders: bool = True  # keep text encoders on CPU except while encoding
    offload_vae: bool = False  # keep the VAE on CPU except while decoding / encoding
    # --- prompts
    prompts_file: str = ""  # training prompts, one per line
    prompt_cache_dir: str = DEFAULT_PROMPT_CACHE  # "" = no disk cache (memory only)
    prompt_cache_memory_mb: int = 1024
    text_encoder_batch_size: int = 8
    precompute_prompts: bool = True  # encode every prompts_file line once, then free the text encoders
    # --- schedules
    shift: float = 0.0  # SD3-style sampling shift; 0 = the model's scheduler config
    generator_timesteps: list[float] = field(default_factory=lambda: [1000.0, 750.0, 500.0, 250.0])

    def validate(self):
        if self.resolution <= 0 or self.resolution % 16:
            raise UserError(f"backend.resolution={self.resolution} must be a positive multiple of 16; use e.g. 512 or 1024.")
        if self.lora_rank <= 0 or self.lora_alpha <= 0:
            raise UserError("backend.lora_rank and backend.lora_alpha must be positive; the paper uses rank 32, alpha 64.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserError("backend.lora_dropout must be in [0, 1).")
        if self.text_encoder_batch_size <= 0:
            raise UserError("backend.text_encoder_batch_size must be positive.")


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def images_to_vae_range(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1] (what diffusers VAEs take and give)."""
    return images * 2.0 - 1.0


def vae_range_to_images(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped like diffusers' image post-processing."""
    return ((x + 1.0) * 0.5).clamp(0.0, 1.0)


def _to_dtype(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating weights only when they differ (diffusers warns on every dtype cast)."""
    if any(p.dtype != dtype for p in module.parameters() if p.is_floating_point()):
        module.to(dtype)


def enable_tf32() -> None:
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# ---------------------------------------------------------------------------- the backend


class RealBackend(Backend):
    """Backend surface shared by SD3 and FLUX.2; subclasses fill in the family-specific pieces."""

    family: str = "real"
    #: diffusers pipeline class whose ``save_lora_weights`` writes this family's LoRA files
    pipeline_class_name: str = ""
    #: {component folder: kind} that must exist in a model directory
    components: dict[str, str] = {}
    layout: str = ""
    default_lora_targets: list[str] = L.SD3_ATTENTION_TARGETS
    hub_ids: dict[str, str] = {}

    def __init__(self, options: RealOptions, device="cpu", modules: dict[str, Any] | None = None,
                 identity: str | None = None):
        super().__init__(options, device)
        self.dtype = torch_dtype(options.dtype)
        if options.tf32:
            enable_tf32()
        self._modules: dict[str, Any] = {}
        self.source: ModelSource | None = None
        if modules is not None:  # in-memory components (tests, benchmarks): nothing read from disk
            self._modules = dict(modules)
            self.identity = identity or f"memory:{id(self)}"
            self._configs = {k: dict(m.config) for k, m in modules.items() if hasattr(m, "config") and hasattr(m.config, "keys")}
        else:
            self.source = ModelSource.locate(options.model, self.hub_ids[self.variant_name()], self.family, options.hub_cache_dir)
            self.source.check(self.required_components(), self.layout)
            self.identity = self.source.identity
            self._configs = {}
        self._teacher_net: L.AdapterNet | None = None
        self._prompts: list[str] | None = None
        self._precomputed = False
        cache_root = options.prompt_cache_dir or None
        self.prompt_cache = PromptCache(cache_root, f"{self.identity}|{self.encoder_fingerprint()}",
                                        options.prompt_cache_memory_mb)

    # ------------------------------------------------------------------ family hooks
    @abc.abstractmethod
    def variant_name(self) -> str:
        """Key of ``hub_ids`` for the configured variant."""

    def required_components(self) -> dict[str, str]:
        return dict(self.components)

    @abc.abstractmethod
    def encoder_fingerprint(self) -> str:
        """Everything besides the model that changes an embedding (sequence length, layers, dtype)."""

    @abc.abstractmethod
    def _load_transformer(self, dtype: torch.dtype) -> nn.Module: ...

    @abc.abstractmethod
    def _load_vae(self) -> nn.Module: ...

    @abc.abstractmethod
    def _load_text_encoders(self) -> dict[str, Any]:
        """Text encoders and tokenizers by pipeline component name (encoders on CPU)."""

    @abc.abstractmethod
    def _encode_uncached(self, prompts: list[str], encoders: dict[str, Any]) -> Cond:
        """Run the text encoders (already on self.device when offloading) on ``prompts``."""

    @staticmethod
    @abc.abstractmethod
    def velocity_call(model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """v = model(x, sigma, cond) for this family's transformer (float32 in and out)."""

    @abc.abstractmethod
    def latents_to_images(self, x: torch.Tensor, vae: nn.Module) -> torch.Tensor: ...

    @abc.abstractmethod
    def images_to_latents(self, images: torch.Tensor, vae: nn.Module) -> torch.Tensor: ...

    # ------------------------------------------------------------------ configs without loading weights
    def config_of(self, component: str) -> dict:
        if component not in self._configs:
            if component in self._modules and hasattr(self._modules[component], "config"):
                self._configs[component] = dict(self._modules[component].config)
            else:
                f = self.source.path / component / ("scheduler_config.json" if component == "scheduler" else "config.json")
                try:
                    self._configs[component] = json.loads(f.read_text())
                except (OSError, ValueError):
                    raise UserError(f"{f} is unreadable; re-download the {component}/ folder of the model.") from None
        return self._configs[component]

    # ------------------------------------------------------------------ networks
    def base_model(self) -> nn.Module:
        """The frozen transformer every LoRA handle shares (loaded on first use)."""
        if "transformer" not in self._modules:
            self._modules["transformer"] = self._load_transformer(self.dtype)
        m = self._modules["transformer"]
        if not getattr(m, "_rtdmd_prepared", False):
            _to_dtype(m, self.dtype)
            m.to(self.device).eval().requires_grad_(False)
            if self.options.gradient_checkpointing and getattr(m, "_supports_gradient_checkpointing", False):
                L.enable_gradient_checkpointing(m)
            m._rtdmd_prepared = True
        return m

    @property
    def teacher(self) -> nn.Module:
        if self._teacher_net is None:
            self._teacher_net = L.AdapterNet(self.base_model(), None, self.velocity_call)
        return self._teacher_net

    def lora_spec(self) -> L.LoraSpec:
        o = self.options
        return L.LoraSpec(rank=o.lora_rank, alpha=o.lora_alpha, targets=list(o.lora_targets or self.default_lora_targets),
                          dropout=o.lora_dropout, seed=o.lora_seed)

    def mode_for(self, role: str) -> str:
        if role == "teacher":
            raise UserError(f"the {self.family} backend loads a published teacher and cannot train one; "
                            "choose a distillation or RL method.")
        fake = "fake" in role or "critic" in role
        return self.options.fake_score_mode if fake else self.options.generator_mode

    def make_trainable(self, role: str) -> nn.Module:
        base = self.base_model()
        if self.mode_for(role) == "lora":
            name = L.unique_adapter_name(base, role)
            L.add_adapter(base, name, self.lora_spec(), trainable=True)
            return L.AdapterNet(base, name, self.velocity_call).train()
        # full fine-tuning: an fp32 copy of the teacher's weights (fp32 master weights)
        model = L.strip_adapters(copy.deepcopy(base)).to(self.device, torch.float32)
        model.requires_grad_(True).train()
        if self.options.gradient_checkpointing and getattr(model, "_supports_gradient_checkpointing", False):
            model.enable_gradient_checkpointing()
        return L.FullNet(model, self.velocity_call)

    def velocity(self, net, x, sigma, cond):
        sigma = flow.batch_sigma(sigma, x)
        return net(x, sigma, cond)

    def teacher_velocity(self, x, sigma, cond, guidance: float = 1.0, uncond: Cond | None = None):
        if guidance != 1.0 and self.is_guidance_distilled():
            raise UserError(f"{self.family} variant '{self.variant_name()}' is step/guidance-distilled and takes no CFG; "
                            "set the teacher guidance to 1 or use a base variant as teacher.")
        return super().teacher_velocity(x, sigma, cond, guidance, uncond)

    def is_guidance_distilled(self) -> bool:
        return False

    # ------------------------------------------------------------------ persistence
    @staticmethod
    def _unwrap(net: nn.Module) -> nn.Module:
        """The handle inside a DDP / accelerate wrapper."""
        while isinstance(getattr(net, "module", None), nn.Module):
            net = net.module
        return net

    def network_state(self, net):
        net = self._unwrap(net)
        if isinstance(net, L.AdapterNet):
            return L.adapter_state_dict(net.base, net.adapter) if net.adapter else {}
        if isinstance(net, L.FullNet):
            return {k: v.detach() for k, v in net.model.state_dict().items()}
        raise TypeError(f"not a network of the {self.family} backend: {type(net).__name__}")

    def load_network_state(self, net, state):
        net = self._unwrap(net)
        if isinstance(net, L.AdapterNet):
            L.load_adapter_state_dict(net.base, net.adapter, state)
        else:
            net.model.load_state_dict(state)

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def export(self, net: nn.Module, directory: Path, merged: bool = False) -> None:
        """LoRA: pytorch_lora_weights.safetensors (pipeline.load_lora_weights reads it); full or
        ``merged``: a diffusers ``transformer/`` folder that replaces the model's own."""
        net = self._unwrap(net)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if isinstance(net, L.AdapterNet):
            if net.adapter is None:
                raise ValueError("the teacher has no adapter to export")
            self.pipeline_class().save_lora_weights(
                str(directory), transformer_lora_layers=L.adapter_state_dict(net.base, net.adapter),
                transformer_lora_adapter_metadata=L.peft_metadata(net.spec, net.base))
            if merged:
                L.merged_copy(net.base, net.adapter).to(self.dtype).save_pretrained(str(directory / "transformer"))
        else:
            copy.deepcopy(net.model).to("cpu", self.dtype).save_pretrained(str(directory / "transformer"))

    # ------------------------------------------------------------------ text
    def encoder_modules(self) -> dict[str, Any]:
        """Text encoders and tokenizers, loaded on first use (a cache miss)."""
        names = self.text_component_names()
        if not all(n in self._modules for n in names):
            loaded = self._load_text_encoders()
            for k, m in loaded.items():
                self._modules.setdefault(k, m)
        dt = torch_dtype(self.options.text_encoder_dtype)
        place = "cpu" if self.options.offload_text_encoders else self.device
        for n in names:
            m = self._modules[n]
            if isinstance(m, nn.Module) and not getattr(m, "_rtdmd_prepared", False):
                _to_dtype(m, dt)
                m.to(place).eval().requires_grad_(False)
                m._rtdmd_prepared = True
        return {n: self._modules[n] for n in names}

    @abc.abstractmethod
    def text_component_names(self) -> list[str]: ...

    def release_text_encoders(self) -> None:
        """Free the text encoders (embeddings keep coming from the cache; a miss reloads them)."""
        for n in self.text_component_names():
            if isinstance(self._modules.get(n), nn.Module):
                del self._modules[n]
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _encode_batch(self, prompts: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        """Encode ``prompts`` with the text encoders and cache them; returns {prompt: row}."""
        enc = self.encoder_modules()
        mods = [m for m in enc.values() if isinstance(m, nn.Module)]
        if self.options.offload_text_encoders:
            for m in mods:
                m.to(self.device)
        try:
            with torch.no_grad():
                cond = self._encode_uncached(prompts, enc)
        finally:
            if self.options.offload_text_encoders:
                for m in mods:
                    m.to("cpu")
        rows = {}
        for i, p in enumerate(prompts):
            rows[p] = {k: v[i].detach().to("cpu", self.dtype) for k, v in cond.items()}
            self.prompt_cache.put(p, rows[p])
        return rows

    def cache_prompts(self, prompts: list[str], release: bool = True, progress: bool = False) -> int:
        """Encode every prompt not yet cached; returns how many were encoded. ``release`` frees the encoders."""
        todo = list(dict.fromkeys(p for p in prompts if self.prompt_cache.get(p) is None))
        bs = self.options.text_encoder_batch_size
        chunks = range(0, len(todo), bs)
        if progress and todo:
            chunks = tqdm(chunks, desc="prompt embeddings", unit="batch")
        for i in chunks:
            self._encode_batch(todo[i:i + bs])
        if release and todo:
            self.release_text_encoders()
        return len(todo)

    def encode_prompts(self, prompts):
        prompts = list(prompts)
        if not prompts:
            raise ValueError("encode_prompts needs at least one prompt")
        rows, missing = {}, []
        for p in dict.fromkeys(prompts):
            row = self.prompt_cache.get(p)
            if row is None:
                missing.append(p)
            else:
                rows[p] = row
        bs = self.options.text_encoder_batch_size
        for i in range(0, len(missing), bs):
            rows.update(self._encode_batch(missing[i:i + bs]))
        keys = rows[prompts[0]].keys()
        return {k: torch.stack([rows[p][k] for p in prompts]).to(self.device) for k in keys}

    # ------------------------------------------------------------------ prompts
    def prompt_list(self) -> list[str]:
        """Distinct training prompts of backend.prompts_file, in file order."""
        if self._prompts is None:
            f = self.options.prompts_file
            if not f:
                raise UserError(f"the {self.family} backend trains on prompts only and backend.prompts_file is not set; "
                                "pass a text file with one prompt per line (--set backend.prompts_file=PATH).")
            path = Path(f).expanduser()
            if not path.is_file():
                raise UserError(f"backend.prompts_file {path} does not exist; pass a text file with one prompt per line.")
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
            self._prompts = list(dict.fromkeys(ln for ln in lines if ln))
            if not self._prompts:
                raise UserError(f"backend.prompts_file {path} holds no prompts; write one prompt per line.")
        return self._prompts

    def training_prompts(self, n, generator):
        pool = self.prompt_list()
        if self.options.precompute_prompts and not self._precomputed:
            self._precomputed = True
            self.cache_prompts(pool + [""], release=True, progress=True)
        idx = torch.randint(0, len(pool), (n,), generator=generator)
        return [pool[int(i)] for i in idx]

    # ------------------------------------------------------------------ images
    def vae(self) -> nn.Module:
        if "vae" not in self._modules:
            self._modules["vae"] = self._load_vae()
        m = self._modules["vae"]
        if not getattr(m, "_rtdmd_prepared", False):
            _to_dtype(m, torch_dtype(self.options.vae_dtype))
            m.to("cpu" if self.options.offload_vae else self.device)
            m.eval().requires_grad_(False)
            if self.options.gradient_checkpointing and getattr(m, "_supports_gradient_checkpointing", False):
                m.enable_gradient_checkpointing()  # only active when decoding with grad (reward back-prop)
            m._rtdmd_prepared = True
        return m

    def _with_vae(self, fn: Callable[[nn.Module], torch.Tensor]) -> torch.Tensor:
        vae = self.vae()
        if self.options.offload_vae:
            vae.to(self.device)
        try:
            return fn(vae)
        finally:
            if self.options.offload_vae:
                vae.to("cpu")

    def decode(self, x):
        return self._with_vae(lambda vae: self.latents_to_images(x.to(self.device), vae))

    def encode_images(self, images):
        return self._with_vae(lambda vae: self.images_to_latents(images.to(self.device), vae))
