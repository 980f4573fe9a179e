"""Studies: paired statistics against hand values, the study file's checks, and a 2-arm, 2-seed toy2d study end to
end (run, interrupted run that resumes to the same numbers, parallel jobs, report with verdicts)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from benchmarks.study import execute, records
from benchmarks.study.spec import load_study
from benchmarks.study.stats import arm_mean, paired_difference, verdict
from benchmarks.study.units import mixture_log_density
from rtdmd.errors import UserError

# ---------------------------------------------------------------------------- statistics


def test_paired_difference_of_a_constant_shift_is_exact():
    rng = np.random.default_rng(0)
    b = rng.normal(size=(1, 50))
    d = paired_difference(b + 0.3, b, n_boot=300)
    assert d.diff == pytest.approx(0.3)
    assert d.lo == pytest.approx(0.3) and d.hi == pytest.approx(0.3)  # pairing removes the units' own spread


def test_paired_interval_matches_the_normal_approximation():
    """Differences ~ N(0.1, 1) on 2,000 units: the 95 % interval is 0.1 +- 1.96 / sqrt(2000) = +-0.0438."""
    rng = np.random.default_rng(1)
    b = rng.normal(size=2000)
    a = b + 0.1 + rng.normal(size=2000)
    d = paired_difference(a, b, n_boot=2000, seed=2)
    sd = np.std(a - b, ddof=1)
    assert d.half_width == pytest.approx(1.96 * sd / np.sqrt(2000), rel=0.1)
    assert d.lo < np.mean(a - b) < d.hi


def test_stratified_mean_averages_tasks_equally_and_seeds_first():
    # two seeds; units 0-2 in task "x" (3 units), unit 3 in task "y"
    a = np.array([[1, 1, 1, 0], [1, 0, 1, 1.0]])
    strata = np.array(["x", "x", "x", "y"])
    # seed mean per unit: [1, .5, 1, .5]; task x: 2.5/3, task y: .5 -> overall (0.8333 + 0.5) / 2
    assert arm_mean(a, strata) == pytest.approx((2.5 / 3 + 0.5) / 2)
    assert arm_mean(a) == pytest.approx(3 / 4)


def test_seed_spread_widens_the_interval():
    units = np.linspace(0, 1, 400)
    same = np.stack([units, units])
    apart = np.stack([units - 0.2, units + 0.2])
    narrow = paired_difference(same, units[None], n_boot=500)
    wide = paired_difference(apart, units[None], n_boot=500)
    assert narrow.half_width < 1e-9 and wide.half_width > 0.1
    assert wide.seed_means_a == pytest.approx([0.3, 0.7])


def test_verdict_words():
    from benchmarks.study.stats import Difference

    def d(lo, hi):
        return Difference((lo + hi) / 2, lo, hi, 10, 1, 1, [], [])

    assert verdict(d(0.01, 0.05)) == "supported"
    assert verdict(d(-0.05, -0.01)) == "not supported"
    assert verdict(d(-0.01, 0.05)) == "inconclusive"
    assert verdict(d(-0.05, -0.01), "less") == "supported"


def test_mixture_log_density_by_hand():
    import torch

    x = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    means = torch.tensor([[0.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    stds = torch.tensor([1.0, 0.5], dtype=torch.float64)
    w = torch.tensor([3.0, 1.0], dtype=torch.float64)
    got = mixture_log_density(x, means, stds, w)

    def n(p, m, s):
        return np.exp(-((p - m) ** 2).sum() / (2 * s * s)) / (2 * np.pi * s * s)

    for i in range(2):
        p = x[i].numpy()
        want = np.log(0.75 * n(p, means[0].numpy(), 1.0) + 0.25 * n(p, means[1].numpy(), 0.5))
        assert float(got[i]) == pytest.approx(want)


# ---------------------------------------------------------------------------- the study file


def _write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_study_file_mistakes_are_one_sentence(tmp_path):
    base = {"backend": "toy2d", "eval": {"suites": ["toy2d"]}, "arms": {"a": {"method": "dmd2"}, "b": {"method": "dmd2", "init_from": "a"}}}
    assert [a.name for a in load_study(_write(tmp_path, base)).order()] == ["a", "b"]
    cases = [({**base, "armz": {}}, "unknown key 'armz'"),
             ({**base, "reference": "c"}, "reference arm 'c'"),
             ({**base, "arms": {"a": {"method": "dmd2", "init_from": "b"}, "b": {"method": "dmd2", "init_from": "a"}}},
              "in a circle"),
             ({**base, "arms": {"a": {"method": "dmd2", "checkpoint": "x"}}}, "exactly one of"),
             ({**base, "arms": {"a": {"method": "dmd2", "seeds": [0, 0]}}}, "distinct training seeds"),
             ({**base, "arms": {"a": {"method": "dmd2", "lr": 1}}}, "unknown config key 'arms.a.lr'"),
             ({**base, "claims": [{"name": "c", "arm": "a", "versus": "z", "metric": "m"}]}, "unknown arm 'z'"),
             ({**base, "arms": {"a": {"method": "dmd3"}}}, "unknown method 'dmd3'"),
             ({**base, "eval": {"suites": ["geneval"]}}, "toy2d suite only"),
             ({**base, "backend": "shapes", "eval": {"suites": ["genevall"]}}, "unknown suite 'genevall'")]
    for data, fragment in cases:
        with pytest.raises(UserError, match=fragment):
            load_study(_write(tmp_path, data))
    with pytest.raises(UserError, match=r"^study file .*nope\.yaml does not exist; pass the path of a study file"):
        load_study(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(UserError, match=r"^study file .*list\.yaml must hold a mapping of study settings"):
        load_study(tmp_path / "list.yaml")


# ---------------------------------------------------------------------------- a toy2d study end to end

TINY = {"backend": {"hidden": 16, "depth": 2}, "train": {"batch_size": 16, "max_steps": 6, "checkpoint_every": 3},
        "tracking": {"enabled": False}}


@pytest.fixture(scope="module")
def toy_teacher(tmp_path_factory) -> Path:
    from rtdmd.api import run_training

    out = tmp_path_factory.mktemp("teacher") / "teacher"
    run_training("teacher", backend="toy2d", out=out, show_progress=False,
                 overrides={**TINY, "train": {**TINY["train"], "max_steps": 20, "num_threads": 1}})
    return out


def _study(tmp_path: Path, teacher: Path, name: str) -> Path:
    over = {**TINY, "backend": {**TINY["backend"], "teacher": str(teacher)}}
    data = {"name": name, "backend": "toy2d", "out": str(tmp_path / name), "reference": "teacher",
            "experiment": "study-test", "budget": {"generator_updates": 2, "batch": 16},
            "eval": {"suites": ["toy2d"], "prompts": 3, "images_per_prompt": 16, "bootstrap": 200},
            "arms": {"teacher": {"checkpoint": str(teacher), "steps": 8},
                     "dmd2": {"method": "dmd2", "seeds": [0, 1], "overrides": over},
                     "ac-dmd": {"method": "ac-dmd", "seeds": [0, 1],
                                "overrides": {**over, "method": {"init": str(teacher)}}}},
            "claims": [{"name": "(b) AC-DMD vs DMD2", "arm": "ac-dmd", "versus": "dmd2", "metric": "toy2d/log_density"}]}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def _finals(study_path: Path) -> dict:
    s = load_study(study_path)
    out = {}
    for job in execute.plan(s):
        if job.kind == "eval":
            d = execute.arm_dir(s, job.arm, job.seed)
            ev = json.loads((d / "eval.json").read_text())
            out[(job.arm, job.seed)] = [json.loads((s.out / p["units"]).read_text())["metrics"] for p in ev["points"]]
    return out


def test_toy2d_study_runs_resumes_after_an_interruption_and_reports(tmp_path, toy_teacher, monkeypatch):
    from rtdmd import trainer as T
    from benchmarks.study.report import write_study_report

    monkeypatch.chdir(tmp_path)
    full = _study(tmp_path, toy_teacher, "full")
    execute.run_study(full, progress=False)

    cut = _study(tmp_path, toy_teacher, "cut")
    real_step = T.Trainer._one_step
    calls = {"n": 0}

    def dying_step(self, step, **kw):  # the second training run dies inside step 4 (after its step-3 checkpoint)
        if self.cfg.tracking.tags.get("seed") == "1" and step == 4:
            calls["n"] += 1
            raise KeyboardInterrupt
        return real_step(self, step, **kw)

    monkeypatch.setattr(T.Trainer, "_one_step", dying_step)
    with pytest.raises(UserError, match="second interrupt"):
        execute.run_study(cut, progress=False)
    assert calls["n"] == 1
    s = load_study(cut)
    done = [j for j in execute.plan(s) if execute.is_done(s, j)]
    assert [j.label for j in done] == ["eval teacher seed 0", "train dmd2 seed 0", "eval dmd2 seed 0"]
    from benchmarks.study.status import status_lines

    lines = status_lines(cut)
    assert lines[0].startswith("study cut: 3 of 9 jobs done, 1 started, 5 waiting")
    t0 = json.loads((execute.arm_dir(s, "dmd2", 0) / "train.json").read_text())
    left = (6 - 3) * t0["run_train_cpu_seconds"] / t0["iterations"]  # seed 1 has 3 of its 6 iterations left
    assert lines[1].startswith(f"training left: about {left:,.0f} CPU-seconds ({left / 3600:.1f} h) for 1 train and "
                               "sweep jobs") and lines[1].endswith("not estimated: 2 train and sweep jobs without a done "
                                                                   "run of their arm or method, and 3 eval jobs")
    assert re.search(r"^  started  train dmd2 seed 1 +checkpoint at step 3$", "\n".join(lines), re.M)
    assert re.search(r"^  done     train dmd2 seed 0 +[\d,]+ CPU-s$", "\n".join(lines), re.M)
    assert lines[-1] == f"continue with: rtdmd-bench study run {cut} --jobs 2"
    with pytest.raises(UserError, match="report the finished arms with --partial"):
        write_study_report(cut, tmp_path / "partial" / "report.md")
    text = write_study_report(cut, tmp_path / "partial" / "report.md", partial=True).read_text()
    assert "**Partial report: 3 of 9 jobs are done.**" in text and "not yet: dmd2, ac-dmd." in text
    assert "| (b) AC-DMD vs DMD2 | ac-dmd > dmd2 | toy2d/log_density | - | not run yet |" in text
    assert re.search(r"^\| teacher \| [0-9.]+ \[", text, re.M) and not re.search(r"^\| dmd2 \|", text, re.M)
    monkeypatch.setattr(T.Trainer, "_one_step", real_step)
    execute.run_study(cut, progress=False)  # the same command continues
    assert _finals(cut) == _finals(full)

    report = write_study_report(full, tmp_path / "rep" / "report.md")
    text = report.read_text()
    assert "| (b) AC-DMD vs DMD2 | ac-dmd > dmd2 | toy2d/log_density |" in text
    assert any(w in text for w in ("**supported**", "**not supported**", "**inconclusive**"))
    assert (report.parent / "curve_toy2d_in_mode.png").is_file() and "](curve_toy2d_in_mode.png)" in text
    t = json.loads((tmp_path / "full/arms/dmd2/seed1/train.json").read_text())
    assert t["iterations"] == 6 and t["generator_updates"] == 2 and t["generator_images"] == 32
    assert "cpu_seconds_last_attempt" not in t and t["train_cpu_seconds"] > 0
    assert "| dmd2 | `dmd2` | 2 | - | 2 x 16 = 32 | 6 |" in text
    assert "| teacher | no: checkpoint `teacher` | 1 | - | no cost shown | - | - | - |" in text
    assert "without MLflow tracking" in text and not (report.parent / "losses.png").exists()  # tracking was off
    _assert_no_absolute_paths(text)


_ABSOLUTE = re.compile(r"(^|[\s(\[`'\"=:])(/[^\s/)]|[A-Za-z]:\\)", re.M)


def _assert_no_absolute_paths(text: str) -> None:
    assert "/work/" not in text and "/tmp/" not in text
    hit = _ABSOLUTE.search(text)
    assert hit is None, f"absolute path in the report: ...{text[max(0, hit.start() - 60):hit.end() + 60]}..."


def test_parallel_jobs_give_the_same_numbers(tmp_path, toy_teacher, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = _study(tmp_path, toy_teacher, "serial"), _study(tmp_path, toy_teacher, "parallel")
    execute.run_study(a, progress=False)
    execute.run_study(b, jobs=2, progress=False)
    assert _finals(a) == _finals(b)
    s = load_study(b)
    for job in execute.plan(s):  # each job's output went to its log, its progress bar included
        log = execute.job_log(s, job)
        assert log.is_file(), job.label
        if job.kind == "train":
            assert f"train {job.arm}" in log.read_text(errors="replace")


def test_run_arms_runs_the_named_arms_and_what_they_start_from(tmp_path, toy_teacher, cli, reported):
    path = _study(tmp_path, toy_teacher, "some")
    r = cli("study", "run", path, "--arms", "dmd2", "--quiet")
    assert r.exit_code == 0, r.output
    assert f"the jobs of dmd2 are done; the rest: rtdmd-bench study run {path}" in r.output
    s = load_study(path)
    assert [j.label for j in execute.missing_jobs(s)] == ["eval teacher seed 0", "train ac-dmd seed 0", "eval ac-dmd seed 0",
                                                           "train ac-dmd seed 1", "eval ac-dmd seed 1"]
    r = cli("study", "run", path, "--arms", "dmd2,dmd3")
    assert r.exit_code == 2 and "--arms names dmd3, not an arm of" in r.output and "teacher, dmd2, ac-dmd" in r.output
    study, _ = reported  # 'more' starts from 'ac-dmd'
    assert execute.with_needs(study, ["more"]) == {"more", "ac-dmd"} and execute.with_needs(study, ["ac-dmd"]) == {"ac-dmd"}


def test_study_status_command_of_a_finished_study(reported, cli):
    study, _ = reported
    r = cli("study", "status", study.path)
    assert r.exit_code == 0, r.output
    assert r.output.startswith("study rep: 9 of 9 jobs done, 0 started, 0 waiting; training CPU-seconds of the done jobs: ")
    cpu = sum(json.loads((execute.arm_dir(study, a, s) / "train.json").read_text())["run_train_cpu_seconds"]
              for a in ("ac-dmd", "more") for s in (0, 1))
    assert f"done jobs: {cpu:,.0f} (" in r.output
    assert r.output.rstrip().endswith(f"every job is done; report it with: rtdmd-bench study report {study.path}")


def test_last_line_counts_progress_updates_as_lines(tmp_path):
    log = tmp_path / "x.log"
    log.write_bytes(b"first\ntrain dmd2:  10%|#   | 1/10\rtrain dmd2:  20%|##  | 2/10\r\n\n")
    assert execute.last_line(log) == "train dmd2:  20%|##  | 2/10"
    assert execute.last_line(tmp_path / "missing.log") == ""


def test_a_failed_parallel_job_names_its_error_and_its_log(tmp_path, toy_teacher, monkeypatch):
    import shutil

    from rtdmd.checkpoint import find_checkpoint

    monkeypatch.chdir(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(toy_teacher, broken)
    weights = next(p for p in find_checkpoint(broken).iterdir() if p.suffix == ".safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the checksum in meta.json no longer matches
    weights.write_bytes(bytes(data))
    p = _study(tmp_path, toy_teacher, "fails")
    d = yaml.safe_load(p.read_text())
    d["arms"] = {"teacher": {"checkpoint": str(toy_teacher), "steps": 8}, "broken": {"checkpoint": str(broken), "steps": 8}}
    d.pop("claims")
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    with pytest.raises(UserError, match=r"'eval broken seed 0' failed \(exit 2: 'error: .*'; its whole output is in "
                                        r".*arms/broken/seed0/eval\.log\)"):
        execute.run_study(p, jobs=2, progress=False)


def test_report_of_an_unfinished_study_says_how_to_finish(tmp_path, toy_teacher):
    from benchmarks.study.report import write_study_report

    with pytest.raises(UserError, match="study run"):
        write_study_report(_study(tmp_path, toy_teacher, "new"))
    with pytest.raises(UserError, match="has not scored its reference arm 'teacher' yet"):
        write_study_report(_study(tmp_path, toy_teacher, "new"), partial=True)


# ---------------------------------------------------------------------------- the report: costs, curves, losses, precision


def _report_study(tmp_path: Path, teacher: Path) -> Path:
    """teacher (checkpoint) <- ac-dmd (2 seeds) <- more (init_from ac-dmd), tracked in a throwaway MLflow store;
    ttur 3 and checkpoints every 3 of 6 iterations: 1 then 2 generator updates per run."""
    over = {**TINY, "backend": {**TINY["backend"], "teacher": str(teacher)},
            "train": {**TINY["train"], "log_every": 1},
            "tracking": {"enabled": True, "uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}}
    data = {"name": "rep", "backend": "toy2d", "out": str(tmp_path / "rep"), "reference": "teacher",
            "experiment": "study-report-test",
            "eval": {"suites": ["toy2d"], "prompts": 3, "images_per_prompt": 8, "bootstrap": 200},
            "arms": {"teacher": {"checkpoint": str(teacher), "steps": 8},
                     "ac-dmd": {"method": "ac-dmd", "seeds": [0, 1],
                                "overrides": {**over, "method": {"init": str(teacher), "ttur": 3}}},
                     "more": {"method": "ac-dmd", "init_from": "ac-dmd", "seeds": [0, 1],
                              "overrides": {**over, "method": {"ttur": 3}}}}}
    p = tmp_path / "rep.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


@pytest.fixture(scope="module")
def reported(tmp_path_factory, toy_teacher):
    """The report study, run and reported once (cwd: its folder, as `study run` and `study report` are used)."""
    import os

    from benchmarks.study.report import write_study_report

    tmp = tmp_path_factory.mktemp("report")
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        path = _report_study(tmp, toy_teacher)
        execute.run_study(path, progress=False)
        report = write_study_report(path, tmp / "reports" / "report.md")
    finally:
        os.chdir(cwd)
    return load_study(path), report


def _meta(study, arm: str, seed: int, step: int) -> dict:
    return json.loads((execute.arm_dir(study, arm, seed) / f"run/checkpoints/step_{step:06d}/meta.json").read_text())


def test_train_json_records_cpu_seconds_of_the_final_checkpoint(reported):
    study, _ = reported
    for arm in ("ac-dmd", "more"):
        for seed in (0, 1):
            t = json.loads((execute.arm_dir(study, arm, seed) / "train.json").read_text())
            meta = _meta(study, arm, seed, 6)
            assert t["train_cpu_seconds"] == meta["train_cpu_seconds"] and "cpu_seconds_last_attempt" not in t
            assert t["run_train_cpu_seconds"] == pytest.approx(meta["run_train_cpu_seconds"])
    # a run's train_cpu_seconds includes the weights it started from: more's = ac-dmd's final + its own run
    parent = json.loads((execute.arm_dir(study, "ac-dmd", 0) / "train.json").read_text())
    child = json.loads((execute.arm_dir(study, "more", 0) / "train.json").read_text())
    assert child["train_cpu_seconds"] == pytest.approx(parent["train_cpu_seconds"] + child["run_train_cpu_seconds"], abs=0.02)


def test_a_train_json_without_cpu_seconds_takes_them_from_its_checkpoint(reported):
    from benchmarks.study.scores import _train_record

    study, _ = reported
    d = execute.arm_dir(study, "ac-dmd", 0)
    t = json.loads((d / "train.json").read_text())
    old = {k: v for k, v in t.items() if k not in ("train_cpu_seconds", "run_train_cpu_seconds")}
    legacy = d.parent / "legacy"
    legacy.mkdir()
    (legacy / "train.json").write_text(json.dumps(old))
    assert _train_record(study, legacy)["run_train_cpu_seconds"] == pytest.approx(t["run_train_cpu_seconds"])


def test_first_difference_names_the_dotted_key():
    from benchmarks.study.records import first_difference

    a = {"method": "ac-dmd", "overrides": {"method": {"ttur": 3, "optim": {"lr": 1e-4}}}, "sweep": None}
    assert first_difference(a, json.loads(json.dumps(a))) is None
    b = json.loads(json.dumps(a))
    b["overrides"]["method"]["optim"]["lr"] = 3e-4
    assert first_difference(a, b) == "overrides.method.optim.lr"
    assert first_difference(a, {**a, "preset": "no-dm"}) == "preset"  # a key only one side has
    assert first_difference(1, 2) == "(the whole record)"


def test_a_done_job_whose_study_settings_changed_stops_run_and_report(reported, tmp_path):
    """Editing an arm after it trained is caught, naming the setting and the folder to delete; a change to an arm
    that another starts from (init_from) reaches that arm's record too."""
    from benchmarks.study.report import write_study_report

    study, _ = reported
    data = yaml.safe_load(study.path.read_text())
    same = tmp_path / "same.yaml"
    same.write_text(yaml.safe_dump(data, sort_keys=False))
    assert all(execute.is_done(load_study(same), j) for j in execute.plan(load_study(same)))  # unchanged: all done

    edited = json.loads(json.dumps(data))
    edited["arms"]["ac-dmd"]["overrides"]["method"]["ttur"] = 2
    p = tmp_path / "edited.yaml"
    p.write_text(yaml.safe_dump(edited, sort_keys=False))
    with pytest.raises(UserError, match=r"'train ac-dmd seed 0' is done but was run with another 'overrides\.method\.ttur'"
                                        r".*delete .*arms/ac-dmd/seed0 to run it again"):
        execute.run_study(p, progress=False)
    with pytest.raises(UserError, match="overrides.method.ttur"):
        write_study_report(p, tmp_path / "r" / "report.md")
    s = load_study(p)
    with pytest.raises(UserError, match=r"'train ac-dmd seed 0' .* 'overrides\.method\.ttur'"):  # checked first
        execute.is_done(s, execute.Job("train", "more", 0))
    more = json.loads((execute.arm_dir(s, "more", 0) / "train.json").read_text())
    assert records.first_difference(more["inputs"], records.inputs(s, "train", s.arms["more"])) == "init_from.overrides.method.ttur"

    edited = json.loads(json.dumps(data))
    edited["eval"]["images_per_prompt"] = 4
    p.write_text(yaml.safe_dump(edited, sort_keys=False))
    with pytest.raises(UserError, match=r"'eval teacher seed 0' .* 'eval\.images_per_prompt'.*eval\.json and .*units"):
        execute.run_study(p, progress=False)
    edited["eval"]["images_per_prompt"], edited["eval"]["bootstrap"] = data["eval"]["images_per_prompt"], 300
    p.write_text(yaml.safe_dump(edited, sort_keys=False))
    assert all(execute.is_done(load_study(p), j) for j in execute.plan(load_study(p)))  # bootstrap: report-time only


