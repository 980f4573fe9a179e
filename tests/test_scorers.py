"""Real scorers on tiny random models of the same classes, saved in the real on-disk formats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from benchmarks.scorers import get_scorer, scorer_names
from benchmarks.scorers.clip_family import AestheticMLP
from benchmarks.scorers.common import OPENAI_MEAN, OPENAI_STD, load_pretrained, load_weights, preprocess, scorer_options
from rtdmd.errors import UserError
from rtdmd.rewards.base import Reward

LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]
PROMPTS = ["a red dog", "a cat", "two dogs and a cat", "a photo of a blue car"]


# ------------------------------------------------------------------ tiny models on disk


def clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = ["!"] + LETTERS + [c + "</w>" for c in LETTERS] + ["do", "dog</w>", "<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[("d", "o"), ("do", "g</w>")], pad_token="!")


CLIP_VOCAB = 57  # len of the vocabulary above; eos = 56 (largest id, as in CLIP)


def tiny_clip_dir(root, seed=0, proj=16, image=32):
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=CLIP_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=55, eos_token_id=56, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image, patch_size=8),
        projection_dim=proj,
    )
    CLIPModel(cfg).save_pretrained(root)
    clip_tokenizer().save_pretrained(root)
    CLIPImageProcessorPil(size={"shortest_edge": image}, crop_size={"height": image, "width": image}).save_pretrained(root)
    return root


#: key stems of one pre-LN transformer block: LN 1, LN 2, fused qkv, attention out, MLP in, MLP out
OPENCLIP_BLOCK = ("ln_1.", "ln_2.", "attn.in_proj_", "attn.out_proj.", "mlp.c_fc.", "mlp.c_proj.")
TIMM_BLOCK = ("norm1.", "norm2.", "attn.qkv.", "attn.proj.", "mlp.fc1.", "mlp.fc2.")


def random_block(r, prefix, w, stems):
    """Random weights of one block of width w (MLP 4w) named prefix + stem + weight/bias; r(*shape, s) draws."""
    shapes = [(w,), (w,), (3 * w, w), (w, w), (4 * w, w), (w, 4 * w)]
    sd = {}
    for i, (stem, shape) in enumerate(zip(stems, shapes)):
        sd[prefix + stem + "weight"] = 1 + r(*shape) if i < 2 else r(*shape, s=0.3)  # LayerNorm gains near 1
        sd[prefix + stem + "bias"] = r(shape[0])
    return sd


def tiny_openclip_state_dict(seed=0, width=32, tw=24, layers=2, embed=16, patch=8, grid=4, ctx=16):
    """Random weights under open_clip's CLIP key names (the HPS_v2.1_compressed.pt layout)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.1):
        return torch.randn(*shape, generator=g) * s

    sd = {
        "visual.class_embedding": r(width),
        "visual.positional_embedding": r(grid * grid + 1, width),
        "visual.conv1.weight": r(width, 3, patch, patch),
        "visual.ln_pre.weight": 1 + r(width), "visual.ln_pre.bias": r(width),
        "visual.ln_post.weight": 1 + r(width), "visual.ln_post.bias": r(width),
        "visual.proj": r(width, embed, s=0.3),
        "token_embedding.weight": r(CLIP_VOCAB, tw),
        "positional_embedding": r(ctx, tw),
        "ln_final.weight": 1 + r(tw), "ln_final.bias": r(tw),
        "text_projection": r(tw, embed, s=0.3),
        "logit_scale": torch.tensor(4.6052),
    }
    for prefix, w in (("visual.transformer.resblocks.", width), ("transformer.resblocks.", tw)):
        for i in range(layers):
            sd |= random_block(r, f"{prefix}{i}.", w, OPENCLIP_BLOCK)
    return sd


