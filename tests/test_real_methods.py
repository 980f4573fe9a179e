"""Every method on every real backend, end to end: the shipped sd3 / flux2 config of each method (tiny sizes,
the paper's hyper-parameters otherwise) trains 2 iterations on tiny random-weight instances of the real
diffusers / transformers classes, written to disk in the published layout (nothing downloaded), then its
checkpoint generates 4-step images. Rewards: two small differentiable functions registered for the test
(the real scorers need weights)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")

from rtdmd import registry  # noqa: E402
from rtdmd.api import make_config, run_training  # noqa: E402
from rtdmd.checkpoint import find_checkpoint, load_for_inference, load_model_state, load_training_state  # noqa: E402
from rtdmd.generate import SamplingConfig, generate  # noqa: E402
from rtdmd.rewards.registry import register_reward, unregister_reward  # noqa: E402
from tiny_real import flux2_components, save_model_dir, sd3_components  # noqa: E402

RES = 32  # tiny VAEs: sd3 state (4, 16, 16), flux2 state (16, 8, 8)
PROMPTS = ["a red cat", "a blue dog", "two green birds"]
METHODS = ["dmd2", "lcm", "hypersd", "flow-grpo", "ac-dmd", "rtdmd"]
REWARDS = {"tiny_red": 1.0, "tiny_contrast": 1.0}


def _red(images, prompts):  # mean red channel, (B,)
    return images[:, 0].mean(dim=(1, 2))


def _contrast(images, prompts):  # per-image pixel std, (B,)
    return images.flatten(1).std(dim=1)


@pytest.fixture(scope="module", autouse=True)
def tiny_rewards():
    register_reward("tiny_red", _red, differentiable=True)
    register_reward("tiny_contrast", _contrast, differentiable=True)
    yield
    unregister_reward("tiny_red")
    unregister_reward("tiny_contrast")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_models")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return {"root": root,
            "sd3": save_model_dir(sd3_components(), root / "sd3", "StableDiffusion3Pipeline"),
            "flux2": save_model_dir(flux2_components(), root / "flux2", "Flux2KleinPipeline")}


def _backend_overrides(kind: str, dirs) -> dict:
    b = {"model": str(dirs[kind]), "prompts_file": str(dirs["root"] / "prompts.txt"),
         "prompt_cache_dir": str(dirs["root"] / f"cache-{kind}"), "resolution": RES, "dtype": "fp32",
         "vae_dtype": "fp32", "text_encoder_dtype": "fp32", "tf32": False, "lora_rank": 4, "lora_alpha": 8.0,
         "gradient_checkpointing": False, "offload_text_encoders": False, "max_sequence_length": 16}
    if kind == "flux2":
        b["text_encoder_out_layers"] = [1, 2, 3]  # the tiny Qwen3 has 3 layers
    return b


def _method_overrides(method: str) -> dict:
    """Tiny sizes; two-network methods update both networks within 2 steps."""
    if method in ("dmd2", "ac-dmd"):
        return {"ttur": 2}  # step 0: generator and fake score, step 1: fake score
    if method == "hypersd":
        # step 0: TSCD with 8 segments; step 1: the unified stage (consistency + DMD + ReFL)
        return {"segment_steps": [1, 0, 0, 0], "refl_steps": 0, "unified_refl_weight": 1.0}
    if method == "flow-grpo":
        return {"group_size": 2, "sampling_steps": 4}
    if method == "rtdmd":  # both stages, 2 iterations each
        return {"stage": 0, "stage1": {"ttur": 2}, "group_size": 2,
                "stage1_train": {"batch_size": 2, "max_steps": 2, "checkpoint_every": 2, "log_every": 1}}
    return {}  # lcm


def _use_test_rewards(cfg) -> None:
    """The shipped reward dicts name the real scorers; override dicts merge into them, so replace them here."""
    m = cfg.method
    if cfg.method_name == "hypersd":
        m.refl_margins = {"tiny_red": 2.0, "tiny_contrast": 2.0}  # ReFL hinge relu(2 - r), as the shipped margins
    elif cfg.method_name == "flow-grpo":
        m.rewards = {"tiny_red": 1.0}
    elif cfg.method_name == "rtdmd":
        m.rewards, m.bp_rewards = dict(REWARDS), list(REWARDS)
    elif cfg.method_name == "dmd2":
        assert not m.refl_margins  # the shipped DMD2 configs train without ReFL (prompt-only, no reward)


def _train_overrides(method: str) -> dict:
    return {"batch_size": 4 if method in ("flow-grpo", "rtdmd") else 2, "max_steps": 2, "checkpoint_every": 2,
            "log_every": 1, "num_threads": 1, "device": "cpu", "mixed_precision": "no"}


def _changed(trained: dict, initial: dict) -> bool:
    assert trained.keys() == initial.keys() and trained
    return any(not torch.equal(trained[k].float(), initial[k].float()) for k in trained)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["sd3", "flux2"])
def test_two_iterations_then_four_step_generation(kind, method, model_dirs, tmp_path):
    over = {"backend": _backend_overrides(kind, model_dirs), "method": _method_overrides(method),
            "train": _train_overrides(method), "tracking": {"enabled": False}}
    cfg = make_config(method, backend=kind, overrides=over)
    _use_test_rewards(cfg)
    cfg.method.validate()
    res = run_training(cfg, out=tmp_path / "run", show_progress=False)
    assert res.steps == (4 if method == "rtdmd" else 2)  # a two-stage run counts both stages' steps
    assert res.last_logs and all(torch.isfinite(torch.tensor(v)) for v in res.last_logs.values())

    cfg, b, net, meta = load_for_inference(res.checkpoint)
    assert cfg.backend_name == kind and cfg.method_name == method

    # every trained network moved off its starting weights: rtdmd's stage 2 starts from its stage-1 checkpoint
    # (generator: its EMA = model.safetensors, fake score: its raw weights), every other method from fresh
    # adapters (B = 0, so the teacher; A seeded by the adapter's name)
    state = load_training_state(find_checkpoint(res.checkpoint))["tensors"]
    nets = sorted(k[len("net_"):] for k in state if k.startswith("net_"))
    assert nets == (["fake_score", "generator"] if method in ("dmd2", "ac-dmd", "hypersd", "rtdmd") else ["generator"])
    if method == "rtdmd":
        s1 = find_checkpoint(tmp_path / "run" / "stage1")
        initial = {"generator": load_model_state(s1), "fake_score": load_training_state(s1)["tensors"]["net_fake_score"]}
    else:
        fresh = registry.get_backend(kind).factory(cfg.backend, "cpu")
        initial = {name: fresh.network_state(fresh.make_trainable(name)) for name in nets}
    for name in nets:
        assert _changed(state[f"net_{name}"], initial[name]), name
    assert _changed(b.network_state(net), initial["generator"])  # the inference (EMA) weights too

    sc = SamplingConfig.from_meta(meta["sampler"], steps=4)
    images = generate(b, net, PROMPTS[:2], [(0, "real-methods", i) for i in range(2)], sc)
    assert images.shape == (2, 3, RES, RES)
    assert torch.isfinite(images).all() and float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert float(images.std()) > 0  # not a constant (e.g. fully clamped) image
