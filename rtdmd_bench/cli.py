"""The `rtdmd-bench` console script: rtdmd's core commands (train, sample) and the benchmark commands."""

from __future__ import annotations

import click

from benchmarks.cli import COMMANDS
from rtdmd import cli as core


@click.group(cls=core.Group, context_settings=core.CONTEXT_SETTINGS,
             commands=[*core.main.commands.values(), *COMMANDS])
@click.version_option(package_name="rtdmd-bench")
def main():
    """rtdmd-bench: train few-step text-to-image generators (RTDMD and baselines), evaluate and report."""


if __name__ == "__main__":
    main()
