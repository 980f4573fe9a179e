"""shapes: the embedded default backend, a miniature of the SD3 pipeline that trains on CPU.

Networks are built from diffusers / transformers parts: a word-level tokenizer over the
world's caption grammar, a small transformers ``CLIPTextModel`` (trained jointly with the
teacher), and a pixel-space denoiser: ``UNet2DConditionModel`` (cross-attention on the
token states, pooled text added to the time embedding) or ``SD3Transformer2DModel``.
Pixels are the state: x = 2 * image - 1.

Each velocity network is a ``ShapesFlowModel`` (text encoder + denoiser), so the
conditioning a method passes around is token ids, and a student copies the teacher's text
encoder (frozen unless options say otherwise). diffusers and transformers are imported when a
network is built, so that importing the backend stays light.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml
from torch import nn

from rtdmd import checkpoint as ckpt
from rtdmd import flow
from rtdmd.backends.base import Backend, DataBatch
from rtdmd.errors import UserError
from rtdmd.registry import register_backend
from rtdmd.world import shapes as world

SHIPPED_TEACHER = Path(__file__).resolve().parent.parent / "assets" / "shapes_teacher"

# Backend options that define the world and the architecture: a run that uses a teacher
# checkpoint must agree with it on these (everything else is free).
_WORLD_KEYS = ("image_size", "classes", "size_range", "max_objects")
_ARCH_KEYS = ("denoiser", "unet_channels", "unet_layers_per_block", "unet_attention_head_dim",
              "sd3_patch_size", "sd3_layers", "sd3_head_dim", "sd3_heads",
              "text_width", "text_layers", "text_heads", "max_tokens")


@dataclass
class ShapesOptions:
    # --- the world
    image_size: int = 32
    classes: list[str] = field(default_factory=lambda: ["circle", "square", "triangle", "cross"])
    size_range: list[float] = field(default_factory=lambda: [10.0, 15.0])
    max_objects: int = 4
    distractor_prob: float = 0.3
    # --- the denoiser (chosen by measurement, see docs/shapes-teacher.md)
    denoiser: Literal["unet", "sd3"] = "unet"
    unet_channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    unet_layers_per_block: int = 1
    unet_attention_head_dim: int = 8
    sd3_patch_size: int = 2
    sd3_layers: int = 4
    sd3_head_dim: int = 32
    sd3_heads: int = 4
    # --- the text encoder
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    max_tokens: int = 16
    # --- schedules
    shift: float = 1.0  # teacher sampling shift
    generator_timesteps: list[float] = field(default_factory=lambda: [1000.0, 750.0, 500.0, 250.0])
    generator_shift: float = 3.0  # docs/paper.md s2: sigmas [1, .9, .75, .5]
    # --- which teacher the distillation methods use: "shipped" or a checkpoint path
    teacher: str = "shipped"
    train_text_encoder: bool = False  # in students (the teacher method always trains it)
    channels_last: bool = False

    def validate(self):
        if self.denoiser == "sd3" and self.image_size % self.sd3_patch_size:
            raise UserError("backend.image_size must be a multiple of backend.sd3_patch_size.")
        if len(self.size_range) != 2:
            raise UserError("backend.size_range must be [min, max] in pixels.")
        self.world_spec()  # raises UserError on bad world settings

    def world_spec(self) -> world.WorldSpec:
        return world.WorldSpec(image_size=self.image_size, classes=tuple(self.classes),
                               size_range=tuple(self.size_range), max_objects=self.max_objects)


class WordTokenizer:
    """Word-level tokenizer over the caption grammar: [bos] words [eos] [pad]...

    Ids: 0 pad, 1 bos, 2 unk, 3 eos, then the grammar's words in sorted order.
    """

    PAD, BOS, UNK, EOS = 0, 1, 2, 3

    def __init__(self, words: list[str], max_tokens: int):
        self.words = list(words)
        self.index = {w: i + 4 for i, w in enumerate(self.words)}
        self.max_tokens = max_tokens

    @property
    def vocab_size(self) -> int:
        return len(self.words) + 4

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(prompts), self.max_tokens), self.PAD, dtype=torch.long)
        mask = torch.zeros((len(prompts), self.max_tokens), dtype=torch.long)
        for i, p in enumerate(prompts):
            toks = [self.BOS] + [self.index.get(w, self.UNK) for w in p.lower().split()] + [self.EOS]
            if len(toks) > self.max_tokens:
                raise UserError(f"prompt '{p}' is longer than backend.max_tokens={self.max_tokens - 2} words; shorten it.")
            ids[i, : len(toks)] = torch.tensor(toks)
            mask[i, : len(toks)] = 1
        return ids, mask


class ShapesFlowModel(nn.Module):
    """Text encoder + denoiser; forward(x, sigma, input_ids, attention_mask) -> v."""

    def __init__(self, options: ShapesOptions, vocab_size: int):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        o = options
        self.options = o
        tcfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=o.text_width, intermediate_size=2 * o.text_width,
                              num_hidden_layers=o.text_layers, num_attention_heads=o.text_heads,
                              max_position_embeddings=o.max_tokens, pad_token_id=WordTokenizer.PAD,
                              bos_token_id=WordTokenizer.BOS, eos_token_id=WordTokenizer.EOS,
                              projection_dim=o.text_width)
        self.text_encoder = CLIPTextModel(tcfg)
        if o.denoiser == "unet":
            from diffusers import UNet2DConditionModel

            n = len(o.unet_channels)
            down = ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (n - 1)
            up = ["CrossAttnUpBlock2D"] * (n - 1) + ["UpBlock2D"]
            self.denoiser = UNet2DConditionModel(
                sample_size=o.image_size, in_channels=3, out_channels=3,
                block_out_channels=tuple(o.unet_channels), down_block_types=tuple(down), up_block_types=tuple(up),
                layers_per_block=o.unet_layers_per_block, cross_attention_dim=o.text_width,
                attention_head_dim=o.unet_attention_head_dim, norm_num_groups=min(8, o.unet_channels[0]),
                class_embed_type="projection", projection_class_embeddings_input_dim=o.text_width,
            )
        else:
            from diffusers import SD3Transformer2DModel

            self.denoiser = SD3Transformer2DModel(
                sample_size=o.image_size, patch_size=o.sd3_patch_size, in_channels=3, out_channels=3,
                num_layers=o.sd3_layers, attention_head_dim=o.sd3_head_dim, num_attention_heads=o.sd3_heads,
                joint_attention_dim=o.text_width, caption_projection_dim=o.sd3_head_dim * o.sd3_heads,
                pooled_projection_dim=o.text_width, pos_embed_max_size=o.image_size // o.sd3_patch_size,
            )

    def forward(self, x, sigma, input_ids, attention_mask):
        out = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask)
        states, pooled = out.last_hidden_state, out.pooler_output
        t = flow.timestep_from_sigma(sigma)
        if self.options.denoiser == "unet":
            return self.denoiser(x, t, encoder_hidden_states=states, class_labels=pooled,
                                 encoder_attention_mask=attention_mask.bool()).sample
        return self.denoiser(hidden_states=x, timestep=t, encoder_hidden_states=states,
                             pooled_projections=pooled).sample


def _backend_options_of(checkpoint_dir: Path) -> dict:
    cfg = yaml.safe_load((checkpoint_dir / "config.yaml").read_text())
    return cfg.get("backend", {})


class ShapesBackend(Backend):
    name = "shapes"

    def __init__(self, options: ShapesOptions, device="cpu"):
        super().__init__(options, device)
        self.spec = options.world_spec()
        self.tokenizer = WordTokenizer(world.vocabulary(self.spec), options.max_tokens)
        self._teacher: ShapesFlowModel | None = None

    # ------------------------------------------------------------------ geometry
    def state_shape(self):
        s = self.options.image_size
        return (3, s, s)

    def sampling_sigmas(self, num_steps):
        return flow.sampling_sigmas(num_steps, self.options.shift).to(self.device)

    def generator_sigmas(self, num_steps=4):
        ts = flow.generator_timesteps(num_steps, self.options.generator_timesteps)
        return flow.timesteps_to_sigmas(ts, self.options.generator_shift).to(self.device)

    # ------------------------------------------------------------------ text
    def encode_prompts(self, prompts):
        ids, mask = self.tokenizer(list(prompts))
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    # ------------------------------------------------------------------ networks
    def new_network(self) -> ShapesFlowModel:
        net = ShapesFlowModel(self.options, self.tokenizer.vocab_size).to(self.device)
        if self.options.channels_last:
            net = net.to(memory_format=torch.channels_last)
        return net

    def teacher_dir(self) -> Path:
        t = self.options.teacher
        path = SHIPPED_TEACHER if t == "shipped" else Path(t)
        if t == "shipped" and not (path / "meta.json").is_file():
            raise UserError(f"the shipped shapes teacher is missing from {path}; reinstall rtdmd-bench, or train one with "
                            "'rtdmd-bench train teacher' and pass --set backend.teacher=<run dir>.")
        return ckpt.find_checkpoint(path)

    def check_matches_teacher(self, step_dir: Path) -> None:
        theirs = _backend_options_of(step_dir)
        for key in _WORLD_KEYS + _ARCH_KEYS:
            mine = getattr(self.options, key)
            if key in theirs and theirs[key] != mine:
                raise UserError(f"backend.{key}={mine!r} differs from the teacher's ({theirs[key]!r}, {step_dir}); "
                                f"set backend.{key} to the teacher's value or use a matching teacher.")

    @property
    def teacher(self) -> ShapesFlowModel:
        if self._teacher is None:
            step_dir = self.teacher_dir()
            self.check_matches_teacher(step_dir)
            net = self.new_network()
            self.load_network_state(net, ckpt.load_model_state(step_dir))
            self._teacher = net.eval().requires_grad_(False)
        return self._teacher

    def make_trainable(self, role: str) -> nn.Module:
        if role == "teacher":
            return self.new_network().train()
        net = copy.deepcopy(self.teacher).train().requires_grad_(True)
        net.text_encoder.requires_grad_(self.options.train_text_encoder)
        return net

    def feature_module(self, net):
        """The UNet's mid block (output (B, C, H/4, W/4)), or the SD3 transformer's middle joint block
        (output (text tokens, image tokens)); DMD2's GAN head reads it (docs/paper.md s6.1)."""
        d = getattr(net, "module", net).denoiser
        if self.options.denoiser == "unet":
            return d.mid_block
        return d.transformer_blocks[len(d.transformer_blocks) // 2]

    def velocity(self, net, x, sigma, cond):
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        return net(x, sigma.to(x.dtype), cond["input_ids"], cond["attention_mask"])

    # ------------------------------------------------------------------ images
    def decode(self, x):
        return ((x + 1.0) * 0.5).clamp(0.0, 1.0)

    def encode_images(self, images):
        return images * 2.0 - 1.0

    # ------------------------------------------------------------------ data
    def _rng(self, generator: torch.Generator) -> np.random.Generator:
        return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))

    def sample_data(self, n, generator) -> DataBatch:
        scenes, captions = world.sample_training_batch(self._rng(generator), self.spec, n, self.options.distractor_prob)
        images = world.render(scenes, self.spec, device=self.device).images
        return DataBatch(x0=self.encode_images(images), prompts=captions, images=images, scenes=scenes)

    def training_prompts(self, n, generator):
        _, captions = world.sample_training_batch(self._rng(generator), self.spec, n, self.options.distractor_prob)
        return captions

    # ------------------------------------------------------------------ persistence
    def network_state(self, net):
        return net.state_dict()

    def load_network_state(self, net, state):
        net.load_state_dict(state)


def architecture_keys() -> tuple[str, ...]:
    return _WORLD_KEYS + _ARCH_KEYS


assert set(architecture_keys()) <= {f.name for f in fields(ShapesOptions)}


@register_backend("shapes", ShapesOptions, help="the embedded shapes world (default): CPU-sized SD3 miniature")
def make_shapes(options: ShapesOptions, device="cpu") -> ShapesBackend:
    return ShapesBackend(options, device)
