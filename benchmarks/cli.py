"""The benchmark commands of `rtdmd-bench`: prompts, eval, report (rtdmd_bench.cli adds them to the group).

Command bodies import what they run when they run, so that `rtdmd-bench --help` stays fast.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import click

from benchmarks.study.cli import study
from rtdmd.cli import _command_line
from rtdmd.errors import UserError

# ---------------------------------------------------------------------------- prompts


@click.command()
@click.argument("prompt_set", metavar="SET")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="JSONL file to write.")
@click.option("--seed", type=int, default=43, show_default=True, help="Recipe seed (43: the official file).")
@click.option("--per-task", type=int, default=100, show_default=True, help="Prompts drawn per task after single_object.")
@click.option("--classes", default=None, help="geneval-shapes only: comma-separated world classes (default: the shapes backend's).")
def prompts(prompt_set, out, seed, per_task, classes):
    """Write a GenEval prompt file: SET is geneval (official, 553 prompts) or geneval-shapes."""
    from benchmarks.geneval.prompts import COCO_CLASSES, generate_metadata, write_metadata

    if per_task <= 0:
        raise UserError(f"--per-task must be a positive integer, got {per_task}.")
    if prompt_set == "geneval":
        if classes is not None:
            raise UserError("--classes applies to geneval-shapes only; the official set uses GenEval's 80 COCO classes.")
        entries = generate_metadata(list(COCO_CLASSES), seed=seed, per_task=per_task)
    elif prompt_set == "geneval-shapes":
        from rtdmd.backends.shapes import ShapesOptions
        from rtdmd.world.shapes import ALL_CLASSES

        names = [c.strip() for c in classes.split(",") if c.strip()] if classes is not None else list(ShapesOptions().classes)
        bad = [c for c in names if c not in ALL_CLASSES]
        if bad:
            raise UserError(f"unknown shapes class {bad[0]!r} in --classes; use comma-separated names from {', '.join(ALL_CLASSES)}.")
        entries = generate_metadata(names, seed=seed, per_task=per_task, exclude_color_class=None)
    else:
        raise UserError(f"unknown prompt set '{prompt_set}'; choose geneval or geneval-shapes.")
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    write_metadata(entries, out)
    click.echo(f"wrote {len(entries)} prompts to {out}")


# ---------------------------------------------------------------------------- eval / generate


def _pipeline_options(f):
    """--pipeline, --lora, --scheduler-kwargs, --resolution (a diffusers pipeline as the model)."""
    f = click.option("--resolution", type=int, default=None,
                     help="--pipeline: image height = width in pixels (default: the pipeline's).")(f)
    f = click.option("--scheduler-kwargs", default=None,
                     help="--pipeline: JSON object of scheduler options, e.g. '{\"shift\": 3.0}'.")(f)
    f = click.option("--lora-scale", type=float, default=1.0, show_default=True,
                     help="--lora: its strength, fused into the weights when not 1.")(f)
    f = click.option("--lora", default=None, help="--pipeline: a diffusers LoRA (.safetensors or its folder).")(f)
    return click.option("--pipeline", default=None,
                        help="A diffusers text-to-image pipeline (folder, or hub id in the local HF cache) to run "
                             "with its own scheduler at --steps / --guidance.")(f)


def _pipeline_spec(pipeline, lora, lora_scale, scheduler_kwargs, resolution, batch_size):
    from benchmarks.pipelines import DEFAULT_BATCH, PipelineSpec, parse_scheduler_kwargs

    if pipeline is None:
        if lora or lora_scale != 1.0 or scheduler_kwargs or resolution:
            raise UserError("--lora, --lora-scale, --scheduler-kwargs and --resolution apply to --pipeline; add "
                            "--pipeline ID_OR_DIR.")
        return None
    if resolution is not None and (resolution <= 0 or resolution % 8):
        raise UserError(f"--resolution must be a positive multiple of 8, got {resolution}.")
    if not math.isfinite(lora_scale):
        raise UserError(f"--lora-scale must be a finite number, got {lora_scale}.")
    if lora_scale != 1.0 and not lora:
        raise UserError("--lora-scale sets the strength of --lora; add --lora PATH or drop --lora-scale.")
    return PipelineSpec(pipeline, lora, lora_scale, parse_scheduler_kwargs(scheduler_kwargs), resolution,
                        DEFAULT_BATCH if batch_size is None else batch_size)



def default_experiment(experiment: str | None, tracking_uri: str | None, command: str) -> tuple[str, str]:
    """--experiment, or the experiment of the store's newest run (report: newest eval run), with the note that says
    so (the command prints it once it has succeeded, so that an error stays one line); with no run in the store,
    eval logs to a new experiment 'rtdmd-bench' and report fails naming the experiments."""
    if experiment is not None:
        return experiment, ""
    from benchmarks.eval_models import tracking_uri as resolve_uri
    from rtdmd.tracking import experiment_names, latest_experiment

    uri = resolve_uri(tracking_uri)
    found = latest_experiment(uri, "tags.kind = 'eval'") if command == "report" else None
    found = found or latest_experiment(uri)
    if found is None:
        if command == "report":
            names = experiment_names(uri)
            raise UserError(f"no runs in the MLflow store {uri} (experiments: {', '.join(names) or 'none'}); run "
                            "'rtdmd-bench eval' first, or pass --experiment / --tracking-uri.")
        return "rtdmd-bench", (f"{command}: no runs were in the MLflow store {uri}; logged to experiment "
                               "'rtdmd-bench' (choose with --experiment)")
    what = "eval run" if command == "report" else "run"
    return found, f"{command}: used MLflow experiment '{found}' (the newest {what} in {uri}; choose with --experiment)"


def _say(message: str) -> None:
    if message and os.environ.get("RANK", "0") == "0":  # under accelerate / torchrun: once
        click.echo(message, err=True)


@click.command("eval")
@click.option("--suite", "suites", multiple=True, default=("geneval",), show_default=True,
              help="geneval, preference, aesthetic, fid or all (repeatable or comma-separated).")
@click.option("--checkpoint", "checkpoints", multiple=True, type=click.Path(path_type=Path),
              help="Run or checkpoint directory (repeatable). Default: the newest checkpoint of every method trained "
                   "in the experiment, plus the shipped shapes teacher.")
@click.option("--steps", type=int, default=None, help="Sampling steps (default: each checkpoint's).")
@click.option("--guidance", type=float, default=None, help="CFG weight, 1 = off (default: each checkpoint's).")
@click.option("--eta", type=float, default=None, help="CPS stochasticity of few-step generators (default: the checkpoint's).")
@click.option("--weights", type=click.Choice(["ema", "online"]), default="ema", show_default=True,
              help="ema: the checkpoint's model.safetensors (the EMA copy where the method keeps one); online: its "
                   "training weights. Online runs are named <method>-online.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--images-per-prompt", type=int, default=4, show_default=True)
@click.option("--max-prompts", type=int, default=None,
              help="Evaluate this many prompts, as many per GenEval task as the set allows (default all).")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), default=None,
              help="Prompt file: GenEval JSONL, or plain text with one prompt per line (not for the geneval suite).")
@click.option("--images", "images_dir", type=click.Path(path_type=Path), default=None,
              help="Score the images already in this folder (GenEval layout) instead of generating.")
@click.option("--backend", default="shapes", show_default=True, help="With --images and no --checkpoint: the images' backend.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/eval"), show_default=True, help="Folder for images and results.")
@click.option("--experiment", default=None, help="MLflow experiment (default: that of the newest run in the store).")
@click.option("--tracking-uri", default=None, help="MLflow store (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db).")
@click.option("--no-tracking", is_flag=True, help="Do not log to MLflow (results stay under --out).")
@click.option("--batch-size", type=int, default=None, help="Images generated per batch (default 128; --pipeline: 4).")
@click.option("--workers", type=int, default=None, help="Detector processes (default: all cores for >= 400 images).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--threads", type=int, default=0, show_default=True, help="torch CPU threads (0: torch's default).")
@click.option("--fid-reference", default=None, help="fid suite on real backends: reference folder, .npz (mu, sigma) or clean-fid stats name.")
@click.option("--inception", "inception_path", default=None, help="clean-fid Inception file (default: the usual locations).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_pipeline_options
def eval_cmd(suites, checkpoints, steps, guidance, eta, weights, seed, images_per_prompt, max_prompts, prompts_file, images_dir,
             backend, out, experiment, tracking_uri, no_tracking, batch_size, workers, device, threads, fid_reference,
             inception_path, quiet, pipeline, lora, lora_scale, scheduler_kwargs, resolution):
    """Generate (resumably, sharded under accelerate) and score checkpoints or a diffusers pipeline; one MLflow run per model and sampler."""
    from benchmarks.runner import EvalOptions, run_eval

    note = ""
    if not no_tracking or not (checkpoints or images_dir or pipeline):  # else the experiment's training runs name the models
        experiment, note = default_experiment(experiment, tracking_uri, "eval")
    spec = _pipeline_spec(pipeline, lora, lora_scale, scheduler_kwargs, resolution, batch_size)
    batch_size = 128 if batch_size is None else batch_size
    opts = EvalOptions(pipeline=spec, suites=[s for item in suites for s in item.replace(",", " ").split()], steps=steps,
                       guidance=guidance, eta=eta, weights=weights, seed=seed, images_per_prompt=images_per_prompt,
                       max_prompts=max_prompts, prompts_file=prompts_file, images_dir=images_dir, backend=backend,
                       out=out, experiment=experiment or "rtdmd-bench", tracking_uri=tracking_uri, tracking=not no_tracking,
                       batch_size=batch_size, workers=workers, device=device, threads=threads, fid_reference=fid_reference,
                       inception_path=inception_path, command=_command_line(), progress=not quiet)
    for r in run_eval(list(checkpoints), opts):
        shown = ", ".join(f"{k} {v:.4g}" for k, v in r.metrics.items())
        click.echo(f"{r.method} {r.suite} steps {r.steps} guidance {r.guidance:g} seed {r.seed}: {shown}  "
                   f"[{r.generated} generated; {r.eval_dir}]")
    _say(note)


@click.command()
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None, help="Run or checkpoint directory.")
@_pipeline_options
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Image folder (GenEval layout + generation.json); rerunning fills in what is missing.")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), default=None,
              help="GenEval JSONL or plain text, one prompt per line (default: GenEval's prompts for the backend).")
@click.option("--steps", type=int, default=None, help="Sampling steps (default: the checkpoint's; required with --pipeline).")
@click.option("--guidance", type=float, default=None, help="CFG weight, 1 = off (default: the checkpoint's; required with --pipeline).")
@click.option("--eta", type=float, default=None, help="CPS stochasticity (checkpoints only).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--images-per-prompt", type=int, default=4, show_default=True)
@click.option("--max-prompts", type=int, default=None, help="This many evenly spaced prompts (default all).")
@click.option("--batch-size", type=int, default=None, help="Images per batch (default 128; --pipeline: 4).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--threads", type=int, default=0, show_default=True, help="torch CPU threads (0: torch's default).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def generate(checkpoint, pipeline, lora, lora_scale, scheduler_kwargs, resolution, out, prompts_file, steps, guidance,
             eta, seed, images_per_prompt, max_prompts, batch_size, device, threads, quiet):
    """Images only, for scoring elsewhere with `eval --images`: a checkpoint or a diffusers pipeline."""
    import torch

    from benchmarks.generate_cmd import run_generate
    from benchmarks.runner import EvalOptions

    spec = _pipeline_spec(pipeline, lora, lora_scale, scheduler_kwargs, resolution, batch_size)
    opts = EvalOptions(pipeline=spec, steps=steps, guidance=guidance, eta=eta, seed=seed,
                       images_per_prompt=images_per_prompt, max_prompts=max_prompts, prompts_file=prompts_file,
                       batch_size=128 if batch_size is None else batch_size, device=device, threads=threads,
                       tracking=False, command=_command_line(), progress=not quiet)
    if threads > 0:
        torch.set_num_threads(threads)
    r = run_generate(checkpoint, opts, out)
    click.echo(f"{r.model}: {r.images} images in {r.out} [{r.generated} generated in {r.seconds:.1f} s]")


@click.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["lora", "pipeline"]), required=True,
              help="lora: pytorch_lora_weights.safetensors for load_lora_weights; pipeline: a whole diffusers folder.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="New folder to write.")
def export(checkpoint, fmt, out):
    """Export an sd3 / flux2 checkpoint for stock diffusers: a LoRA or a full pipeline folder."""
    from rtdmd.export import export_checkpoint

    path = export_checkpoint(checkpoint, fmt, out)
    click.echo(f"wrote {path}")


# ---------------------------------------------------------------------------- report


@click.command()
@click.option("--experiment", default=None, help="MLflow experiment to report (default: that of the newest eval run).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Markdown file (default reports/<experiment>/report.md).")
@click.option("--tracking-uri", default=None, help="MLflow store (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db).")
@click.option("--bootstrap", type=int, default=1000, show_default=True, help="Bootstrap resamples for the 95% CIs.")
def report(experiment, out, tracking_uri, bootstrap):
    """Markdown report (table, CIs, plots) of the eval runs of an MLflow experiment."""
    from benchmarks.report import write_report

    experiment, note = default_experiment(experiment, tracking_uri, "report")
    path = write_report(experiment, out=out, uri=tracking_uri, n_boot=bootstrap, command=_command_line())
    _say(note)
    click.echo(f"wrote {path}")


COMMANDS = [prompts, eval_cmd, generate, export, report, study]
