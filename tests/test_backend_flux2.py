"""flux2 backend on tiny random-weight instances of the real diffusers / transformers classes."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("peft")

from rtdmd.backends import lora as L  # noqa: E402
from rtdmd.backends.flux2 import Flux2Backend, Flux2Options, empirical_mu, flux2_velocity, unpack_tokens  # noqa: E402
from rtdmd.errors import UserError  # noqa: E402
from tiny_real import flux2_components, save_model_dir  # noqa: E402

RES = 32  # tiny VAE: 2x down, 2x2 patchify -> state (16, 8, 8)


def opts(tmp_path, **kw) -> Flux2Options:
    base = dict(resolution=RES, dtype="fp32", vae_dtype="fp32", text_encoder_dtype="fp32", lora_rank=4, lora_alpha=8,
                max_sequence_length=16, text_encoder_out_layers=[1, 2, 3], prompt_cache_dir=str(tmp_path / "cache"),
                offload_text_encoders=False, tf32=False)
    base.update(kw)
    return Flux2Options(**base)


def backend(tmp_path, comps=None, **kw) -> Flux2Backend:
    return Flux2Backend(opts(tmp_path, **kw), modules=comps or flux2_components(), identity="tiny-flux2")


def test_empirical_mu_and_generator_sigmas_at_512px(tmp_path):
    # hand computation of FLUX.2's mu for 1024 tokens (512 px) and 4 steps:
    # m10 = 8.73809524e-5 * 1024 + 1.89833333, m200 = 1.6927e-4 * 1024 + 0.45666666,
    # mu = m200 + (4 - 200) * (m200 - m10) / 190
    m10, m200 = 8.73809524e-05 * 1024 + 1.89833333, 0.00016927 * 1024 + 0.45666666
    mu = m200 + (4 - 200) * (m200 - m10) / 190
    assert empirical_mu(1024, 4) == pytest.approx(mu, rel=1e-9) and mu == pytest.approx(2.0307, abs=1e-4)
    # a backend whose state is 32 x 32 tokens (128 px through the tiny 4x-stride VAE) has the 512-px schedule
    b = backend(tmp_path, resolution=128)
    assert b.image_seq_len() == 1024
    expected = [1.0] + [math.exp(mu) / (math.exp(mu) + 1 / s - 1) for s in (0.75, 0.5, 0.25)] + [0.0]
    got = b.generator_sigmas()
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)
    assert torch.allclose(got, torch.tensor([1.0, 0.958, 0.884, 0.718, 0.0]), atol=1e-3)  # docs/paper.md s2


def test_shapes_packing_and_decode_gradient(tmp_path):
    from diffusers import Flux2KleinPipeline

    b = backend(tmp_path)
    assert b.state_shape() == (16, 8, 8)
    cond = b.encode_prompts(["a red cat", "", "a red cat"])
    assert cond["prompt_embeds"].shape == (3, 16, 3 * 8)  # three Qwen3 layers of width 8, concatenated
    x = b.initial_noise(3, torch.Generator().manual_seed(0))
    tokens = Flux2KleinPipeline._pack_latents(x)
    ids = Flux2KleinPipeline._prepare_latent_ids(x)
    assert torch.equal(unpack_tokens(tokens, 8, 8), Flux2KleinPipeline._unpack_latents_with_ids(tokens, ids, 8, 8))
    x.requires_grad_(True)
    v = b.velocity(b.teacher, x, torch.tensor([0.9, 0.5, 0.1]), cond)
    img = b.decode(x)
    assert v.shape == x.shape and img.shape == (3, 3, RES, RES)
    (v.mean() + img.mean()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert b.encode_images(img.detach()).shape == x.shape


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_one_euler_step_matches_the_klein_pipeline_with_real_cfg(tmp_path, guidance):
    from diffusers import Flux2KleinPipeline

    comps = flux2_components()
    b = backend(tmp_path, comps)
    cond, unc = b.encode_prompts(["a red cat"]), b.uncond(1)
    x = b.initial_noise(1, torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = b.decode(x - b.teacher_velocity(x, torch.ones(1), cond, guidance, unc))  # Euler 1 -> 0
        pipe = Flux2KleinPipeline(**comps, is_distilled=False)
        theirs = pipe(prompt_embeds=cond["prompt_embeds"], negative_prompt_embeds=unc["prompt_embeds"],
                      latents=x, num_inference_steps=1, guidance_scale=guidance,
                      height=RES, width=RES, output_type="pt").images
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_lora_teacher_fake_and_diffusers_round_trip(tmp_path):
    from diffusers import Flux2KleinPipeline

    ref = flux2_components()["transformer"].eval()
    b = backend(tmp_path)
    gen, fake = b.make_trainable("generator"), b.make_trainable("fake_score")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in list(gen.parameters()) + list(fake.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    base = b.teacher.base
    targets = L.target_module_names(base, L.FLUX2_ATTENTION_TARGETS)
    assert any(n.startswith("single_transformer_blocks") and n.endswith("attn.to_out") for n in targets)
    assert any(n.endswith("to_qkv_mlp_proj") for n in targets) and any(n.endswith("to_out.0") for n in targets)
    assert all(id(p) in {id(q) for q in base.parameters()} for p in gen.parameters())
    cond = b.encode_prompts(["a cat", "a dog"])
    x, s = b.initial_noise(2, torch.Generator().manual_seed(0)), torch.tensor([0.7, 0.3])
    with torch.no_grad():
        v_ref = flux2_velocity(ref, x, s, cond)
        v_t, v_g, v_f = (b.velocity(n, x, s, cond) for n in (b.teacher, gen, fake))
    assert torch.allclose(v_t, v_ref, atol=1e-6)
    assert not torch.allclose(v_g, v_t, atol=1e-3) and not torch.allclose(v_f, v_g, atol=1e-3)
    b.export(gen, tmp_path / "lora")
    pipe = Flux2KleinPipeline(**flux2_components())
    pipe.load_lora_weights(str(tmp_path / "lora"))
    with torch.no_grad():
        assert torch.allclose(flux2_velocity(pipe.transformer, x, s, cond), v_g, atol=1e-5)


def test_directory_loading_distilled_flag_and_missing_file(tmp_path):
    comps = flux2_components()
    d = save_model_dir(comps, tmp_path / "klein", "Flux2KleinPipeline", {"is_distilled": True})
    b = Flux2Backend(opts(tmp_path, model=str(d), variant="klein-4b"))
    assert b.is_guidance_distilled()
    cond = b.encode_prompts(["a cat"])
    x = b.initial_noise(1)
    assert b.teacher_velocity(x, torch.tensor([0.5]), cond, 1.0).shape == x.shape
    with pytest.raises(UserError, match="guidance-distilled and takes no CFG"):
        b.teacher_velocity(x, torch.tensor([0.5]), cond, 4.0)
    (d / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(UserError) as err:
        Flux2Backend(opts(tmp_path, model=str(d)))
    assert str(err.value) == (
        f"model directory {d.resolve()} is missing tokenizer/tokenizer.json (a diffusers-format FLUX.2 klein checkpoint "
        "has model_index.json, scheduler/, transformer/, vae/, text_encoder/ and tokenizer/); download the complete model "
        "('hf download black-forest-labs/FLUX.2-klein-base-4B --local-dir DIR') and pass --set backend.model=DIR.")