def test_curves_score_the_checkpoint_grid_and_the_final_checkpoint_not_an_interruption_s(reported, tmp_path):
    import shutil

    study, _ = reported
    data = yaml.safe_load(study.path.read_text())
    p = tmp_path / "copy.yaml"
    p.write_text(yaml.safe_dump({**data, "out": str(tmp_path / "copy")}, sort_keys=False))
    shutil.copytree(study.out, tmp_path / "copy")
    s = load_study(p)
    ckpts = execute.arm_dir(s, "ac-dmd", 0) / "run" / "checkpoints"
    assert [c.name for c in execute.curve_checkpoints(s, s.arms["ac-dmd"], 0)] == ["step_000003", "step_000006"]
    extra = ckpts / "step_000004"  # what an interruption at step 4 leaves beside the grid of checkpoint_every 3
    shutil.copytree(ckpts / "step_000003", extra)
    assert [c.name for c in execute.curve_checkpoints(s, s.arms["ac-dmd"], 0)] == ["step_000003", "step_000006"]


def test_curve_points_are_read_from_each_checkpoint_and_an_init_from_arm_continues_its_parent(reported):
    from benchmarks.study.plots import all_curve_rows
    from benchmarks.study.scores import load_scores

    study, _ = reported
    rows = all_curve_rows(study, load_scores(study), "toy2d/in_mode")
    assert set(rows) == {"ac-dmd", "more"}  # the checkpoint arm has no curve
    cpu = {(a, st): np.mean([_meta(study, a, s, st)["run_train_cpu_seconds"] for s in (0, 1)])
           for a in ("ac-dmd", "more") for st in (3, 6)}
    np.testing.assert_allclose(rows["ac-dmd"][:, 0], [1, 2])
    np.testing.assert_allclose(rows["ac-dmd"][:, 1], [cpu["ac-dmd", 3], cpu["ac-dmd", 6]], atol=0.02)
    # more starts at ac-dmd's final point (same weights), then adds its own checkpoints' costs
    np.testing.assert_allclose(rows["more"][0], rows["ac-dmd"][-1])
    np.testing.assert_allclose(rows["more"][1:, 0], [3, 4])
    np.testing.assert_allclose(rows["more"][1:, 1], [cpu["ac-dmd", 6] + cpu["more", 3], cpu["ac-dmd", 6] + cpu["more", 6]], atol=0.02)
    assert np.all(rows["ac-dmd"][:, 3] <= rows["ac-dmd"][:, 2]) and np.all(rows["ac-dmd"][:, 2] <= rows["ac-dmd"][:, 4])


