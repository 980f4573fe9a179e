"""`rtdmd-bench --help`: every command of both layers, each with its whole first sentence on one line, and fast."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from benchmarks.cli import COMMANDS
from rtdmd import cli as core
from rtdmd_bench.cli import main


def test_help_lists_every_command_on_one_untruncated_line():
    out = CliRunner().invoke(main, ["--help"]).output
    commands = {**core.main.commands, **{c.name: c for c in COMMANDS}}
    assert set(commands) == {"train", "sample", "prompts", "eval", "generate", "export", "report", "study"} == set(main.commands)
    lines = out[out.index("Commands:"):].splitlines()[1:]
    for name, cmd in commands.items():
        first = cmd.help.split("\n")[0].strip()
        (line,) = [ln for ln in lines if ln.split()[0] == name]
        assert line.endswith(first) and "..." not in line, line


def test_help_imports_no_heavy_module():
    code = ("import sys; from rtdmd_bench.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'numpy', 'mlflow', 'diffusers', 'transformers') if m in sys.modules]\n"
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
