"""Study runner features: an arm's sampler override (the teacher's weights as the 4-step CPS generator), FD-shapes
per image with a bootstrap interval, and a learning-rate sweep on held-out prompts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from benchmarks.study import execute
from benchmarks.study.spec import load_study
from rtdmd.errors import UserError
from tests.eval_fixtures import ckpt, one_torch_thread, tiny_bundle  # noqa: F401 (fixtures)
from tests.test_study import TINY, toy_teacher  # noqa: F401 (a module-scoped toy2d teacher fixture)


def _write(tmp_path: Path, data: dict, name: str = "s") -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


# ---------------------------------------------------------------------------- sampler: the step-0 arm


def test_sampler_mistakes_are_one_sentence(tmp_path):
    base = {"backend": "toy2d", "eval": {"suites": ["toy2d"]}}
    cases = [({"a": {"checkpoint": "x", "sampler": "ddim"}}, "sampler 'ddim'; use euler or cps"),
             ({"a": {"checkpoint": "x", "sampler": "euler", "eta": 0.5}}, "eta for the euler sampler")]
    for arms, fragment in cases:
        with pytest.raises(UserError, match=fragment):
            load_study(_write(tmp_path, {**base, "arms": arms}))
    assert load_study(_write(tmp_path, {**base, "arms": {"a": {"checkpoint": "x", "sampler": "cps"}}})).arms["a"].sampler == "cps"


def test_cps_arm_runs_the_teachers_weights_as_the_4_step_generator(tmp_path, toy_teacher):
    """Two arms of one checkpoint: its own sampler (Euler, 8 steps) and `sampler: cps` (4 steps, eta 0.9)."""
    import torch

    from rtdmd.checkpoint import find_checkpoint, load_for_inference
    from rtdmd.generate import SamplingConfig, generate_batched, sample_seed

    path = _write(tmp_path, {"backend": "toy2d", "out": str(tmp_path / "out"),
                             "eval": {"suites": ["toy2d"], "prompts": 2, "images_per_prompt": 4, "bootstrap": 100},
                             "arms": {"teacher": {"checkpoint": str(toy_teacher), "steps": 8},
                                      "step0": {"checkpoint": str(toy_teacher), "sampler": "cps", "steps": 4, "eta": 0.9}}})
    execute.run_study(path, progress=False)
    s = load_study(path)
    units = {a: json.loads((s.out / json.loads((execute.arm_dir(s, a, 0) / "eval.json").read_text())["final"]).read_text())
             for a in ("teacher", "step0")}
    assert units["teacher"]["metrics"] != units["step0"]["metrics"]
    _, backend, net, meta = load_for_inference(find_checkpoint(toy_teacher))
    assert meta["sampler"]["kind"] == "euler"
    x = generate_batched(backend, net, [("mode 0", sample_seed(0, 1, k)) for k in range(4)],
                         SamplingConfig(kind="cps", steps=4, eta=0.9)).double()
    mean, std = torch.tensor(backend.options.means[0]).double(), float(backend.options.stds[0])
    logp = -((x - mean) ** 2).sum(1) / (2 * std ** 2) - 2 * np.log(std) - np.log(2 * np.pi)
    got = [units["step0"]["metrics"]["toy2d/log_density"][f"1:{k}"] for k in range(4)]
    assert got == pytest.approx(logp.tolist())


def test_the_image_cache_keys_on_the_sampler(tmp_path, ckpt):
    """One checkpoint with its own sampler (cps) and with euler: separate image folders, different images."""
    from benchmarks import runner

    def opts(**kw):
        return runner.EvalOptions(suites=["geneval"], max_prompts=2, images_per_prompt=1, tracking=False,
                                  out=tmp_path / "evals", progress=False, batch_size=4, **kw)

    (own,) = runner.run_eval([ckpt], opts())
    (euler,) = runner.run_eval([ckpt], opts(sampler="euler"))
    assert own.image_dir.name.startswith("cps-s2") and euler.image_dir.name.startswith("euler-s2")
    assert euler.generated == 2  # nothing reused from the cps folder
    png = sorted(own.image_dir.rglob("*.png"))[0].relative_to(own.image_dir)
    assert (own.image_dir / png).read_bytes() != (euler.image_dir / png).read_bytes()
    with pytest.raises(UserError, match="sampler must be euler or cps"):
        runner.run_eval([ckpt], opts(sampler="ddim"))


# ---------------------------------------------------------------------------- FD over images with a bootstrap CI


def _gauss(n=2000, d=4, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d))


def test_fd_bootstrap_by_hand_on_gaussian_features():
    from benchmarks.fid import feature_statistics
    from benchmarks.study.stats import fd_bootstrap

    x = _gauss()
    mu, sigma = feature_statistics(x)
    assert abs(fd_bootstrap(x, mu, sigma, n_boot=100).diff) < 1e-9  # a sample against its own statistics
    shift = np.array([2.0, 0.0, 0.0, 0.0])  # |shift|^2 = 4; the covariance is unchanged
    d = fd_bootstrap(x + shift, mu, sigma, n_boot=400)
    assert d.diff == pytest.approx(4.0, rel=1e-9) and d.lo < d.diff < d.hi
    # FD ~ |shift + mean noise|^2: its sd is about 2 |shift| / sqrt(n), so the 95 % half-width about 1.96 x that
    assert d.half_width == pytest.approx(1.96 * 2 * 2.0 / np.sqrt(len(x)), rel=0.25)


def test_fd_bootstrap_paired_difference():
    from benchmarks.fid import feature_statistics
    from benchmarks.study.stats import fd_bootstrap

    x = _gauss(seed=1)
    mu, sigma = feature_statistics(_gauss(seed=2))  # an independent reference sample
    same = fd_bootstrap(x, mu, sigma, b=x, n_boot=200)
    assert same.diff == 0.0 and same.lo == 0.0 and same.hi == 0.0  # the same unit indices for both arms
    far, near = x + np.array([2.0, 0, 0, 0]), x + np.array([1.5, 0, 0, 0])
    d = fd_bootstrap(far, mu, sigma, b=near, n_boot=400)
    alone = fd_bootstrap(far, mu, sigma, n_boot=400)
    assert d.diff == pytest.approx(alone.diff - fd_bootstrap(near, mu, sigma, n_boot=100).diff)
    assert d.lo < d.diff < d.hi and d.diff == pytest.approx(4 - 2.25, abs=0.2)
    # FD(far) - FD(near) = 1.75 + 2 (mean noise) . (0.5, 0, 0, 0): paired, only the 0.5 part of the shared noise is
    # left (independent resamples would leave sqrt(2^2 + 1.5^2) of it)
    assert d.half_width == pytest.approx(1.96 * 2 * 0.5 / np.sqrt(len(x)), rel=0.3)
    assert d.half_width < alone.half_width / 2
    seeds = fd_bootstrap(np.stack([x, far]), mu, sigma, n_boot=100)  # two training seeds: the mean of their FDs
    assert seeds.seed_means_a == pytest.approx([fd_bootstrap(x, mu, sigma, n_boot=100).diff, alone.diff])
    assert seeds.diff == pytest.approx(np.mean(seeds.seed_means_a))


def test_fd_features_are_stored_as_plain_arrays_and_compared_on_shared_units(tmp_path):
    from benchmarks.fid import feature_statistics
    from benchmarks.study.units import UnitScores, feature_difference, load_units, save_units

    x = _gauss(n=40, seed=3)
    mu, sigma = feature_statistics(_gauss(n=40, seed=4))
    units = np.array([(i, k) for i in range(20) for k in range(2)])

    def scores(feats, order):
        s = UnitScores(summary={"fd_shapes": 0.0})
        s.features["fd_shapes"] = {"units": units[order], "features": feats[order], "ref_mu": mu, "ref_sigma": sigma}
        return s

    save_units(tmp_path / "units" / "step_000003.json", scores(x, np.arange(40)))
    back = load_units(tmp_path / "units" / "step_000003.json")
    assert (tmp_path / "units" / "step_000003.fd_shapes.npz").is_file()
    assert np.array_equal(back.features["fd_shapes"]["features"], x)
    shuffled = scores(x, np.random.default_rng(0).permutation(40))  # rows in another order: matched by unit
    assert feature_difference([back], [shuffled], "fd_shapes", 100).diff == 0.0
    other = scores(x, np.arange(40))
    other.features["fd_shapes"]["ref_mu"] = mu + 1
    with pytest.raises(UserError, match="different reference statistics"):
        feature_difference([back], [other], "fd_shapes", 100)
    np.save(tmp_path / "evil.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "units" / "step_000003.fd_shapes.npz").write_bytes((tmp_path / "evil.npy").read_bytes())
    with pytest.raises(UserError, match="unreadable"):  # never unpickled
        load_units(tmp_path / "units" / "step_000003.json")


def test_a_tiny_shapes_study_keeps_fd_features_and_reports_fd_with_an_interval(tmp_path, ckpt, tiny_bundle, monkeypatch):
    """Two arms of the tiny shapes checkpoint (its own cps sampler, and euler) on GenEval-shapes and FD-shapes."""
    from benchmarks.study.report import write_study_report
    from benchmarks.study.units import feature_difference, load_units

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    path = _write(tmp_path, {"name": "fd", "backend": "shapes", "out": str(tmp_path / "out"), "reference": "own",
                             "eval": {"suites": ["geneval", "fid"], "prompts": 4, "images_per_prompt": 2, "steps": 2,
                                      "bootstrap": 100},
                             "arms": {"own": {"checkpoint": str(ckpt)}, "euler": {"checkpoint": str(ckpt), "sampler": "euler"}}})
    execute.run_study(path, progress=False)
    s = load_study(path)
    finals = {a: load_units(s.out / json.loads((execute.arm_dir(s, a, 0) / "eval.json").read_text())["final"])
              for a in ("own", "euler")}
    for a, u in finals.items():
        f = u.features["fd_shapes"]
        assert f["features"].shape == (8, 16)  # 4 prompts x 2 images, the tiny bundle's 16 features
        assert set(f"{i}:{k}" for i, k in f["units"].tolist()) == set(u.metrics["geneval"])  # the same units
        alone = feature_difference([u], None, "fd_shapes", 100)
        assert alone.diff == pytest.approx(u.summary["fd_shapes"], rel=1e-9)  # the logged FD-shapes, recomputed
    d = feature_difference([finals["euler"]], [finals["own"]], "fd_shapes", 100)
    assert d.diff == pytest.approx(finals["euler"].summary["fd_shapes"] - finals["own"].summary["fd_shapes"], rel=1e-9)
    text = write_study_report(path, tmp_path / "rep" / "report.md").read_text()
    head = next(line for line in text.splitlines() if line.startswith("| arm - own |"))
    assert head == "| arm - own | geneval | fd_shapes |"
    rows = [line for line in text.splitlines() if line.startswith("| euler |") and "[" in line and line.count("|") == 4]
    score_row, diff_row = rows[0], rows[1]  # the score table (absolute FD, its interval over images), then the differences
    assert f"{d.diff:+.3f}" in diff_row.split("|")[3]
    assert score_row.split("|")[3].strip().startswith(f"{finals['euler'].summary['fd_shapes']:.2f} [")
    assert next(line for line in text.splitlines() if line.startswith("| arm | geneval")) == "| arm | geneval | fd_shapes |"


# ---------------------------------------------------------------------------- sweeps on held-out prompts


def _sweep_study(tmp_path: Path, teacher: Path, name: str, tracking: dict | None = None, **sweep) -> Path:
    over = {**TINY, "backend": {**TINY["backend"], "teacher": str(teacher)}, **({"tracking": tracking} if tracking else {})}
    return _write(tmp_path, {
        "name": name, "backend": "toy2d", "out": str(tmp_path / name), "reference": "teacher",
        "eval": {"suites": ["toy2d"], "prompts": 3, "images_per_prompt": 8, "bootstrap": 100, "curves": False},
        "arms": {"teacher": {"checkpoint": str(teacher), "steps": 8},
                 "dmd2": {"method": "dmd2", "overrides": over,
                          "sweep": {"key": "method.generator_optim.lr", "values": [1e-5, 3e-3], "max_steps": 2, **sweep}}},
        "claims": [{"name": "c", "arm": "dmd2", "versus": "teacher", "metric": "toy2d/log_density"}]}, name)


def test_sweep_choice_rule_and_spec_mistakes(tmp_path):
    from benchmarks.study.sweep import choose

    assert choose([3e-5, 1e-5, 1e-4], [0.5, 0.5, 0.4], "greater") == 1e-5  # a tie: the smaller value
    assert choose([3e-5, 1e-5, 1e-4], [0.5, 0.6, 0.4], "less") == 1e-4
    sw = {"key": "method.generator_optim.lr", "values": [1e-5, 3e-5], "max_steps": 2}
    base = {"backend": "toy2d", "eval": {"suites": ["toy2d"], "prompts": 3},
            "arms": {"a": {"method": "dmd2", "sweep": sw}}, "claims": [{"name": "c", "arm": "a", "versus": "a", "metric": "m"}]}
    s = load_study(_write(tmp_path, base))
    assert (s.arms["a"].sweep.metric, s.arms["a"].sweep.direction) == ("m", "greater")  # the first claim's
    assert [j.label for j in execute.plan(s)] == ["sweep a value #0", "sweep a value #1", "train a seed 0", "eval a seed 0"]
    cases = [({"eval": {"suites": ["toy2d"], "prompts": 0}}, "eval.prompts is 0"),
             ({"arms": {"a": {"checkpoint": "x", "sweep": sw}}}, "trains nothing"),
             ({"claims": []}, "no metric to choose by"),
             ({"arms": {"a": {"method": "dmd2", "sweep": {**sw, "values": [1e-5]}}}}, "at least 2 distinct"),
             ({"arms": {"a": {"method": "dmd2", "sweep": {**sw, "max_steps": 0}}}}, "max_steps must be a positive"),
             ({"arms": {"a": {"method": "dmd2", "sweep": {**sw, "key": "method.generator_optim.lrr"}}}},
              "unknown config key 'method.generator_optim.lrr'"),
             ({"arms": {"a": {"method": "dmd2", "sweep": {**sw, "key": "lr"}}}}, "not a dotted config key")]
    for change, fragment in cases:
        with pytest.raises(UserError, match=fragment):
            load_study(_write(tmp_path, {**base, **change}))
    with pytest.raises(UserError, match="leaves none of the 9 toy2d prompts"):  # the mixture and 8 modes, all evaluated
        execute.run_study(_write(tmp_path, {**base, "eval": {"suites": ["toy2d"], "prompts": 9}}), progress=False)
    from benchmarks.study.sweep import check_heldout

    shapes = {**base, "backend": "shapes", "eval": {"suites": ["geneval"], "prompts": 209}}
    check_heldout(load_study(_write(tmp_path, shapes)))  # every default prompt evaluated: the recipe draws new ones


def test_geneval_heldout_prompts_never_overlap_the_evaluation_and_mirror_its_task_mix():
    from collections import Counter

    from benchmarks.eval_prompts import stratified_indices
    from benchmarks.geneval.prompts import generate_metadata
    from benchmarks.study.sweep import heldout_entries

    classes = ["circle", "square", "triangle", "cross"]
    entries = generate_metadata(classes, exclude_color_class=None)  # 209: 4 single objects, 12 two-object, 12 counting
    draws = [generate_metadata(classes, seed=s, exclude_color_class=None) for s in range(1000, 1020)]
    key = lambda e: (e["tag"], e["prompt"])  # noqa: E731
    for n in (12, 24, 150, 209):
        used = Counter(entries[i]["tag"] for i in stratified_indices(entries, n))
        evaluated = {key(entries[i]) for i in stratified_indices(entries, n)}
        held, missing = heldout_entries(entries, n, draws)
        assert not {key(e) for e in held} & evaluated and len({key(e) for e in held}) == len(held)
        have = Counter(e["tag"] for e in held)
        assert all(have[t] <= used[t] for t in have) and set(have) | set(missing) == set(used)
        if n == 12:  # 2 per task: every task keeps 2 held-out prompts, single_object too (4 exist)
            assert have == used and missing == []
        if n == 150:  # the shapes study: the first three tasks are evaluated whole; colors and position nearly
            assert missing == ["counting", "single_object", "two_object"]
            assert have == {"colors": 2, "position": 5, "color_attr": used["color_attr"]}
    rest, _ = heldout_entries(entries, 150)  # without draws: only what the 209 leave out
    assert Counter(e["tag"] for e in rest) == {"position": 2, "color_attr": 41}  # 57 color_attr left, 41 evaluated
    with pytest.raises(UserError, match="takes every prompt a sweep could hold out"):
        heldout_entries(entries, len(entries))


def test_toy2d_sweep_scores_held_out_prompts_chooses_and_trains_with_the_choice(tmp_path, toy_teacher, monkeypatch):
    from benchmarks.study.report import write_study_report
    from benchmarks.study.sweep import choose
    from rtdmd.config import load_resolved

    monkeypatch.chdir(tmp_path)
    path = _sweep_study(tmp_path, toy_teacher, "sw")
    execute.run_study(path, progress=False)
    s = load_study(path)
    c = json.loads((s.out / "sweeps" / "dmd2.json").read_text())
    assert c["values"] == [1e-5, 3e-3] and c["metric"] == "toy2d/log_density" and c["heldout_prompts"] == 9 - 3
    means = [x["mean"] for x in c["scores"]]
    assert means[0] != means[1] and c["choice"] == choose(c["values"], means, "greater")
    assert all(x["lo"] <= x["mean"] <= x["hi"] and x["iterations"] == 2 for x in c["scores"])
    # each value minus the chosen one, paired over the same held-out units: the difference of the means
    chosen_mean = next(x["mean"] for x in c["scores"] if x["value"] == c["choice"])
    for x, v in zip(c["scores"], c["versus_choice"]):
        assert v["value"] == x["value"] and v["diff"] == pytest.approx(x["mean"] - chosen_mean, abs=1e-9)
        assert (v["lo"], v["hi"]) == ((0.0, 0.0) if x["value"] == c["choice"] else (v["lo"], v["hi"])) and v["lo"] <= v["diff"] <= v["hi"]
    held = json.loads((s.out / "sweeps/dmd2/value0/units.json").read_text())["metrics"]["toy2d/log_density"]
    final = json.loads((s.out / json.loads((execute.arm_dir(s, "dmd2", 0) / "eval.json").read_text())["final"]).read_text())
    evaluated = final["metrics"]["toy2d/log_density"]
    assert {k.split(":")[0] for k in held} == {"3", "4", "5", "6", "7", "8"} and not set(held) & set(evaluated)
    t = json.loads((execute.arm_dir(s, "dmd2", 0) / "train.json").read_text())
    assert t["sweep"] == {"method.generator_optim.lr": c["choice"]} and t["iterations"] == 6  # the arm's own budget
    assert load_resolved(s.out / t["checkpoint"] / "config.yaml").method.generator_optim.lr == c["choice"]
    # resumable: a lost score is rescored from the finished run; the arm waits for the choice, which is the same, so
    # it keeps its training and evaluation, and the study's numbers do not change
    trained = (execute.arm_dir(s, "dmd2", 0) / "train.json").read_text()
    (s.out / "sweeps/dmd2/value1/score.json").unlink()
    assert [j.label for j in execute.plan(s) if not execute.is_done(s, j)] == [
        "sweep dmd2 value #1", "train dmd2 seed 0", "eval dmd2 seed 0"]
    from benchmarks.study.status import status_lines

    lines = status_lines(path)
    assert any(ln.split()[:5] == ["waiting", "eval", "dmd2", "seed", "0"] and
               ln.endswith("has its record; it counts once 'sweep dmd2 value #1' is done") for ln in lines), lines
    execute.run_study(path, progress=False)
    assert json.loads((s.out / "sweeps" / "dmd2.json").read_text()) == c
    assert (execute.arm_dir(s, "dmd2", 0) / "train.json").read_text() == trained
    (s.out / "sweeps" / "dmd2.json").unlink()  # the choice file is rewritten by a train job that keeps its training
    execute.train_job(s, s.arms["dmd2"], 0, progress=False)
    assert json.loads((s.out / "sweeps" / "dmd2.json").read_text()) == c
    (s.out / "sweeps" / "dmd2.json").unlink()  # ... and by the sweep job that scores the last value
    execute.sweep_job(s, s.arms["dmd2"], 1, progress=False)
    assert json.loads((s.out / "sweeps" / "dmd2.json").read_text()) == c
    # a sweep score that now chooses the other value: the arm's training is stale, and the study says what to delete
    f = s.out / "sweeps/dmd2/value0/score.json"
    score = json.loads(f.read_text())
    f.write_text(json.dumps({**score, "mean": max(x["mean"] for x in c["scores"]) + 1.0}))
    with pytest.raises(UserError, match=r"'inputs' is done but|another 'sweep.value'"):
        execute.run_study(path, progress=False)
    f.write_text(json.dumps(score))
    # an interrupted run of the arm started with another value is not continued with the new one
    execute._check_partial_run(s.out / "sweeps/dmd2/value0/run", "method.generator_optim.lr", 1e-5)
    with pytest.raises(UserError, match=r"started with method.generator_optim.lr = 1e-05, but the sweep now chooses 0.003"):
        execute._check_partial_run(s.out / "sweeps/dmd2/value0/run", "method.generator_optim.lr", 3e-3)
    execute._check_partial_run(tmp_path / "nothing-yet", "method.generator_optim.lr", 3e-3)
    text = write_study_report(path, tmp_path / "rep" / "report.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| dmd2 | method.generator_optim.lr = ")]
    assert len(rows) == 2 and sum("**chosen**" in r for r in rows) == 1
    other = next(v for v in c["versus_choice"] if v["value"] != c["choice"])
    assert f"| {other['diff']:+.3f} [{other['lo']:+.3f}, {other['hi']:+.3f}] |" in text
    edge = "largest" if c["choice"] == 3e-3 else "smallest"  # a 2-value grid: the choice is always an end
    assert f"- dmd2: the chosen {c['choice']:g} is the {edge} value of its grid, so the best value may lie beyond it." in text
    from benchmarks.study.sweep import grid_edge

    assert [grid_edge([1e-5, 3e-5, 1e-4], v) for v in (1e-5, 3e-5, 1e-4)] == ["smallest", "", "largest"]
    assert f"= {c['choice']:g} |" in next(r for r in rows if "**chosen**" in r)


def test_the_loss_figure_leaves_out_the_sweep_runs(tmp_path, toy_teacher, monkeypatch):
    """Sweep runs train seed 0 with the arm's tags; the losses of the arm's seed 0 are its own run's alone."""
    from benchmarks.study.plots import loss_histories
    from benchmarks.study.scores import load_scores

    monkeypatch.chdir(tmp_path)
    path = _sweep_study(tmp_path, toy_teacher, "lossw", tracking={"enabled": True, "uri": f"sqlite:///{tmp_path / 'm.db'}"})
    data = yaml.safe_load(path.read_text())
    data["arms"]["dmd2"]["overrides"]["train"]["log_every"] = 1
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    execute.run_study(path, progress=False)
    s = load_study(path)
    hist = loss_histories(s, load_scores(s))
    steps = [st for st, _ in hist["dmd2"][0]["loss/fake_score"]]
    assert steps == list(range(1, 7)) or steps == list(range(6))  # the arm's 6 iterations, not 2 + 2 + 6