def test_checkpoint_line_labels_keep_their_order_and_a_minimum_gap():
    from benchmarks.study.plots import label_positions

    # y range 0.4 to 0.8, gap 0.045 of it = 0.018: 0.51 is lifted to 0.5 + 0.018, 0.7 is far enough already
    assert label_positions([0.5, 0.51, 0.7], (0.4, 0.8)) == pytest.approx([0.5, 0.518, 0.7])
    assert label_positions([0.51, 0.5], (0.4, 0.8)) == pytest.approx([0.518, 0.5])
    assert label_positions([], (0.0, 1.0)) == []


def test_report_shows_costs_curves_losses_and_precision_without_absolute_paths(reported):
    from benchmarks.study.plots import loss_histories
    from benchmarks.study.scores import load_scores

    study, report = reported
    text = report.read_text()
    assert "| ac-dmd | `ac-dmd` | 2 | - | 2 x 16 = 32 | 6 |" in text
    assert "| more | `ac-dmd` | 2 | ac-dmd | 2 x 16 = 32; with `ac-dmd`: 4 updates, 64 images | 6; with `ac-dmd`: 12 |" in text
    assert "counting the weights it started from outside the study" in text  # ac-dmd's method.init is the teacher
    assert "quiet machine" in text and "one torch thread" in text
    commit = json.loads((execute.arm_dir(study, "more", 1) / "train.json").read_text())["git_commit"][:10]
    assert f"`{commit}" in text
    for png in ("curve_toy2d_in_mode.png", "curve_toy2d_log_density.png", "losses.png"):
        assert (report.parent / png).is_file() and f"]({png})" in text
    hist = loss_histories(study, load_scores(study))
    assert set(hist) == {"ac-dmd", "more"} and set(hist["more"]) == {0, 1}
    assert {"loss/generator", "loss/fake_score"} <= set(hist["more"][1])
    assert len(hist["more"][1]["loss/fake_score"]) == 6  # log_every 1: every iteration
    assert "## Per-task precision (`toy2d/in_mode`)" in text and "Prompts per task: mixture 1, mode 2 (x 8 images each)." in text
    assert "`toy2d/log_density`: toy2d: log density" in text  # the metric legend
    _assert_no_absolute_paths(text)


