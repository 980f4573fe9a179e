#!/usr/bin/env python
"""Shapes training on CPU: model FLOP/s against this CPU's fp32 peak, and what each optimisation buys.

Workloads, at the shipped shapes configs and through the project's own code (the Trainer's steps,
benchmarks/perf/method_driver.py): a teacher step (teacher.yaml, batch 64), an AC-DMD stage-1
iteration (ac-dmd.yaml, batch 16, amortised over its TTUR period), a DMD2 iteration (dmd2.yaml,
batch 32, amortised likewise) and an RTDMD stage-2 epoch (rtdmd.yaml, 4 groups x K = 8, its shipped
rewards), stage 2 starting from a stage-1 checkpoint written before any update (generator and fake
score = the shipped teacher). FLOPs of one step per kind are counted with FlopCounterMode (matmuls,
convolutions, attention), so GFLOP/s is model FLOPs over wall time.

fp32 peak: threads x FMA units x SIMD fp32 lanes x 2 x clock, with lanes from /proc/cpuinfo (16 with
avx512f, 8 with avx2), the clock its 'cpu MHz', and 2 FMA units per core ASSUMED (printed).

Variants, each alone over eager on --variant-workloads (default: the teacher step and the AC-DMD
iteration), then the kept ones together on every workload (kept: faster than eager by more than
--keep-threshold; bf16 autocast changes numerics and more threads change the resources, so neither
is kept): channels_last (backend.channels_last), foreach / fused AdamW (train.adamw_impl), bf16
autocast (train.mixed_precision=bf16, offered where the CPU has avx512_bf16 or amx_bf16), one more
torch thread (train.num_threads), and, opt-in with --variants ...,compile because inductor's CPU
compilation of every graph takes minutes on one thread, torch.compile of the networks
(train.compile). Every variant times the same step indices with the same seeds; compiled runs warm
up one step longer so the same steps are timed. The machine may be shared: with one thread,
comparisons use this process's CPU seconds (wall seconds are printed too); figures are as measured,
in one run. The last line is `speedup: X.XX` (the kept combination over eager, all workloads).

    OMP_NUM_THREADS=1 python benchmarks/perf/bench_cpu_train.py [--threads 1] [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import method_driver as D  # noqa: E402
from rtdmd.api import make_config  # noqa: E402

WORKLOADS = [("teacher step", "teacher"), ("AC-DMD iteration", "ac-dmd"), ("DMD2 iteration", "dmd2"),
             ("RTDMD stage-2 epoch", "rtdmd")]
FIRST_TIMED = 2  # timed steps start here in every variant (compiled runs warm up on steps 0 and 1)
FMA_UNITS = 2  # assumed per core


def cpu_info() -> dict:
    """Model name, flags and clock of this machine's first CPU (Linux /proc/cpuinfo)."""
    info = {"model": "unknown", "flags": set(), "mhz": None, "cores": os.cpu_count() or 1}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, val = (p.strip() for p in line.partition(":"))
        if key == "model name" and info["model"] == "unknown":
            info["model"] = val
        elif key == "flags" and not info["flags"]:
            info["flags"] = set(val.split())
        elif key == "cpu MHz" and info["mhz"] is None:
            info["mhz"] = float(val)
    return info


def simd_lanes(flags: set) -> int:
    """fp32 lanes of the widest vector FMA: 16 (AVX-512), 8 (AVX2 + FMA), else 4."""
    if "avx512f" in flags:
        return 16
    if "avx2" in flags and "fma" in flags:
        return 8
    return 4


def fp32_peak_gflops(threads: int, lanes: int, mhz: float) -> float:
    """threads x FMA units x lanes x 2 FLOPs per FMA x GHz."""
    return threads * FMA_UNITS * lanes * 2 * mhz / 1000.0


def has_bf16(flags: set) -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def variants(threads: int, info: dict) -> dict[str, dict]:
    """name -> config overrides (nested) of each candidate optimisation available here."""
    v = {"channels_last": {"backend": {"channels_last": True}},
         "compile": {"train": {"compile": True}},
         "adamw_foreach": {"train": {"adamw_impl": "foreach"}},
         "adamw_fused": {"train": {"adamw_impl": "fused"}}}
    if has_bf16(info["flags"]):
        v["bf16_autocast"] = {"train": {"mixed_precision": "bf16"}}
    if info["cores"] > threads:
        v[f"threads={threads + 1}"] = {"train": {"num_threads": threads + 1}}
    return v


