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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from benchmarks.suites import expand_suites, make_suite
from benchmarks.suites.base import BackendInfo, ImageItem, SuiteResult
from rtdmd.errors import UserError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "rtdmd-bench"
SHIPPED_TEACHER = Path(__file__).resolve().parent.parent / "rtdmd" / "assets" / "shapes_teacher"
GRID_PROMPTS = 8  # prompts shown in a run's sample grid (rows, evenly spaced over the prompt set)


def tracking_uri(explicit: str | None = None) -> str:
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def nfe(steps: int, guidance: float) -> int:
    """Network evaluations per image: one per step, two with classifier-free guidance (w != 1)."""
    return int(steps) * (2 if float(guidance) != 1.0 else 1)


# ---------------------------------------------------------------------------- models


@dataclass
class Model:
    """A checkpoint described without building its networks."""

    checkpoint: Path | None  # the step directory (None: images given without a checkpoint)
    method: str
    info: BackendInfo
    meta: dict = field(default_factory=dict)

    @property
    def train_seconds(self) -> float | None:
        v = self.meta.get("train_seconds")
        return float(v) if v is not None else None

    @property
    def slug(self) -> str:
        if self.checkpoint is None:
            return f"images-{self.info.name}"
        sha = (self.meta.get("model_sha256") or hashlib.sha256(str(self.checkpoint).encode()).hexdigest())[:8]
        return f"{self.method}-step{self.meta.get('step', 0)}-{sha}"


def describe_checkpoint(path: str | Path) -> Model:
    from rtdmd.checkpoint import find_checkpoint, read_meta
    from rtdmd.config import load_resolved

    step_dir = find_checkpoint(path).resolve()
    meta = read_meta(step_dir)
    cfg = load_resolved(step_dir / "config.yaml")
    return Model(step_dir, meta.get("method", cfg.method_name), BackendInfo.from_options(cfg.backend_name, cfg.backend), meta)


def images_only_model(backend: str) -> Model:
    """The model of --images without --checkpoint: only the backend (its default options) is known."""
    from rtdmd import registry

    entry = registry.get_backend(backend)
    return Model(None, "images", BackendInfo.from_options(backend, entry.options()), {})


def default_checkpoints(experiment: str, uri: str | None = None, include_teacher: bool = True,
                        warn=lambda msg: print(msg, file=sys.stderr)) -> list[Path]:
    """The newest checkpoint of every (method, backend) trained in ``experiment``, then the shipped teacher.

    Training runs are the runs tagged kind=train; their run_dir tag locates the checkpoints.
    """
    from rtdmd.checkpoint import find_checkpoint

    mlflow = _mlflow(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    out: list[Path] = []
    if exp is not None:
        df = mlflow.search_runs(experiment_ids=[exp.experiment_id], filter_string="tags.kind = 'train'",
                                order_by=["attributes.start_time DESC"])
        seen: set[tuple[str, str]] = set()
        for _, row in df.iterrows():
            key = (row.get("tags.method"), row.get("tags.backend"))
            run_dir = row.get("tags.run_dir")
            if key in seen or not isinstance(run_dir, str):
                continue
            if key[1] == "toy2d":
                continue  # 2-D points: no images to evaluate
            try:
                ckpt = find_checkpoint(run_dir)
            except UserError:
                warn(f"skipping training run {row['run_id']} ({key[0]}): no checkpoint in {run_dir}")
                continue
            seen.add(key)
            out.append(ckpt.resolve())
    if include_teacher:
        teacher = find_checkpoint(SHIPPED_TEACHER).resolve()
        if teacher not in out:
            out.append(teacher)
    return out


# ---------------------------------------------------------------------------- prompts


def read_prompt_file(path: str | Path) -> tuple[list[dict], bool]:
    """(entries, is_geneval): a GenEval JSONL file (first non-blank line is a JSON object), or
    plain text with one prompt per line (blank lines skipped) -> [{"prompt": ...}]."""
    from benchmarks.geneval.prompts import read_metadata

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"prompt file {path} does not exist; pass a text file (one prompt per line) or a GenEval JSONL file.") from None
    except OSError as e:
        raise UserError(f"cannot read prompt file {path} ({e.strerror}); check the path and its permissions.") from None
    except UnicodeDecodeError:
        raise UserError(f"prompt file {path} is not UTF-8 text; pass a text file (one prompt per line) or a GenEval JSONL file.") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise UserError(f"prompt file {path} holds no prompts; put one prompt per line.")
    if lines[0].startswith("{"):
        return read_metadata(path), True
    for n, ln in enumerate(text.splitlines(), start=1):
        if "\x00" in ln:
            raise UserError(f"{path} line {n}: contains a NUL character; pass a plain text file of prompts.")
    return [{"prompt": ln} for ln in lines], False


