#!/usr/bin/env python
"""Shapes sampling on CPU: the 4-step generator against the 28-step CFG teacher, and eval throughput.

1. Speed-up. The same images (prompts and per-image seeds) at the same batch, generated with
   rtdmd.generate.generate_batched twice: the shipped teacher's own sampler (Euler, 28 steps,
   CFG 4: 56 sample-forwards per image) and the 4-step CPS sampler without guidance (4
   sample-forwards). A 4-step generator distilled from the teacher has the teacher's network (the
   students are copies of it), so the shipped teacher weights sampled with CPS give a 4-step
   generator's speed without a distilled checkpoint. Printed: seconds, images/s, the time spent in
   network calls, the measured speed-up and the NFE ratio 56 / 4 = 14.
2. Eval throughput. benchmarks.runner.run_eval, as `rtdmd-bench eval --suite all` runs it on the
   shapes backend (GenEval-shapes prompts, 4 images each, the shapes detector, oracle and learned
   rewards, FD-shapes; no MLflow), with the 4-step CPS sampler; generation is timed once (the suites
   share the prompt set) and each suite's scoring separately, in images per second.

    OMP_NUM_THREADS=1 python benchmarks/perf/bench_sampling.py [--threads 1] [--batch 32] [--max-prompts 48]

The machine may be shared: figures are as measured, in one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import runner  # noqa: E402
from rtdmd.backends.shapes import SHIPPED_TEACHER  # noqa: E402
from rtdmd.checkpoint import load_for_inference  # noqa: E402
from rtdmd.generate import SamplingConfig, generate_batched, sample_seed  # noqa: E402
from rtdmd.seeding import torch_generator  # noqa: E402


class TimedVelocity:
    """Wraps backend.velocity and accumulates the wall time spent inside it."""

    def __init__(self, fn):
        self.fn, self.seconds, self.calls, self.samples = fn, 0.0, 0, 0

    def __call__(self, net, x, sigma, cond):
        t = time.perf_counter()
        out = self.fn(net, x, sigma, cond)
        self.seconds += time.perf_counter() - t
        self.calls += 1
        self.samples += x.shape[0]
        return out


def timed_generation(backend, net, items, sc, batch: int) -> dict:
    """Wall seconds of generate_batched over ``items``, and the share inside network calls."""

    timed = TimedVelocity(backend.velocity)
    backend.velocity = timed
    try:
        t = time.perf_counter()
        with torch.no_grad():
            images = generate_batched(backend, net, items, sc, batch_size=batch)
        total = time.perf_counter() - t
    finally:
        del backend.velocity  # back to the class method
    return {"seconds": total, "images": images.shape[0], "network_seconds": timed.seconds, "calls": timed.calls,
            "sample_forwards_per_image": timed.samples / images.shape[0]}


def nfe(sc) -> int:
    """Sample-forwards per image: steps, doubled by CFG."""
    return sc.steps * (2 if sc.guidance != 1.0 else 1)


def speedup(a) -> dict:
    _, backend, net, meta = load_for_inference(SHIPPED_TEACHER)
    teacher_sc = SamplingConfig.from_meta(meta["sampler"])  # Euler, 28 steps, CFG 4
    fast_sc = SamplingConfig(kind="cps", steps=4, guidance=1.0, eta=0.9)
    prompts = backend.training_prompts(a.images, torch_generator("bench_sampling"))  # the caption grammar
    items = [(p, sample_seed(0, i, 0)) for i, p in enumerate(prompts)]
    timed_generation(backend, net, items[:a.batch], fast_sc, a.batch)  # warm-up (allocator, kernels)
    fast = timed_generation(backend, net, items, fast_sc, a.batch)
    teacher = timed_generation(backend, net, items, teacher_sc, a.batch)
    ratio = nfe(teacher_sc) / nfe(fast_sc)
    measured = teacher["seconds"] / fast["seconds"]
    for name, sc, r in (("4-step generator (CPS, no CFG)", fast_sc, fast),
                        (f"teacher ({teacher_sc.kind}, {teacher_sc.steps} steps, CFG {teacher_sc.guidance:g})", teacher_sc, teacher)):
        print(f"{name:42s} NFE {nfe(sc):3d}  {r['seconds']:7.2f} s  {r['images'] / r['seconds']:7.2f} img/s  "
              f"network calls {r['network_seconds'] / r['seconds']:6.1%} of the time ({r['calls']} calls, "
              f"{r['sample_forwards_per_image']:.0f} sample-forwards/image)")
    print(f"speed-up of the 4-step generator: measured {measured:.2f}x, NFE ratio {nfe(teacher_sc)}/{nfe(fast_sc)} = "
          f"{ratio:.2f}x, measured / NFE ratio = {measured / ratio:.2f}")
    return {"measured": measured, "nfe_ratio": ratio, "fast": fast, "teacher": teacher}


def eval_throughput(a) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-sampling-") as work:
        opts = runner.EvalOptions(suites=["all"], steps=4, guidance=1.0, eta=0.9, images_per_prompt=4,
                                  max_prompts=a.max_prompts, out=Path(work) / "eval", tracking=False,
                                  batch_size=a.eval_batch, workers=0, threads=a.threads, progress=False,
                                  command="bench_sampling.py")
        t0 = time.perf_counter()
        results = runner.run_eval([str(SHIPPED_TEACHER)], opts)
        total = time.perf_counter() - t0
    gen = [r for r in results if r.generated]
    n = results[0].generated if not gen else gen[0].generated
    g = (gen[0] if gen else results[0]).seconds["generate"]
    print(f"eval ({len(results)} suites, {n} images = {a.max_prompts} GenEval-shapes prompts x 4, 4 CPS steps, "
          f"batch {a.eval_batch}, detector in-process)")
    print(f"  generation (model load included): {g:7.2f} s  {n / g:7.1f} img/s")
    for r in results:
        s = r.seconds["score"]
        print(f"  scoring {r.suite:11s}: {s:7.2f} s  {n / s:7.1f} img/s")
    print(f"  run_eval in all: {total:.1f} s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32, help="images per batch, both samplers")
    ap.add_argument("--images", type=int, default=32, help="images timed per sampler")
    ap.add_argument("--max-prompts", type=int, default=48, help="GenEval-shapes prompts in the eval throughput run")
    ap.add_argument("--eval-batch", type=int, default=128)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}, torch {torch.__version__}, {a.threads} thread(s); "
          "the machine may be shared: figures as measured in this run")
    speedup(a)
    eval_throughput(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
