"""sd3 backend on tiny random-weight instances of the real diffusers / transformers classes."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

pytest.importorskip("peft")

from rtdmd.backends import lora as L  # noqa: E402
from rtdmd.backends.sd3 import SD3Backend, SD3Options, sd3_velocity  # noqa: E402
from rtdmd.errors import UserError  # noqa: E402
from tiny_real import save_model_dir, sd3_components  # noqa: E402

RES = 32  # tiny VAE downsamples 2x: state (4, 16, 16)


def opts(tmp_path, **kw) -> SD3Options:
    base = dict(resolution=RES, dtype="fp32", vae_dtype="fp32", text_encoder_dtype="fp32", lora_rank=4, lora_alpha=8,
                prompt_cache_dir=str(tmp_path / "cache"), offload_text_encoders=False, tf32=False)
    base.update(kw)
    return SD3Options(**base)


def backend(tmp_path, comps=None, **kw) -> SD3Backend:
    return SD3Backend(opts(tmp_path, **kw), modules=comps or sd3_components(), identity="tiny-sd3")


def randomize(net, seed: int, scale: float = 0.3) -> None:
    """Non-zero LoRA B (a fresh adapter is the identity), so adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_geometry_schedule_and_shapes(tmp_path):
    b = backend(tmp_path)
    assert b.state_shape() == (4, 16, 16)
    # docs/paper.md s2: [1000, 750, 500, 250] with shift 3 -> [1, .9, .75, .5], then 0
    assert torch.allclose(b.generator_sigmas(), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))
    assert torch.allclose(b.sampling_sigmas(2), torch.tensor([1.0, 0.75, 0.0]))  # 3 * .5 / (1 + 2 * .5)
    cond = b.encode_prompts(["a red cat", "a dog", "a red cat"])
    assert cond["prompt_embeds"].shape == (3, 77 + 256, 32)  # CLIP tokens + T5 tokens, T5 width
    assert cond["pooled_prompt_embeds"].shape == (3, 8 + 16)  # CLIP-L + CLIP-G pooled
    assert torch.equal(cond["prompt_embeds"][0], cond["prompt_embeds"][2])
    x = b.initial_noise(3, torch.Generator().manual_seed(0)).requires_grad_(True)
    v = b.velocity(b.teacher, x, torch.full((3,), 0.5), cond)
    assert v.shape == x.shape and v.dtype == torch.float32
    img = b.decode(x)
    assert img.shape == (3, 3, RES, RES) and 0.0 <= float(img.detach().min()) and float(img.detach().max()) <= 1.0
    (img.mean() + v.mean()).backward()  # decode keeps the graph (reward back-propagation)
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert b.encode_images(img.detach()).shape == (3, 4, 16, 16)


