"""GenEval as a suite: generate images into the official layout, then score them.

Generation is batched and resumable (an image already complete on disk is never
regenerated) and each image is seeded by (seed, prompt index, image index), so any image
can be regenerated alone. Scoring runs the detector and the official rules, in worker
processes when asked.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

from benchmarks.geneval import layout, rules
from benchmarks.geneval.prompts import COCO_CLASSES, generate_metadata


def default_metadata(backend) -> list[dict]:
    """GenEval's prompts for the backend: the official 553 for real models, the same recipe on the shapes classes."""
    if backend.name == "shapes":
        return generate_metadata(list(backend.options.classes), exclude_color_class=None)
    return generate_metadata(list(COCO_CLASSES))


def default_detector(backend):
    if backend.name == "shapes":
        from benchmarks.shapes.detector import ShapesDetector

        return ShapesDetector(backend.spec)
    from benchmarks.geneval.mask2former import Mask2FormerDetector

    return Mask2FormerDetector.from_default_location()


def generate_images(backend, net, metadata: Sequence[dict], out: Path, sampling, images_per_prompt: int = 4,
                    seed: int = 0, batch_size: int = 64, shard: tuple[int, int] = (0, 1), progress: bool = True) -> int:
    """Write missing images of every prompt into ``out`` (official layout); returns how many were generated.

    ``shard = (rank, world)`` splits the missing images across processes.
    """
    from rtdmd.generate import generate, sample_seed
    from rtdmd.images import to_uint8

    out = Path(out)
    for i, meta in enumerate(metadata):
        layout.write_prompt_dir(out, i, meta)
    todo = layout.missing_images(out, len(metadata), images_per_prompt)
    rank, world = shard
    todo = todo[rank::world]
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="generate", unit="img", dynamic_ncols=True)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        images = generate(backend, net, [metadata[i]["prompt"] for i, _ in chunk],
                          [sample_seed(seed, i, k) for i, k in chunk], sampling)
        for (i, k), arr in zip(chunk, to_uint8(images)):
            layout.save_image(out, i, k, arr)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return len(todo)


_WORKER_DETECTOR = None


def _init_worker(detector):
    global _WORKER_DETECTOR
    import torch

    torch.set_num_threads(1)
    _WORKER_DETECTOR = detector


def _score_one(args):
    path, metadata, cfg = args
    rec = rules.evaluate_image(layout.load_image(path), metadata, _WORKER_DETECTOR, cfg)
    rec["filename"] = str(path)
    return rec


def score_images(out: Path, detector, cfg: rules.RuleConfig | None = None, workers: int = 0,
                 progress: bool = True) -> tuple[list[dict], dict]:
    """Score every image under ``out``: (per-image official records, summary)."""
    items = [(p, meta, cfg) for _, _, meta, p in layout.read_images_dir(out)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc="score", unit="img", dynamic_ncols=True)
    results: list[dict] = []
    if workers and workers > 1:
        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(detector,)) as pool:
            for rec in pool.map(_score_one, items, chunksize=16):
                results.append(rec)
                if bar is not None:
                    bar.update(1)
    else:
        _init_worker(detector)
        for it in items:
            results.append(_score_one(it))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return results, rules.summarize(results)


def write_results(results: list[dict], path: Path) -> None:
    """One JSON line per image, as the official evaluator writes."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)
