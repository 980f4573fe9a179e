"""ImageReward v1.0 rebuilt from transformers classes (no `image-reward` package).

Architecture (ImageReward.py / BLIP models in the public ImageReward code):
- vision: BLIP ViT-L/16 at 224 px (timm-style blocks, LayerNorm eps 1e-6), full token
  sequence after the final norm -> ``BlipVisionModel.last_hidden_state``;
- text: BLIP "med" BERT (word + position embeddings, no token types) with a cross-attention
  block in every layer over the image tokens, bidirectional self-attention (mode
  "multimodal") -> ``BlipTextModel`` built with is_decoder=True (creates the cross-attention)
  and called with is_decoder=False (bidirectional mask);
- head: the [CLS] feature through the 768-1024-128-64-16-1 linear MLP, then the z-score
  ``(r - 0.16717362830052426) / 1.0333394966054072``;
- tokenizer: bert-base-uncased plus [DEC] (bos) and [ENC] special tokens, padded/truncated
  to 35 tokens; the [CLS] token is not replaced by [ENC] at scoring time.
Checkpoint keys (ImageReward.pt): ``blip.visual_encoder.*`` (timm names),
``blip.text_encoder.*`` (med names = BlipTextModel names), ``mlp.layers.*``;
``blip.vision_proj`` / ``blip.text_proj`` are unused for the reward.
transformers' model classes are imported when the scorer loads (heavy).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from benchmarks.scorers.clip_family import AestheticMLP, _load_state_dict
from benchmarks.scorers.common import (OPENAI_MEAN, OPENAI_STD, BatchedScorer, identity_of, load_pretrained,
                                       load_weights, preprocess, read_json, resolve_dir, resolve_file)
from rtdmd.errors import UserError

IR_REPO, IR_FILE, IR_CONFIG = "THUDM/ImageReward", "ImageReward.pt", "med_config.json"
BERT_TOKENIZER = "bert-base-uncased"
#: reward normalisation constants of ImageReward v1.0 (ImageReward.py: self.mean, self.std)
IR_MEAN = 0.16717362830052426
IR_STD = 1.0333394966054072
PROMPT_MAX_LENGTH = 35
#: BLIP ViT-L: 16 heads of 64 (create_vit('large')); heads are not recoverable from shapes
VIT_L_HEAD_DIM = 64

_VIT_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]


def vit_key_to_hf(key: str) -> str:
    for pat, rep in _VIT_RENAMES:
        new, n = re.subn(pat, rep, key)
        if n:
            return new
    raise KeyError(key)


def split_checkpoint(sd: dict) -> tuple[dict, dict, dict]:
    """ImageReward.pt state dict -> (BlipVisionModel sd, BlipTextModel sd, MLP sd)."""
    vision, text, mlp = {}, {}, {}
    for k, v in sd.items():
        if k.startswith("blip.visual_encoder."):
            vision[vit_key_to_hf(k.removeprefix("blip.visual_encoder."))] = v
        elif k.startswith("blip.text_encoder."):
            name = k.removeprefix("blip.text_encoder.")
            if name != "embeddings.position_ids":
                text[name] = v
        elif k.startswith("mlp."):
            mlp[k.removeprefix("mlp.")] = v
    return vision, text, mlp


def build_configs(vision_sd: dict, med_config: dict, vision_heads: int | None = None):
    """BlipVisionConfig from the checkpoint's shapes, BlipTextConfig from med_config.json."""
    from transformers import BlipTextConfig, BlipVisionConfig

    width = vision_sd["embeddings.class_embedding"].shape[-1]
    patch = vision_sd["embeddings.patch_embedding.weight"].shape[-1]
    grid = int(round((vision_sd["embeddings.position_embedding"].shape[1] - 1) ** 0.5))
    layers = 1 + max(int(m.group(1)) for k in vision_sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k)))
    vcfg = BlipVisionConfig(
        hidden_size=width,
        intermediate_size=vision_sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers,
        num_attention_heads=vision_heads or width // VIT_L_HEAD_DIM,
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=1e-6,  # BLIP ViT: partial(nn.LayerNorm, eps=1e-6)
    )
    tcfg = BlipTextConfig(
        vocab_size=med_config["vocab_size"],
        hidden_size=med_config["hidden_size"],
        intermediate_size=med_config["intermediate_size"],
        num_hidden_layers=med_config["num_hidden_layers"],
        num_attention_heads=med_config["num_attention_heads"],
        max_position_embeddings=med_config["max_position_embeddings"],
        hidden_act=med_config.get("hidden_act", "gelu"),
        layer_norm_eps=med_config.get("layer_norm_eps", 1e-12),
        pad_token_id=med_config.get("pad_token_id", 0),
        encoder_hidden_size=width,  # BLIP sets encoder_width = vision_width
        is_decoder=True,  # builds the cross-attention blocks; forward uses is_decoder=False
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return vcfg, tcfg


def blip_tokenizer(folder: Path):
    """bert-base-uncased with BLIP's added [DEC] bos and [ENC] special tokens."""
    from transformers import BertTokenizer

    tok = load_pretrained(BertTokenizer, folder, "ImageReward tokenizer", "pass a bert-base-uncased directory")
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


class ImageReward(BatchedScorer):
    """ImageReward v1.0: z-scored reward from BLIP image-text cross-attention features."""

    name = "imagereward"

    def __init__(self, path: str | None = None, med_config: str | None = None, tokenizer_path: str | None = None,
                 vision_heads: int | None = None, **common):
        super().__init__(**common)
        from transformers import BlipTextModel, BlipVisionModel

        ckpt = resolve_file(path or IR_REPO, "ImageReward", (IR_REPO, IR_FILE))
        # med_config.json sits beside ImageReward.pt (same hub repo) unless given
        cfg_spec = med_config or (str(ckpt.parent / IR_CONFIG) if (ckpt.parent / IR_CONFIG).is_file() else IR_REPO)
        cfg_file = resolve_file(cfg_spec, "ImageReward med_config", (IR_REPO, IR_CONFIG))
        sd = _load_state_dict(ckpt)
        vision_sd, text_sd, mlp_sd = split_checkpoint(sd)
        if not vision_sd or not text_sd or not mlp_sd:
            raise UserError(f"{ckpt} is not an ImageReward checkpoint (no blip.visual_encoder / blip.text_encoder / mlp keys); pass {IR_FILE}.")
        vcfg, tcfg = build_configs(vision_sd, read_json(cfg_file), vision_heads)
        self.vision = BlipVisionModel(vcfg)
        self.text = BlipTextModel(tcfg, add_pooling_layer=False)
        self.mlp = AestheticMLP(tcfg.hidden_size)
        for module, part, label in ((self.vision, vision_sd, "vision"), (self.text, text_sd, "text"), (self.mlp, mlp_sd, "mlp")):
            missing, unexpected = load_weights(module, part)
            if missing or unexpected:
                raise UserError(
                    f"{ckpt} does not match the ImageReward {label} layout (missing {missing[:3]}, unexpected {unexpected[:3]}); pass {IR_FILE}."
                )
        self._freeze(self.vision, self.text, self.mlp)
        self.tokenizer = blip_tokenizer(resolve_dir(tokenizer_path or BERT_TOKENIZER, "ImageReward tokenizer (bert-base-uncased)"))
        self.image_size = vcfg.image_size
        self.identity = identity_of(ckpt)

    def _score(self, images, prompts):
        # ImageReward.py preprocess: Resize(224, bicubic) shortest side, CenterCrop(224), OpenAI mean/std
        px = preprocess(images, self.image_size, "crop", OPENAI_MEAN, OPENAI_STD, self.differentiable).to(self.dtype)
        image_embeds = self.vision(pixel_values=px).last_hidden_state
        tok = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=PROMPT_MAX_LENGTH, return_tensors="pt"
        ).to(self.device)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        out = self.text(
            input_ids=tok["input_ids"],
            attention_mask=tok["attention_mask"],
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            is_decoder=False,
        )
        features = out.last_hidden_state[:, 0, :]
        reward = self.mlp(features).squeeze(-1).float()
        return (reward - IR_MEAN) / IR_STD