def prompt_set_id(entries: Sequence[dict]) -> str:
    return hashlib.sha256("\n".join(json.dumps(e, sort_keys=True) for e in entries).encode()).hexdigest()[:10]


def select_indices(n: int, max_prompts: int | None) -> list[int]:
    """All prompts, or ``max_prompts`` evenly spaced ones (every task of a GenEval file stays represented)."""
    if max_prompts is None or max_prompts >= n:
        return list(range(n))
    if max_prompts <= 0:
        raise UserError(f"--max-prompts must be positive, got {max_prompts}.")
    if max_prompts == 1:
        return [0]
    return sorted({round(j * (n - 1) / (max_prompts - 1)) for j in range(max_prompts)})


@dataclass
class PromptSet:
    name: str  # where the prompts came from (file path or "default:<suite>")
    entries: list[dict]
    indices: list[int]
    geneval: bool

    @property
    def id(self) -> str:
        return prompt_set_id(self.entries)


# ---------------------------------------------------------------------------- processes


class Processes:
    """Rank / world / barrier under accelerate or torchrun; one process otherwise."""

    def __init__(self, cpu: bool = False):
        import torch

        from rtdmd.distributed import inside_launch

        self.state = None
        self.rank, self.world = 0, 1
        if inside_launch():
            from accelerate import PartialState

            # CPU processes (gloo) only form a group when accelerate is told they are CPU processes
            self.state = PartialState(cpu=cpu or not torch.cuda.is_available())
            self.rank, self.world = self.state.process_index, self.state.num_processes

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> str:
        import torch

        if requested != "auto":
            return requested
        if self.state is not None:
            return str(self.state.device)
        return "cuda" if torch.cuda.is_available() else "cpu"

    def barrier(self) -> None:
        if self.world > 1:
            self.state.wait_for_everyone()

    def agree(self, error: BaseException | None) -> None:
        """Raise on every rank if rank 0 failed (so no rank waits forever at the next barrier)."""
        if self.world > 1:
            import torch.distributed as dist

            box = [None if error is None else f"{type(error).__name__}: {error}"]
            dist.broadcast_object_list(box, src=0)
            if error is None and box[0] is not None:
                raise UserError(f"rank 0 failed ({box[0]}); see its message above.")
        if error is not None:
            raise error


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
    tags: dict = field(default_factory=dict)  # extra MLflow tags of every eval run (a study's arm, seed, study)

    def validate(self) -> None:
        self.suites = expand_suites(self.suites)
        for name, v in (("--steps", self.steps), ("--images-per-prompt", self.images_per_prompt),
                        ("--max-prompts", self.max_prompts), ("--batch-size", self.batch_size)):
            if v is not None and v <= 0:
                raise UserError(f"{name} must be a positive integer, got {v}.")
        if self.guidance is not None and self.guidance < 0:
            raise UserError(f"--guidance must be >= 0 (1 disables CFG), got {self.guidance}.")
        if self.eta is not None and not 0.0 <= self.eta <= 1.0:
            raise UserError(f"--eta must be in [0, 1], got {self.eta}.")
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
    from rtdmd.generate import SamplingConfig

    if model.checkpoint is None:
        return SamplingConfig(kind="images", steps=opts.steps or 0, guidance=1.0 if opts.guidance is None else opts.guidance,
                              eta=0.0 if opts.eta is None else opts.eta)
    return SamplingConfig.from_meta(model.meta.get("sampler", {}), steps=opts.steps, guidance=opts.guidance, eta=opts.eta)


def sampler_slug(sc, seed: int) -> str:
    eta = "" if sc.kind == "euler" else f"-eta{sc.eta:g}"  # the Euler ODE sampler has no eta
    return f"{sc.kind}-s{sc.steps}-w{sc.guidance:g}{eta}-seed{seed}"


def _prompt_sets(model: Model, suites: dict, opts: EvalOptions) -> dict[str, PromptSet]:
    """suite name -> its prompts (suites with identical prompts share one PromptSet object)."""
    by_id: dict[str, PromptSet] = {}
    out: dict[str, PromptSet] = {}
    if opts.images_dir is not None:
        entries = _folder_metadata(Path(opts.images_dir))
        ps = PromptSet(str(opts.images_dir), entries, [], all("tag" in e and "include" in e for e in entries if e is not None))
        ps.indices = [i for i in select_indices(len(entries), opts.max_prompts) if entries[i] is not None]
        for name, suite in suites.items():
            out[name] = ps
    else:
        file_entries = None
        if opts.prompts_file is not None:
            file_entries, is_geneval = read_prompt_file(opts.prompts_file)
        for name, suite in suites.items():
            if file_entries is not None:
                ps = PromptSet(str(opts.prompts_file), file_entries, select_indices(len(file_entries), opts.max_prompts), is_geneval)
            else:
                entries = suite.default_prompts(model.info)
                ps = PromptSet(f"default:{model.info.name}", entries, select_indices(len(entries), opts.max_prompts), True)
            ps = by_id.setdefault(ps.id + str(ps.indices), ps)
            out[name] = ps
    for name, suite in suites.items():
        if suite.needs_geneval_metadata and not out[name].geneval:
            raise UserError(f"the {name} suite needs GenEval prompt entries (JSONL with tag, include, prompt), but "
                            f"{out[name].name} holds plain prompts; pass a GenEval JSONL file or drop --prompts.")
    return out