def test_monitor_section_shows_the_learned_reward_gap_of_the_arms_that_logged_it(reported, tmp_path):
    """No arm of the toy study monitors a reward: no section. Monitor values logged to one arm's training run are
    read back by key and iteration and drawn, and the section names them."""
    from benchmarks.study import report as R
    from benchmarks.study.plots import loss_histories, tracked_uris
    from benchmarks.study.scores import load_scores
    from rtdmd.tracking import mlflow_at, search_runs

    study, report = reported
    assert "Learned rewards against the oracle" not in report.read_text()
    arms = load_scores(study)
    assert R._monitor_section(study, arms, tmp_path) == []
    uri = sorted(tracked_uris(study, arms))[0]
    run = search_runs(uri, study.experiment, f"tags.study = '{study.name}' AND tags.arm = 'more' AND tags.seed = '1'")
    client = mlflow_at(uri, True).tracking.MlflowClient()
    run_id = run.iloc[0]["run_id"]
    for step, gap in ((2, 0.05), (4, 0.12)):
        client.log_metric(run_id, "monitor/gap/learned", gap, step=step)
        client.log_metric(run_id, "monitor/oracle", 0.5, step=step)
    hist = loss_histories(study, arms, prefix="monitor/")
    assert {a for a, seeds in hist.items() if any(seeds.values())} == {"more"}
    assert set(hist["more"][1]) == {"monitor/gap/learned", "monitor/oracle"} and not hist["more"][0]
    # more's iterations continue ac-dmd's 6 (a later stage of the same arm would do the same)
    assert [v for _, v in hist["more"][1]["monitor/gap/learned"]] == [0.05, 0.12]
    lines = R._monitor_section(study, arms, tmp_path)
    assert "## Learned rewards against the oracle over training" in lines and "reward hacking" in " ".join(lines)
    assert (tmp_path / "monitor.png").is_file() and lines[-1] == "![learned rewards against the oracle](monitor.png)"


