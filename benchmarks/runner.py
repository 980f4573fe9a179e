"""Evaluation runner: checkpoints -> generated images -> suite scores -> one MLflow run each.

    rtdmd-bench eval --suite geneval --checkpoint runs/dmd2-shapes --steps 4

Images go to ``<out>/<model>/<prompt set>/<sampler>/`` in the GenEval layout, one folder
per (checkpoint, prompt set, sampler settings, seed), so suites with the same prompts
score the same images and a restarted eval regenerates nothing already on disk (PNGs are
written atomically). Each image is seeded by (seed, prompt index, image index)
(rtdmd.generate.sample_seed), so sharding across processes or batch size never changes
an image. Under ``accelerate launch`` / ``torchrun`` every rank generates its share of
the missing images; rank 0 scores after a barrier and logs to MLflow.

One MLflow run per (checkpoint, suite, sampler settings, seed, images per prompt, prompt
set): a rerun with the same settings reuses its run (found by the ``eval_key`` tag).
Artifacts: ``results.jsonl`` (per image), ``per_prompt.csv`` (per prompt, for bootstrap
CIs in the report), ``summary.json``, ``grid.png``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from benchmarks.eval_models import Model, default_models, describe_checkpoint, images_only_model, tracking_uri
from benchmarks.eval_prompts import PromptSet, collect_items, prompt_sets, select_indices
from benchmarks.geneval import suite as gsuite
from benchmarks.processes import Processes
from benchmarks.suites.registry import expand_suites, make_suite
from benchmarks.suites.base import ImageItem, SuiteResult
from rtdmd.checkpoint import load_for_inference
from rtdmd.errors import UserError
from rtdmd.generate import SamplingConfig
from rtdmd.images import load_png, make_grid, save_png
from rtdmd.tracking import Tracker, git_commit, search_runs
from rtdmd.validate import check_device, check_guidance, check_image_sizes, refuse_non_finite

DEFAULT_EXPERIMENT = "rtdmd-bench"
GRID_PROMPTS = 8  # prompts shown in a run's sample grid (rows, evenly spaced over the prompt set)


def nfe(steps: int, guidance: float) -> int:
    """Network evaluations per image: one per step, two with classifier-free guidance (w != 1)."""
    return int(steps) * (2 if float(guidance) != 1.0 else 1)


# ---------------------------------------------------------------------------- options / results


@dataclass
class EvalOptions:
    suites: list[str] = field(default_factory=lambda: ["geneval"])
    steps: int | None = None
    guidance: float | None = None
    eta: float | None = None
    seed: int = 0
    images_per_prompt: int = 4
    max_prompts: int | None = None
    prompts_file: Path | None = None
    images_dir: Path | None = None
    backend: str = "shapes"  # only for --images without --checkpoint
    weights: str = "ema"  # "ema" (model.safetensors) or "online" (the checkpoint's training weights)
    out: Path = Path("runs/eval")
    experiment: str = DEFAULT_EXPERIMENT
    tracking_uri: str | None = None
    tracking: bool = True
    batch_size: int = 128
    workers: int | None = None  # detector processes (None: all cores when there are many images)
    device: str = "auto"
    threads: int = 0  # torch CPU threads (0: torch's default)
    fid_reference: str | None = None
    inception_path: str | None = None
    command: str = ""
    progress: bool = True

    def validate(self) -> None:
        self.suites = expand_suites(self.suites)
        for name, v in (("--steps", self.steps), ("--images-per-prompt", self.images_per_prompt),
                        ("--max-prompts", self.max_prompts), ("--batch-size", self.batch_size)):
            if v is not None and v <= 0:
                raise UserError(f"{name} must be a positive integer, got {v}.")
        check_guidance(self.guidance, self.eta)
        if self.weights not in ("ema", "online"):
            raise UserError(f"--weights must be ema or online, got {self.weights!r}.")
        check_device(self.device)
        if self.threads < 0:
            raise UserError(f"--threads must be >= 0 (0: torch's default), got {self.threads}.")
        if self.workers is not None and self.workers < 0:
            raise UserError(f"--workers must be >= 0, got {self.workers}.")


@dataclass
class EvalResult:
    checkpoint: Path | None
    method: str
    suite: str
    steps: int
    guidance: float
    seed: int
    metrics: dict
    image_dir: Path
    eval_dir: Path
    generated: int
    run_id: str | None
    seconds: dict = field(default_factory=dict)  # generate (this prompt set, incl. model load), score, log


# ---------------------------------------------------------------------------- the run


def _sampling(model: Model, opts: EvalOptions):
    if model.checkpoint is None:
        return SamplingConfig(kind="images", steps=opts.steps or 0, guidance=1.0 if opts.guidance is None else opts.guidance,
                              eta=0.0 if opts.eta is None else opts.eta)
    return SamplingConfig.from_meta(model.meta.get("sampler", {}), steps=opts.steps, guidance=opts.guidance, eta=opts.eta)


def sampler_slug(sc, seed: int) -> str:
    eta = "" if sc.kind == "euler" else f"-eta{sc.eta:g}"  # the Euler ODE sampler has no eta
    return f"{sc.kind}-s{sc.steps}-w{sc.guidance:g}{eta}-seed{seed}"


def _default_workers(n_images: int) -> int:
    # process start-up (~1 s) only pays off for a few hundred images (benchmarks/perf/bench_eval.py)
    return (os.cpu_count() or 1) if n_images >= 400 and (os.cpu_count() or 1) > 1 else 0


def _write_artifacts(eval_dir: Path, result: SuiteResult, items: list[ImageItem], images_per_prompt: int,
                     summary: dict) -> list[Path]:
    eval_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    p = eval_dir / "results.jsonl"
    with open(p, "w") as f:
        for r in result.per_image:
            f.write(json.dumps(r) + "\n")
    paths.append(p)
    if result.per_prompt:
        p = eval_dir / "per_prompt.csv"
        cols = list(result.per_prompt[0])
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(result.per_prompt)
        paths.append(p)
    p = eval_dir / "summary.json"
    p.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    paths.append(p)
    ncols = min(images_per_prompt, 4)
    prompts = sorted({it.index for it in items})
    shown = [prompts[j] for j in select_indices(len(prompts), GRID_PROMPTS)]  # spread over the tasks
    grid_items = [it for it in items if it.index in shown and it.k < ncols]
    if grid_items:
        arrays = [load_png(it.path) for it in grid_items]
        upscale = max(1, 128 // arrays[0].shape[0])
        p = eval_dir / "grid.png"
        save_png(p, make_grid(arrays, ncols=ncols, upscale=upscale))
        (eval_dir / "grid_prompts.txt").write_text("\n".join(
            next(it.metadata["prompt"] for it in grid_items if it.index == i) for i in shown) + "\n")
        paths += [p, eval_dir / "grid_prompts.txt"]
    return paths


def _find_run(uri: str, experiment: str, key: str) -> str | None:
    df = search_runs(uri, experiment, f"tags.eval_key = '{key}'")
    return None if df is None or df.empty else str(df.iloc[0]["run_id"])


def log_eval_run(opts: EvalOptions, model: Model, sc, suite: str, ps: PromptSet, result: SuiteResult,
                 artifacts: list[Path], image_dir: Path) -> str | None:
    """One MLflow run per (checkpoint, suite, sampler settings, seed, images per prompt, prompt set)."""
    if not opts.tracking:
        return None
    ident = {"checkpoint": str(model.checkpoint), "sha": model.meta.get("model_sha256"), "suite": suite,
             **({"weights": model.weights} if model.weights != "ema" else {}),
             "sampler": sampler_slug(sc, opts.seed), "ipp": opts.images_per_prompt, "prompts": ps.id,
             "indices": hashlib.sha256(str(ps.indices).encode()).hexdigest()[:10],
             "images": str(Path(opts.images_dir).resolve()) if opts.images_dir else None}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    params = {"checkpoint": str(model.checkpoint or ""), "method": model.label, "backend": model.info.name, "weights": model.weights,
              "sampler": sc.kind, "steps": sc.steps, "guidance": sc.guidance, "eta": sc.eta, "seed": opts.seed,
              "images_per_prompt": opts.images_per_prompt, "prompt_count": len(ps.indices), "prompt_set": ps.name,
              "suite": suite}
    tags = {"kind": "eval", "suite": suite, "method": model.label, "backend": model.info.name,
            "git_commit": git_commit(), "nfe": str(nfe(sc.steps, sc.guidance)),
            "train_seconds": "" if model.train_seconds is None else f"{model.train_seconds:g}",
            "checkpoint_sha256": model.weights_sha256, "eval_key": key,
            "image_dir": str(Path(image_dir).resolve()), "command": opts.command[:5000], **result.tags}
    uri = tracking_uri(opts.tracking_uri)
    run_id = _find_run(uri, opts.experiment, key)
    tracker = Tracker(True, uri, opts.experiment)
    name = f"{suite}-{model.label}-{sc.kind}{sc.steps}-w{sc.guidance:g}-seed{opts.seed}"
    tracker.start(name, tags, params, run_id=run_id)
    status = "FAILED"
    try:
        if run_id is not None:
            tracker.set_tags(tags)
        tracker.log_metrics({**result.metrics, "nfe": nfe(sc.steps, sc.guidance)}, step=0)
        for p in artifacts:
            tracker.log_artifact(p)
        status = "FINISHED"
    finally:
        tracker.end(status)
    return tracker.run_id


def _load_network(model: Model, device: str, cache: dict):
    if "net" not in cache:
        cfg, backend, net, meta = load_for_inference(model.checkpoint, device=device, weights=model.weights)
        refuse_non_finite(net, model.checkpoint)
        if not backend.has_images:
            raise UserError(f"checkpoint {model.checkpoint} is a {backend.name} model (no images); evaluation suites need images.")
        cache["net"] = (backend, net)
    return cache["net"]


def run_eval(checkpoints: Sequence[str | Path] | None, opts: EvalOptions) -> list[EvalResult]:
    """Evaluate checkpoints (default: newest per trained method + shipped teacher) on opts.suites."""
    opts.validate()
    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    procs = Processes(cpu=opts.device == "cpu")
    device = procs.device(opts.device)
    if checkpoints:
        models = [describe_checkpoint(c, opts.weights) for c in checkpoints]
    elif opts.images_dir is not None:
        models = [images_only_model(opts.backend)]
    else:
        models = default_models(opts.experiment, opts.tracking_uri, opts.weights)
    if opts.images_dir is not None and len(models) != 1:
        raise UserError("--images scores one model's images; pass at most one --checkpoint with it.")
    results: list[EvalResult] = []
    for model in models:
        if model.info.name == "toy2d":
            raise UserError(f"checkpoint {model.checkpoint} is a toy2d model (2-D points, no images); evaluate an image backend.")
        sc = _sampling(model, opts)
        suites = {name: make_suite(name, opts.fid_reference, opts.inception_path) for name in opts.suites}
        sets = prompt_sets(model, suites, opts)
        n_images = max(len(ps.indices) for ps in sets.values()) * opts.images_per_prompt
        workers = _default_workers(n_images) if opts.workers is None else opts.workers
        error = None
        if procs.main:  # scorers load before anything is generated: missing weights fail fast
            try:
                for s in suites.values():
                    s.load(model.info, device, workers)
            except BaseException as e:  # noqa: BLE001 - re-raised on every rank by agree()
                error = e
        procs.agree(error)
        net_cache: dict = {}
        generated: dict[int, int] = {}
        gen_seconds: dict[int, float] = {}
        dirs: dict[int, Path] = {}
        for ps in {id(p): p for p in sets.values()}.values():
            if opts.images_dir is not None:
                dirs[id(ps)], generated[id(ps)], gen_seconds[id(ps)] = Path(opts.images_dir), 0, 0.0
                continue
            image_dir = Path(opts.out) / model.slug / f"prompts-{ps.id}" / sampler_slug(sc, opts.seed)
            dirs[id(ps)] = image_dir
            t0 = time.perf_counter()
            generated[id(ps)] = _generate(model, sc, ps, image_dir, opts, procs, device, net_cache)
            gen_seconds[id(ps)] = time.perf_counter() - t0
        net_cache.clear()
        error = None
        if procs.main:  # rank 0 scores; a failure is broadcast so the other ranks stop too
            try:
                results += _score_all(model, sc, suites, sets, dirs, generated, gen_seconds, opts)
            except BaseException as e:  # noqa: BLE001 - re-raised on every rank by agree()
                error = e
        procs.agree(error)
    return results


def _score_all(model: Model, sc, suites: dict, sets: dict, dirs: dict, generated: dict, gen_seconds: dict,
               opts: EvalOptions) -> list[EvalResult]:
    """Score every suite on its images, write the artifacts, log one MLflow run per suite."""
    results = []
    for name, suite in suites.items():
        ps = sets[name]
        image_dir = dirs[id(ps)]
        items = collect_items(image_dir, ps, opts.images_per_prompt)
        check_image_sizes([it.path for it in items], getattr(model.info.options, "image_size", None))
        eval_dir = image_dir / "eval" / f"{name}-ipp{opts.images_per_prompt}-p{len(ps.indices)}"
        t0 = time.perf_counter()
        res = suite.score(items, model.info, seed=opts.seed, progress=opts.progress, work_dir=eval_dir)
        t_score = time.perf_counter() - t0
        summary = {"metrics": res.metrics, "tags": res.tags, **res.extra,
                   "checkpoint": str(model.checkpoint), "method": model.label, "weights": model.weights, "suite": name,
                   "sampler": {"kind": sc.kind, "steps": sc.steps, "guidance": sc.guidance, "eta": sc.eta},
                   "seed": opts.seed, "images_per_prompt": opts.images_per_prompt,
                   "prompt_count": len(ps.indices), "prompt_set": ps.name, "nfe": nfe(sc.steps, sc.guidance)}
        t0 = time.perf_counter()
        artifacts = _write_artifacts(eval_dir, res, items, opts.images_per_prompt, summary)
        run_id = log_eval_run(opts, model, sc, name, ps, res, artifacts, image_dir)
        seconds = {"generate": gen_seconds[id(ps)], "score": t_score, "log": time.perf_counter() - t0}
        results.append(EvalResult(model.checkpoint, model.label, name, sc.steps, sc.guidance, opts.seed,
                                  res.metrics, image_dir, eval_dir, generated[id(ps)], run_id, seconds))
    return results


def _generate(model: Model, sc, ps: PromptSet, image_dir: Path, opts: EvalOptions, procs: Processes, device: str,
              net_cache: dict) -> int:
    """Generate this rank's share of the missing images; returns how many this rank generated."""
    if procs.main:
        gsuite.prepare_prompt_dirs(image_dir, ps.entries, ps.indices)
    procs.barrier()
    todo = gsuite.missing_images(image_dir, ps.indices, opts.images_per_prompt)
    procs.barrier()  # every rank has the same list before anyone writes
    mine = todo[procs.rank::procs.world]
    if mine:
        backend, net = _load_network(model, device, net_cache)
        gsuite.generate_images(backend, net, ps.entries, image_dir, sc, opts.images_per_prompt, opts.seed,
                               batch_size=opts.batch_size, shard=(0, 1), progress=opts.progress and procs.main,
                               indices=ps.indices, todo=mine)
    procs.barrier()
    return len(mine)