DEFAULT_VARIANTS = "channels_last,adamw_foreach,adamw_fused,bf16_autocast,threads=2"  # compile: opt-in (slow to compile)
NOT_KEPT = ("bf16_autocast", "threads=")  # changes numerics / resources: reported, never kept


def merge(*dicts: dict) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def stage1_init(tmp: Path, threads: int) -> Path:
    """A stage-1 checkpoint before any update: generator and fake score are the shipped teacher."""

    cfg = make_config("ac-dmd", backend="shapes", overrides={"train": {"device": "cpu", "num_threads": threads}})
    tr = D.setup_trainer(cfg, tmp / "init")
    try:
        return D.save_checkpoint(tr, 0)
    finally:
        D.release(tr)


def run_pass(overrides: dict, a, init: Path, tmp: Path, flops: bool, label: str, workloads: list[str]
             ) -> dict[str, D.MethodTiming]:
    compiled = overrides.get("train", {}).get("compile", False)
    out = {}
    for title, m in WORKLOADS:
        if m not in workloads:
            continue
        base = {"train": {"device": "cpu", "num_threads": a.threads}}
        if m == "rtdmd":
            base["method"] = {"stage": 2, "init": str(init)}
        cfg = make_config(m, backend="shapes", overrides=merge(base, overrides))
        tr = D.setup_trainer(cfg, tmp / f"{label}-{m}")
        try:
            out[m] = D.measure(tr, a.repeats, flops=flops, warmup=FIRST_TIMED if compiled else 1, first_timed=FIRST_TIMED)
        finally:
            D.release(tr)
        torch.set_num_threads(a.threads)
    return out


def seconds(p: dict[str, D.MethodTiming], m: str, key: str) -> float:
    return p[m].amortised(key)


def total(p: dict[str, D.MethodTiming], key: str, workloads) -> float:
    return sum(p[m].amortised(key) for m in workloads)


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, choices=[1, 2], help="torch threads of the eager baseline")
    ap.add_argument("--repeats", type=int, default=1, help="timed steps of each kind of step")
    ap.add_argument("--workloads", default=",".join(m for _, m in WORKLOADS))
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated variants to try (add 'compile')")
    ap.add_argument("--variant-workloads", default="teacher,ac-dmd", help="workloads each variant is timed on; the kept "
                    "combination is timed on every workload")
    ap.add_argument("--keep-threshold", type=float, default=0.02, help="keep a variant faster than eager by this fraction")
    a = ap.parse_args(argv)
    a.workloads = [w for w in a.workloads.split(",") if w]
    return a


def _header(a, info: dict) -> tuple[float, str]:
    """Print the machine, the fp32 peak and what is compared; return (peak GFLOP/s, the seconds key compared)."""
    lanes = simd_lanes(info["flags"])
    peak = fp32_peak_gflops(a.threads, lanes, info["mhz"] or 0.0)
    shown = " ".join(f for f in ("avx512f", "avx2", "fma", "avx512_bf16", "amx_bf16") if f in info["flags"])
    print(f"cpu: {info['model']}, {info['cores']} cores, flags {shown or 'none of avx512f/avx2/fma'}, "
          f"{info['mhz'] or float('nan'):.0f} MHz; torch {torch.__version__}, {a.threads} thread(s)")
    print(f"fp32 peak = {a.threads} thread(s) x {FMA_UNITS} FMA units/core (ASSUMED) x {lanes} lanes x 2 x "
          f"{(info['mhz'] or 0) / 1000:.3f} GHz = {peak:.1f} GFLOP/s")
    key = "cpu_seconds" if a.threads == 1 else "seconds"
    print("the machine may be shared with other work: every figure is as measured in this one run; comparisons use "
          + ("this process's CPU seconds (steadier than wall time under contention; wall also shown)" if key == "cpu_seconds"
             else "wall seconds"))
    return peak, key


