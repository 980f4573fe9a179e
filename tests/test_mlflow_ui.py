"""benchmarks/perf/check_mlflow_ui.py: the MLflow UI shows one row per evaluated configuration with every metric."""

from __future__ import annotations

import pytest

from benchmarks import runner
from benchmarks.perf import check_mlflow_ui as UI
from tests.eval_fixtures import ckpt, one_torch_thread, tiny_bundle, tiny_checkpoint  # noqa: F401 (fixtures)


def _row(run_id, method, metrics, start=0, end=0, **params):
    return {"run_id": run_id, "start": start, "end": end, "metrics": metrics,
            "params": {"method": method, "checkpoint": f"runs/{method}", "steps": "4", **params}}


def test_table_problems_finds_empty_cells_duplicates_paths_and_durations():
    good = [_row("a", "dmd2", {"geneval/overall": 0.5, "fd_shapes": 2.0}),
            _row("b", "lcm", {"geneval/overall": 0.4, "fd_shapes": 3.0})]
    assert UI.table_problems(good, ["a", "b"]) == []
    assert "different runs" in UI.table_problems(good, ["a"])[0]
    split = [_row("a", "dmd2", {"geneval/overall": 0.5}), _row("b", "dmd2", {"fd_shapes": 2.0}, steps="4")]
    found = " ".join(UI.table_problems(split, ["a", "b"]))  # the per-suite layout: half the cells empty, two rows
    assert "a (dmd2) lacks fd_shapes" in found and "b (dmd2) lacks geneval/overall" in found
    assert "same configuration" in found
    found = " ".join(UI.table_problems([_row("a", "x", {}, checkpoint="/abs/run")], ["a"]))
    assert "parameter checkpoint is an absolute path: /abs/run" in found
    timed = {"generate_seconds": 30.0, "score_seconds": 10.0}
    assert UI.table_problems([_row("a", "x", timed, start=1000, end=41_000)], ["a"]) == []
    assert "lasts 0.1 s" in UI.table_problems([_row("a", "x", timed, start=1000, end=1100)], ["a"])[0]


@pytest.mark.slow  # starts the MLflow UI server (tens of seconds on a busy machine)
def test_ui_compares_two_checkpoints_by_two_suites_as_two_full_rows(tmp_path, ckpt, tiny_bundle, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    other = tiny_checkpoint(tmp_path / "other", method="dmd2", seed=1)
    opts = runner.EvalOptions(suites=["geneval", "fid"], max_prompts=3, images_per_prompt=2, out=tmp_path / "evals",
                              progress=False, batch_size=8, tracking_uri=uri, experiment="ui-test")
    results = runner.run_eval([ckpt, other], opts)
    assert len(results) == 4 and len({r.run_id for r in results}) == 2
    rc = UI.check(uri, "ui-test", tmp_path / "shot.png", chromium=str(tmp_path / "no-chromium"))
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "UI REST API: 2 eval runs" in out.out and "every run has all" in out.out
    for metric in ("geneval/overall", "fd_shapes", "generate_seconds", "score_seconds", "nfe"):
        assert metric in out.out
    # no browser here: said plainly (where Playwright is installed, it renders the page instead)
    assert "skipped the browser check" in out.out or (tmp_path / "shot.png").is_file()