def test_precision_table_flags_wide_intervals_and_prices_the_target():
    from types import SimpleNamespace

    from benchmarks.study.precision import images_needed, precision_section
    from benchmarks.study.scores import ArmScores
    from benchmarks.study.units import UnitScores

    assert images_needed(4, 0.04) == 16 and images_needed(4, 0.01) == 4  # 4 x (0.04 / 0.02)^2; never fewer than now
    rng = np.random.default_rng(0)
    ref, arm = UnitScores(), UnitScores()
    for i in range(20):  # prompts 0-9: task x, the same scores in both arms; 10-19: task y, ref 0 and arm coin flips
        for k in range(4):
            task, v = ("x", float(rng.integers(0, 2))) if i < 10 else ("y", 0.0)
            ref.add("geneval", f"{i}:{k}", v, task)
            arm.add("geneval", f"{i}:{k}", v if task == "x" else float(rng.integers(0, 2)), task)
    arms = {"ref": ArmScores("ref", [0], [ref], {}, [{}]), "arm": ArmScores("arm", [0], [arm], {}, [{}])}
    study = SimpleNamespace(reference="ref", eval=SimpleNamespace(bootstrap=500, images_per_prompt=4))
    lines = precision_section(study, arms, ["geneval"])
    assert "Prompts per task: x 10, y 10 (x 4 images each)." in lines
    table = lines[lines.index("**arm**"):]
    x = next(line for line in table if line.startswith("| x |")).split(" | ")
    y = next(line for line in table if line.startswith("| y |")).split(" | ")
    assert x[3:] == ["+0.000", "0.000", "met |"]  # identical scores: the paired difference is exact
    hw = float(y[4].strip("*"))
    assert y[2].startswith("**") and y[4].startswith("**") and hw > 0.1  # 40 coin flips: about +-0.15
    need = int(y[5].rstrip(" |").replace(",", ""))  # 4 x (hw / 0.02)^2, hw unrounded in the table
    assert need == pytest.approx(4 * (hw / 0.02) ** 2, rel=0.02) and need > 100
    ref_y = next(line for line in lines[lines.index("**ref**"):] if line.startswith("| y |"))
    assert ref_y == "| y | 0.000 | 0.000 | - | - | - |"


