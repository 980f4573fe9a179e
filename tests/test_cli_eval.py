"""CLI: `rtdmd-bench prompts`, `eval` and `report` (in-process, tiny sizes)."""

from __future__ import annotations

import hashlib
import json

from benchmarks.geneval.prompts import generate_metadata
from tests.eval_fixtures import ckpt, one_torch_thread  # noqa: F401 (fixtures)

OFFICIAL_SHA256 = "5c48e0813e812e3c373fa5c8ed07a8f0a483be30272b4427b0559c8048e67c13"


def user_error(result, *fragments):
    """Exit 2 and exactly one stderr line 'error: ...' holding every fragment, no traceback."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def test_prompts_geneval_is_the_official_file(cli, tmp_path):
    r = cli("prompts", "geneval", "--out", "meta/evaluation_metadata.jsonl")
    assert r.exit_code == 0 and "553 prompts" in r.stdout
    assert hashlib.sha256((tmp_path / "meta/evaluation_metadata.jsonl").read_bytes()).hexdigest() == OFFICIAL_SHA256
    r = cli("prompts", "geneval", "--out", "other.jsonl", "--seed", "44", "--per-task", "10")
    assert r.exit_code == 0 and (tmp_path / "other.jsonl").read_text().count("\n") < 553


def test_prompts_geneval_shapes(cli, tmp_path):
    r = cli("prompts", "geneval-shapes", "--out", "s.jsonl")
    assert r.exit_code == 0 and "209 prompts" in r.stdout
    lines = (tmp_path / "s.jsonl").read_text().splitlines()
    want = generate_metadata(["circle", "square", "triangle", "cross"], exclude_color_class=None)
    assert [json.loads(x) for x in lines] == want
    r = cli("prompts", "geneval-shapes", "--out", "r.jsonl", "--classes", "ring, diamond")
    assert r.exit_code == 0
    classes = {c["class"] for x in (tmp_path / "r.jsonl").read_text().splitlines() for c in json.loads(x)["include"]}
    assert classes == {"ring", "diamond"}


def test_prompts_errors(cli):
    user_error(cli("prompts", "coco", "--out", "x.jsonl"), "unknown prompt set 'coco'", "geneval-shapes")
    user_error(cli("prompts", "geneval-shapes", "--out", "x", "--classes", "circle,hexagon"), "'hexagon'")
    user_error(cli("prompts", "geneval", "--out", "x", "--classes", "circle"), "geneval-shapes only")
    user_error(cli("prompts", "geneval", "--out", "x", "--per-task", "0"), "--per-task")


def test_eval_user_errors(cli, tmp_path, ckpt):
    user_error(cli("eval", "--suite", "clip", "--checkpoint", ckpt, "--no-tracking"), "unknown suite 'clip'", "geneval, preference")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tag": "counting", "include": [{"class": "circle"}], "prompt": "x"}\n')
    user_error(cli("eval", "--checkpoint", ckpt, "--prompts", bad, "--no-tracking"), f"{bad} line 1", "has no 'count'")
    user_error(cli("eval", "--checkpoint", ckpt, "--images", tmp_path / "none", "--no-tracking"),
               f"{tmp_path / 'none'} does not exist")
    user_error(cli("eval", "--checkpoint", tmp_path / "nothing", "--no-tracking"), "does not exist")
    user_error(cli("report", "--experiment", "x", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"),
               f"no MLflow store at {tmp_path / 'm.db'}")
    assert not (tmp_path / "m.db").exists()
    user_error(cli("report", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"), "no runs in the MLflow store",
               "experiments: none", "rtdmd-bench eval")
    assert not (tmp_path / "m.db").exists()


def test_eval_missing_shapes_reward_weights_names_path_and_fix(cli, tmp_path, ckpt, monkeypatch):
    import benchmarks.shapes.reward_models as RM

    monkeypatch.setattr(RM, "SHIPPED", tmp_path / "no_rewards")
    msg = user_error(cli("eval", "--suite", "aesthetic", "--checkpoint", ckpt, "--no-tracking", "--max-prompts", "2"),
                     str(tmp_path / "no_rewards"), "rtdmd-bench train reward")
    assert msg and not (tmp_path / "runs").exists()  # failed before generating anything


def test_eval_then_report_end_to_end(cli, tmp_path, ckpt, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    r = cli("eval", "--checkpoint", ckpt, "--max-prompts", "3", "--images-per-prompt", "2", "--experiment", "cli-exp",
            "--quiet", "--batch-size", "4")
    assert r.exit_code == 0, r.output
    assert "teacher geneval steps 2 guidance 1 seed 0: geneval/overall" in r.stdout and "[6 generated;" in r.stdout
    assert len(list((tmp_path / "runs/eval").rglob("samples/*.png"))) == 6
    # without --experiment: the experiment of the newest run, said on stderr
    r = cli("eval", "--checkpoint", ckpt, "--max-prompts", "3", "--images-per-prompt", "2", "--quiet")
    assert r.exit_code == 0 and "[0 generated;" in r.stdout  # resumed: nothing regenerated
    assert f"eval: used MLflow experiment 'cli-exp' (the newest run in {uri}" in r.stderr
    r = cli("report", "--bootstrap", "50")
    assert r.exit_code == 0, r.output
    assert "report: used MLflow experiment 'cli-exp' (the newest eval run" in r.stderr
    user_error(cli("report", "--experiment", "demo"), "experiment 'demo' does not exist", "experiments there: ",
               "cli-exp", "--experiment")
    md = (tmp_path / "reports/cli-exp/report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| teacher |"))
    assert row.startswith("| teacher | cps | 2 | 1 | 2 | 2.0 | **") and "](grid_teacher-cps-2-w1_seed0.png)" in md


def test_eval_without_experiment_or_runs_logs_to_rtdmd_bench(tmp_path, capsys):
    from benchmarks.cli import default_experiment

    uri = f"sqlite:///{tmp_path / 'none.db'}"
    assert default_experiment("mine", uri, "eval") == ("mine", "")
    name, note = default_experiment(None, uri, "eval")
    assert name == "rtdmd-bench" and note.startswith("eval: no runs were in the MLflow store")
    assert not (tmp_path / "none.db").exists()  # looking does not create a store
