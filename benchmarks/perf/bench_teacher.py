"""Shapes teacher speed on this machine: training it/s, sampling images/s, time outside network calls.

Training: the shipped recipe (rtdmd/configs/shapes/teacher.yaml), timed over trainer steps after a
warm-up (data prefetch, AdamW, EMA and gradient clipping included; no checkpoint writes).
Sampling: the shipped teacher at 4 CPS steps (no guidance) and at 28 Euler steps with CFG 4 (the
shipped sampler), batched; the network calls are timed by wrapping backend.velocity, and the rest
of the sampling loop (noise draws, sampler arithmetic, decoding) is reported as a share of the total.

    python benchmarks/perf/bench_teacher.py [--threads 2] [--batch 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from rtdmd.backends.shapes import SHIPPED_TEACHER
from rtdmd.checkpoint import load_for_inference
from rtdmd.config import resolve
from rtdmd.generate import SamplingConfig, generate_batched, sample_seed
from rtdmd.seeding import torch_generator
from rtdmd.trainer import Trainer

SHIPPED_STEPS = 4364  # rtdmd/assets/shapes_teacher/meta.json


def bench_training(batch: int, warmup: int, steps: int, threads: int) -> float:
    """Teacher training iterations per second (shipped recipe)."""

    cfg = resolve("teacher", backend="shapes", overrides={
        "train": {"batch_size": batch, "device": "cpu", "num_threads": threads, "max_steps": warmup + steps},
        "tracking": {"enabled": False}})
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(cfg, Path(tmp), show_progress=False)
        tr._setup()
        try:
            for i in range(warmup):
                tr._one_step(i)
            t = time.perf_counter()
            for i in range(warmup, warmup + steps):
                tr._one_step(i)
            dt = time.perf_counter() - t
        finally:
            tr.method.close()
    return steps / dt


class _TimedVelocity:
    """Wraps backend.velocity and accumulates the wall time spent inside it."""

    def __init__(self, fn):
        self.fn, self.seconds, self.calls = fn, 0.0, 0

    def __call__(self, *a, **k):
        t = time.perf_counter()
        out = self.fn(*a, **k)
        self.seconds += time.perf_counter() - t
        self.calls += 1
        return out


def bench_sampling(sc, n_images: int, batch: int, backend, net, warmup: bool) -> tuple[float, float, int]:
    """(images/s, share of time outside network calls, network calls) for n_images from distinct prompts/seeds."""

    prompts = backend.training_prompts(n_images, torch_generator("bench_teacher"))  # the world's caption grammar
    items = [(p, sample_seed(0, i, 0)) for i, p in enumerate(prompts)]
    if warmup:
        generate_batched(backend, net, items[:batch], sc, batch_size=batch)
    timed = _TimedVelocity(backend.velocity)
    backend.velocity = timed
    try:
        t = time.perf_counter()
        generate_batched(backend, net, items, sc, batch_size=batch)
        total = time.perf_counter() - t
    finally:
        del backend.velocity  # back to the class method
    return n_images / total, 1.0 - timed.seconds / total, timed.calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2, help="untimed training steps")
    ap.add_argument("--steps", type=int, default=8, help="timed training steps")
    ap.add_argument("--images-fast", type=int, default=128, help="images timed at 4 CPS steps")
    ap.add_argument("--images-cfg", type=int, default=64, help="images timed at 28 Euler steps with CFG")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)


    it_s = bench_training(a.batch, a.warmup, a.steps, a.threads)
    torch.set_num_threads(a.threads)
    _, backend, net, meta = load_for_inference(SHIPPED_TEACHER)
    fast = SamplingConfig(kind="cps", steps=4, guidance=1.0, eta=0.9)
    cfg = SamplingConfig.from_meta(meta["sampler"])  # euler, 28 steps, CFG 4
    fast_ips, fast_out, fast_calls = bench_sampling(fast, a.images_fast, a.batch, backend, net, warmup=True)
    cfg_ips, cfg_out, cfg_calls = bench_sampling(cfg, a.images_cfg, a.batch, backend, net, warmup=False)

    print(f"shapes teacher on CPU, torch {torch.__version__}, {a.threads} threads, batch {a.batch}")
    print(f"{'measurement':44s} {'value':>10s}  {'target':>8s}")
    print(f"{'training (shipped recipe), it/s':44s} {it_s:10.2f}")
    print(f"{'  images trained per second':44s} {it_s * a.batch:10.1f}")
    print(f"{'sampling 4 CPS steps, images/s':44s} {fast_ips:10.1f}")
    print(f"{'  time outside network calls':44s} {fast_out:10.1%}  {'<= 10%':>8s}  ({fast_calls} calls)")
    print(f"{f'sampling {cfg.steps} Euler steps + CFG {cfg.guidance:g}, images/s':44s} {cfg_ips:10.2f}")
    print(f"{'  time outside network calls':44s} {cfg_out:10.1%}  {'<= 10%':>8s}  ({cfg_calls} calls)")
    hours = SHIPPED_STEPS / it_s / 3600
    print(f"implied CPU time of the shipped teacher's {SHIPPED_STEPS} steps at batch {a.batch}: "
          f"{hours:.1f} h ({hours * 60:.0f} min); it was trained in {meta.get('train_seconds', float('nan')):.0f} s "
          "on a GPU")


if __name__ == "__main__":
    main()