def test_checkpoint_cost_of_a_two_stage_run_adds_the_earlier_stage(tmp_path):
    """A two-stage run folder (rtdmd: stage1/, stage2/): a stage-2 checkpoint costs stage 1's final checkpoint plus
    stage 2 up to it, each from its own meta.json and config.yaml (ttur, batch, accumulate)."""
    from rtdmd.api import make_config
    from rtdmd.config import dump

    def checkpoint(stage: str, step: int, cpu: float, method: str, over: dict) -> Path:
        d = tmp_path / "run" / stage / "checkpoints" / f"step_{step:06d}"
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(dump(make_config(method, backend="toy2d", overrides=over)))
        (d / "meta.json").write_text(json.dumps({"step": step, "run_train_cpu_seconds": cpu}))
        (d.parent / "latest").write_text(d.name + "\n")
        return d

    checkpoint("stage1", 10, 5.0, "ac-dmd", {"method": {"ttur": 3}, "train": {"batch_size": 8}})
    checkpoint("stage2", 4, 1.0, "dmd2", {"method": {"ttur": 2}, "train": {"batch_size": 4, "accumulate": 2}})
    last = checkpoint("stage2", 7, 2.5, "dmd2", {"method": {"ttur": 2}, "train": {"batch_size": 4, "accumulate": 2}})
    # stage 1: 10 iterations, ceil(10 / 3) = 4 updates x 8; stage 2 at step 7: ceil(7 / 2) = 4 updates x (4 x 2)
    want = {"iterations": 17, "generator_updates": 8, "generator_images": 4 * 8 + 4 * 8, "run_train_cpu_seconds": 7.5}
    assert execute.checkpoint_cost(last) == want
    assert execute.checkpoint_cost(tmp_path / "run" / "stage2" / "checkpoints" / "step_000004")["iterations"] == 14
    (tmp_path / "run" / "checkpoints").mkdir()
    (tmp_path / "run" / "checkpoints" / "latest").write_text("../stage2/checkpoints/step_000007\n")  # as rtdmd.stages
    assert execute.run_budget(tmp_path / "run") == want