def test_one_euler_step_with_cfg_matches_the_diffusers_pipeline(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    comps = sd3_components()
    b = backend(tmp_path, comps)
    cond, unc = b.encode_prompts(["a red cat"]), b.uncond(1)
    x = b.initial_noise(1, torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = b.decode(x - b.teacher_velocity(x, torch.ones(1), cond, 4.0, unc))  # Euler 1 -> 0
        pipe = StableDiffusion3Pipeline(**comps)
        theirs = pipe(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_prompt_embeds"],
                      negative_prompt_embeds=unc["prompt_embeds"], negative_pooled_prompt_embeds=unc["pooled_prompt_embeds"],
                      latents=x, num_inference_steps=1, guidance_scale=4.0, height=RES, width=RES, output_type="pt").images
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_lora_shares_one_base_and_teacher_is_adapters_off(tmp_path):
    ref = sd3_components()["transformer"].eval()  # same seed: the untouched teacher weights
    b = backend(tmp_path)
    gen, fake = b.make_trainable("generator"), b.make_trainable("fake_score")
    randomize(gen, 1)
    randomize(fake, 2)
    ema = copy.deepcopy(gen)  # what the trainer does for EMA: a third adapter, same values
    base = b.teacher.base
    assert gen.base is base and fake.base is base and ema.base is base
    assert list(b.teacher.parameters()) == []
    base_weights = {p.data_ptr() for n, p in base.named_parameters() if not L.is_lora_parameter_name(n)}
    own = {id(p) for p in base.parameters()}
    for net in (gen, fake, ema):
        ps = list(net.parameters())
        assert ps and all(id(p) in own for p in ps)  # the base's own Parameter objects, no copies
        assert not base_weights & {p.data_ptr() for p in ps}  # adapter weights only
        assert all(p.dtype == torch.float32 and p.requires_grad for p in ps)
    n_lora = sum(p.numel() for p in gen.parameters())
    assert n_lora == sum(p.numel() for p in fake.parameters()) == sum(p.numel() for p in ema.parameters())
    # rank 4 on every attention projection: r * (in + out) per layer
    lin = [base.get_submodule(n).get_base_layer() for n in L.target_module_names(base, L.SD3_ATTENTION_TARGETS)]
    assert n_lora == sum(4 * (m.in_features + m.out_features) for m in lin)
    # one copy of the frozen weights: every parameter tensor of the base is distinct storage
    total = sum(p.numel() for p in base.parameters())
    assert total == sum(p.numel() for p in ref.parameters()) + 3 * n_lora

    cond = b.encode_prompts(["a cat", "a dog"])
    x, s = b.initial_noise(2, torch.Generator().manual_seed(0)), torch.tensor([0.7, 0.3])
    with torch.no_grad():
        v_ref = sd3_velocity(ref, x, s, cond)
        v_t, v_g, v_f, v_e = (b.velocity(n, x, s, cond) for n in (b.teacher, gen, fake, ema))
    assert torch.allclose(v_t, v_ref, atol=1e-6)
    assert not torch.allclose(v_g, v_ref, atol=1e-3) and not torch.allclose(v_f, v_g, atol=1e-3)
    assert torch.allclose(v_e, v_g, atol=1e-6)


def _grads(tmp_path, mode: str):
    comps = sd3_components()
    b = backend(tmp_path, comps, gradient_checkpointing=(mode != "off"))
    gen, fake = b.make_trainable("generator"), b.make_trainable("fake_score")
    if mode == "plain":  # diffusers' default checkpointing, unaware of the adapter switch
        b.teacher.base.enable_gradient_checkpointing()
    randomize(gen, 1)
    randomize(fake, 2)
    cond = b.encode_prompts(["a cat"])
    x = b.initial_noise(1, torch.Generator().manual_seed(0))
    s = torch.tensor([0.6])
    v_g = b.velocity(gen, x, s, cond)
    v_f = b.velocity(fake, x, s, cond)  # another adapter active between forward and backward
    ((v_g ** 2).mean() + (v_f - 1).abs().mean()).backward()
    return [p.grad.clone() for p in gen.parameters()]


def test_gradient_checkpointing_recomputes_with_the_right_adapter(tmp_path):
    exact = _grads(tmp_path, "off")
    ours = _grads(tmp_path, "adapter_aware")
    assert all(torch.allclose(a, c, atol=1e-5) for a, c in zip(exact, ours))
    # the failure the adapter-aware checkpoint prevents: recompute runs without the adapter,
    # which torch either detects (different saved tensors) or turns into wrong gradients
    try:
        naive = _grads(tmp_path, "plain")
    except torch.utils.checkpoint.CheckpointError:
        return
    assert not all(torch.allclose(a, c, atol=1e-5) for a, c in zip(exact, naive))


def test_bf16_base_keeps_fp32_adapters(tmp_path):
    b = backend(tmp_path, dtype="bf16")
    gen = b.make_trainable("generator")
    assert b.teacher.base.pos_embed.proj.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in gen.parameters())
    randomize(gen, 3, 0.1)
    cond = b.encode_prompts(["a cat"])
    assert cond["prompt_embeds"].dtype == torch.bfloat16  # embeddings are stored at weight precision
    v = b.velocity(gen, b.initial_noise(1), torch.tensor([0.5]), cond)
    assert v.dtype == torch.float32
    v.square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in gen.parameters())


def test_network_state_and_diffusers_lora_round_trip(tmp_path):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    b = backend(tmp_path)
    gen = b.make_trainable("generator")
    randomize(gen, 4)
    state = b.network_state(gen)
    assert state and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in state)
    other = b.make_trainable("generator")  # a second adapter named generator_2
    b.load_network_state(other, state)
    cond = b.encode_prompts(["a cat"])
    x, s = b.initial_noise(1, torch.Generator().manual_seed(5)), torch.tensor([0.4])
    with torch.no_grad():
        v_gen = b.velocity(gen, x, s, cond)
        assert torch.allclose(b.velocity(other, x, s, cond), v_gen, atol=1e-6)
    b.export(gen, tmp_path / "lora", merged=True)
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    pipe = StableDiffusion3Pipeline(**sd3_components())  # same seed: the same base weights
    pipe.load_lora_weights(str(tmp_path / "lora"))
    merged = SD3Transformer2DModel.from_pretrained(str(tmp_path / "lora" / "transformer"))
    with torch.no_grad():
        assert torch.allclose(sd3_velocity(pipe.transformer, x, s, cond), v_gen, atol=1e-5)  # alpha/rank kept
        assert torch.allclose(sd3_velocity(merged, x, s, cond), v_gen, atol=1e-5)


