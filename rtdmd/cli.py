"""The `rtdmd-bench` command line.

Every user mistake ends in one sentence naming the problem and the fix, and exit code 2
(rtdmd.errors.UserError); success exits 0.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import click

from rtdmd.errors import UserError

SHIPPED_TEACHER = Path(__file__).resolve().parent / "assets" / "shapes_teacher"


def _command_line() -> str:
    return "rtdmd-bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])


class _Group(click.Group):
    """Turn UserError into one line on stderr and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rtdmd-bench")
def main():
    """rtdmd-bench: train few-step text-to-image generators (RTDMD and baselines), evaluate and report."""


# ---------------------------------------------------------------------------- train


@main.command()
@click.argument("method")
@click.option("--backend", default=None, help="Backend (shapes, toy2d, sd3, flux2); default: the method's default.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None, help="YAML file merged over the shipped defaults.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override one config key, e.g. --set train.lr=1e-4 (repeatable).")
@click.option("--preset", default=None, help="A named preset of the shipped config (e.g. quick).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Run directory (default runs/<method>-<backend>).")
@click.option("--max-steps", type=int, default=None, help="Override train.max_steps.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint.")
@click.option("--resume-if-exists", is_flag=True, help="Continue the run in --out if it holds one, else start it.")
@click.option("--stage", type=click.Choice(["1", "2"]), default=None, help="rtdmd only: run stage 1 (AC-DMD) or stage 2 (RTDMD) alone.")
@click.option("--init", "init", type=click.Path(path_type=Path), default=None, help="Checkpoint to initialise from (rtdmd stage 2: a stage-1 checkpoint).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--num-processes", type=int, default=1, show_default=True,
              help="Processes (GPUs) to train on; more than 1 relaunches through accelerate (torchrun/gloo on CPU).")
@click.option("--accelerate-config", default="ddp", show_default=True, help="ddp, fsdp or the path of an accelerate config file.")
def train(method, backend, config_file, sets, preset, out, max_steps, resume, resume_if_exists, stage, init, quiet,
          num_processes, accelerate_config):
    """Train METHOD (teacher, reward, dmd2, lcm, hypersd, flow-grpo, ac-dmd, rtdmd)."""
    from rtdmd import config as C
    from rtdmd import distributed
    from rtdmd.api import run_training

    if num_processes < 1:
        raise UserError(f"--num-processes must be at least 1, got {num_processes}.")
    if num_processes > 1 and not distributed.inside_launch():
        raise SystemExit(distributed.relaunch(sys.argv[1:], num_processes, accelerate_config))

    overrides = C.parse_set(sets)
    if max_steps is not None:
        if max_steps <= 0:
            raise UserError(f"--max-steps must be a positive integer, got {max_steps}.")
        overrides = C._deep_merge(overrides, {"train": {"max_steps": max_steps}})
    try:
        result = run_training(method, backend=backend, config_file=config_file, overrides=overrides, preset=preset,
                              out=out, resume=resume or ("auto" if resume_if_exists else False), stage=stage, init=init,
                              command=_command_line(), show_progress=not quiet)
    finally:
        main_rank = distributed.rank() == 0
        distributed.shutdown()  # inside a launch, every rank leaves its process group before exiting
    if main_rank:
        click.echo(f"trained {method} for {result.steps} steps in {result.seconds / 60:.1f} min")
        click.echo(f"checkpoint: {result.checkpoint}")


# ---------------------------------------------------------------------------- sample


def _slug(text: str, limit: int = 60) -> str:
    s = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return (s or "empty")[:limit]


@main.command()
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None, help="Run or checkpoint directory (default: the shipped shapes teacher).")
@click.option("--prompt", "prompts", multiple=True, required=True, help="Prompt text (repeatable).")
@click.option("--steps", type=int, default=None, help="Sampling steps (default: the checkpoint's).")
@click.option("--guidance", type=float, default=None, help="CFG weight (default: the checkpoint's).")
@click.option("--eta", type=float, default=None, help="CPS stochasticity for few-step generators (default 0.9).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--num-images", type=int, default=4, show_default=True, help="Images per prompt.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("samples"), show_default=True)
def sample(checkpoint, prompts, steps, guidance, eta, seed, num_images, out):
    """Generate images for prompts; writes PNGs and a grid."""
    from rtdmd.checkpoint import load_for_inference
    from rtdmd.generate import SamplingConfig, generate_batched, sample_seed
    from rtdmd.images import make_grid, save_png, to_uint8

    if num_images <= 0:
        raise UserError(f"--num-images must be positive, got {num_images}.")
    if steps is not None and steps <= 0:
        raise UserError(f"--steps must be positive, got {steps}.")
    if checkpoint is None:
        if not (SHIPPED_TEACHER / "meta.json").is_file():
            raise UserError(f"the shipped shapes teacher is missing from {SHIPPED_TEACHER}; reinstall rtdmd-bench or pass --checkpoint.")
        checkpoint = SHIPPED_TEACHER
    cfg, backend, net, meta = load_for_inference(checkpoint)
    sc = SamplingConfig.from_meta(meta.get("sampler", {}), steps=steps, guidance=guidance, eta=eta)
    items = [(p, sample_seed(seed, i, k)) for i, p in enumerate(prompts) for k in range(num_images)]
    images = generate_batched(backend, net, items, sc)
    out.mkdir(parents=True, exist_ok=True)
    if backend.has_images:
        arrays = to_uint8(images)
        for (p, key), a in zip(items, arrays):
            save_png(out / f"{_slug(p)}_{key[2]:02d}_{key[3]:02d}.png", a)
        grid = make_grid(list(arrays), ncols=num_images, upscale=4 if arrays.shape[1] <= 64 else 1)
        save_png(out / "grid.png", grid)
        click.echo(f"wrote {len(arrays)} images ({sc.kind}, {sc.steps} steps, guidance {sc.guidance}) and {out / 'grid.png'}")
    else:
        from rtdmd.plots import scatter_points

        path = scatter_points(images.cpu().numpy(), [p for p, _ in items], out / "samples.png")
        import numpy as np

        np.save(out / "samples.npy", images.cpu().numpy())
        click.echo(f"wrote {len(items)} points to {out / 'samples.npy'} and {path}")



# ---------------------------------------------------------------------------- prompts


@main.command()
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


@main.command("eval")
@click.option("--suite", "suites", multiple=True, default=("geneval",), show_default=True,
              help="geneval, preference, aesthetic, fid or all (repeatable or comma-separated).")
@click.option("--checkpoint", "checkpoints", multiple=True, type=click.Path(path_type=Path),
              help="Run or checkpoint directory (repeatable). Default: the newest checkpoint of every method trained "
                   "in the experiment, plus the shipped shapes teacher.")
@click.option("--steps", type=int, default=None, help="Sampling steps (default: each checkpoint's).")
@click.option("--guidance", type=float, default=None, help="CFG weight, 1 = off (default: each checkpoint's).")
@click.option("--eta", type=float, default=None, help="CPS stochasticity of few-step generators (default: the checkpoint's).")
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
def eval_cmd(suites, checkpoints, steps, guidance, eta, seed, images_per_prompt, max_prompts, prompts_file, images_dir,
             backend, out, experiment, tracking_uri, no_tracking, batch_size, workers, device, threads, fid_reference,
             inception_path, quiet):
    """Generate (resumably, sharded under accelerate) and score checkpoints; one MLflow run per suite."""
    from benchmarks.runner import EvalOptions, run_eval

    opts = EvalOptions(suites=[s for item in suites for s in item.replace(",", " ").split()], steps=steps,
                       guidance=guidance, eta=eta, seed=seed, images_per_prompt=images_per_prompt,
                       max_prompts=max_prompts, prompts_file=prompts_file, images_dir=images_dir, backend=backend,
                       out=out, experiment=experiment, tracking_uri=tracking_uri, tracking=not no_tracking,
                       batch_size=batch_size, workers=workers, device=device, threads=threads, fid_reference=fid_reference,
                       inception_path=inception_path, command=_command_line(), progress=not quiet)
    for r in run_eval(list(checkpoints), opts):
        shown = ", ".join(f"{k} {v:.4g}" for k, v in r.metrics.items())
        click.echo(f"{r.method} {r.suite} steps {r.steps} guidance {r.guidance:g} seed {r.seed}: {shown}  "
                   f"[{r.generated} generated; {r.eval_dir}]")


# ---------------------------------------------------------------------------- report


@main.command()
@click.option("--experiment", default="rtdmd-bench", show_default=True, help="MLflow experiment to report.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Markdown file (default reports/<experiment>/report.md).")
@click.option("--tracking-uri", default=None, help="MLflow store (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db).")
@click.option("--bootstrap", type=int, default=1000, show_default=True, help="Bootstrap resamples for the 95% CIs.")
def report(experiment, out, tracking_uri, bootstrap):
    """Markdown report (table, CIs, plots) of the eval runs of an MLflow experiment."""
    from benchmarks.report import write_report

    path = write_report(experiment, out=out, uri=tracking_uri, n_boot=bootstrap, command=_command_line())
    click.echo(f"wrote {path}")


def _add_study() -> None:
    from benchmarks.study.cli import study

    main.add_command(study)


_add_study()

if __name__ == "__main__":
    main()
