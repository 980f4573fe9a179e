"""flux2: FLUX.2 [klein] 4B / 9B through diffusers' FLUX.2 classes.

diffusers 0.42.1 ships Flux2KleinPipeline with Flux2Transformer2DModel, AutoencoderKLFlux2
(32 latent channels, a BatchNorm over 2x2-patchified latents) and a Qwen3ForCausalLM text
encoder (Qwen3-4B for klein 4B, Qwen3-8B for 9B) whose hidden states at layers (9, 18, 27)
are concatenated into the prompt embedding.

State x: the patchified, BatchNorm-normalised latent of the pipeline, (128, R/16, R/16);
the transformer sees it packed as (R/16)^2 tokens of 128 channels. The transformer takes
timestep = sigma and predicts v = eps - x0 (FlowMatchEulerDiscreteScheduler steps
x + (s' - s) v). Schedule: FLUX.2's resolution-dependent mu (diffusers' compute_empirical_mu)
with rtdmd.flow.exponential_time_shift; at 512 px the generator's [1000, 750, 500, 250]
become about [1.0, 0.958, 0.884, 0.718] (docs/paper.md s2).

Base variants (klein-base-*) are the undistilled teachers and take real CFG (two passes,
Imagen form); the distilled klein-4b / klein-9b take no CFG. diffusers and transformers are
imported when the model loads (the real extras are optional and heavy).
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

FLUX2_HUB_IDS = {
    "klein-base-4b": "black-forest-labs/FLUX.2-klein-base-4B",
    "klein-base-9b": "black-forest-labs/FLUX.2-klein-base-9B",
    "klein-4b": "black-forest-labs/FLUX.2-klein-4B",
    "klein-9b": "black-forest-labs/FLUX.2-klein-9B",
}


@dataclass
class Flux2Options(RealOptions):
    variant: Literal["klein-base-4b", "klein-base-9b", "klein-4b", "klein-9b"] = "klein-base-4b"
    resolution: int = 512  # docs/paper.md: FLUX.2-klein trained and evaluated at 512 px
    max_sequence_length: int = 512  # Qwen3 tokens (the pipeline's default)
    text_encoder_out_layers: list[int] = field(default_factory=lambda: [9, 18, 27])
    lora_targets: list[str] = field(default_factory=lambda: list(L.FLUX2_ATTENTION_TARGETS))


def _pipeline():
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's schedule parameter mu (diffusers' own compute_empirical_mu; not re-derived here)."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    return compute_empirical_mu(image_seq_len=image_seq_len, num_steps=num_steps)


def unpack_tokens(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h*w, C) -> (B, C, h, w): the inverse of the pipeline's _pack_latents (row-major ids)."""
    b, _, c = tokens.shape
    return tokens.permute(0, 2, 1).reshape(b, c, h, w)