def test_sweep_jobs_run_in_parallel_to_the_same_choice(tmp_path, toy_teacher, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = _sweep_study(tmp_path, toy_teacher, "serial"), _sweep_study(tmp_path, toy_teacher, "parallel")
    execute.run_study(a, progress=False)
    execute.run_study(b, jobs=2, progress=False)
    ca, cb = (json.loads((tmp_path / n / "sweeps" / "dmd2.json").read_text()) for n in ("serial", "parallel"))
    assert ca == cb


def test_image_sweep_scores_only_held_out_prompts(tmp_path, ckpt, monkeypatch):
    """A sweep run's scoring on shapes: the prompt file holds what the evaluation leaves out, every task left kept."""
    from benchmarks.eval_models import describe_checkpoint
    from benchmarks.eval_prompts import stratified_indices
    from benchmarks.geneval.suite import default_metadata

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    path = _write(tmp_path, {"backend": "shapes", "out": str(tmp_path / "out"),
                             "eval": {"suites": ["geneval"], "prompts": 6, "images_per_prompt": 1, "steps": 2},
                             "arms": {"a": {"checkpoint": str(ckpt)}}})
    s = load_study(path)
    scores = execute.score_checkpoint(s, s.arms["a"], 0, ckpt, "cpu", False, held_out=tmp_path / "v")
    entries = default_metadata(describe_checkpoint(ckpt).info)
    evaluated = [entries[i] for i in stratified_indices(entries, 6)]
    held = [json.loads(line) for line in (tmp_path / "v" / "heldout.jsonl").read_text().splitlines()]
    scored = [held[int(k.split(":")[0])] for k in scores.metrics["geneval"]]
    assert len(scored) == 6 and not any(e in evaluated for e in scored)
    assert {e["tag"] for e in scored} == {e["tag"] for e in entries}  # 6 prompts, 6 tasks: one of each