def _folder_metadata(folder: Path) -> list:
    """Prompt entries of an image folder in the GenEval layout, by prompt index (None where absent)."""
    if not folder.is_dir():
        raise UserError(f"image folder {folder} does not exist; pass the folder an earlier eval or sample wrote (GenEval layout).")
    found: dict[int, dict] = {}
    for d in sorted(p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()):
        mp = d / "metadata.jsonl"
        try:
            entry = json.loads(mp.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{mp} is missing; every prompt folder of --images needs its metadata.jsonl.") from None
        except (OSError, ValueError) as e:
            raise UserError(f"{mp} is not one readable JSON object ({e}); rewrite it or regenerate the images.") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) or not entry["prompt"]:
            raise UserError(f"{mp} has no 'prompt' string; rewrite it or regenerate the images.")
        if "tag" in entry:
            from benchmarks.geneval.prompts import validate_entry

            validate_entry(entry, str(mp))
        found[int(d.name)] = entry
    if not found:
        raise UserError(f"{folder} holds no <index:05d> prompt folders; pass a folder in the GenEval image layout.")
    return [found.get(i) for i in range(max(found) + 1)]


def collect_items(image_dir: Path, ps: PromptSet, images_per_prompt: int) -> list[ImageItem]:
    """The images to score: every selected prompt x images_per_prompt; a missing one is a UserError."""
    from benchmarks.geneval import layout

    items = []
    for i in ps.indices:
        for k in range(images_per_prompt):
            p = layout.image_path(image_dir, i, k)
            if not p.is_file():
                raise UserError(f"image {p} is missing; rerun the eval without --images to generate it, "
                                "or lower --images-per-prompt.")
            if not layout.is_complete_png(p):
                raise UserError(f"image {p} is not a complete PNG (truncated or another format); delete it and rerun to regenerate it.")
            items.append(ImageItem(i, k, ps.entries[i], p))
    return items


def _default_workers(n_images: int) -> int:
    # process start-up (~1 s) only pays off for a few hundred images (benchmarks/perf/bench_eval.py)
    return (os.cpu_count() or 1) if n_images >= 400 and (os.cpu_count() or 1) > 1 else 0


def _write_artifacts(eval_dir: Path, result: SuiteResult, items: list[ImageItem], images_per_prompt: int,
                     summary: dict) -> list[Path]:
    from rtdmd.images import load_png, make_grid, save_png

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


def _mlflow(uri: str | None, must_exist: bool = False):
    """mlflow pointed at the store (its INFO chatter silenced); ``must_exist``: refuse to create a new sqlite file."""
    import logging

    uri = tracking_uri(uri)
    if must_exist and uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.is_file():
            raise UserError(f"no MLflow store at {db}; run 'rtdmd-bench eval' there first or pass --tracking-uri.")
    try:
        import mlflow
    except ImportError:
        raise UserError("MLflow is not installed; install it (pip install 'mlflow<3.18').") from None
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    mlflow.set_tracking_uri(uri)
    return mlflow