def test_every_budget_arm_plans_the_study_budget(tmp_path):
    """Arms held to the budget plan exactly generator_updates x batch images (max_steps / ttur x batch x
    accumulate), with no wall-clock limit; an arm on another axis says budget: false."""
    base = {"name": "b", "backend": "toy2d", "out": str(tmp_path / "b"), "budget": {"generator_updates": 2, "batch": 16},
            "eval": {"suites": ["toy2d"], "prompts": 3},
            "arms": {"teacher": {"checkpoint": "runs/t"},
                     "dmd2": {"method": "dmd2", "overrides": TINY}}}  # 6 steps, ttur 5: 2 updates x 16
    p = tmp_path / "b.yaml"
    p.write_text(yaml.safe_dump(base))
    load_study(p)
    longer = {**base, "arms": {**base["arms"], "dmd2": {"method": "dmd2",
                                                       "overrides": {**TINY, "train": {**TINY["train"], "max_steps": 11}}}}}
    p.write_text(yaml.safe_dump(longer))
    with pytest.raises(UserError, match=r"arm 'dmd2' plans 3 generator updates x 16 images = 48, not the study budget 2 x 16 = 32"):
        load_study(p)
    timed = {**base, "arms": {**base["arms"], "dmd2": {"method": "dmd2",
                                                      "overrides": {**TINY, "train": {**TINY["train"], "max_minutes": 5}}}}}
    p.write_text(yaml.safe_dump(timed))
    with pytest.raises(UserError, match="max_minutes"):
        load_study(p)
    longer["arms"]["dmd2"]["budget"] = False
    p.write_text(yaml.safe_dump(longer))
    load_study(p)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "studies").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_study_files_load(path):
    """Every shipped study file passes the checks `study run` makes first (methods, suites, budgets, sweeps)."""
    s = load_study(path)
    assert s.arms and all(a.name in s.arms for a in s.order())
