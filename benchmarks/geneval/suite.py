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
from typing import Iterator, Sequence

import torch
from tqdm import tqdm

from benchmarks.geneval import layout, rules
from benchmarks.geneval.mask2former import Mask2FormerDetector
from benchmarks.geneval.prompts import COCO_CLASSES, generate_metadata
from benchmarks.shapes.detector import ShapesDetector
from benchmarks.suites.base import SuiteResult, per_prompt_means
from rtdmd.errors import UserError
from rtdmd import generate as gen  # through the module: tests replace gen.generate
from rtdmd.images import to_uint8


def default_metadata(backend) -> list[dict]:
    """GenEval's prompts for the backend: the official 553 for real models, the same recipe on the shapes classes."""
    if backend.name == "shapes":
        return generate_metadata(list(backend.options.classes), exclude_color_class=None)
    return generate_metadata(list(COCO_CLASSES))


#: the recipe seeds of the extra prompt draws a held-out split takes from (the official set is seed 43)
HELDOUT_RECIPE_SEEDS = range(1000, 1100)


def recipe_draws(backend) -> Iterator[list[dict]]:
    """GenEval's recipe on the backend's classes drawn again with HELDOUT_RECIPE_SEEDS, one prompt list per seed: the
    prompts a held-out split adds to those the evaluation leaves out (benchmarks.study.sweep)."""
    classes, exclude = ((list(backend.options.classes), None) if backend.name == "shapes"
                        else (list(COCO_CLASSES), "person"))
    for seed in HELDOUT_RECIPE_SEEDS:
        yield generate_metadata(classes, seed=seed, exclude_color_class=exclude)


def default_detector(backend):
    if backend.name == "shapes":
        return ShapesDetector(backend.spec)
    return Mask2FormerDetector.from_default_location()


def prepare_prompt_dirs(out: Path, metadata: Sequence[dict], indices: Sequence[int] | None = None) -> None:
    """Write ``<out>/<i:05d>/metadata.jsonl`` for the selected prompts (all by default)."""
    for i in (range(len(metadata)) if indices is None else indices):
        layout.write_prompt_dir(out, i, metadata[i])


def missing_images(out: Path, indices: Sequence[int], images_per_prompt: int) -> list[tuple[int, int]]:
    """(prompt index, image number) pairs of the selected prompts whose PNG is absent or incomplete."""
    return [(i, k) for i in indices for k in range(images_per_prompt)
            if not layout.is_complete_png(layout.image_path(out, i, k))]


def generate_images(backend, net, metadata: Sequence[dict], out: Path, sampling, images_per_prompt: int = 4,
                    seed: int = 0, batch_size: int = 64, shard: tuple[int, int] = (0, 1), progress: bool = True,
                    indices: Sequence[int] | None = None, todo: Sequence[tuple[int, int]] | None = None) -> int:
    """Write missing images of every prompt into ``out`` (official layout); returns how many were generated.

    ``shard = (rank, world)`` splits the missing images across processes. ``indices`` selects
    prompts (default all); ``todo`` gives the missing (index, k) list computed beforehand (so
    every process splits the same list even while others are already writing).
    """
    out = Path(out)
    indices = list(range(len(metadata))) if indices is None else list(indices)
    if todo is None:
        prepare_prompt_dirs(out, metadata, indices)
        todo = missing_images(out, indices, images_per_prompt)
    rank, world = shard
    todo = list(todo)[rank::world]
    bar = None
    if progress and todo:
        bar = tqdm(total=len(todo), desc="generate", unit="img", dynamic_ncols=True)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        step = gen.StepProgress(bar, len(chunk), sampling.steps) if bar is not None else None
        extra = {} if step is None else {"on_step": step}  # the bar moves after every sampling step of a batch
        images = gen.generate(backend, net, [metadata[i]["prompt"] for i, _ in chunk],
                              [gen.sample_seed(seed, i, k) for i, k in chunk], sampling, **extra)
        for (i, k), arr in zip(chunk, to_uint8(images)):
            layout.save_image(out, i, k, arr)
        if step is not None:
            step.done()
    if bar is not None:
        bar.close()
    return len(todo)


_WORKER_DETECTOR = None


def _init_worker(detector):
    global _WORKER_DETECTOR
    torch.set_num_threads(1)
    _WORKER_DETECTOR = detector


def _score_one(args):
    path, metadata, cfg = args
    rec = rules.evaluate_image(layout.load_image(path), metadata, _WORKER_DETECTOR, cfg)
    rec["filename"] = str(path)
    return rec


def score_paths(items: Sequence[tuple[Path, dict]], detector, cfg: rules.RuleConfig | None = None, workers: int = 0,
                progress: bool = True) -> list[dict]:
    """Official records for (png path, metadata) pairs, in order; ``workers > 1`` uses processes."""
    items = [(p, meta, cfg) for p, meta in items]
    bar = None
    if progress:
        bar = tqdm(total=len(items), desc="score", unit="img", dynamic_ncols=True)
    results: list[dict] = []
    if workers and workers > 1 and len(items) > workers:
        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(detector,)) as pool:
            for rec in pool.map(_score_one, items, chunksize=max(1, min(32, len(items) // (4 * workers)))):
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
    return results


def score_images(out: Path, detector, cfg: rules.RuleConfig | None = None, workers: int = 0,
                 progress: bool = True) -> tuple[list[dict], dict]:
    """Score every image under ``out``: (per-image official records, summary)."""
    items = [(p, meta) for _, _, meta, p in layout.read_images_dir(out)]
    results = score_paths(items, detector, cfg, workers, progress)
    return results, rules.summarize(results)


class GenEvalSuite:
    """GenEval (or GenEval-shapes) accuracy: overall and per task, per image and per prompt.

    Metrics: ``geneval/overall`` (unweighted mean of the task accuracies, as the official
    summary) and ``geneval/<task>``; per prompt, the fraction of its images judged correct
    (column ``geneval``), from which the report bootstraps confidence intervals.
    """

    name = "geneval"
    needs_geneval_metadata = True

    def __init__(self, detector=None, rule_config: rules.RuleConfig | None = None):
        self.detector = detector
        self.rule_config = rule_config
        self.workers = 0

    def default_prompts(self, info) -> list[dict]:
        return default_metadata(info)

    def heldout_draws(self, info) -> Iterator[list[dict]]:
        return recipe_draws(info)

    def load(self, info, device: str = "cpu", workers: int = 0) -> None:
        if self.detector is None:
            self.detector = default_detector(info)
        self.workers = workers

    def score(self, items, info, seed: int = 0, progress: bool = True, work_dir=None):
        for it in items:
            if not layout.is_complete_png(it.path):
                raise UserError(f"image {it.path} is missing or incomplete; rerun the eval without --images to generate it.")
        records = score_paths([(it.path, it.metadata) for it in items], self.detector, self.rule_config,
                              self.workers, progress)
        summary = rules.summarize(records)
        for it, rec in zip(items, records):
            rec["index"], rec["k"] = it.index, it.k
        metrics = {"geneval/overall": summary["overall"]}
        metrics.update({f"geneval/{t}": v for t, v in summary["tasks"].items()})
        per_prompt = per_prompt_means(items, {"geneval": [float(r["correct"]) for r in records]})
        tags = {"detector": self.detector.name}
        return SuiteResult(metrics, records, per_prompt, tags, extra={"summary": summary})


def write_results(results: list[dict], path: Path) -> None:
    """One JSON line per image, as the official evaluator writes."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)
