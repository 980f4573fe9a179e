"""`rtdmd-bench export`: sd3 / flux2 checkpoints as a diffusers LoRA or a whole pipeline folder, loaded back by the
stock pipelines (tiny random-weight models in the published layout, nothing downloaded). Round trip: the stock
transformer with the exported weights gives our backend's velocity for the checkpoint on one forward."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("peft")

from rtdmd import checkpoint as C  # noqa: E402
from rtdmd.backends.flux2 import flux2_velocity  # noqa: E402
from rtdmd.backends.sd3 import sd3_velocity  # noqa: E402
from rtdmd.checkpoint import load_for_inference  # noqa: E402
from rtdmd.config import dump, resolve  # noqa: E402
from rtdmd.registry import get_backend  # noqa: E402
from tests.eval_fixtures import ckpt, one_torch_thread  # noqa: E402,F401 (fixtures)
from tests.test_cli_eval import user_error  # noqa: E402
from tiny_real import flux2_components, save_model_dir, sd3_components  # noqa: E402

RES = 32
PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux2": "Flux2KleinPipeline"}
VELOCITY = {"sd3": sd3_velocity, "flux2": flux2_velocity}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_models")
    return {"root": root,
            "sd3": save_model_dir(sd3_components(), root / "sd3", PIPELINES["sd3"]),
            "flux2": save_model_dir(flux2_components(), root / "flux2", PIPELINES["flux2"])}


def real_checkpoint(kind: str, dirs, run_dir, mode: str = "lora"):
    """A checkpoint of a 'trained' generator: fresh LoRA (or full copy) with every weight moved off its start."""
    b = {"model": str(dirs[kind]), "prompt_cache_dir": str(dirs["root"] / f"cache-{kind}"), "resolution": RES,
         "dtype": "fp32", "vae_dtype": "fp32", "text_encoder_dtype": "fp32", "tf32": False, "lora_rank": 4,
         "lora_alpha": 8.0, "gradient_checkpointing": False, "offload_text_encoders": False,
         "max_sequence_length": 16, "generator_mode": mode}
    if kind == "flux2":
        b["text_encoder_out_layers"] = [1, 2, 3]
    cfg = resolve("lcm", backend=kind, overrides={"backend": b, "tracking": {"enabled": False}})
    backend = get_backend(kind).factory(cfg.backend, "cpu")
    net = backend.make_trainable("generator")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.2 if mode == "lora" else 0.02))
    return C.write_checkpoint(run_dir, 2, config_yaml=dump(cfg), sampler={"kind": "cps", "steps": 4, "guidance": 1.0,
                                                                           "eta": 0.9}, method="lcm", backend=kind,
                              inference_state=dict(backend.network_state(net)), training_state=None,
                              extra_meta={"role": "generator"})


def _ours(step_dir):
    _, b, net, _ = load_for_inference(step_dir)
    cond = b.encode_prompts(["a red cat", "a dog"])
    x, s = b.initial_noise(2, torch.Generator().manual_seed(5)), torch.tensor([0.8, 0.3])
    with torch.no_grad():
        return b, cond, x, s, b.velocity(net, x, s, cond), b.velocity(b.teacher, x, s, cond)


@pytest.mark.parametrize("kind", ["sd3", "flux2"])
def test_lora_and_pipeline_exports_reproduce_the_checkpoint_in_stock_diffusers(kind, model_dirs, tmp_path, cli):
    import diffusers
    from diffusers import DiffusionPipeline

    step = real_checkpoint(kind, model_dirs, tmp_path / "run")
    b, cond, x, s, v_ours, v_teacher = _ours(step)
    assert not torch.allclose(v_ours, v_teacher, atol=1e-3)  # the adapter matters
    call = VELOCITY[kind]

    r = cli("export", tmp_path / "run", "--format", "lora", "--out", tmp_path / "lora")
    assert r.exit_code == 0, r.output
    stock = getattr(diffusers, PIPELINES[kind]).from_pretrained(str(model_dirs[kind]), local_files_only=True)
    stock.load_lora_weights(str(tmp_path / "lora"))
    with torch.no_grad():
        assert torch.allclose(call(stock.transformer, x, s, cond), v_ours, atol=1e-5)

    r = cli("export", tmp_path / "run", "--format", "pipeline", "--out", tmp_path / "pipe")
    assert r.exit_code == 0, r.output
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "pipe"), local_files_only=True)
    assert type(pipe).__name__ == PIPELINES[kind] and not any("lora" in n for n, _ in pipe.transformer.named_parameters())
    with torch.no_grad():
        assert torch.allclose(call(pipe.transformer, x, s, cond), v_ours, atol=1e-5)
    rec = json.loads((tmp_path / "pipe" / "export.json").read_text())
    assert rec["checkpoint"] == str(step.resolve()) and rec["method"] == "lcm" and rec["backend"] == kind
    # the other components are the base model's files, linked or copied
    assert (tmp_path / "pipe/vae/diffusion_pytorch_model.safetensors").read_bytes() == \
        (model_dirs[kind] / "vae/diffusion_pytorch_model.safetensors").read_bytes()


def test_full_fine_tune_exports_as_pipeline_only(model_dirs, tmp_path, cli):
    from diffusers import DiffusionPipeline

    real_checkpoint("sd3", model_dirs, tmp_path / "run", mode="full")
    _, cond, x, s, v_ours, v_teacher = _ours(tmp_path / "run")
    assert not torch.allclose(v_ours, v_teacher, atol=1e-4)
    user_error(cli("export", tmp_path / "run", "--format", "lora", "--out", tmp_path / "lora"),
               "trained the whole transformer", "--format pipeline")
    assert not (tmp_path / "lora").exists()
    assert cli("export", tmp_path / "run", "--format", "pipeline", "--out", tmp_path / "pipe").exit_code == 0
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "pipe"), local_files_only=True)
    with torch.no_grad():
        assert torch.allclose(sd3_velocity(pipe.transformer, x, s, cond), v_ours, atol=1e-5)


def test_export_refusals(cli, ckpt, tmp_path):
    user_error(cli("export", ckpt, "--format", "pipeline", "--out", tmp_path / "x"),
               "is a shapes model", "only sd3 and flux2 checkpoints")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    user_error(cli("export", ckpt, "--format", "lora", "--out", tmp_path / "full"), "is not an empty folder")
    user_error(cli("export", tmp_path / "none", "--format", "lora", "--out", tmp_path / "y"), "does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]