def test_full_fine_tuning_copy(tmp_path):
    b = backend(tmp_path, generator_mode="full")
    gen = b.make_trainable("generator")
    assert isinstance(gen, L.FullNet) and gen.model is not b.teacher.base
    n = sum(p.numel() for p in b.teacher.base.parameters())
    assert sum(p.numel() for p in gen.parameters() if p.requires_grad) == n
    assert all(p.dtype == torch.float32 for p in gen.parameters())
    cond = b.encode_prompts(["a cat"])
    x, s = b.initial_noise(1), torch.tensor([0.5])
    opt = torch.optim.SGD(gen.parameters(), lr=0.1)
    b.velocity(gen, x, s, cond).square().mean().backward()
    opt.step()
    with torch.no_grad():
        assert not torch.allclose(b.velocity(gen, x, s, cond), b.velocity(b.teacher, x, s, cond), atol=1e-4)
    assert set(b.network_state(gen)) == set(b.teacher.base.state_dict())


def test_prompt_cache_hits_without_text_encoders(tmp_path):
    b1 = backend(tmp_path)
    c1 = b1.encode_prompts(["a cat", "a dog"])
    assert b1.prompt_cache.misses == 2 and len(list((tmp_path / "cache").rglob("*.safetensors"))) == 2
    comps = {k: v for k, v in sd3_components().items() if "text_encoder" not in k and "tokenizer" not in k}
    b2 = backend(tmp_path, comps)  # same identity, no text encoders at all
    c2 = b2.encode_prompts(["a dog", "a cat"])
    assert b2.prompt_cache.hits == 2 and b2.prompt_cache.misses == 0
    assert torch.equal(c2["prompt_embeds"], c1["prompt_embeds"].flip(0))
    b3 = backend(tmp_path, max_sequence_length=128)  # other encoder settings: another namespace
    assert b3.prompt_cache.dir != b1.prompt_cache.dir
    assert b3.encode_prompts(["a cat"])["prompt_embeds"].shape[1] == 77 + 128 and b3.prompt_cache.misses == 1


def test_load_from_directory_and_missing_file_errors(tmp_path):
    comps = sd3_components()
    ref = backend(tmp_path / "mem", comps)
    d = save_model_dir(sd3_components(), tmp_path / "sd3-medium", "StableDiffusion3Pipeline")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\na cat\n")
    b = SD3Backend(opts(tmp_path, model=str(d), prompts_file=str(prompts), offload_text_encoders=True))
    assert b.prompt_list() == ["a cat", "a dog"]
    drawn = b.training_prompts(5, torch.Generator().manual_seed(0))  # precomputes, then frees the encoders
    assert set(drawn) <= {"a cat", "a dog"} and "text_encoder" not in b._modules
    cond = b.encode_prompts(["a cat", ""])  # cache hits only
    assert "text_encoder" not in b._modules
    x, s = b.initial_noise(2, torch.Generator().manual_seed(0)), torch.tensor([0.8, 0.2])
    with torch.no_grad():
        assert torch.allclose(b.velocity(b.teacher, x, s, cond), ref.velocity(ref.teacher, x, s, ref.encode_prompts(["a cat", ""])), atol=1e-5)
        assert torch.allclose(b.decode(x), ref.decode(x), atol=1e-5)
    assert b.encode_prompts(["a bird"])["prompt_embeds"].shape[0] == 1  # a miss reloads the encoders

    (d / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError) as err:
        SD3Backend(opts(tmp_path, model=str(d)))
    assert str(err.value) == (
        f"model directory {d.resolve()} is missing vae/diffusion_pytorch_model.safetensors (a diffusers-format SD3 "
        "checkpoint has model_index.json, scheduler/, transformer/, vae/, text_encoder/, tokenizer/, text_encoder_2/, "
        "tokenizer_2/, text_encoder_3/ and tokenizer_3/); download the complete model ('hf download "
        "stabilityai/stable-diffusion-3-medium-diffusers --local-dir DIR') and pass --set backend.model=DIR.")
    shutil.rmtree(d / "tokenizer_3")
    with pytest.raises(UserError, match="is missing vae/"):  # the first missing file is named
        SD3Backend(opts(tmp_path, model=str(d)))
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        SD3Backend(opts(tmp_path, model="nobody/no-such-model", hub_cache_dir=str(tmp_path / "hub")))
    with pytest.raises(UserError, match="prompts_file is not set"):
        ref.training_prompts(2, torch.Generator())


def test_sharded_weights_index_names_the_missing_shard(tmp_path):
    import json

    d = save_model_dir(sd3_components(), tmp_path / "m", "StableDiffusion3Pipeline")
    te = d / "text_encoder_3"
    (te / "model.safetensors").rename(te / "model-00001-of-00002.safetensors")
    (te / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(UserError, match="is missing text_encoder_3/model-00002-of-00002.safetensors"):
        SD3Backend(opts(tmp_path, model=str(d)))
