"""Tiny random-weight instances of the real SD3 / FLUX.2 classes (nothing downloaded).

Shared by tests/test_backend_sd3.py and tests/test_backend_flux2.py: in-memory component
sets, and the same components written to disk in the published diffusers layout.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

_CHARS = string.ascii_lowercase


def clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer():
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + c, -1.0) for c in _CHARS] + [(c, -2.0) for c in _CHARS]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def qwen_tokenizer():
    from transformers import Qwen2TokenizerFast

    vocab = {c: i for i, c in enumerate(list(_CHARS) + ["\u0120", "\u010a", "<|im_start|>", "<|im_end|>", "<|endoftext|>"])}
    tok = Qwen2TokenizerFast(vocab=vocab, merges=[])
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def _clip(hidden: int, vocab: int = 60):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1))


def sd3_components(seed: int = 0, t5: bool = True) -> dict:
    """Tiny SD3: CLIP widths 8 + 16 = 24 (pooled), T5 width 32 = joint_attention_dim, 4 latent channels."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    comps = {
        "transformer": SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=24,
            pos_embed_max_size=8),
        "vae": AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
            layers_per_block=1, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
            use_post_quant_conv=False),
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "text_encoder": _clip(8), "tokenizer": clip_tokenizer(),
        "text_encoder_2": _clip(16), "tokenizer_2": clip_tokenizer(),
    }
    if t5:
        comps["text_encoder_3"] = T5EncoderModel(T5Config(vocab_size=60, d_model=32, d_ff=16, d_kv=8, num_layers=1,
                                                          num_heads=2, pad_token_id=0, eos_token_id=1))
        comps["tokenizer_3"] = t5_tokenizer()
    return comps


def flux2_components(seed: int = 0) -> dict:
    """Tiny FLUX.2 klein: Qwen3 width 8 with out layers (1, 2, 3) -> joint_attention_dim 24; 4 x 4 = 16 latent channels."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                             layers_per_block=1)
    with torch.no_grad():  # non-trivial latent statistics, so the normalisation is exercised
        vae.bn.running_mean.uniform_(-0.5, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    return {
        "transformer": Flux2Transformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=24, timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2), guidance_embeds=False),
        "vae": vae,
        "scheduler": FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0),
        "text_encoder": Qwen3ForCausalLM(Qwen3Config(
            vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=1, head_dim=4, max_position_embeddings=64, pad_token_id=30)),
        "tokenizer": qwen_tokenizer(),
    }


def save_model_dir(components: dict, directory: Path, pipeline_class: str, extra_index: dict | None = None) -> Path:
    """Write components in the diffusers layout (model_index.json + one folder each)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": pipeline_class, "_diffusers_version": "0.42.1", **(extra_index or {})}
    for name, comp in components.items():
        comp.save_pretrained(str(directory / name))
        lib = "transformers" if type(comp).__module__.startswith("transformers") else "diffusers"
        index[name] = [lib, type(comp).__name__]
    (directory / "model_index.json").write_text(json.dumps(index, indent=1))
    return directory
