#!/usr/bin/env python
"""Seconds per iteration, peak memory and model FLOP utilisation of the methods users run, on one GPU.

Every iteration is the project's own (benchmarks/perf/method_driver.py): the shipped config of the
method and backend, backend and method from rtdmd's registry, each step the Trainer's own (losses,
backward, clipping, AdamW, EMA), MLflow off. The real backends are full-size, randomly initialised
networks of the published configs (benchmarks/perf/real_model_configs.py): SD3-Medium at 1024 px
and FLUX.2 klein base 4B at 512 px, LoRA r32/a64 on bf16 weights with gradient checkpointing, as
shipped; text encoders are not built (random prompt embeddings of the published shapes sit in the
backend's prompt cache, where training reads them), and the scorers of RTDMD stage 2 are random
CLIP ViT towers of their sizes (ViT-L/14 CLIPScore, ViT-H/14 HPSv2.1 and PickScore; a no-grad
ViT-L/14 for GenEval partial credit).

Batch: one GPU's share of the shipped global batch over the paper's 8 GPUs (AC-DMD / DMD2 9,
LCM 12; RTDMD stage 2: SD3 4, FLUX.2 9, as one prompt group of that size: the paper's K = 16 / 24
groups straddle GPUs, and the group size does not change the compute). RTDMD stage 2 starts from
the checkpoint of the AC-DMD iterations just measured.

Per method: the seconds of each distinct set of due updates (AC-DMD: the fake score every step, the
generator every 10th), amortised over the update period; FLOPs of one step of each set counted
with torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions and attention, gradient
checkpointing's recomputation included); achieved TFLOP/s and MFU against the GPU's dense bf16
peak when the device is in PEAK_BF16_TFLOPS. Then the shapes teacher step and a shapes AC-DMD
iteration (the shipped configs) at GPU speed. Sections share a time budget (default 450 s) and print
what they skipped.

    python benchmarks/perf/gpu_check.py [--out results.json]     # one GPU, under 8 minutes
    python benchmarks/perf/gpu_check.py --tiny                   # tiny models of the same classes, CPU

Needs torch, diffusers, transformers, peft; not MLflow.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import method_driver as D  # noqa: E402
from rtdmd.api import make_config  # noqa: E402

#: dense bf16 tensor-core peak, TFLOP/s, by a substring of torch.cuda.get_device_name() (first match wins)
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.4), ("H200", 989.4), ("H100", 989.4),
                    ("H800", 989.4), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1)]
REAL_METHODS = ["ac-dmd", "rtdmd", "dmd2", "lcm"]  # rtdmd (stage 2) starts from ac-dmd's checkpoint
SHAPES_METHODS = ["teacher", "ac-dmd"]


def peak_tflops(device_name: str) -> float | None:
    for key, peak in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def method_config(kind: str, method: str, tiny: bool, device: str, pfile: Path, init: Path | None):
    if kind == "shapes":
        over = {"train": {"device": device}}
        if tiny:
            over["train"]["batch_size"] = 2
        return make_config(method, backend="shapes", overrides=over)
    over = D.real_overrides(kind, tiny, pfile, device)
    if method == "rtdmd":
        over["method"] = {"stage": 2, "init": str(init)}
    cfg = make_config(method, backend=kind, overrides=over)
    batch = 2 if tiny else D.paper_batch(cfg)
    cfg.train.batch_size = batch
    if method == "rtdmd":
        cfg.method.group_size = batch  # one prompt group per GPU (see the module docstring)
    return cfg


def summary(kind: str, r: D.MethodTiming, peak: float | None) -> dict:
    out = {"method": r.method, "backend": kind, "batch": r.batch, "update_period": r.period,
           "seconds_per_iteration": r.amortised("seconds"), "flops_per_iteration": r.amortised("flops"),
           "peak_gib": r.peak_gib, "static_gib": r.static_gib, "skipped": r.skipped,
           "steps": {"+".join(k): v for k, v in r.kinds.items()}}
    s, f = out["seconds_per_iteration"], out["flops_per_iteration"]
    if s and f:
        out["achieved_tflops"] = f / s / 1e12
        if peak:
            out["mfu"] = out["achieved_tflops"] / peak
    return out


def line(o: dict) -> str:
    parts = [f"{o['backend']:6s} {o['method']:8s} batch {o['batch']:2d}"]
    s = o["seconds_per_iteration"]
    parts.append(f"s/it {s:.3f}" if s is not None else "s/it -")
    if len(o["steps"]) > 1:
        parts.append("(" + ", ".join(f"{k} {v['seconds']:.3f}" for k, v in o["steps"].items() if "seconds" in v)
                     + f"; period {o['update_period']})")
    if o["peak_gib"] is not None:
        parts.append(f"peak {o['peak_gib']:.1f} GiB")
    if o["flops_per_iteration"]:
        parts.append(f"{o['flops_per_iteration'] / 1e12:.4g} TFLOP/it")
    if "achieved_tflops" in o:
        parts.append(f"{o['achieved_tflops']:.4g} TFLOP/s")
    if "mfu" in o:
        parts.append(f"MFU {100 * o['mfu']:.1f}%")
    return "  ".join(parts)


def run_section(kind: str, methods: list[str], a, device: str, peak: float | None, deadline: float, tmp: Path,
                results: list[dict]) -> None:
    pfile = D.prompts_file(tmp)
    init = None
    min_start = 0.0 if a.tiny else a.min_method_seconds
    ctx = D.random_real_backends(a.tiny) if kind != "shapes" else _null()
    with ctx:
        for m in methods:
            left = deadline - time.perf_counter()
            if left < min_start:
                print(f"{kind:6s} {m:8s} skipped: {left:.0f} s left of this section's time budget", flush=True)
                results.append({"backend": kind, "method": m, "skipped": ["time budget"]})
                continue
            if m == "rtdmd" and init is None:
                print(f"{kind:6s} {m:8s} skipped: needs the ac-dmd checkpoint, which was not written", flush=True)
                results.append({"backend": kind, "method": m, "skipped": ["no stage-1 checkpoint"]})
                continue
            cfg = method_config(kind, m, a.tiny, device, pfile, init)
            names = D.use_standins(cfg) if kind != "shapes" else []
            wdt = torch.float32 if a.tiny else torch.bfloat16
            try:
                with D.standin_rewards(names, a.tiny, device, wdt):
                    tr = D.setup_trainer(cfg, tmp / f"{kind}-{m}")
                    try:
                        r = D.measure(tr, a.repeats, flops=not a.no_flops, deadline=deadline)
                        if m == "ac-dmd" and kind != "shapes":
                            init = D.save_checkpoint(tr, 1)
                    finally:
                        D.release(tr)
            except Exception as exc:  # out of memory, say: report it and go on with the next method
                if a.tiny:
                    raise
                msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
                print(f"{kind:6s} {m:8s} failed: {msg}", flush=True)
                results.append({"backend": kind, "method": m, "failed": msg})
                D.release_memory()
                continue
            o = summary(kind, r, peak)
            results.append(o)
            print(line(o) + ("  skipped: " + "; ".join(r.skipped) if r.skipped else ""), flush=True)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random models of the same classes, on CPU (seconds)")
    ap.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    ap.add_argument("--sections", default="shapes,sd3,flux2")
    ap.add_argument("--repeats", type=int, default=1, help="timed steps of each set of due updates, after one warm-up")
    ap.add_argument("--time-budget", type=float, default=450.0, help="seconds for all sections together")
    ap.add_argument("--min-method-seconds", type=float, default=25.0, help="start a method only with this much left")
    ap.add_argument("--no-flops", action="store_true", help="skip the FLOP-counted step")
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    device = "cpu" if a.tiny or not torch.cuda.is_available() else "cuda"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = peak_tflops(name) if device == "cuda" else None
    print(f"device: {name}  torch {torch.__version__}  " + (f"dense bf16 peak {peak:.0f} TFLOP/s" if peak else
          "bf16 peak unknown: achieved TFLOP/s only") + ("  (tiny models)" if a.tiny else ""), flush=True)
    if device == "cpu" and not a.tiny:
        print("no CUDA device: run with --tiny on CPU", file=sys.stderr)
        return 2
    sections = [s for s in a.sections.split(",") if s]
    results: list[dict] = []
    with D.temp_dir() as tmp:
        for i, kind in enumerate(sections):
            left = a.time_budget - (time.perf_counter() - t_start)
            deadline = time.perf_counter() + left / (len(sections) - i)  # a fair share of what is left
            methods = SHAPES_METHODS if kind == "shapes" else REAL_METHODS
            run_section(kind, methods, a, device, peak, deadline, Path(tmp), results)
    total = time.perf_counter() - t_start
    print(f"total {total:.0f} s")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"device": name, "peak_bf16_tflops": peak, "tiny": a.tiny, "torch": torch.__version__,
                                     "total_seconds": total, "results": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
