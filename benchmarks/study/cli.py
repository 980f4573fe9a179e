"""`rtdmd-bench study run STUDY.yaml`, `rtdmd-bench study status STUDY.yaml` and `rtdmd-bench study report STUDY.yaml`.

The study modules (torch, the trainer, the runner) load inside the commands, so `rtdmd-bench --help` stays fast."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def study():
    """Run a study file (arms x training seeds, evaluation, paired statistics) and report it."""


@study.command("run")
@click.argument("study_file", type=click.Path(path_type=Path))
@click.option("--jobs", type=int, default=1, show_default=True, help="Jobs at once, each a process with one torch thread.")
@click.option("--device", default="cpu", show_default=True, help="Device of training and evaluation (cpu, cuda, cuda:N).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--arms", default="", help="Comma-separated arms to run (with the arms they start from); default: all.")
def run_cmd(study_file, jobs, device, quiet, arms):
    """Train and evaluate every arm not done yet; rerun the same command to continue after an interruption."""
    from benchmarks.study.execute import run_study  # lazy: benchmarks.cli imports this module for --help, which loads no torch

    names = [a.strip() for a in arms.split(",") if a.strip()]
    s = run_study(study_file, jobs=jobs, device=device, progress=not quiet, arms=names or None)
    if names:
        click.echo(f"study {s.name}: the jobs of {', '.join(names)} are done; the rest: rtdmd-bench study run {study_file}")
    else:
        click.echo(f"study {s.name}: every job is done; report it with: rtdmd-bench study report {study_file}")


@study.command("status")
@click.argument("study_file", type=click.Path(path_type=Path))
def status_cmd(study_file):
    """Which jobs are done, started or waiting, with CPU-seconds and progress; starts nothing."""
    from benchmarks.study.status import status_lines  # lazy: keeps --help free of numpy and torch

    click.echo("\n".join(status_lines(study_file)))


@study.command("report")
@click.argument("study_file", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Markdown file (default reports/<study>/report.md).")
@click.option("--partial", is_flag=True, help="Report the arms finished so far of a study with jobs left.")
def report_cmd(study_file, out, partial):
    """Markdown report: budgets, paired differences with 95 % CIs, verdicts, per-task precision, curves, losses."""
    from benchmarks.study.report import write_study_report  # lazy: keeps --help free of numpy and torch

    click.echo(f"wrote {write_study_report(study_file, out, partial=partial)}")