def _find_run(uri: str | None, experiment: str, key: str) -> str | None:
    mlflow = _mlflow(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return None
    df = mlflow.search_runs(experiment_ids=[exp.experiment_id], filter_string=f"tags.eval_key = '{key}'",
                            order_by=["attributes.start_time DESC"])
    return None if df.empty else str(df.iloc[0]["run_id"])


def log_eval_run(opts: EvalOptions, model: Model, sc, suite: str, ps: PromptSet, result: SuiteResult,
                 artifacts: list[Path], image_dir: Path) -> str | None:
    """One MLflow run per (checkpoint, suite, sampler settings, seed, images per prompt, prompt set)."""
    from rtdmd.tracking import Tracker, git_commit

    if not opts.tracking:
        return None
    ident = {"checkpoint": str(model.checkpoint), "sha": model.meta.get("model_sha256"), "suite": suite,
             "sampler": sampler_slug(sc, opts.seed), "ipp": opts.images_per_prompt, "prompts": ps.id,
             "indices": hashlib.sha256(str(ps.indices).encode()).hexdigest()[:10],
             "images": str(Path(opts.images_dir).resolve()) if opts.images_dir else None}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    params = {"checkpoint": str(model.checkpoint or ""), "method": model.method, "backend": model.info.name,
              "sampler": sc.kind, "steps": sc.steps, "guidance": sc.guidance, "eta": sc.eta, "seed": opts.seed,
              "images_per_prompt": opts.images_per_prompt, "prompt_count": len(ps.indices), "prompt_set": ps.name,
              "suite": suite}
    tags = {"kind": "eval", "suite": suite, "method": model.method, "backend": model.info.name,
            "git_commit": git_commit(), "nfe": str(nfe(sc.steps, sc.guidance)),
            "train_seconds": "" if model.train_seconds is None else f"{model.train_seconds:g}",
            "checkpoint_sha256": str(model.meta.get("model_sha256", "")), "eval_key": key,
            "image_dir": str(Path(image_dir).resolve()), "command": opts.command[:5000], **result.tags, **opts.tags}
    uri = tracking_uri(opts.tracking_uri)
    run_id = _find_run(uri, opts.experiment, key)
    tracker = Tracker(True, uri, opts.experiment)
    name = f"{suite}-{model.method}-{sc.kind}{sc.steps}-w{sc.guidance:g}-seed{opts.seed}"
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
    from rtdmd.checkpoint import load_for_inference

    if "net" not in cache:
        cfg, backend, net, meta = load_for_inference(model.checkpoint, device=device)
        if not backend.has_images:
            raise UserError(f"checkpoint {model.checkpoint} is a {backend.name} model (no images); evaluation suites need images.")
        cache["net"] = (backend, net)
    return cache["net"]


def run_eval(checkpoints: Sequence[str | Path] | None, opts: EvalOptions) -> list[EvalResult]:
    """Evaluate checkpoints (default: newest per trained method + shipped teacher) on opts.suites."""
    opts.validate()
    if opts.threads > 0:
        import torch

        torch.set_num_threads(opts.threads)
    procs = Processes(cpu=opts.device == "cpu")
    device = procs.device(opts.device)
    if checkpoints:
        models = [describe_checkpoint(c) for c in checkpoints]
    elif opts.images_dir is not None:
        models = [images_only_model(opts.backend)]
    else:
        models = [describe_checkpoint(c) for c in default_checkpoints(opts.experiment, opts.tracking_uri)]
    if opts.images_dir is not None and len(models) != 1:
        raise UserError("--images scores one model's images; pass at most one --checkpoint with it.")
    results: list[EvalResult] = []
    for model in models:
        if model.info.name == "toy2d":
            raise UserError(f"checkpoint {model.checkpoint} is a toy2d model (2-D points, no images); evaluate an image backend.")
        sc = _sampling(model, opts)
        suites = {name: make_suite(name, opts.fid_reference, opts.inception_path) for name in opts.suites}
        sets = _prompt_sets(model, suites, opts)
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
        eval_dir = image_dir / "eval" / f"{name}-ipp{opts.images_per_prompt}-p{len(ps.indices)}"
        t0 = time.perf_counter()
        res = suite.score(items, model.info, seed=opts.seed, progress=opts.progress, work_dir=eval_dir)
        t_score = time.perf_counter() - t0
        summary = {"metrics": res.metrics, "tags": res.tags, **res.extra,
                   "checkpoint": str(model.checkpoint), "method": model.method, "suite": name,
                   "sampler": {"kind": sc.kind, "steps": sc.steps, "guidance": sc.guidance, "eta": sc.eta},
                   "seed": opts.seed, "images_per_prompt": opts.images_per_prompt,
                   "prompt_count": len(ps.indices), "prompt_set": ps.name, "nfe": nfe(sc.steps, sc.guidance)}
        t0 = time.perf_counter()
        artifacts = _write_artifacts(eval_dir, res, items, opts.images_per_prompt, summary)
        run_id = log_eval_run(opts, model, sc, name, ps, res, artifacts, image_dir)
        seconds = {"generate": gen_seconds[id(ps)], "score": t_score, "log": time.perf_counter() - t0}
        results.append(EvalResult(model.checkpoint, model.method, name, sc.steps, sc.guidance, opts.seed,
                                  res.metrics, image_dir, eval_dir, generated[id(ps)], run_id, seconds))
    return results


def _generate(model: Model, sc, ps: PromptSet, image_dir: Path, opts: EvalOptions, procs: Processes, device: str,
              net_cache: dict) -> int:
    """Generate this rank's share of the missing images; returns how many this rank generated."""
    from benchmarks.geneval import suite as gsuite

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
