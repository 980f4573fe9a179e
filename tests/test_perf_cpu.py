"""bench_cpu_train.py's peak formula and variants, and the opt-in training hooks it measures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

PERF = Path(__file__).resolve().parent.parent / "benchmarks" / "perf"
sys.path.insert(0, str(PERF))

import bench_cpu_train as B  # noqa: E402


def test_fp32_peak_by_hand():
    # 1 thread x 2 FMA units x 16 lanes (AVX-512) x 2 FLOPs x 2.5 GHz = 160 GFLOP/s
    assert B.fp32_peak_gflops(1, 16, 2500.0) == pytest.approx(160.0)
    assert B.fp32_peak_gflops(2, 8, 3000.0) == pytest.approx(192.0)
    assert B.simd_lanes({"avx512f", "avx2", "fma"}) == 16
    assert B.simd_lanes({"avx2", "fma"}) == 8
    assert B.simd_lanes({"sse2"}) == 4


def test_variants_follow_the_cpu():
    v = B.variants(1, {"flags": {"avx512f", "avx512_bf16"}, "cores": 2})
    assert {"channels_last", "compile", "adamw_foreach", "adamw_fused", "bf16_autocast", "threads=2"} == set(v)
    v = B.variants(2, {"flags": {"avx2"}, "cores": 2})
    assert "bf16_autocast" not in v and not any(k.startswith("threads") for k in v)
    assert B.merge({"train": {"a": 1}}, {"train": {"b": 2}}, {"backend": {"c": 3}}) == \
        {"train": {"a": 1, "b": 2}, "backend": {"c": 3}}


def _trainer(tmp_path, **train):
    from rtdmd.api import make_config
    from rtdmd.trainer import Trainer

    cfg = make_config("teacher", backend="toy2d", overrides={"train": {"device": "cpu", "max_steps": 2, **train},
                                                              "tracking": {"enabled": False}})
    tr = Trainer(cfg, tmp_path, show_progress=False)
    tr._setup()
    return tr


@pytest.mark.parametrize("impl,flag", [("default", None), ("foreach", "foreach"), ("fused", "fused")])
def test_adamw_impl_option(tmp_path, impl, flag):
    tr = _trainer(tmp_path, adamw_impl=impl)
    opt = tr.optimizers["teacher"]
    d = getattr(opt, "optimizer", opt).defaults
    if flag is None:
        assert not d.get("foreach") and not d.get("fused")  # torch's own default
    else:
        assert d[flag] is True


def test_compile_option_compiles_the_networks_only_when_asked(tmp_path):
    off = _trainer(tmp_path / "off")
    assert getattr(off.method.networks["teacher"], "_compiled_call_impl", None) is None
    on = _trainer(tmp_path / "on", compile=True)
    assert on.method.networks["teacher"]._compiled_call_impl is not None
    # the state dict keeps the module's own names (checkpoints unchanged)
    assert list(on.method.networks["teacher"].state_dict()) == list(off.method.networks["teacher"].state_dict())


def test_diagnostics_bench_times_the_steps_a_log_point_can_fall_on():
    """bench_diagnostics times generator steps: with TTUR 5 those are 0, 5, 10 ...; a method with one update
    (Flow-GRPO's policy) steps every iteration."""
    from types import SimpleNamespace

    import bench_diagnostics as BD

    from rtdmd.methods.base import Update

    ac_dmd = SimpleNamespace(updates=[Update("fake_score", every=1), Update("generator", every=5)])
    assert BD.generator_steps(ac_dmd, 3) == [0, 5, 10]
    grpo = SimpleNamespace(updates=[Update("generator", every=1)])
    assert BD.generator_steps(grpo, 3) == [0, 1, 2]
