"""The real-backend perf scripts: the GPU benchmark's --tiny run on CPU, the memory model's formulas."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
PERF = Path(__file__).resolve().parent.parent / "benchmarks" / "perf"
sys.path.insert(0, str(PERF))

import memory_table as MT  # noqa: E402
import real_model_configs as RC  # noqa: E402


def test_gpu_benchmark_runs_tiny_on_cpu(tmp_path):
    import gpu_real_backends as G

    out = tmp_path / "bench.json"
    assert G.main(["--tiny", "--out", str(out), "--repeats", "1"]) == 0
    res = json.loads(out.read_text())
    assert set(res["backends"]) == {"sd3", "flux2"}
    for kind, entry in res["backends"].items():
        assert set(entry["methods"]) == set(G.METHODS)
        dmd2 = entry["methods"]["dmd2"]
        assert dmd2["amortised_seconds"] == pytest.approx(dmd2["fake"]["seconds"] + dmd2["generator"]["seconds"] / 5, abs=1e-3)
        calls = entry["methods"]["rtdmd"]["iteration"]["calls"]
        # method.md s4 at batch 2: 4 rollout steps, 2 SubGRPO + 1 BP grad forwards, 3 fake forwards, decode with grad
        assert calls["gen_nograd_samples"] == 8 and calls["gen_grad_samples"] == 6 and calls["fake_grad_samples"] == 6
        assert calls["vae_decode_grad"] == 2 and calls["reward_grad_images"] == 6 and calls["teacher_nograd_samples"] == 4
        grpo = entry["methods"]["flow-grpo"]["iteration"]["calls"]
        assert grpo["gen_grad_samples"] == grpo["gen_nograd_samples"] == 10 * 2 * 2  # 10 steps, CFG, batch 2


def test_published_configs_have_the_published_sizes():
    nominal = {"sd3-medium": 2.0e9, "sd3.5-medium": 2.5e9, "sd3.5-large": 8.1e9, "klein-base-4b": 4e9, "klein-base-9b": 9e9}
    for kind, variant, _ in MT.VARIANTS:
        n = MT.count_params(kind, variant)
        assert abs(n["transformer"] / nominal[variant] - 1) < 0.15, variant
    assert MT.count_params("sd3", "sd3-medium")["transformer"] == pytest.approx(2.028e9, rel=1e-3)
    assert MT.count_params("flux2", "klein-base-4b")["text"] == pytest.approx(4.02e9, rel=1e-2)  # Qwen3-4B


def test_saved_activation_bytes_and_fit():
    w = torch.nn.Parameter(torch.randn(8, 4))
    x = torch.randn(5, 8, requires_grad=True)
    # y = tanh(x @ w): matmul saves x (w is a parameter, excluded), tanh saves its output (5 x 4)
    b = MT.saved_activation_bytes(lambda: torch.tanh(x @ w), {w.untyped_storage().data_ptr()})
    assert b == 5 * 8 * 4 + 5 * 4 * 4
    c, e = MT.fit_linear([(1, 10, 10 * (1 * 3 + 2)), (2, 10, 10 * (2 * 3 + 2)), (1, 20, 20 * 5)])
    assert c == pytest.approx(3) and e == pytest.approx(2)


def test_activation_model_and_estimate_by_hand():
    per_token = {"joint": 100.0, "e": 10.0}
    # no checkpointing: T (L c + e) = 50 (4 * 100 + 10)
    assert MT.transformer_activation_bytes(per_token, [("joint", 4)], 50, 8, False) == 50 * 410
    # checkpointing: T (L * 2 d + c + e) = 50 (4 * 16 + 100 + 10)
    assert MT.transformer_activation_bytes(per_token, [("joint", 4)], 50, 8, True) == 50 * 174
    params = {"transformer": 1000, "lora": 10, "vae": 100, "text": 0}
    act = {"transformer": 7.0, "transformer_ckpt": 3.0, "vae": 9.0, "vae_ckpt": 5.0, "vit_h": 2.0}
    prof = MT.MethodProfile(trained=2, frozen_adapters=1, grad_forwards=3, decodes=1, reward_towers=["vit_h"],
                            rewards_resident=50, note="")
    est = MT.estimate(params, act, prof, batch=4, checkpointing=True)
    resident = 1000 * 2 + 2 * 10 * 16 + 1 * 10 * 4 + 100 * 2 + 50 * 2
    assert est["resident"] == resident and est["per_sample"] == 3 * 3.0 + 5.0 + 2.0
    assert est["peak"] == resident + 4 * 16.0
    full = MT.estimate(params, act, prof, batch=4, checkpointing=True, full=True)
    assert full["resident"] == 1000 * 2 + 2 * 1000 * 16 + 1000 * 4 + 100 * 2 + 50 * 2


def test_tokens_of_published_geometries():
    assert MT.tokens_of("sd3", 1024) == (4096, 333)  # 128 x 128 latent in 2 x 2 patches; 77 CLIP + 256 T5
    assert MT.tokens_of("flux2", 512) == (1024, 512)  # 64 x 64 latent patchified 2 x 2; 512 Qwen3 tokens
    assert RC.FLUX2_TRANSFORMERS["klein-base-4b"]["joint_attention_dim"] == 3 * RC.FLUX2_TEXT["klein-base-4b"]["hidden_size"]
