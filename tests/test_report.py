"""benchmarks.report: bootstrap CIs, best-marking, and a report from a tiny fake set of MLflow runs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from benchmarks import eval_models as EM
from benchmarks import eval_prompts as EP
from benchmarks import report, runner
from benchmarks.suites.base import BackendInfo, SuiteResult
from rtdmd.errors import UserError
from rtdmd.generate import SamplingConfig

# ---------------------------------------------------------------------------- statistics


def test_bootstrap_constant_and_two_point():
    assert report.bootstrap_ci([0.7] * 5) == (0.7, 0.7)
    # mean of 2 draws from {0, 1}: 0 (p 1/4), 0.5 (p 1/2), 1 (p 1/4) -> 2.5% / 97.5% quantiles are 0 and 1
    assert report.bootstrap_ci([0.0, 1.0], n_boot=4000) == (0.0, 1.0)


def test_bootstrap_stratified_is_mean_of_stratum_means():
    # strata constant within themselves: every resample gives (1 + 0) / 2 exactly
    assert report.bootstrap_ci([1, 1, 1, 0], strata=["a", "a", "a", "b"]) == (0.5, 0.5)
    lo, hi = report.bootstrap_ci([1, 1, 1, 0])  # unstratified, the same numbers vary
    assert lo < 0.75 < hi or (lo, hi) != (0.5, 0.5)


def test_bootstrap_matches_normal_approximation():
    v = np.random.default_rng(1).normal(3.0, 2.0, size=400)
    lo, hi = report.bootstrap_ci(v, n_boot=4000, seed=3)
    half = 1.959964 * v.std(ddof=0) / np.sqrt(len(v))  # closed-form large-sample interval of the mean
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.08)
    assert (hi + lo) / 2 == pytest.approx(v.mean(), abs=0.05 * half)


def test_best_index():
    assert report.best_index([0.2, 0.5, None, 0.5], lower_is_better=False) == {1, 3}
    assert report.best_index([3.0, 1.0, float("nan")], lower_is_better=True) == {1}
    assert report.best_index([None, None], lower_is_better=True) == set()


# ---------------------------------------------------------------------------- fake runs -> report

TASK_VALUES = {  # per-prompt GenEval fractions per configuration (2 prompts per task, 2 tasks)
    ("teacher", 4): {"single_object": [1.0, 0.5], "counting": [0.0, 0.5]},
    ("teacher", 8): {"single_object": [1.0, 1.0], "counting": [0.5, 0.5]},
    ("dmd2", 4): {"single_object": [0.5, 0.5], "counting": [0.0, 0.0]},
}
REWARD = {("teacher", 4): [0.1, 0.3, 0.2, 0.4], ("teacher", 8): [0.5, 0.5, 0.6, 0.6], ("dmd2", 4): [0.2, 0.2, 0.3, 0.1]}
FD = {("teacher", 4): 3.0, ("teacher", 8): 2.0, ("dmd2", 4): 2.5}


def _geneval_result(values) -> SuiteResult:
    per_prompt, i = [], 0
    for tag, fracs in values.items():
        for f in fracs:
            per_prompt.append({"index": i, "prompt": f"p{i}", "tag": tag, "n_images": 2, "geneval": f})
            i += 1
    tasks = {t: float(np.mean(v)) for t, v in values.items()}
    metrics = {"geneval/overall": float(np.mean(list(tasks.values()))), **{f"geneval/{t}": v for t, v in tasks.items()}}
    return SuiteResult(metrics, [{"index": r["index"]} for r in per_prompt], per_prompt, {"detector": "fake-det"})


def _per_prompt_csv(folder: Path, result: SuiteResult) -> list[Path]:
    import csv

    folder.mkdir(parents=True, exist_ok=True)
    if not result.per_prompt:
        return []
    p = folder / "per_prompt.csv"
    with open(p, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(result.per_prompt[0]))
        w.writeheader()
        w.writerows(result.per_prompt)
    return [p]


def _log(tmp_path, uri, method, steps, guidance, results: dict, train_seconds, experiment="report-test"):
    """One eval run of (method, steps) holding every suite in ``results``, as the runner logs it."""
    ck = tmp_path / method / "step_100"
    model = EM.Model(ck, method, BackendInfo("shapes", None),
                     {"model_sha256": method * 4, "train_seconds": train_seconds, "step": 100, "mlflow_run_id": "t" + method})
    sc = SamplingConfig(kind="cps", steps=steps, guidance=guidance, eta=0.9)
    ps = EP.PromptSet("default:shapes", [{"prompt": f"p{i}"} for i in range(4)], [0, 1, 2, 3], True)
    opts = runner.EvalOptions(tracking_uri=uri, experiment=experiment, images_per_prompt=2,
                              command=f"rtdmd-bench eval --suite all --steps {steps} --out /abs/evals # {method}")
    base = tmp_path / "art" / f"{method}-{steps}"
    scores = [runner.SuiteScore(suite, res, _per_prompt_csv(base / suite, res), 1.5) for suite, res in results.items()]
    from rtdmd.images import save_png

    grid = base / "grid.png"
    save_png(grid, np.full((8, 8, 3), 20 * steps, np.uint8))
    return runner.log_eval_run(opts, model, sc, ps, scores, [grid], base, 8, 1.7e9, 2.0)


@pytest.fixture(scope="module")
def fake_experiment(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    for (method, steps), values in TASK_VALUES.items():
        ts = 120.0 if method == "dmd2" else None
        rv = REWARD[(method, steps)]
        pref = SuiteResult({"reward/oracle": float(np.mean(rv))}, [],
                           [{"index": i, "prompt": f"p{i}", "tag": "", "n_images": 1, "reward/oracle": v}
                            for i, v in enumerate(rv)], {"scorers": "oracle=fake"})
        _log(tmp, uri, method, steps, 1.0, {"geneval": _geneval_result(values), "preference": pref,
                                            "fid": SuiteResult({"fd_shapes": FD[(method, steps)]}, [], [])}, ts)
    return tmp, uri


def _table(md: str, heading: str) -> list[list[str]]:
    block = md.split(heading, 1)[1].split("\n\n")[1]
    return [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()[2:]]


def test_report_tables_best_and_cis(fake_experiment):
    tmp, uri = fake_experiment
    out = report.write_report("report-test", out=tmp / "rep" / "report.md", uri=uri, n_boot=500, command="rtdmd-bench report -x")
    md = out.read_text()
    rows = _table(md, "## Results")
    head = md.split("## Results", 1)[1].split("\n\n")[1].splitlines()[0]
    assert [c.strip() for c in head.strip("|").split("|")] == [
        "method", "sampler", "steps", "CFG", "NFE", "train (min)", "geneval/overall", "reward/oracle", "fd_shapes"]
    assert [r[:6] for r in rows] == [["dmd2", "cps", "4", "1", "4", "2.0"], ["teacher", "cps", "4", "1", "4", "-"],
                                     ["teacher", "cps", "8", "1", "8", "-"]]
    cell = {(r[0], r[2]): r[6:] for r in rows}
    # best per column in bold: teacher-8 has the highest GenEval (0.75) and reward, the lowest FD
    assert cell[("teacher", "8")][0].startswith("**0.750**") and cell[("teacher", "8")][2] == "**2.000**"
    assert cell[("teacher", "8")][1].startswith("**0.550**")
    assert not any("**" in c for c in cell[("dmd2", "4")] + cell[("teacher", "4")])
    # CIs: the stratified bootstrap over the per-prompt table, as bootstrap_ci computes it
    lo, hi = report.bootstrap_ci([1.0, 0.5, 0.0, 0.5], ["single_object"] * 2 + ["counting"] * 2, n_boot=500)
    assert cell[("teacher", "4")][0] == f"0.500 [{lo:.3f}, {hi:.3f}]"
    lo, hi = report.bootstrap_ci(REWARD[("dmd2", 4)], n_boot=500)
    assert cell[("dmd2", "4")][1] == f"0.200 [{lo:.3f}, {hi:.3f}]"
    assert "[" not in cell[("dmd2", "4")][2]  # FD has no per-prompt form: no interval
    tasks = _table(md, "## GenEval per task")
    assert tasks[2][6].startswith("**1.000**") and tasks[0][7] == "0.000 [0.000, 0.000]"
    # plots beside the Markdown, linked from it
    for name in ("metric_vs_nfe.png", "geneval_tasks.png"):
        assert (out.parent / name).stat().st_size > 1000 and f"]({name})" in md
    grids = re.findall(r"\]\((grid_[^)]+\.png)\)", md)
    assert len(grids) == 3 and all((out.parent / g).is_file() for g in grids)
    # the legend says what each metric measures and its range
    legend = md.split("## What the metrics measure", 1)[1].split("\n## ", 1)[0]
    assert "`fd_shapes`: FD-shapes" in legend and "lower is better" in legend and "`reward/oracle`" in legend
    assert "`geneval/<task>`" in legend and "0 to 1" in legend
    # provenance: the eval commands, the commit, the report command
    assert "rtdmd-bench eval --suite all --steps 8 --out evals # teacher" in md and "rtdmd-bench report -x" in md
    assert "/abs" not in md  # no absolute path anywhere in the report
    assert "Eval code commit(s):" in md and "geneval: fake-det" in md and "preference: oracle=fake" in md
    assert "3 eval runs, 3 configurations." in md


def test_report_errors(fake_experiment, tmp_path):
    _, uri = fake_experiment
    with pytest.raises(UserError, match=r"experiment 'nope' does not exist .*experiments there: .*report-test"):
        report.write_report("nope", out=tmp_path / "r.md", uri=uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("only-training")
    with mlflow.start_run():
        mlflow.set_tag("kind", "train")
    with pytest.raises(UserError, match="holds no finished eval runs"):
        report.write_report("only-training", out=tmp_path / "r.md", uri=uri)


def test_default_report_path(fake_experiment, tmp_path, monkeypatch):
    _, uri = fake_experiment
    monkeypatch.chdir(tmp_path)
    out = report.write_report("report-test", uri=uri, n_boot=50)
    assert out == Path("reports/report-test/report.md") and out.is_file()


def test_rows_of_one_method_with_several_checkpoints_are_named_apart():
    rows = [{"method": "dmd2", "checkpoint": "/x/run/checkpoints/step_000100", "sha": "abcdef123", "name": "dmd2"},
            {"method": "dmd2", "checkpoint": "/y/run/checkpoints/step_000100", "sha": "987654fed", "name": "dmd2"},
            {"method": "lcm", "checkpoint": "/c", "sha": "555555", "name": "lcm"}]
    report._name_checkpoints(rows)
    assert [r["name"] for r in rows] == ["dmd2@abcdef", "dmd2@987654", "lcm"]  # same run label: the sha tells them apart
    rows = [{"method": "rtdmd", "checkpoint": "runs/s/rtdmd/stage2/checkpoints/step_000120", "sha": "a1", "name": "rtdmd"},
            {"method": "rtdmd", "checkpoint": "runs/s/rtdmd-no-dm/checkpoints/step_000120", "sha": "b2", "name": "rtdmd"},
            {"method": "rtdmd", "checkpoint": "runs/s/rtdmd-epoch50", "sha": "c3", "name": "rtdmd"}]
    report._name_checkpoints(rows)
    assert [r["name"] for r in rows] == ["rtdmd [rtdmd/stage2@120]", "rtdmd [rtdmd-no-dm@120]", "rtdmd [rtdmd-epoch50]"]


def test_runs_of_the_older_one_run_per_suite_layout_are_still_read(tmp_path):
    """Stores written before one run held every suite: per-suite runs with their artifacts at the top."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'old.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("old-layout")
    params = {"checkpoint": "/abs/runs/dmd2/checkpoints/step_000100", "method": "dmd2", "backend": "shapes",
              "sampler": "cps", "steps": 4, "guidance": 1.0, "eta": 0.9, "seed": 0, "images_per_prompt": 2}
    res = _geneval_result(TASK_VALUES[("dmd2", 4)])
    art = _per_prompt_csv(tmp_path / "old", res)[0]
    for suite, metrics, tags in (("geneval", res.metrics, {"detector": "fake-det"}),
                                 ("fid", {"fd_shapes": 2.5}, {"scorers": "shapes_encoder=/abs/bundle@sha256:1"})):
        with mlflow.start_run():
            mlflow.log_params({**params, "suite": suite})
            mlflow.set_tags({"kind": "eval", "suite": suite, "nfe": "4", **tags})
            mlflow.log_metrics({**metrics, "nfe": 4})
            if suite == "geneval":
                mlflow.log_artifact(str(art))
    md = report.write_report("old-layout", out=tmp_path / "r" / "report.md", uri=uri, n_boot=100).read_text()
    (row,) = _table(md, "## Results")
    lo, hi = report.bootstrap_ci([0.5, 0.5, 0.0, 0.0], ["single_object"] * 2 + ["counting"] * 2, n_boot=100)
    assert row[:6] == ["dmd2", "cps", "4", "1", "4", "-"] and row[6] == f"**0.250** [{lo:.3f}, {hi:.3f}]"
    assert row[7] == "**2.500**" and "shapes_encoder=bundle@sha256:1" in md and "/abs/" not in md


def test_logged_run_spans_generation_and_scoring(fake_experiment):
    import mlflow

    _, uri = fake_experiment
    mlflow.set_tracking_uri(uri)
    df = mlflow.search_runs(experiment_names=["report-test"], filter_string="params.method = 'dmd2'")
    (run_id,) = df["run_id"]
    run = mlflow.get_run(run_id)
    m, t = run.data.metrics, run.data.tags
    assert (m["generate_seconds"], m["score_seconds"]) == (2.0, 4.5)  # 3 suites of 1.5 s
    assert (run.info.start_time, run.info.end_time) == (1_700_000_000_000, 1_700_000_006_500)
    assert t["train_run_id"] == "tdmd2" and t["suites"] == "fid,geneval,preference" and run.data.params["checkpoint"] == (
        "step_100@dmd2dmd2")  # outside the working directory: the folder name + the sha prefix