def _eager_table(eager: dict, key: str, peak: float) -> None:
    print(f"\n{'workload':22s} {'batch':>5s} {'GFLOP/step':>11s} {'wall s':>8s} {'cpu s':>8s} {'GFLOP/s':>8s} "
          f"{'% fp32 peak':>12s}   (GFLOP/s per {'CPU' if key == 'cpu_seconds' else 'wall'} second)")
    for title, m in WORKLOADS:
        if m not in eager:
            continue
        r = eager[m]
        f = r.amortised("flops")
        gfs = f / r.amortised(key) / 1e9
        print(f"{title:22s} {r.batch:5d} {f / 1e9:11.2f} {r.amortised('seconds'):8.3f} {r.amortised('cpu_seconds'):8.3f} "
              f"{gfs:8.2f} {100 * gfs / peak if peak else float('nan'):11.1f}%")


def _try_variants(a, vs: dict, init, tmp: Path, eager: dict, key: str, vw: list[str]) -> tuple[dict, list[str]]:
    """Time every variant on the variant workloads; return the passes and the variants kept."""
    passes = {"eager": eager}
    for name, over in vs.items():
        try:
            passes[name] = run_pass(over, a, init, tmp, flops=False, label=name, workloads=vw)
        except Exception as exc:  # an optimisation this torch / CPU cannot run: reported, not fatal
            print(f"variant {name} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    base_vw = total(eager, key, vw)
    kept = [n for n in passes if n != "eager" and not n.startswith(NOT_KEPT)
            and total(passes[n], key, vw) < base_vw * (1 - a.keep_threshold)]
    adamw = [n for n in kept if n.startswith("adamw_")]
    if len(adamw) > 1:  # one AdamW implementation: the faster
        kept = [n for n in kept if n not in sorted(adamw, key=lambda n: total(passes[n], key, vw))[1:]]
    names = list(passes)
    if len(names) > 1 and vw:
        print(f"\nvariants on {', '.join(vw)}: {key.replace('_', ' ')} per step (amortised over each update period)")
        print(f"{'workload':22s} " + " ".join(f"{n[:16]:>16s}" for n in names))
        for title, m in WORKLOADS:
            if m in vw:
                print(f"{title:22s} " + " ".join(f"{seconds(passes[n], m, key):16.3f}" for n in names))
        print(f"{'speed-up over eager':22s} " + " ".join(f"{base_vw / total(passes[n], key, vw):16.2f}" for n in names))
        if key != "seconds":  # CPU seconds add up every thread's: more threads are judged by wall time
            print(f"{'wall s, same steps':22s} " + " ".join(f"{total(passes[n], 'seconds', vw):16.3f}" for n in names))
    print("kept (faster than eager by more than {:.0%}; bf16 autocast and extra threads are never kept): {}".format(
        a.keep_threshold, ", ".join(kept) or "none"))
    return passes, kept


def _kept_speedup(a, vs: dict, kept: list[str], init, tmp: Path, eager: dict, key: str) -> float:
    """The kept variants together on every workload: their speed-up over eager (1.0 when nothing is kept)."""
    if not kept:
        return 1.0
    combo = run_pass(merge(*(vs[n] for n in kept)), a, init, tmp, flops=False, label="kept", workloads=a.workloads)
    print(f"\nkept combination ({'+'.join(kept)}) on every workload, {key.replace('_', ' ')} per step")
    for title, m in WORKLOADS:
        if m in combo:
            print(f"{title:22s} eager {seconds(eager, m, key):8.3f}  kept {seconds(combo, m, key):8.3f}  "
                  f"x{seconds(eager, m, key) / seconds(combo, m, key):.2f}")
    return total(eager, key, a.workloads) / total(combo, key, a.workloads)


def main(argv=None) -> int:
    a = _args(argv)
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    info = cpu_info()
    peak, key = _header(a, info)
    with D.temp_dir() as tmp_s:
        tmp = Path(tmp_s)
        init = stage1_init(tmp, a.threads) if "rtdmd" in a.workloads else None
        eager = run_pass({}, a, init, tmp, flops=True, label="eager", workloads=a.workloads)
        _eager_table(eager, key, peak)
        vs = {k: v for k, v in variants(a.threads, info).items() if k in a.variants.split(",")}
        vw = [w for w in a.variant_workloads.split(",") if w in eager]
        _, kept = _try_variants(a, vs, init, tmp, eager, key, vw)
        speedup = _kept_speedup(a, vs, kept, init, tmp, eager, key)
        print(f"kept combination: {'+'.join(kept) or 'none (eager)'}; measured over eager on every workload: "
              f"x{speedup:.2f} ({time.perf_counter() - t_start:.0f} s wall in all)")
        print(f"speedup: {speedup:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
