"""The benchmark commands of `rtdmd-bench`: prompts, eval, report (rtdmd_bench.cli adds them to the group).

Command bodies import what they run when they run, so that `rtdmd-bench --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import click

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


# ---------------------------------------------------------------------------- eval


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
@click.option("--max-prompts", type=int, default=None, help="Evaluate this many evenly spaced prompts (default all).")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), default=None,
              help="Prompt file: GenEval JSONL, or plain text with one prompt per line (not for the geneval suite).")
@click.option("--images", "images_dir", type=click.Path(path_type=Path), default=None,
              help="Score the images already in this folder (GenEval layout) instead of generating.")
@click.option("--backend", default="shapes", show_default=True, help="With --images and no --checkpoint: the images' backend.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/eval"), show_default=True, help="Folder for images and results.")
@click.option("--experiment", default="rtdmd-bench", show_default=True, help="MLflow experiment.")
@click.option("--tracking-uri", default=None, help="MLflow store (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db).")
@click.option("--no-tracking", is_flag=True, help="Do not log to MLflow (results stay under --out).")
@click.option("--batch-size", type=int, default=128, show_default=True, help="Images generated per batch.")
@click.option("--workers", type=int, default=None, help="Detector processes (default: all cores for >= 400 images).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--threads", type=int, default=0, show_default=True, help="torch CPU threads (0: torch's default).")
@click.option("--fid-reference", default=None, help="fid suite on real backends: reference folder, .npz (mu, sigma) or clean-fid stats name.")
@click.option("--inception", "inception_path", default=None, help="clean-fid Inception file (default: the usual locations).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def eval_cmd(suites, checkpoints, steps, guidance, eta, weights, seed, images_per_prompt, max_prompts, prompts_file, images_dir,
             backend, out, experiment, tracking_uri, no_tracking, batch_size, workers, device, threads, fid_reference,
             inception_path, quiet):
    """Generate (resumably, sharded under accelerate) and score checkpoints; one MLflow run per suite."""
    from benchmarks.runner import EvalOptions, run_eval

    opts = EvalOptions(suites=[s for item in suites for s in item.replace(",", " ").split()], steps=steps,
                       guidance=guidance, eta=eta, weights=weights, seed=seed, images_per_prompt=images_per_prompt,
                       max_prompts=max_prompts, prompts_file=prompts_file, images_dir=images_dir, backend=backend,
                       out=out, experiment=experiment, tracking_uri=tracking_uri, tracking=not no_tracking,
                       batch_size=batch_size, workers=workers, device=device, threads=threads, fid_reference=fid_reference,
                       inception_path=inception_path, command=_command_line(), progress=not quiet)
    for r in run_eval(list(checkpoints), opts):
        shown = ", ".join(f"{k} {v:.4g}" for k, v in r.metrics.items())
        click.echo(f"{r.method} {r.suite} steps {r.steps} guidance {r.guidance:g} seed {r.seed}: {shown}  "
                   f"[{r.generated} generated; {r.eval_dir}]")


# ---------------------------------------------------------------------------- report


@click.command()
@click.option("--experiment", default="rtdmd-bench", show_default=True, help="MLflow experiment to report.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Markdown file (default reports/<experiment>/report.md).")
@click.option("--tracking-uri", default=None, help="MLflow store (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db).")
@click.option("--bootstrap", type=int, default=1000, show_default=True, help="Bootstrap resamples for the 95% CIs.")
def report(experiment, out, tracking_uri, bootstrap):
    """Markdown report (table, CIs, plots) of the eval runs of an MLflow experiment."""
    from benchmarks.report import write_report

    path = write_report(experiment, out=out, uri=tracking_uri, n_boot=bootstrap, command=_command_line())
    click.echo(f"wrote {path}")


COMMANDS = [prompts, eval_cmd, report]
