"""Shapes detector: GenEval accuracy on clean and degraded renders, blob scores, throughput.

    python benchmarks/perf/bench_detector.py [--per-task 100] [--images 4] [--threads 1]

Renders ``--images`` scenes per GenEval-shapes prompt (the official recipe over the six
classes) with ``scene_for_metadata``, scores them with the official rule engine, and
prints accuracy per task for clean renders and for renders degraded by blur and noise
(acceptance: >= 0.99 clean, >= 0.95 at blur 0.7 px + noise 0.05). Then the fraction of
shapeless blobs the detector keeps at GenEval's 0.3 and 0.9 thresholds, and images/s.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.geneval.prompts import generate_metadata
from benchmarks.geneval.rules import assess
from benchmarks.shapes.detector import ShapesDetector
from benchmarks.shapes.probes import BLOB_KINDS, blob_image, degrade
from rtdmd.world.shapes import ALL_CLASSES, TASKS, WorldSpec, render, scene_for_metadata, to_uint8


def accuracy(images: np.ndarray, metas: list[dict], det: ShapesDetector) -> tuple[dict[str, float], float]:
    per: dict[str, list[bool]] = {t: [] for t in TASKS}
    t0 = time.perf_counter()
    for img, meta in zip(images, metas):
        per[meta["tag"]].append(assess(img, meta, det).correct)
    dt = time.perf_counter() - t0
    return {t: float(np.mean(v)) for t, v in per.items() if v}, len(images) / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-task", type=int, default=100)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--blur", type=float, default=0.7)
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--blobs", type=int, default=100, help="blobs per kind")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    k = a.size / 32
    spec = WorldSpec(image_size=a.size, size_range=(10 * k, 15 * k))
    det = ShapesDetector(spec)
    rng = np.random.default_rng(a.seed)
    prompts = generate_metadata(ALL_CLASSES, per_task=a.per_task, exclude_color_class=None)
    metas = [m for m in prompts for _ in range(a.images)]
    scenes = [scene_for_metadata(m, rng, spec) for m in metas]
    images = torch.cat([render(scenes[i : i + 256], spec).images for i in range(0, len(scenes), 256)])
    print(f"detector {det.name}; {len(prompts)} prompts x {a.images} images, {a.size} px, threads {a.threads}")
    rows = [("clean", to_uint8(images)), (f"blur {a.blur} + noise {a.noise}", degrade(images, rng, a.blur, a.noise))]
    for name, imgs in rows:
        acc, ips = accuracy(imgs, metas, det)
        overall = float(np.mean(list(acc.values())))
        tasks = "  ".join(f"{t} {v:.3f}" for t, v in acc.items())
        print(f"{name:24s} overall {overall:.4f}  ({tasks})  [{ips:.0f} images/s incl. rules]")
    for kind in BLOB_KINDS:
        scores = [max([d.score for d in det.detect(blob_image(rng, kind, spec))] or [0.0]) for _ in range(a.blobs)]
        s = np.asarray(scores)
        print(f"blob {kind:8s} max score per image: median {np.median(s):.3f}  kept >0.3 {np.mean(s > 0.3):.3f}  >0.9 {np.mean(s > 0.9):.3f}")
    imgs = rows[1][1][:400]
    t0 = time.perf_counter()
    for img in imgs:
        det.detect(img)
    print(f"detect throughput (degraded renders): {len(imgs) / (time.perf_counter() - t0):.0f} images/s")


if __name__ == "__main__":
    main()
