"""The core commands of the `rtdmd-bench` command line: train and sample.

The group here holds rtdmd's own commands; rtdmd_bench.cli builds the full `rtdmd-bench` group
from them and the benchmark commands (benchmarks.cli). Every user mistake ends in one sentence
naming the problem and the fix, and exit code 2 (rtdmd.errors.UserError); success exits 0.
Command bodies import what they run when they run, so that `--help` stays fast.
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


class Group(click.Group):
    """Turn UserError into one line on stderr and exit code 2; list each command's first sentence in full."""

    def invoke(self, ctx):
        from rtdmd.errors import as_user_error, interrupt_on_sigterm
        from rtdmd.validate import clip_message

        try:
            with interrupt_on_sigterm():
                return super().invoke(ctx)
        except (UserError, OSError, KeyboardInterrupt) as exc:
            err = as_user_error(exc)
            if err is None:
                raise
            click.echo(f"error: {clip_message(str(err))}", err=True)
            ctx.exit(err.exit_code)

    def format_commands(self, ctx, formatter):
        rows = [(name, cmd.get_short_help_str(limit=sys.maxsize)) for name, cmd in
                ((n, self.get_command(ctx, n)) for n in self.list_commands(ctx)) if cmd is not None and not cmd.hidden]
        if rows:
            width = max(len(name) for name, _ in rows)
            with formatter.section("Commands"):
                for name, text in rows:  # one line each, never wrapped or cut
                    formatter.write(f"{'':>{formatter.current_indent}}{name:<{width}}  {text}\n")


CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}


@click.group(cls=Group, context_settings=CONTEXT_SETTINGS)
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
@click.option("--resume-from", "resume_from", type=int, default=None, metavar="STEP",
              help="Continue the run in --out from its checkpoint of step STEP (e.g. when the newest is corrupt).")
@click.option("--resume-if-exists", is_flag=True, help="Continue the run in --out if it holds one, else start it.")
@click.option("--stage", type=click.Choice(["1", "2"]), default=None, help="rtdmd only: run stage 1 (AC-DMD) or stage 2 (RTDMD) alone.")
@click.option("--init", "init", type=click.Path(path_type=Path), default=None, help="Checkpoint to initialise from (rtdmd stage 2: a stage-1 checkpoint).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--num-processes", type=int, default=1, show_default=True,
              help="Processes (GPUs) to train on; more than 1 relaunches through accelerate (torchrun/gloo on CPU).")
@click.option("--accelerate-config", default="ddp", show_default=True, help="ddp, fsdp or the path of an accelerate config file.")
def train(method, backend, config_file, sets, preset, out, max_steps, resume, resume_from, resume_if_exists, stage, init, quiet,
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
        overrides = C._deep_merge(overrides, {"train": {"max_steps": max_steps, "max_steps_cap": max_steps}})
    how = resume_from if resume_from is not None else resume or ("auto" if resume_if_exists else False)
    try:
        result = run_training(method, backend=backend, config_file=config_file, overrides=overrides, preset=preset,
                              out=out, resume=how, stage=stage, init=init,
                              command=_command_line(), show_progress=not quiet)
        distributed.barrier()  # every rank done before any leaves its process group
    finally:
        main_rank = distributed.rank() == 0
        distributed.shutdown()  # inside a launch, every rank leaves its process group before exiting
    if main_rank:
        per_stage = getattr(result, "stage_steps", {})
        parts = f" ({' + '.join(f'{name} {n}' for name, n in per_stage.items())})" if len(per_stage) > 1 else ""
        click.echo(f"trained {method} for {result.steps} steps{parts} in {result.seconds / 60:.1f} min")
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
@click.option("--quiet", is_flag=True, help="No progress bar.")
def sample(checkpoint, prompts, steps, guidance, eta, seed, num_images, out, quiet):
    """Generate images for prompts; writes PNGs and a grid."""
    from tqdm import tqdm

    from rtdmd.checkpoint import load_for_inference
    from rtdmd.generate import SamplingConfig, generate_batched, sample_seed
    from rtdmd.images import make_grid, save_png, to_uint8
    from rtdmd.validate import check_guidance, refuse_non_finite

    if num_images <= 0:
        raise UserError(f"--num-images must be positive, got {num_images}.")
    if steps is not None and steps <= 0:
        raise UserError(f"--steps must be positive, got {steps}.")
    if checkpoint is None:
        if not (SHIPPED_TEACHER / "meta.json").is_file():
            raise UserError(f"the shipped shapes teacher is missing from {SHIPPED_TEACHER}; reinstall rtdmd-bench or pass --checkpoint.")
        checkpoint = SHIPPED_TEACHER
    check_guidance(guidance, eta)
    cfg, backend, net, meta = load_for_inference(checkpoint)
    refuse_non_finite(net, checkpoint)
    sc = SamplingConfig.from_meta(meta.get("sampler", {}), steps=steps, guidance=guidance, eta=eta)
    items = [(p, sample_seed(seed, i, k)) for i, p in enumerate(prompts) for k in range(num_images)]
    # shown from 1 s on (a mistake in a prompt, found at once, stays a one-line error); moves every sampling step
    bar = None if quiet else tqdm(total=len(items), desc=f"sample ({sc.kind}, {sc.steps} steps)", unit="img",
                                  dynamic_ncols=True, delay=1.0)
    try:
        images = generate_batched(backend, net, items, sc, bar=bar)
    finally:
        if bar is not None:
            bar.close()
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


if __name__ == "__main__":
    main()
