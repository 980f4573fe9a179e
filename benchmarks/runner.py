"""Evaluation runner: checkpoints -> generated images -> suite scores -> one MLflow run each.

    rtdmd-bench eval --suite geneval --checkpoint runs/dmd2-shapes --steps 4

Images go to ``<out>/<model>/<prompt set>/<sampler>/`` in the GenEval layout, one folder
per (checkpoint, prompt set, sampler settings, seed), so suites with the same prompts
score the same images and a restarted eval regenerates nothing already on disk (PNGs are
written atomically). Each image is seeded by (seed, prompt index, image index)
(rtdmd.generate.sample_seed), so sharding across processes or batch size never changes
an image. Under ``accelerate launch`` / ``torchrun`` every rank generates its share of
the missing images; rank 0 scores after a barrier and logs to MLflow.

One MLflow run per (checkpoint, sampler settings, seed, images per prompt, prompt set)
holding every suite's metrics: a rerun with the same settings reuses its run (found by the
``eval_key`` tag). Artifacts: per suite ``<suite>/results.jsonl`` (per image),
``<suite>/per_prompt.csv`` (per prompt, for bootstrap CIs in the report),
``<suite>/summary.json``; ``grid.png`` with ``grid_prompts.txt``.
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

from benchmarks import pipelines
from benchmarks.eval_models import Model, default_models, describe_checkpoint, images_only_model, tracking_uri
from benchmarks.generation_record import make_record, recorded_model, write_record
from benchmarks.eval_prompts import PromptSet, collect_items, prompt_sets, stratified_indices
from benchmarks.geneval import suite as gsuite
from benchmarks.processes import Processes
from benchmarks.suites.registry import expand_suites, make_suite
from benchmarks.suites.base import ImageItem, SuiteResult
from rtdmd.checkpoint import load_for_inference
from rtdmd.errors import UserError
from rtdmd.generate import SamplingConfig
from rtdmd.images import load_png, make_grid, save_png
from rtdmd.tracking import close_keyed_run, git_commit, open_keyed_run, portable_path, portable_text
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
    sampler: str | None = None  # "euler" | "cps": run the weights with this sampler (None: the checkpoint's own)
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
    pipeline: pipelines.PipelineSpec | None = None  # a diffusers pipeline evaluated beside the checkpoints
    command: str = ""
    progress: bool = True
    tags: dict = field(default_factory=dict)  # extra tags of the eval runs (a study runner sets arm, seed)

    def validate(self) -> None:
        self.suites = expand_suites(self.suites)
        for name, v in (("--steps", self.steps), ("--images-per-prompt", self.images_per_prompt),
                        ("--max-prompts", self.max_prompts), ("--batch-size", self.batch_size)):
            if v is not None and v <= 0:
                raise UserError(f"{name} must be a positive integer, got {v}.")
        check_guidance(self.guidance, self.eta)
        if self.sampler not in (None, "euler", "cps"):
            raise UserError(f"sampler must be euler or cps (or unset: the checkpoint's own), got {self.sampler!r}.")
        if self.weights not in ("ema", "online"):
            raise UserError(f"--weights must be ema or online, got {self.weights!r}.")
        check_device(self.device)
        if self.threads < 0:
            raise UserError(f"--threads must be >= 0 (0: torch's default), got {self.threads}.")
        if self.workers is not None and self.workers < 0:
            raise UserError(f"--workers must be >= 0, got {self.workers}.")
        if self.pipeline is not None:
            pipelines.check_pipeline_options(self)


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
    if hasattr(model, "sampling"):  # a pipeline's own settings, or those an image folder's generation.json records
        return model.sampling(opts)
    if model.checkpoint is None:
        return SamplingConfig(kind="images", steps=opts.steps or 0, guidance=1.0 if opts.guidance is None else opts.guidance,
                              eta=0.0 if opts.eta is None else opts.eta)
    return SamplingConfig.from_meta(model.meta.get("sampler", {}), steps=opts.steps, guidance=opts.guidance, eta=opts.eta,
                                    kind=opts.sampler)


def sampler_slug(sc, seed: int) -> str:
    eta = "" if sc.kind in ("euler", "pipeline") else f"-eta{sc.eta:g}"  # the Euler ODE sampler has no eta
    return f"{sc.kind}-s{sc.steps}-w{sc.guidance:g}{eta}-seed{seed}"


def _default_workers(n_images: int) -> int:
    # process start-up (~1 s) only pays off for a few hundred images (benchmarks/perf/bench_eval.py)
    return (os.cpu_count() or 1) if n_images >= 400 and (os.cpu_count() or 1) > 1 else 0


def _write_artifacts(eval_dir: Path, result: SuiteResult, summary: dict) -> list[Path]:
    """One suite's artifacts: results.jsonl (per image), per_prompt.csv (per prompt), summary.json."""
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
    return paths