def flux2_velocity(model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
    """Flux2Transformer2DModel on packed latent tokens at timestep sigma; float32 in, float32 out."""
    P = _pipeline()
    b, _, h, w = x.shape
    dtype = model.x_embedder.weight.dtype
    pe = cond["prompt_embeds"]
    img_ids = P._prepare_latent_ids(x[:1])[0].to(x.device)  # (h*w, 4); shared by the batch
    txt_ids = P._prepare_text_ids(pe[:1])[0].to(x.device)
    out = model(hidden_states=P._pack_latents(x).to(dtype), encoder_hidden_states=pe.to(dtype),
                timestep=sigma.to(dtype), img_ids=img_ids, txt_ids=txt_ids, guidance=None, return_dict=False)[0]
    return unpack_tokens(out.float(), h, w)


class Flux2Backend(RealBackend):
    name = "flux2"
    family = "FLUX.2 klein"
    pipeline_class_name = "Flux2KleinPipeline"
    hub_ids = FLUX2_HUB_IDS
    components = {"scheduler": SCHEDULER, "transformer": DIFFUSERS_MODEL, "vae": DIFFUSERS_MODEL,
                  "text_encoder": TRANSFORMERS_MODEL, "tokenizer": TOKENIZER}
    layout = "model_index.json, scheduler/, transformer/, vae/, text_encoder/ and tokenizer/"
    default_lora_targets = L.FLUX2_ATTENTION_TARGETS
    velocity_call = staticmethod(flux2_velocity)

    def variant_name(self):
        return self.options.variant

    def encoder_fingerprint(self):
        o = self.options
        return (f"flux2|len={o.max_sequence_length}|layers={list(o.text_encoder_out_layers)}"
                f"|enc={o.text_encoder_dtype}|store={o.dtype}")

    def text_component_names(self):
        return ["text_encoder", "tokenizer"]

    def is_guidance_distilled(self) -> bool:
        if self.source is not None:
            return bool(self.source.model_index().get("is_distilled", False))
        return bool(self._modules.get("is_distilled", False))

    # ------------------------------------------------------------------ loading
    def _load_transformer(self, dtype):
        from diffusers import Flux2Transformer2DModel

        return self.source.load(Flux2Transformer2DModel, "transformer", dtype)

    def _load_vae(self):
        from diffusers import AutoencoderKLFlux2

        return self.source.load(AutoencoderKLFlux2, "vae", torch_dtype(self.options.vae_dtype))

    def _load_text_encoders(self):
        from transformers import Qwen2TokenizerFast, Qwen3ForCausalLM

        if self.source is None:
            raise RuntimeError("in-memory FLUX.2 backend was built without a text encoder")
        return {"text_encoder": self.source.load(Qwen3ForCausalLM, "text_encoder",
                                                 torch_dtype(self.options.text_encoder_dtype)),
                "tokenizer": self.source.load(Qwen2TokenizerFast, "tokenizer")}

    # ------------------------------------------------------------------ geometry
    def latent_stride(self) -> int:
        """Pixels per state cell: the VAE's 8x downsampling times the 2x2 patchify."""
        return 2 ** (len(self.config_of("vae")["block_out_channels"]) - 1) * 2

    def state_shape(self):
        f = self.latent_stride()
        r = self.options.resolution
        if r % f:
            raise UserError(f"backend.resolution={r} must be a multiple of {f} for FLUX.2.")
        return (self.config_of("transformer")["in_channels"], r // f, r // f)

    def image_seq_len(self) -> int:
        _, h, w = self.state_shape()
        return h * w

    def sampling_sigmas(self, num_steps):
        mu = empirical_mu(self.image_seq_len(), int(num_steps))
        return flow.sampling_sigmas(num_steps, mu=mu).to(self.device)

    def generator_sigmas(self, num_steps=4):
        ts = self.options.generator_timesteps
        if num_steps != len(ts):
            ts = [1000.0 * (1 - i / num_steps) for i in range(num_steps)]
        s = flow.sigma_from_timestep(torch.tensor(ts, dtype=torch.float64))
        s = flow.exponential_time_shift(s, empirical_mu(self.image_seq_len(), num_steps))
        return torch.cat([s, s.new_zeros(1)]).to(torch.float32).to(self.device)

    # ------------------------------------------------------------------ text
    def _encode_uncached(self, prompts, encoders):
        o = self.options
        pe = _pipeline()._get_qwen3_prompt_embeds(
            text_encoder=encoders["text_encoder"], tokenizer=encoders["tokenizer"], prompt=prompts,
            device=self.device, max_sequence_length=o.max_sequence_length,
            hidden_states_layers=tuple(o.text_encoder_out_layers))
        return {"prompt_embeds": pe}

    # ------------------------------------------------------------------ images
    @staticmethod
    def _bn_stats(vae) -> tuple[torch.Tensor, torch.Tensor]:
        mean = vae.bn.running_mean.view(1, -1, 1, 1).float()
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1).float() + vae.config.batch_norm_eps)
        return mean, std

    def latents_to_images(self, x, vae):
        mean, std = self._bn_stats(vae)
        z = _pipeline()._unpatchify_latents(x.float() * std + mean)
        return vae_range_to_images(vae.decode(z.to(vae.dtype), return_dict=False)[0].float())

    def images_to_latents(self, images, vae):
        mean, std = self._bn_stats(vae)
        z = vae.encode(images_to_vae_range(images.float()).to(vae.dtype)).latent_dist.mode().float()
        return (_pipeline()._patchify_latents(z) - mean) / std


@register_backend("flux2", Flux2Options, help="FLUX.2 [klein] base 4B / 9B (diffusers format, local files only)",
                  extras=("real",))
def make_flux2(options: Flux2Options, device="cpu") -> Flux2Backend:
    return Flux2Backend(options, device)
