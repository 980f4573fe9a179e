"""Studies: paired statistics against hand values, the study file's checks, and a 2-arm, 2-seed toy2d study end to
end (run, interrupted run that resumes to the same numbers, parallel jobs, report with verdicts)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from benchmarks.study import execute
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
    monkeypatch.setattr(T.Trainer, "_one_step", real_step)
    execute.run_study(cut, progress=False)  # the same command continues
    assert _finals(cut) == _finals(full)

    report = write_study_report(full, tmp_path / "rep" / "report.md")
    text = report.read_text()
    assert "| (b) AC-DMD vs DMD2 | ac-dmd > dmd2 | toy2d/log_density |" in text
    assert any(w in text for w in ("**supported**", "**not supported**", "**inconclusive**"))
    assert (report.parent / "curve_toy2d_in_mode.png").is_file()
    t = json.loads((tmp_path / "full/arms/dmd2/seed1/train.json").read_text())
    assert t["iterations"] == 6 and t["generator_updates"] == 2 and t["generator_images"] == 32
    assert "cpu_seconds_last_attempt" not in t and t["train_cpu_seconds"] > 0


def test_parallel_jobs_give_the_same_numbers(tmp_path, toy_teacher, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = _study(tmp_path, toy_teacher, "serial"), _study(tmp_path, toy_teacher, "parallel")
    execute.run_study(a, progress=False)
    execute.run_study(b, jobs=2, progress=False)
    assert _finals(a) == _finals(b)


def test_report_of_an_unfinished_study_says_how_to_finish(tmp_path, toy_teacher):
    from benchmarks.study.report import write_study_report

    with pytest.raises(UserError, match="study run"):
        write_study_report(_study(tmp_path, toy_teacher, "new"))


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
