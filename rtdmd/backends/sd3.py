"""sd3: Stable Diffusion 3 / 3.5 (Medium, Large) through diffusers' SD3 classes.

State x: the VAE latent normalised as the SD3 pipeline does, x = (z - shift_factor) *
scaling_factor, shape (16, R/8, R/8). The transformer (SD3Transformer2DModel) predicts
v = eps - x0 at timestep 1000 * sigma, the project's convention already. Text: CLIP-L and
OpenCLIP-bigG (penultimate hidden states + pooled projections) and T5-XXL, encoded with the
pipeline's own ``encode_prompt`` and cached on disk. Schedule shift: the model's scheduler
config (3.0 for all three published models). diffusers and transformers are imported when the
model loads (the real extras are optional and heavy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from rtdmd import flow
from rtdmd.backends import lora as L
from rtdmd.backends.model_source import DIFFUSERS_MODEL, SCHEDULER, TOKENIZER, TRANSFORMERS_MODEL
from rtdmd.backends.real_common import RealBackend, RealOptions, images_to_vae_range, torch_dtype, vae_range_to_images
from rtdmd.errors import UserError
from rtdmd.registry import register_backend

SD3_HUB_IDS = {
    "sd3-medium": "stabilityai/stable-diffusion-3-medium-diffusers",
    "sd3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
    "sd3.5-large": "stabilityai/stable-diffusion-3.5-large",
}


@dataclass
class SD3Options(RealOptions):
    variant: Literal["sd3-medium", "sd3.5-medium", "sd3.5-large"] = "sd3-medium"
    resolution: int = 1024
    max_sequence_length: int = 256  # T5 tokens (the SD3 pipeline's default)
    use_t5: bool = True  # False: zeros in place of T5 (the pipeline's text_encoder_3=None mode)
    lora_targets: list[str] = field(default_factory=lambda: list(L.SD3_ATTENTION_TARGETS))


def sd3_velocity(model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
    """SD3Transformer2DModel at timestep 1000 * sigma; float32 in, float32 out."""
    dtype = model.pos_embed.proj.weight.dtype
    out = model(hidden_states=x.to(dtype), timestep=flow.timestep_from_sigma(sigma.float()),
                encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                pooled_projections=cond["pooled_prompt_embeds"].to(dtype), return_dict=False)[0]
    return out.float()


class SD3Backend(RealBackend):
    name = "sd3"
    family = "SD3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    hub_ids = SD3_HUB_IDS
    components = {"scheduler": SCHEDULER, "transformer": DIFFUSERS_MODEL, "vae": DIFFUSERS_MODEL,
                  "text_encoder": TRANSFORMERS_MODEL, "tokenizer": TOKENIZER,
                  "text_encoder_2": TRANSFORMERS_MODEL, "tokenizer_2": TOKENIZER,
                  "text_encoder_3": TRANSFORMERS_MODEL, "tokenizer_3": TOKENIZER}
    layout = ("model_index.json, scheduler/, transformer/, vae/, text_encoder/, tokenizer/, text_encoder_2/, "
              "tokenizer_2/, text_encoder_3/ and tokenizer_3/")
    default_lora_targets = L.SD3_ATTENTION_TARGETS
    velocity_call = staticmethod(sd3_velocity)

    def variant_name(self):
        return self.options.variant

    def required_components(self):
        comps = dict(self.components)
        if not self.options.use_t5:
            comps.pop("text_encoder_3")
            comps.pop("tokenizer_3")
        return comps

    def encoder_fingerprint(self):
        o = self.options
        return f"sd3|t5={o.use_t5}|len={o.max_sequence_length}|enc={o.text_encoder_dtype}|store={o.dtype}"

    def text_component_names(self):
        names = ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]
        return names + (["text_encoder_3", "tokenizer_3"] if self.options.use_t5 else [])

    # ------------------------------------------------------------------ loading
    def _load_transformer(self, dtype):
        from diffusers import SD3Transformer2DModel

        return self.source.load(SD3Transformer2DModel, "transformer", dtype)

    def _load_vae(self):
        from diffusers import AutoencoderKL

        return self.source.load(AutoencoderKL, "vae", torch_dtype(self.options.vae_dtype))

    def _load_text_encoders(self):
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        if self.source is None:
            raise RuntimeError("in-memory SD3 backend was built without text encoders")
        dt = torch_dtype(self.options.text_encoder_dtype)
        out = {"text_encoder": self.source.load(CLIPTextModelWithProjection, "text_encoder", dt),
               "tokenizer": self.source.load(CLIPTokenizer, "tokenizer"),
               "text_encoder_2": self.source.load(CLIPTextModelWithProjection, "text_encoder_2", dt),
               "tokenizer_2": self.source.load(CLIPTokenizer, "tokenizer_2")}
        if self.options.use_t5:
            out["text_encoder_3"] = self.source.load(T5EncoderModel, "text_encoder_3", dt)
            out["tokenizer_3"] = self.source.load(T5TokenizerFast, "tokenizer_3")
        return out

    # ------------------------------------------------------------------ geometry
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.config_of("vae")["block_out_channels"]) - 1)

    def state_shape(self):
        t = self.config_of("transformer")
        f = self.vae_scale_factor()
        r = self.options.resolution
        if r % (f * t["patch_size"]):
            raise UserError(f"backend.resolution={r} must be a multiple of {f * t['patch_size']} for {self.family}.")
        return (t["in_channels"], r // f, r // f)

    def schedule_shift(self) -> float:
        return self.options.shift or float(self.config_of("scheduler").get("shift", 3.0))

    def sampling_sigmas(self, num_steps):
        return flow.sampling_sigmas(num_steps, self.schedule_shift()).to(self.device)

    def generator_sigmas(self, num_steps=4):
        ts = self.options.generator_timesteps
        if num_steps != len(ts):
            ts = [1000.0 * (1 - i / num_steps) for i in range(num_steps)]
        # docs/paper.md s2: [1000, 750, 500, 250] with shift 3 -> [1, .9, .75, .5, 0]
        return flow.timesteps_to_sigmas(ts, self.schedule_shift()).to(self.device)

    # ------------------------------------------------------------------ text
    def _encode_uncached(self, prompts, encoders):
        from diffusers import StableDiffusion3Pipeline

        o = self.options
        pipe = StableDiffusion3Pipeline(
            transformer=None if o.use_t5 else self.base_model(), scheduler=None, vae=None,
            text_encoder=encoders["text_encoder"], tokenizer=encoders["tokenizer"],
            text_encoder_2=encoders["text_encoder_2"], tokenizer_2=encoders["tokenizer_2"],
            text_encoder_3=encoders.get("text_encoder_3"), tokenizer_3=encoders.get("tokenizer_3"))
        pe, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=self.device,
                                              do_classifier_free_guidance=False,
                                              max_sequence_length=o.max_sequence_length)
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}

    # ------------------------------------------------------------------ images
    def latents_to_images(self, x, vae):
        c = vae.config
        z = x.float() / c.scaling_factor + (c.shift_factor or 0.0)
        return vae_range_to_images(vae.decode(z.to(vae.dtype), return_dict=False)[0].float())

    def images_to_latents(self, images, vae):
        c = vae.config
        z = vae.encode(images_to_vae_range(images.float()).to(vae.dtype)).latent_dist.mode().float()
        return (z - (c.shift_factor or 0.0)) * c.scaling_factor


@register_backend("sd3", SD3Options, help="SD3-Medium, SD3.5-Medium / Large (diffusers format, local files only)",
                  extras=("real",))
def make_sd3(options: SD3Options, device="cpu") -> SD3Backend:
    return SD3Backend(options, device)