def openclip_reference(sd, pixels, tokens, vision_heads, text_heads):
    """open_clip's forward written from its definition (nn.MultiheadAttention in_proj, GELU,
    pre-LN residual blocks, class-token pooling, causal text pooled at argmax id)."""

    def block(x, p, mask, heads):
        w = x.shape[-1]
        h = F.layer_norm(x, (w,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], 1e-5).transpose(0, 1)
        a, _ = F.multi_head_attention_forward(
            h, h, h, w, heads, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"], None, None, False, 0.0,
            sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"], training=False, need_weights=False, attn_mask=mask,
        )
        x = x + a.transpose(0, 1)
        h = F.layer_norm(x, (w,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], 1e-5)
        h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])), sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
        return x + h

    n_layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("visual.transformer.resblocks."))
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=sd["visual.conv1.weight"].shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], 1) + sd["visual.positional_embedding"]
    w = x.shape[-1]
    x = F.layer_norm(x, (w,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"], 1e-5)
    for i in range(n_layers):
        x = block(x, f"visual.transformer.resblocks.{i}.", None, vision_heads)
    img = F.layer_norm(x[:, 0], (w,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"], 1e-5) @ sd["visual.proj"]
    t = sd["token_embedding.weight"][tokens] + sd["positional_embedding"]
    L = tokens.shape[1]
    causal = torch.full((L, L), float("-inf")).triu(1)
    for i in range(n_layers):
        t = block(t, f"transformer.resblocks.{i}.", causal, text_heads)
    tw = t.shape[-1]
    t = F.layer_norm(t, (tw,), sd["ln_final.weight"], sd["ln_final.bias"], 1e-5)
    txt = t[torch.arange(t.shape[0]), tokens.argmax(-1)] @ sd["text_projection"]
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


def hps_paths(tmp_path, seed=0):
    ckpt = tmp_path / "HPS_v2.1_compressed.pt"
    sd = tiny_openclip_state_dict(seed)
    torch.save({"state_dict": sd}, ckpt)
    tok = tmp_path / "laion_tok"
    clip_tokenizer().save_pretrained(tok)
    return ckpt, tok, sd


def blip_tokenizer_dir(root):
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "dog", "cat", "two", "dogs", "and", "photo", "of", "blue", "car"]
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(root)
    return root, len(words) + 2  # + [DEC], [ENC] added by BLIP


def tiny_imagereward_files(tmp_path, seed=0, width=32, depth=2, patch=8, image=32):
    """Random ImageReward.pt in the checkpoint's key format + med_config.json + BERT vocab."""
    from transformers import BlipTextConfig, BlipTextModel

    tok_dir, vocab = blip_tokenizer_dir(tmp_path / "bert")
    med = dict(architectures=["BertModel"], attention_probs_dropout_prob=0.1, hidden_act="gelu", hidden_dropout_prob=0.1,
               hidden_size=24, initializer_range=0.02, intermediate_size=48, layer_norm_eps=1e-12, max_position_embeddings=40,
               model_type="bert", num_attention_heads=2, num_hidden_layers=2, pad_token_id=0, type_vocab_size=2,
               vocab_size=vocab, encoder_width=width, add_cross_attention=True)
    (tmp_path / "med_config.json").write_text(json.dumps(med))
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.1):
        return torch.randn(*shape, generator=g) * s

    sd = {
        "blip.visual_encoder.cls_token": r(1, 1, width),
        "blip.visual_encoder.pos_embed": r(1, (image // patch) ** 2 + 1, width),
        "blip.visual_encoder.patch_embed.proj.weight": r(width, 3, patch, patch),
        "blip.visual_encoder.patch_embed.proj.bias": r(width),
        "blip.visual_encoder.norm.weight": 1 + r(width), "blip.visual_encoder.norm.bias": r(width),
        "blip.vision_proj.weight": r(8, width), "blip.vision_proj.bias": r(8),
        "blip.text_proj.weight": r(8, 24), "blip.text_proj.bias": r(8),
        "blip.text_encoder.embeddings.position_ids": torch.arange(40)[None],
    }
    for i in range(depth):
        sd |= random_block(r, f"blip.visual_encoder.blocks.{i}.", width, TIMM_BLOCK)
    # the med BERT's parameter names are BlipTextModel's (BLIP's med.py was ported as-is)
    text = BlipTextModel(BlipTextConfig(vocab_size=vocab, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=40, encoder_hidden_size=width,
                                        is_decoder=True), add_pooling_layer=False)
    sd |= {f"blip.text_encoder.{k}": v.detach().clone() for k, v in text.state_dict().items()}
    sd |= {f"mlp.{k}": v for k, v in AestheticMLP(24).state_dict().items()}
    torch.save(sd, tmp_path / "ImageReward.pt")
    return tmp_path / "ImageReward.pt", tok_dir, sd


def vit_reference(sd, pixels, heads):
    """BLIP/timm ViT forward from its definition: qkv reshaped (B, N, 3, heads, d), eps 1e-6."""
    pre = "blip.visual_encoder."
    x = F.conv2d(pixels, sd[pre + "patch_embed.proj.weight"], sd[pre + "patch_embed.proj.bias"], stride=sd[pre + "patch_embed.proj.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[pre + "cls_token"].expand(x.shape[0], -1, -1), x], 1) + sd[pre + "pos_embed"]
    B, N, C = x.shape
    depth = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith(pre + "blocks."))
    for i in range(depth):
        p = f"{pre}blocks.{i}."
        h = F.layer_norm(x, (C,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
        qkv = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        att = (qkv[0] @ qkv[1].transpose(-2, -1) * (C // heads) ** -0.5).softmax(-1)
        h = (att @ qkv[2]).transpose(1, 2).reshape(B, N, C)
        x = x + F.linear(h, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.layer_norm(x, (C,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
        x = x + F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])), sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    return F.layer_norm(x, (C,), sd[pre + "norm.weight"], sd[pre + "norm.bias"], 1e-6)


@pytest.fixture(scope="module")
def scorer_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorers")
    clip_dir = tiny_clip_dir(root / "clip")
    mlp = root / "sac+logos+ava1-l14-linearMSE.pth"
    torch.manual_seed(1)
    torch.save(AestheticMLP(16).state_dict(), mlp)
    (root / "hps").mkdir()
    hps_ckpt, hps_tok, hps_sd = hps_paths(root / "hps")
    (root / "ir").mkdir()
    ir_ckpt, ir_tok, ir_sd = tiny_imagereward_files(root / "ir")
    return dict(
        clipscore=dict(path=str(clip_dir)),
        pickscore=dict(path=str(clip_dir), processor_path=str(clip_dir)),
        aesthetic=dict(path=str(mlp), clip_path=str(clip_dir)),
        hpsv21=dict(path=str(hps_ckpt), tokenizer_path=str(hps_tok), vision_heads=4, text_heads=2),
        imagereward=dict(path=str(ir_ckpt), tokenizer_path=str(ir_tok), vision_heads=2),
        _hps_sd=hps_sd,
        _ir_sd=ir_sd,
    )


def _images(n=4, h=40, w=40, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _make(files, name, **kw):
    return get_scorer(name, **{**files[name], **kw})


ALL = ["clipscore", "pickscore", "aesthetic", "hpsv21", "imagereward"]


def test_registry_names():
    assert scorer_names() == ["hpsv21", "imagereward", "pickscore", "clipscore", "aesthetic"]
    with pytest.raises(UserError, match="unknown scorer"):
        get_scorer("nope")


@pytest.mark.parametrize("name", ALL)
def test_shape_dtype_protocol_and_batching(scorer_files, name):
    x = _images()
    s4 = _make(scorer_files, name, batch_size=4)
    s1 = _make(scorer_files, name, batch_size=1)
    assert isinstance(s4, Reward) and s4.name == name and not s4.differentiable and s4.identity
    out = s4(x, PROMPTS)
    assert out.shape == (4,) and out.dtype == torch.float32 and torch.isfinite(out).all()
    singles = torch.cat([s1(x[i : i + 1], PROMPTS[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(out, singles, atol=1e-5, rtol=1e-5)
    # different images score differently (the score reads the pixels)
    assert not torch.allclose(out, s4(x.flip(0), PROMPTS))
    with pytest.raises(UserError, match="prompt"):
        s4(x, PROMPTS[:3])


@pytest.mark.parametrize("name", ALL)
def test_gradient_reaches_images(scorer_files, name):
    s = _make(scorer_files, name, differentiable=True, batch_size=2)
    assert s.differentiable
    x = _images(4, 48, 40).requires_grad_(True)
    s(x, PROMPTS).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(g.abs().sum() > 0 for g in x.grad)  # each image gets its own gradient


@pytest.mark.parametrize("name", ALL)
def test_differentiable_path_matches_exact_path(scorer_files, name):
    # torch antialiased bicubic vs PIL bicubic on uint8: same score up to resampling rounding
    x = (_images(2, 64, 64) * 255).round() / 255
    exact = _make(scorer_files, name)(x, PROMPTS[:2])
    diff = _make(scorer_files, name, differentiable=True)(x, PROMPTS[:2]).detach()
    torch.testing.assert_close(diff, exact, atol=2e-2 * (1 + exact.abs().max().item()), rtol=0)


def test_hpsv21_matches_openclip_definition(scorer_files):
    s = _make(scorer_files, "hpsv21")
    x = (_images(2, 32, 32) * 255).round() / 255  # 32 px = the tiny model's input: no resize
    got = s(x, PROMPTS[:2])
    px = (x - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    tokens = clip_tokenizer()(PROMPTS[:2], padding="max_length", max_length=16, truncation=True, return_tensors="pt")["input_ids"]
    # the tiny tokenizer pads with "!" = id 0, as open_clip's tokenize() does
    img, txt = openclip_reference(scorer_files["_hps_sd"], px, tokens, vision_heads=4, text_heads=2)
    torch.testing.assert_close(got, (img * txt).sum(-1), atol=1e-5, rtol=1e-4)


def test_imagereward_vision_matches_blip_definition(scorer_files):
    s = _make(scorer_files, "imagereward")
    x = (_images(2, 32, 32) * 255).round() / 255
    px = (x - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        got = s.vision(pixel_values=px).last_hidden_state
    torch.testing.assert_close(got, vit_reference(scorer_files["_ir_sd"], px, heads=2), atol=1e-5, rtol=1e-4)


def test_imagereward_text_is_bidirectional_and_reads_the_image(scorer_files):
    s = _make(scorer_files, "imagereward")
    x = _images(2, 32, 32)
    a = s(x[:1], ["a red dog"])
    b = s(x[:1], ["a red cat"])  # only a later token differs: [CLS] must see it (no causal mask)
    c = s(x[1:], ["a red dog"])
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


def test_imagereward_zscore_constants(scorer_files):
    s = _make(scorer_files, "imagereward")
    x = _images(1, 32, 32)
    px = preprocess(x, 32, "crop", OPENAI_MEAN, OPENAI_STD, differentiable=False)
    tok = s.tokenizer(["a dog"], padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        emb = s.vision(pixel_values=px).last_hidden_state
        feat = s.text(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], encoder_hidden_states=emb,
                      encoder_attention_mask=torch.ones(emb.shape[:2], dtype=torch.long), is_decoder=False).last_hidden_state[:, 0]
        raw = s.mlp(feat).squeeze(-1)
    torch.testing.assert_close(s(x, ["a dog"]), (raw - 0.16717362830052426) / 1.0333394966054072)


def test_pickscore_is_scaled_cosine_of_clipscore(scorer_files):
    x = _images()
    clip = _make(scorer_files, "clipscore")(x, PROMPTS)
    pick = _make(scorer_files, "pickscore")(x, PROMPTS)
    from transformers import CLIPModel

    scale = CLIPModel.from_pretrained(scorer_files["clipscore"]["path"]).logit_scale.exp().item()
    torch.testing.assert_close(pick, scale * clip, atol=1e-4, rtol=1e-5)
    assert (clip.abs() <= 1 + 1e-6).all()


def test_aesthetic_is_mlp_on_normalised_embedding(scorer_files):
    s = _make(scorer_files, "aesthetic")
    x = _images(2)
    emb = s.image_embeds(x)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    mlp = AestheticMLP(16)
    mlp.load_state_dict(torch.load(scorer_files["aesthetic"]["path"]))
    mlp.eval()
    with torch.no_grad():
        torch.testing.assert_close(s(x, ["", ""]), mlp(emb).squeeze(-1))


def test_preprocess_pad_and_crop_geometry():
    # 20 x 40 image, longest side to 8 -> 4 x 8, zero rows above/below (2 each); crop keeps the centre
    x = torch.ones(1, 3, 20, 40)
    p = preprocess(x, 8, "pad", (0, 0, 0), (1, 1, 1), differentiable=True)
    assert p.shape == (1, 3, 8, 8)
    assert (p[:, :, :2] == 0).all() and (p[:, :, -2:] == 0).all()
    torch.testing.assert_close(p[:, :, 2:6], torch.ones(1, 3, 4, 8))
    y = torch.zeros(1, 3, 10, 30)
    y[..., 10:20] = 1  # the middle third
    c = preprocess(y, 10, "crop", (0, 0, 0), (1, 1, 1), differentiable=False)
    torch.testing.assert_close(c, torch.ones(1, 3, 10, 10))
    m = preprocess(torch.full((1, 3, 4, 4), 0.5), 4, "crop", (0.25, 0.5, 0.75), (0.5, 0.5, 0.5), differentiable=False)
    torch.testing.assert_close(m[0, :, 0, 0], torch.tensor([0.5, 0.0, -0.5]), atol=0.01, rtol=0)


def test_torch_bicubic_close_to_pil():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)
    pil = np.asarray(Image.fromarray(arr).resize((23, 23), Image.BICUBIC)).astype(np.float32)
    t = torch.from_numpy(arr).permute(2, 0, 1)[None].float()
    tt = F.interpolate(t, size=(23, 23), mode="bicubic", antialias=True, align_corners=False)[0].permute(1, 2, 0).numpy()
    assert np.abs(tt - pil).mean() < 1.0 and np.abs(tt - pil).max() < 4.0


@pytest.mark.parametrize("name", ALL)
def test_missing_weights_name_the_path(tmp_path, name):
    missing = tmp_path / "nowhere" / "weights.pt"
    with pytest.raises(UserError, match="nowhere"):
        get_scorer(name, path=str(missing))


def test_missing_hub_id_says_how_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="huggingface-cli download openai/clip-vit-large-patch14"):
        get_scorer("clipscore")
    with pytest.raises(UserError, match="HPS_v2.1_compressed.pt"):
        get_scorer("hpsv21")


def test_load_weights_reports_missing_and_unexpected_keys_but_not_position_ids():
    m = torch.nn.Linear(2, 1)
    m.register_buffer("position_ids", torch.arange(2))
    assert load_weights(m, {"weight": torch.ones(1, 2), "extra": torch.zeros(1)}) == (["bias"], ["extra"])
    assert torch.equal(m.weight, torch.ones(1, 2))


def test_load_pretrained_failure_is_one_sentence_naming_folder_and_fix(tmp_path):
    from transformers import AutoTokenizer

    with pytest.raises(UserError) as e:
        load_pretrained(AutoTokenizer, tmp_path, "X tokenizer", "pass a vocab directory")
    msg = str(e.value)
    assert msg.startswith(f"X tokenizer: could not load AutoTokenizer from {tmp_path} (") and "\n" not in msg
    assert msg.endswith("); pass a vocab directory.")


def test_scorer_options_are_the_constructors_own_and_the_common_parameters():
    from benchmarks.scorers.clip_family import PickScore

    assert scorer_options(PickScore) == {"path", "processor_path", "device", "dtype", "batch_size", "differentiable"}


def test_wrong_checkpoint_is_a_user_error(scorer_files, tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"foo": torch.zeros(1)}, bad)
    with pytest.raises(UserError, match="not an"):
        get_scorer("hpsv21", path=str(bad), tokenizer_path=scorer_files["hpsv21"]["tokenizer_path"])
    with pytest.raises(UserError, match="not an ImageReward"):
        get_scorer("imagereward", path=str(bad), tokenizer_path=scorer_files["imagereward"]["tokenizer_path"], 
                    med_config=str(Path(scorer_files["imagereward"]["path"]).parent / "med_config.json"))
    with pytest.raises(UserError, match="no option"):
        get_scorer("clipscore", path=scorer_files["clipscore"]["path"], processor_path="x")