def _write_grid(folder: Path, items: list[ImageItem], images_per_prompt: int) -> list[Path]:
    """grid.png (the first images of GRID_PROMPTS prompts spread over the tasks) and grid_prompts.txt."""
    ncols = min(images_per_prompt, 4)
    entries = {it.index: it.metadata for it in items}
    shown = [sorted(entries)[j] for j in stratified_indices([entries[i] for i in sorted(entries)], GRID_PROMPTS)]
    grid_items = [it for it in items if it.index in shown and it.k < ncols]
    if not grid_items:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    arrays = [load_png(it.path) for it in grid_items]
    upscale = max(1, 128 // arrays[0].shape[0])
    save_png(folder / "grid.png", make_grid(arrays, ncols=ncols, upscale=upscale))
    (folder / "grid_prompts.txt").write_text("\n".join(entries[i]["prompt"] for i in sorted(shown)) + "\n")
    return [folder / "grid.png", folder / "grid_prompts.txt"]


@dataclass
class SuiteScore:
    """One suite's scores of one image folder, ready to log."""

    name: str
    result: SuiteResult
    artifacts: list[Path]
    seconds: float  # scoring time


def checkpoint_label(model: Model) -> str:
    """The checkpoint as logged: its path relative to the working directory when inside it, else the run
    folder's name, the path below it and the weights' sha256 prefix ('rtdmd/stage2/checkpoints/step_000016@1a2b3c4d')."""
    if model.checkpoint is None:
        return ""
    p = Path(model.checkpoint)
    run = p.parent.parent if p.parent.name == "checkpoints" else p
    run = run.parent if run.name in ("stage1", "stage2") else run
    tail = p.relative_to(run.parent).as_posix() if run.parent in p.parents else p.name
    sha = str(model.meta.get("model_sha256") or "")[:8]
    return portable_path(p, f"{tail}@{sha}" if sha else tail)


def eval_key(model: Model, sc, opts: EvalOptions, ps: PromptSet) -> str:
    """The identity of an evaluation run: checkpoint weights, sampling config, prompt set, seed, images per prompt."""
    ident = {"sha": model.meta.get("model_sha256") or checkpoint_label(model), "method": model.method,
             **({"weights": model.weights} if model.weights != "ema" else {}),
             "sampler": sampler_slug(sc, opts.seed), "ipp": opts.images_per_prompt, "prompts": ps.id,
             "indices": hashlib.sha256(str(ps.indices).encode()).hexdigest()[:10],
             "images": portable_path(opts.images_dir, str(Path(opts.images_dir).resolve())) if opts.images_dir else None}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _run_tags(opts: EvalOptions, model: Model, sc, scores: list[SuiteScore], image_dir: Path, old_tags: dict) -> dict:
    suites = sorted({*filter(None, old_tags.get("suites", "").split(",")), *(s.name for s in scores)})
    tags = {"kind": "eval", "method": model.label, "backend": model.info.name, "suites": ",".join(suites),
            "git_commit": git_commit(), "nfe": str(nfe(sc.steps, sc.guidance)),
            "train_seconds": "" if model.train_seconds is None else f"{model.train_seconds:g}",
            "checkpoint_sha256": model.weights_sha256,
            "train_run_id": str(model.meta.get("mlflow_run_id") or ""),
            "image_dir": portable_path(image_dir, str(image_dir)), "command": opts.command[:5000]}
    for s in scores:  # per suite: detector / scorer identities, FD references
        tags.update({f"{s.name}.{k}": portable_text(str(v)) for k, v in s.result.tags.items()})
    tags.update({k: str(v) for k, v in model.tags.items()})  # a diffusers pipeline's identity (benchmarks.pipelines)
    tags.update({k: str(v) for k, v in opts.tags.items()})  # e.g. arm, seed (of training) from a study runner
    return tags


def log_eval_run(opts: EvalOptions, model: Model, sc, ps: PromptSet, scores: list[SuiteScore], artifacts: list[Path],
                 image_dir: Path, generated: int, gen_start: float, gen_seconds: float) -> str | None:
    """One MLflow run per (checkpoint, sampling config, prompt set, seed, images per prompt) holding every suite's
    metrics; a rerun reuses it (found by its eval_key tag) and adds or updates the suites it scores.

    Each suite's artifacts go under ``<suite>/``, ``artifacts`` (the sample grid) at the top. The run starts when
    generation started (``gen_start``, epoch seconds) and lasts generate_seconds + score_seconds: the time spent
    generating its images (summed over the evals that generated some) and scoring its suites (each suite's latest).
    """
    if not opts.tracking:
        return None
    uri = tracking_uri(opts.tracking_uri)
    params = {"checkpoint": checkpoint_label(model), "method": model.label, "backend": model.info.name,
              "weights": model.weights,
              "sampler": sc.kind, "steps": sc.steps, "guidance": sc.guidance, "eta": sc.eta, "seed": opts.seed,
              "images_per_prompt": opts.images_per_prompt, "prompt_count": len(ps.indices),
              "prompt_set": portable_text(ps.name)}
    who = opts.tags.get("arm") or model.label
    name = f"{who}-{sc.kind}{sc.steps}-w{sc.guidance:g}-seed{opts.seed}"
    run = open_keyed_run(uri, opts.experiment, "eval_key", eval_key(model, sc, opts, ps), name,
                         {"kind": "eval"}, params, int(gen_start * 1000))
    try:
        old = run["metrics"]
        spent = gen_seconds + (old.get("generate_seconds", 0.0) if generated else 0.0)
        gen = spent if run["created"] or generated else old.get("generate_seconds", 0.0)
        per_suite = {**{k: v for k, v in old.items() if k.startswith("score_seconds/")},
                     **{f"score_seconds/{s.name}": s.seconds for s in scores}}
        metrics = {m: v for s in scores for m, v in s.result.metrics.items()}
        metrics.update(per_suite, nfe=nfe(sc.steps, sc.guidance), generate_seconds=gen,
                       score_seconds=sum(per_suite.values()))
        files = [(p, s.name) for s in scores for p in s.artifacts] + [(p, None) for p in artifacts]
        end_ms = run["start_ms"] + int(1000 * (gen + metrics["score_seconds"]))
        close_keyed_run(uri, run["run_id"], _run_tags(opts, model, sc, scores, image_dir, run["tags"]), metrics,
                        files, end_ms)
    except BaseException:
        if run["created"]:
            close_keyed_run(uri, run["run_id"], {}, {}, [], int(time.time() * 1000), "FAILED")
        raise
    return run["run_id"]


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
    if checkpoints or opts.pipeline is not None:
        models = [describe_checkpoint(c, opts.weights) for c in checkpoints or []]
        models += [pipelines.describe_pipeline(opts.pipeline)] if opts.pipeline is not None else []
    elif opts.images_dir is not None:
        models = [recorded_model(opts.images_dir) or images_only_model(opts.backend)]
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
        gen_times: dict[int, tuple[float, float]] = {}  # (start, epoch seconds; duration)
        dirs: dict[int, Path] = {}
        for ps in {id(p): p for p in sets.values()}.values():
            if opts.images_dir is not None:
                dirs[id(ps)], generated[id(ps)], gen_times[id(ps)] = Path(opts.images_dir), 0, (time.time(), 0.0)
                continue
            image_dir = Path(opts.out) / model.slug / f"prompts-{ps.id}" / sampler_slug(sc, opts.seed)
            dirs[id(ps)] = image_dir
            t0, start = time.perf_counter(), time.time()
            generated[id(ps)] = _generate(model, sc, ps, image_dir, opts, procs, device, net_cache)
            gen_times[id(ps)] = (start, time.perf_counter() - t0)
        net_cache.clear()
        error = None
        if procs.main:  # rank 0 scores; a failure is broadcast so the other ranks stop too
            try:
                results += _score_all(model, sc, suites, sets, dirs, generated, gen_times, opts)
            except BaseException as e:  # noqa: BLE001 - re-raised on every rank by agree()
                error = e
        procs.agree(error)
    return results


def _score_all(model: Model, sc, suites: dict, sets: dict, dirs: dict, generated: dict, gen_times: dict,
               opts: EvalOptions) -> list[EvalResult]:
    """Score every suite on its images and write its artifacts; log one MLflow run per image folder (every suite)."""
    results, scored = [], {}
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
                   "checkpoint": checkpoint_label(model), "method": model.label, "weights": model.weights, "suite": name,
                   "sampler": {"kind": sc.kind, "steps": sc.steps, "guidance": sc.guidance, "eta": sc.eta},
                   "seed": opts.seed, "images_per_prompt": opts.images_per_prompt,
                   "prompt_count": len(ps.indices), "prompt_set": portable_text(ps.name), "nfe": nfe(sc.steps, sc.guidance)}
        score = SuiteScore(name, res, _write_artifacts(eval_dir, res, summary), t_score)
        scored.setdefault(id(ps), (ps, items, []))[2].append(score)
        results.append(EvalResult(model.checkpoint, model.label, name, sc.steps, sc.guidance, opts.seed,
                                  res.metrics, image_dir, eval_dir, generated[id(ps)], None,
                                  {"generate": gen_times[id(ps)][1], "score": t_score}))
    for key, (ps, items, scores) in scored.items():
        t0 = time.perf_counter()
        image_dir = dirs[key]
        grid = _write_grid(image_dir / "eval", items, opts.images_per_prompt)
        run_id = log_eval_run(opts, model, sc, ps, scores, grid, image_dir, generated[key], *gen_times[key])
        for r in results:
            if r.image_dir == image_dir:
                r.run_id, r.seconds["log"] = run_id, time.perf_counter() - t0
    return results


