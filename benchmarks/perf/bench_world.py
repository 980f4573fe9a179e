"""Shapes-world data throughput: scene sampling and batched rendering, images/s on this machine.

    python benchmarks/perf/bench_world.py [--batch 64] [--size 32] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from rtdmd.world.shapes import WorldSpec, render, sample_training_batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    spec = WorldSpec(image_size=a.size, size_range=(10.0 * a.size / 32, 15.0 * a.size / 32))
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    batches = [sample_training_batch(rng, spec, a.batch)[0] for _ in range(a.batches)]
    t_sample = time.perf_counter() - t
    render(batches[0], spec, a.device)  # warm-up
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    for scenes in batches:
        out = render(scenes, spec, a.device)
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
    t_render = time.perf_counter() - t
    n = a.batch * a.batches
    print(f"world {a.size}px batch {a.batch} threads {a.threads} device {a.device}: {out.images.shape}")
    print(f"sampling  {n / t_sample:9.0f} scenes/s")
    print(f"rendering {n / t_render:9.0f} images/s")
    print(f"together  {n / (t_sample + t_render):9.0f} images/s  (target >= 2000)")


if __name__ == "__main__":
    main()
