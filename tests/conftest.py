"""Shared fixtures: the in-process CLI runner, torch thread count restored after each test."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture()
def cli(monkeypatch, tmp_path):
    """Invoke `rtdmd-bench` in-process (cwd = tmp_path, so default paths land there); returns the click Result."""
    from click.testing import CliRunner

    from rtdmd_bench.cli import main

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=True)

    return invoke


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A run with train.num_threads changes torch's global thread count; restore it for the next test."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