def _generate(model: Model, sc, ps: PromptSet, image_dir: Path, opts: EvalOptions, procs: Processes, device: str,
              net_cache: dict) -> int:
    """Generate this rank's share of the missing images; returns how many this rank generated."""
    error = None
    if procs.main:  # a folder holding another prompt set or model is refused on every rank
        try:
            gsuite.prepare_prompt_dirs(image_dir, ps.entries, ps.indices)
            write_record(image_dir, make_record(model, sc, ps, opts.seed, opts.images_per_prompt))
        except BaseException as e:  # noqa: BLE001 - re-raised on every rank by agree()
            error = e
    procs.agree(error)
    procs.barrier()
    todo = gsuite.missing_images(image_dir, ps.indices, opts.images_per_prompt)
    procs.barrier()  # every rank has the same list before anyone writes
    mine = todo[procs.rank::procs.world]
    if mine and isinstance(model, pipelines.PipelineModel):
        pipelines.generate_images(model, ps.entries, image_dir, sc, opts.seed, mine, device, net_cache,
                                  progress=opts.progress and procs.main)
    elif mine:
        backend, net = _load_network(model, device, net_cache)
        gsuite.generate_images(backend, net, ps.entries, image_dir, sc, opts.images_per_prompt, opts.seed,
                               batch_size=opts.batch_size, shard=(0, 1), progress=opts.progress and procs.main,
                               indices=ps.indices, todo=mine)
    procs.barrier()
    return len(mine)
