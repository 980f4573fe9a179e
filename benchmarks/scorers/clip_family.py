"""CLIP-based scorers on transformers' CLIPModel: CLIPScore, PickScore, LAION aesthetic v2, HPSv2.1.

HPSv2.1 ships an open_clip ViT-H-14 state dict; it is mapped key by key onto a CLIPModel of
the same architecture (same maths: pre-LN ViT with class-token pooling, causal text
transformer pooled at the end-of-text token, GELU, LayerNorm eps 1e-5). open_clip itself is
not imported: it needs torchvision, whose PyPI wheels are CUDA builds that fail to import
beside a CPU torch (see docs/scorers.md). transformers' model classes are imported when a
scorer loads (heavy).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.scorers.common import (DEFAULT_WEIGHTS_DIR, OPENAI_MEAN, OPENAI_STD, BatchedScorer,
                                       identity_of, load_pretrained, load_weights, preprocess, read_json,
                                       resolve_dir, resolve_file)
from rtdmd.errors import UserError

CLIP_L14 = "openai/clip-vit-large-patch14"
PICKSCORE = "yuvalkirstain/PickScore_v1"
LAION_H14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
HPS_REPO, HPS_FILE = "xswu/HPSv2", "HPS_v2.1_compressed.pt"
AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_DEFAULT = DEFAULT_WEIGHTS_DIR / AESTHETIC_FILE


class AestheticMLP(nn.Module):
    """The improved-aesthetic-predictor head (also ImageReward's): linear layers, no activations.

    Keys layers.{0,2,4,6,7}; dropouts at 1, 3, 5 (identity in eval).
    """

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _load_state_dict(path: Path) -> dict:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"could not read weights file {path} ({type(exc).__name__}: {exc}); re-obtain the file.") from None
    return sd


def image_config(folder: Path | None) -> dict:
    """Resize/crop/normalisation of a CLIP processor (preprocessor_config.json), OpenAI defaults."""
    cfg = {"size": 224, "crop": 224, "mean": OPENAI_MEAN, "std": OPENAI_STD}
    if folder is not None and (folder / "preprocessor_config.json").is_file():
        pc = read_json(folder / "preprocessor_config.json")
        size = pc.get("size", 224)
        crop = pc.get("crop_size", size)
        cfg["size"] = size.get("shortest_edge", size.get("height", 224)) if isinstance(size, dict) else int(size)
        cfg["crop"] = crop.get("height", cfg["size"]) if isinstance(crop, dict) else int(crop)
        cfg["mean"] = tuple(pc.get("image_mean", OPENAI_MEAN))
        cfg["std"] = tuple(pc.get("image_std", OPENAI_STD))
    return cfg


def _load_tokenizer(folder: Path, what: str):
    from transformers import AutoTokenizer

    return load_pretrained(AutoTokenizer, folder, what)


class _ClipScorerBase(BatchedScorer):
    """A CLIPModel, its tokenizer and image preprocessing; text embeddings cached per prompt."""

    _TEXT_CACHE_MAX = 4096

    def _setup(self, model, tokenizer, img_cfg: dict, mode: str = "crop") -> None:
        self.model = model
        self._freeze(model)
        self.tokenizer = tokenizer
        self.img_cfg = img_cfg
        self.mode = mode
        self.context_length = int(model.config.text_config.max_position_embeddings)
        self._text_cache: dict[str, torch.Tensor] = {}

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        c = self.img_cfg
        return preprocess(images, c["size"], self.mode, c["mean"], c["std"], self.differentiable, crop=c["crop"])

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) in [0, 1] -> L2-normalised projected image embeddings (b, D)."""
        return self.embed_pixels(self._pixels(images))

    def embed_pixels(self, px: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels (b, 3, S, S) -> L2-normalised projected image embeddings (b, D)."""
        pooled = self.model.vision_model(pixel_values=px.to(self.device, self.dtype)).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised projected text embeddings (b, D); no gradient (text is never optimised)."""
        todo = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if todo:
            tok = self.tokenizer(
                todo, padding="max_length", max_length=self.context_length, truncation=True, return_tensors="pt"
            )
            with torch.no_grad():
                out = self.model.text_model(input_ids=tok["input_ids"].to(self.device))
                emb = F.normalize(self.model.text_projection(out.pooler_output).float(), dim=-1)
            if len(self._text_cache) + len(todo) > self._TEXT_CACHE_MAX:
                self._text_cache.clear()
            self._text_cache.update(zip(todo, emb))
        return torch.stack([self._text_cache[p] for p in prompts])


def _load_clip_model(folder: Path, what: str):
    from transformers import CLIPModel

    return load_pretrained(CLIPModel, folder, what)


class CLIPScore(_ClipScorerBase):
    """Raw cosine between CLIP ViT-L/14 image and text embeddings (papers report this cosine)."""

    name = "clipscore"

    def __init__(self, path: str | None = None, **common):
        super().__init__(**common)
        folder = resolve_dir(path or CLIP_L14, "CLIPScore (CLIP ViT-L/14)", ["config.json"])
        self._setup(_load_clip_model(folder, "CLIPScore"), _load_tokenizer(folder, "CLIPScore"), image_config(folder))
        self.identity = identity_of(folder)

    def _score(self, images, prompts):
        return (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)


class PickScore(_ClipScorerBase):
    """PickScore_v1: logit_scale.exp() * cosine, with the laion ViT-H-14 processor."""

    name = "pickscore"

    def __init__(self, path: str | None = None, processor_path: str | None = None, **common):
        super().__init__(**common)
        folder = resolve_dir(path or PICKSCORE, "PickScore model", ["config.json"])
        proc = resolve_dir(processor_path or LAION_H14, "PickScore processor (laion ViT-H-14)")
        self._setup(_load_clip_model(folder, "PickScore"), _load_tokenizer(proc, "PickScore processor"), image_config(proc))
        self.identity = identity_of(folder)

    def _score(self, images, prompts):
        cos = (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)
        return self.model.logit_scale.float().exp() * cos


class AestheticScore(_ClipScorerBase):
    """LAION improved aesthetic predictor v2: MLP on the L2-normalised CLIP ViT-L/14 image embedding."""

    name = "aesthetic"

    def __init__(self, path: str | None = None, clip_path: str | None = None, **common):
        super().__init__(**common)
        mlp_file = resolve_file(str(path or AESTHETIC_DEFAULT), "aesthetic MLP (improved-aesthetic-predictor)")
        folder = resolve_dir(clip_path or CLIP_L14, "aesthetic CLIP ViT-L/14", ["config.json"])
        self._setup(_load_clip_model(folder, "aesthetic CLIP"), _load_tokenizer(folder, "aesthetic CLIP"), image_config(folder))
        dim = self.model.config.projection_dim
        self.mlp = AestheticMLP(dim)
        try:
            self.mlp.load_state_dict(_load_state_dict(mlp_file))
        except RuntimeError as exc:
            raise UserError(f"{mlp_file} is not an aesthetic MLP for {dim}-d CLIP embeddings ({str(exc)[:120]}); pass {AESTHETIC_FILE}.") from None
        self._freeze(self.mlp)
        self.identity = f"{identity_of(mlp_file)}+{identity_of(folder)}"

    def _score(self, images, prompts):
        return self.mlp(self.image_embeds(images).to(self.dtype)).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# HPSv2.1: open_clip state dict -> CLIPModel
# ---------------------------------------------------------------------------------------------

#: open_clip ViT-H-14 (model_configs/ViT-H-14.json): vision head_width 80 -> 16 heads, text 16 heads
VIT_H14_HEADS = {"vision_heads": 16, "text_heads": 16}

_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def _count_blocks(sd: dict, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return 1 + max(int(m.group(1)) for k in sd if (m := pat.match(k)))


def _map_blocks(sd: dict, out: dict, src: str, dst: str, n: int) -> None:
    """open_clip residual blocks ``src<i>.`` -> CLIP encoder layers ``dst<i>.`` (fused qkv split into q, k, v)."""
    for i in range(n):
        s, d = f"{src}{i}.", f"{dst}{i}."
        w, b = sd[s + "attn.in_proj_weight"], sd[s + "attn.in_proj_bias"]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[d + f"self_attn.{name}.weight"] = w.chunk(3)[j]
            out[d + f"self_attn.{name}.bias"] = b.chunk(3)[j]
        for a, z in _BLOCK.items():
            for t in ("weight", "bias"):
                out[d + f"{z}.{t}"] = sd[s + f"{a}.{t}"]


def openclip_to_hf(sd: dict, vision_heads: int, text_heads: int):
    """Map an open_clip CLIP state dict to (CLIPConfig, CLIPModel state dict)."""
    from transformers import CLIPConfig

    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    vw = sd["visual.class_embedding"].shape[0]
    patch = sd["visual.conv1.weight"].shape[-1]
    grid = int(round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5))
    embed = sd["visual.proj"].shape[1]
    tw = sd["token_embedding.weight"].shape[1]
    vision = dict(
        hidden_size=vw,
        intermediate_size=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=_count_blocks(sd, "visual.transformer.resblocks."),
        num_attention_heads=vision_heads,
        patch_size=patch,
        image_size=grid * patch,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=embed,
    )
    text = dict(
        hidden_size=tw,
        intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=_count_blocks(sd, "transformer.resblocks."),
        num_attention_heads=text_heads,
        vocab_size=sd["token_embedding.weight"].shape[0],
        max_position_embeddings=sd["positional_embedding"].shape[0],
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=embed,
        # open_clip pools at argmax(token id) = the end-of-text token 49407 (the largest id)
        bos_token_id=sd["token_embedding.weight"].shape[0] - 2,
        eos_token_id=sd["token_embedding.weight"].shape[0] - 1,
        pad_token_id=0,
    )
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed)

    out = {}
    out["vision_model.embeddings.class_embedding"] = sd["visual.class_embedding"]
    out["vision_model.embeddings.patch_embedding.weight"] = sd["visual.conv1.weight"]
    out["vision_model.embeddings.position_embedding.weight"] = sd["visual.positional_embedding"]
    for t in ("weight", "bias"):
        out[f"vision_model.pre_layrnorm.{t}"] = sd[f"visual.ln_pre.{t}"]
        out[f"vision_model.post_layernorm.{t}"] = sd[f"visual.ln_post.{t}"]
        out[f"text_model.final_layer_norm.{t}"] = sd[f"ln_final.{t}"]
    _map_blocks(sd, out, "visual.transformer.resblocks.", "vision_model.encoder.layers.", vision["num_hidden_layers"])
    _map_blocks(sd, out, "transformer.resblocks.", "text_model.encoder.layers.", text["num_hidden_layers"])
    # open_clip projects with x @ proj (width, embed); nn.Linear stores (embed, width)
    out["visual_projection.weight"] = sd["visual.proj"].t().contiguous()
    out["text_projection.weight"] = sd["text_projection"].t().contiguous()
    out["text_model.embeddings.token_embedding.weight"] = sd["token_embedding.weight"]
    out["text_model.embeddings.position_embedding.weight"] = sd["positional_embedding"]
    out["logit_scale"] = sd["logit_scale"].reshape(())
    return config, out


class HPSv21(_ClipScorerBase):
    """HPSv2.1: cosine(image, text) of an open_clip ViT-H-14 fine-tuned on HPD v2.

    Preprocessing: longest side to 224 (bicubic), zero-pad to a square, OpenAI mean/std.
    """

    name = "hpsv21"

    def __init__(self, path: str | None = None, tokenizer_path: str | None = None,
                 vision_heads: int = VIT_H14_HEADS["vision_heads"], text_heads: int = VIT_H14_HEADS["text_heads"], **common):
        super().__init__(**common)
        from transformers import CLIPModel

        ckpt = resolve_file(path or HPS_REPO, "HPSv2.1", (HPS_REPO, HPS_FILE))
        raw = _load_state_dict(ckpt)
        sd = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
        try:
            config, hf_sd = openclip_to_hf(sd, vision_heads, text_heads)
        except (KeyError, StopIteration, ValueError) as exc:
            raise UserError(f"{ckpt} is not an open_clip CLIP state dict (missing {exc}); pass {HPS_FILE}.") from None
        model = CLIPModel(config)
        missing, unexpected = load_weights(model, hf_sd)
        if missing or unexpected:
            raise RuntimeError(f"HPS key mapping incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
        tok_dir = resolve_dir(tokenizer_path or LAION_H14, "HPSv2.1 tokenizer (laion ViT-H-14)")
        self._setup(model, _load_tokenizer(tok_dir, "HPSv2.1 tokenizer"), {**image_config(None), "size": config.vision_config.image_size, "crop": config.vision_config.image_size}, mode="pad")
        self.identity = identity_of(ckpt)

    def _score(self, images, prompts):
        return (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)
