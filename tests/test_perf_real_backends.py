"""The real-backend perf scripts: gpu_check.py's --tiny run on CPU, the memory model's counts and formulas."""

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


def test_gpu_check_runs_the_methods_own_iterations_tiny_on_cpu(tmp_path):
    import gpu_check as G

    out = tmp_path / "check.json"
    assert G.main(["--tiny", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    got = {(r["backend"], r["method"]): r for r in res["results"]}
    assert set(got) == {("shapes", "teacher"), ("shapes", "ac-dmd")} | {(k, m) for k in ("sd3", "flux2") for m in G.REAL_METHODS}
    for r in got.values():
        assert not r["skipped"] and r["seconds_per_iteration"] > 0 and r["flops_per_iteration"] > 0
        assert r["achieved_tflops"] > 0 and "mfu" not in r  # no peak known for a CPU
    for kind in ("sd3", "flux2"):
        # AC-DMD: fake score every step, generator every 10th (the shipped TTUR), amortised over the period
        ac = got[(kind, "ac-dmd")]
        assert ac["update_period"] == 10 and set(ac["steps"]) == {"fake_score+generator", "fake_score"}
        parts = ac["steps"]
        assert ac["seconds_per_iteration"] == pytest.approx(0.9 * parts["fake_score"]["seconds"]
                                                            + 0.1 * parts["fake_score+generator"]["seconds"])
        assert parts["fake_score+generator"]["flops"] > parts["fake_score"]["flops"]
        # RTDMD stage 2 at batch 2, counted in the real code's calls: 4 rollout steps without grad, 2 SubGRPO + 1
        # back-propagated generator forwards, ADSM + 2 consistency fake-score forwards, one decode with grad
        # per micro-batch; the shipped stage 2 accumulates train.accumulate micro-batches per optimiser step
        from rtdmd.api import make_config

        m = make_config("rtdmd", backend=kind).train.accumulate
        calls = got[(kind, "rtdmd")]["steps"]["fake_score+generator"]["calls"]
        assert calls["generator_nograd"] == 8 * m and calls["generator_grad"] == 6 * m and calls["fake_score_grad"] == 6 * m
        assert calls["decode_grad"] == 2 * m and calls["teacher_nograd"] == 4 * m  # DM term: teacher with CFG


def test_peak_table_matches_device_names():
    import gpu_check as G

    assert G.peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert G.peak_tflops("NVIDIA H100 PCIe") == pytest.approx(756.0)
    assert G.peak_tflops("NVIDIA H200") == pytest.approx(989.4)
    assert G.peak_tflops("NVIDIA A100-SXM4-80GB") == pytest.approx(312.0)
    assert G.peak_tflops("Some Future GPU") is None


def test_memory_profiles_are_counted_from_the_methods_code():
    prof = MT.measured_profiles("sd3", ["ac-dmd", "rtdmd"])
    ac, rt = prof["ac-dmd"], prof["rtdmd"]
    assert (ac.trained, ac.frozen_adapters) == (2, 1)  # generator + fake score with AdamW, the EMA generator
    # the fake-score update holds ADSM + 2 consistency forwards; the generator update one (docs/paper.md s3)
    assert max(u.grad_forwards for u in ac.updates) == 3 and all(u.decodes == 0 for u in ac.updates)
    # stage 2's generator update: 2 SubGRPO + 1 BP forwards, one decode, CLIPScore (ViT-L) + HPS and Pick (ViT-H)
    gen = max(rt.updates, key=lambda u: u.decodes)
    assert (gen.grad_forwards, gen.decodes, gen.reward_towers) == (3, 1, {"vit_l": 1, "vit_h": 2})
    assert rt.rewards_resident == pytest.approx(2 * MT.REWARD_TOWER_PARAMS["vit_l"] + 2 * MT.REWARD_TOWER_PARAMS["vit_h"])


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
    prof = MT.MethodProfile(trained=2, frozen_adapters=1, rewards_resident=50, note="",
                            updates=[MT.UpdateProfile(3, 1, {"vit_h": 1}), MT.UpdateProfile(1, 0, {})])
    est = MT.estimate(params, act, prof, batch=4, checkpointing=True)  # the larger update sets the peak
    resident = 1000 * 2 + 2 * 10 * 16 + 1 * 10 * 4 + 100 * 2 + 50 * 2
    assert est["resident"] == resident and est["per_sample"] == 3 * 3.0 + 5.0 + 2.0
    assert est["peak"] == resident + 4 * 16.0
    full = MT.estimate(params, act, prof, batch=4, checkpointing=True, full=True)
    assert full["resident"] == 1000 * 2 + 2 * 1000 * 16 + 1000 * 4 + 100 * 2 + 50 * 2


def test_tokens_of_published_geometries():
    assert MT.tokens_of("sd3", 1024) == (4096, 333)  # 128 x 128 latent in 2 x 2 patches; 77 CLIP + 256 T5
    assert MT.tokens_of("flux2", 512) == (1024, 512)  # 64 x 64 latent patchified 2 x 2; 512 Qwen3 tokens
    assert RC.FLUX2_TRANSFORMERS["klein-base-4b"]["joint_attention_dim"] == 3 * RC.FLUX2_TEXT["klein-base-4b"]["hidden_size"]
