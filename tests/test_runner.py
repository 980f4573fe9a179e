"""benchmarks.runner: prompt files, resumable sharded generation, suite scoring, one MLflow run per setting."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from benchmarks import runner
from benchmarks import eval_models as EM
from benchmarks import eval_prompts as EP
from benchmarks.geneval import layout
from benchmarks.geneval import suite as gsuite
from benchmarks.suites.registry import expand_suites, make_suite
from benchmarks.suites.base import BackendInfo, ImageItem
from rtdmd.errors import UserError
from tests.eval_fixtures import ckpt, one_torch_thread, tiny_bundle, tmp_bundle_path  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite MLflow store for the module (creating its tables takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _opts(tmp_path, **kw):
    base = dict(max_prompts=5, images_per_prompt=2, tracking=False, out=tmp_path / "evals", progress=False, batch_size=4)
    base.update(kw)
    return runner.EvalOptions(**base)


def _pngs(root: Path) -> dict[Path, tuple[int, bytes]]:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("samples/*.png"))}


# ---------------------------------------------------------------------------- small pieces


def test_nfe_counts_cfg_twice():
    assert runner.nfe(4, 1.0) == 4 and runner.nfe(4, 4.0) == 8 and runner.nfe(28, 0.0) == 56


def test_select_indices_evenly_spaced_and_bounds():
    assert EP.select_indices(5, None) == [0, 1, 2, 3, 4]
    assert EP.select_indices(5, 9) == [0, 1, 2, 3, 4]
    assert EP.select_indices(209, 5) == [0, 52, 104, 156, 208]
    assert EP.select_indices(10, 1) == [0]
    with pytest.raises(UserError, match="--max-prompts"):
        EP.select_indices(10, 0)


def test_task_quotas_as_equal_as_the_sizes_allow():
    assert EP.task_quotas([4, 12, 12, 38, 45, 98], 48) == [4, 9, 9, 9, 9, 8]  # 44 left after single_object: 9,9,9,9,8
    assert EP.task_quotas([4, 12, 12, 38, 45, 98], 200) == [4, 12, 12, 38, 45, 89]
    assert EP.task_quotas([4, 12, 12, 38, 45, 98], 8) == [2, 2, 1, 1, 1, 1]
    assert EP.task_quotas([5, 5, 5, 5, 5, 5], 3) == [1, 0, 1, 0, 0, 1]  # fewer prompts than tasks: spread tasks
    assert sum(EP.task_quotas([3, 0, 7], 6)) == 6 and EP.task_quotas([3, 0, 7], 6)[1] == 0


def test_max_prompts_is_stratified_by_task_and_deterministic():
    from collections import Counter

    from benchmarks.geneval.prompts import generate_metadata

    entries = generate_metadata(["circle", "square", "triangle", "cross"], exclude_color_class=None)
    sizes = Counter(e["tag"] for e in entries)
    for n in (6, 8, 48, 200):
        idx = EP.stratified_indices(entries, n)
        got = Counter(entries[i]["tag"] for i in idx)
        assert len(idx) == n and idx == sorted(set(idx)) and set(got) == set(sizes)  # every task kept
        big = [t for t in got if got[t] < sizes[t]]  # tasks not taken whole differ by at most one
        assert not big or max(got[t] for t in big) - min(got[t] for t in big) <= 1
        assert all(got[t] <= max(got[u] for u in big) for t in got if t not in big) if big else True  # whole: small
        assert EP.stratified_indices(entries, n) == idx
    assert EP.stratified_indices(entries, None) == list(range(len(entries)))
    # plain prompts are one task: evenly spaced; absent entries (None) are never chosen
    assert EP.stratified_indices([{"prompt": str(i)} for i in range(209)], 5) == [0, 52, 104, 156, 208]
    assert EP.stratified_indices([None, {"prompt": "a"}, None, {"prompt": "b"}], 5) == [1, 3]
    with pytest.raises(UserError, match="--max-prompts"):
        EP.stratified_indices(entries, 0)


def test_unknown_suite_and_all():
    assert expand_suites(["all"]) == ["geneval", "preference", "aesthetic", "fid"]
    assert expand_suites("geneval,fid geneval") == ["geneval", "fid"]
    with pytest.raises(UserError, match=r"unknown suite 'clip'; choose one of geneval, preference, aesthetic, fid or all"):
        expand_suites(["clip"])


def test_prompt_files_plain_and_geneval(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a photo of a circle\n\n  a photo of two squares  \n")
    assert EP.read_prompt_file(txt) == ([{"prompt": "a photo of a circle"}, {"prompt": "a photo of two squares"}], False)
    jl = tmp_path / "g.jsonl"
    jl.write_text(json.dumps({"tag": "single_object", "include": [{"class": "circle", "count": 1}],
                              "prompt": "a photo of a circle"}) + "\n")
    entries, geneval = EP.read_prompt_file(jl)
    assert geneval and entries[0]["tag"] == "single_object"


@pytest.mark.parametrize("content, match", [
    (b"", "holds no prompts"),
    (b"\n  \n", "holds no prompts"),
    (b"\xff\xfe\x00bad", "not UTF-8"),
    (b'{"tag": "single_object", "prompt": "x"}\n', r"line 1: missing 'include'"),
    (b'{"tag": "single_object", "include": [], "prompt": "x"}\n{not json\n', "line 1"),
    (b"a prompt\nwith a \x00 nul\n", "line 2: contains a NUL"),
])
def test_malformed_prompt_files(tmp_path, content, match):
    p = tmp_path / "bad.txt"
    p.write_bytes(content)
    with pytest.raises(UserError, match=match) as e:
        EP.read_prompt_file(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="does not exist"):
        EP.read_prompt_file(tmp_path / "absent.txt")


def test_geneval_suite_refuses_plain_prompts(tmp_path, ckpt):
    p = tmp_path / "p.txt"
    p.write_text("a photo of a circle\n")
    with pytest.raises(UserError, match="needs GenEval prompt entries"):
        runner.run_eval([ckpt], _opts(tmp_path, prompts_file=p))
    assert not (tmp_path / "evals").exists()  # refused before generating anything


def test_bad_options_are_user_errors(tmp_path, ckpt):
    for kw, match in ((dict(steps=0), "--steps"), (dict(images_per_prompt=-1), "--images-per-prompt"),
                      (dict(eta=1.5), "--eta"), (dict(suites=["nope"]), "unknown suite")):
        with pytest.raises(UserError, match=match):
            runner.run_eval([ckpt], _opts(tmp_path, **kw))


# ---------------------------------------------------------------------------- generation


def test_eval_generates_scores_and_writes_artifacts(tmp_path, ckpt):
    res = runner.run_eval([ckpt], _opts(tmp_path))
    (r,) = res
    assert r.suite == "geneval" and r.steps == 2 and r.guidance == 1.0 and r.generated == 10
    assert 0.0 <= r.metrics["geneval/overall"] <= 1.0
    assert len(_pngs(r.image_dir)) == 10
    rows = [json.loads(line) for line in (r.eval_dir / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"} <= set(rows[0])
    per_prompt = (r.eval_dir / "per_prompt.csv").read_text().splitlines()
    assert per_prompt[0] == "index,prompt,tag,n_images,geneval" and len(per_prompt) == 6
    assert (r.image_dir / "eval" / "grid.png").is_file() and len((r.image_dir / "eval" / "grid_prompts.txt").read_text().split("\n")) == 6
    # the per-prompt fractions reproduce the logged task accuracies
    import pandas as pd

    df = pd.read_csv(r.eval_dir / "per_prompt.csv")
    for tag, g in df.groupby("tag"):
        assert g["geneval"].mean() == pytest.approx(r.metrics[f"geneval/{tag}"])


def test_resume_regenerates_only_missing_or_broken_images(tmp_path, ckpt, monkeypatch):
    opts = _opts(tmp_path)
    # an eval killed after its first batch of 4 images ...
    import rtdmd.generate as G

    real = G.generate

    calls = []

    def dying(backend, net, prompts, keys, sc):
        if calls:
            raise KeyboardInterrupt
        calls.append(len(keys))
        return real(backend, net, prompts, keys, sc)

    monkeypatch.setattr(G, "generate", dying)
    with pytest.raises(KeyboardInterrupt):
        runner.run_eval([ckpt], opts)
    monkeypatch.setattr(G, "generate", real)
    first = _pngs(tmp_path / "evals")
    assert len(first) == 4 and not list((tmp_path / "evals").rglob("*.tmp*"))
    # ... and restarted generates the other 6, leaving the 4 finished files untouched
    (r,) = runner.run_eval([ckpt], opts)
    assert r.generated == 6
    after = _pngs(r.image_dir)
    assert len(after) == 10 and all(after[p] == first[p] for p in first)
    # a deleted and a truncated image are the only ones regenerated, bit-identical to before
    paths = sorted(after)
    paths[1].unlink()
    paths[7].write_bytes(after[paths[7]][1][:-9])
    (r2,) = runner.run_eval([ckpt], opts)
    assert r2.generated == 2
    again = _pngs(r.image_dir)
    assert {p for p in again if again[p][0] != after[p][0]} == {paths[1], paths[7]}
    assert all(again[p][1] == after[p][1] for p in again)
    (r3,) = runner.run_eval([ckpt], opts)
    assert r3.generated == 0 and r3.metrics == r2.metrics


class _FakeProcs:
    def __init__(self, rank, world):
        self.rank, self.world = rank, world

    main = property(lambda self: self.rank == 0)

    def barrier(self):
        pass

    def agree(self, error):
        if error is not None:
            raise error


def test_generation_bar_moves_every_sampling_step(tmp_path, ckpt, monkeypatch):
    from rtdmd.checkpoint import load_for_inference
    from rtdmd.generate import SamplingConfig

    updates = []

    class Bar:
        def __init__(self, total, **kw):
            self.total = total

        def update(self, n):
            updates.append(n)

        def close(self):
            pass

    monkeypatch.setattr(gsuite, "tqdm", Bar)
    _, backend, net, _ = load_for_inference(ckpt)
    meta = [{"prompt": "a photo of a circle"}, {"prompt": "a photo of a square"}]
    for kind, steps, want in (("cps", 2, [2, 2, 1, 1]), ("euler", 4, [1, 1, 1, 1, 1, 1])):
        updates.clear()
        n = gsuite.generate_images(backend, net, meta, tmp_path / kind, SamplingConfig(kind, steps, 1.0, 0.9),
                                   images_per_prompt=3, batch_size=4, progress=True)
        assert n == 6 and sum(updates) == 6 and updates == want, (kind, updates)  # 4 + 2 images, in steps


def test_sharded_generation_equals_one_process(tmp_path, ckpt):
    """Each rank generates its share of the missing images; together they equal one process's images."""
    model = EM.describe_checkpoint(ckpt)
    opts = _opts(tmp_path, batch_size=3)
    sc = runner._sampling(model, opts)
    entries = gsuite.default_metadata(model.info)
    ps = EP.PromptSet("default", entries, EP.select_indices(len(entries), 5), True)
    one, two = tmp_path / "one", tmp_path / "two"
    cache: dict = {}
    assert runner._generate(model, sc, ps, one, opts, _FakeProcs(0, 1), "cpu", cache) == 10
    # simulated 2 ranks: both list the missing images before either writes (the runner's barrier)
    gsuite.prepare_prompt_dirs(two, entries, ps.indices)
    todo = gsuite.missing_images(two, ps.indices, 2)
    backend, net = cache["net"]
    for rank in (1, 0):
        gsuite.generate_images(backend, net, entries, two, sc, 2, opts.seed, batch_size=4, shard=(rank, 2),
                               progress=False, indices=ps.indices, todo=todo)
    a, b = _pngs(one), _pngs(two)
    assert [p.relative_to(one) for p in a] == [p.relative_to(two) for p in b]
    # the same samples: a batch's composition moves float32 values by ~1e-7, at most one uint8 level
    from rtdmd.images import load_png

    for pa, pb in zip(a, b):
        x, y = load_png(pa).astype(int), load_png(pb).astype(int)
        assert np.abs(x - y).max() <= 1 and (x != y).mean() < 0.01


# ---------------------------------------------------------------------------- --images


def test_images_folder_scored_without_generation(tmp_path, ckpt):
    (r,) = runner.run_eval([ckpt], _opts(tmp_path))
    (s,) = runner.run_eval([ckpt], _opts(tmp_path, images_dir=r.image_dir, out=tmp_path / "other"))
    assert s.generated == 0 and s.metrics == r.metrics and not (tmp_path / "other").exists()


def test_missing_and_unreadable_images(tmp_path, ckpt):
    (r,) = runner.run_eval([ckpt], _opts(tmp_path))
    victim = layout.image_path(r.image_dir, 0, 1)
    victim.unlink()
    with pytest.raises(UserError, match=f"image {victim} is missing"):
        runner.run_eval([ckpt], _opts(tmp_path, images_dir=r.image_dir))
    victim.write_bytes(b"not a png at all")
    with pytest.raises(UserError, match=f"{victim} is not a complete PNG"):
        runner.run_eval([ckpt], _opts(tmp_path, images_dir=r.image_dir))
    # a complete-looking PNG with garbage inside: the scorer names the file
    good = layout.image_path(r.image_dir, 0, 0).read_bytes()
    victim.write_bytes(good[:8] + b"\x00" * 40 + good[-12:])
    with pytest.raises(UserError, match=str(victim)):
        runner.run_eval([ckpt], _opts(tmp_path, images_dir=r.image_dir))
    with pytest.raises(UserError, match="does not exist"):
        runner.run_eval([ckpt], _opts(tmp_path, images_dir=tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no <index:05d> prompt folders"):
        runner.run_eval([ckpt], _opts(tmp_path, images_dir=tmp_path / "empty"))


def test_reward_suite_scores_per_image_and_prompt(tmp_path):
    """RewardSuite with an explicit reward: per-image rows, per-prompt means, metric = mean."""
    import torch

    from benchmarks.suites.preference import PreferenceSuite

    class Brightness:
        name, differentiable, identity = "bright", False, "mean-pixel"

        def __call__(self, images, prompts):
            assert images.shape[1] == 3 and len(prompts) == images.shape[0]
            return images.mean(dim=(1, 2, 3))

    items = []
    for i, level in ((0, 0), (3, 51)):
        layout.write_prompt_dir(tmp_path, i, {"prompt": f"p{i}"})
        for k in range(2):
            arr = np.full((4, 4, 3), level + 51 * k, np.uint8)
            items.append(ImageItem(i, k, {"prompt": f"p{i}"}, layout.save_image(tmp_path, i, k, arr)))
    s = PreferenceSuite([Brightness()])
    s.load(BackendInfo("shapes", None), "cpu")
    res = s.score(items, BackendInfo("shapes", None), progress=False)
    assert res.metrics["reward/bright"] == pytest.approx((0 + 0.2 + 0.2 + 0.4) / 4)
    assert [r["reward/bright"] for r in res.per_prompt] == pytest.approx([0.1, 0.3])
    assert [r["index"] for r in res.per_prompt] == [0, 3] and res.tags["scorers"] == "bright=mean-pixel"
    assert torch.tensor([r["bright"] for r in res.per_image]).tolist() == pytest.approx([0, 0.2, 0.2, 0.4])


def test_fid_suite_on_real_backend_needs_reference_and_inception(tmp_path, monkeypatch):
    import benchmarks.fid as F

    info = BackendInfo("sd3", None)
    with pytest.raises(UserError, match="needs --fid-reference"):
        make_suite("fid").load(info)
    monkeypatch.setattr(F, "INCEPTION_DIRS", (tmp_path / "weights",))
    with pytest.raises(UserError, match=r"inception-2015-12-05.pt are missing \(looked at .*weights/inception-2015-12-05.pt\); download"):
        make_suite("fid", fid_reference=str(tmp_path)).load(info)


# ---------------------------------------------------------------------------- MLflow


def test_one_mlflow_run_per_checkpoint_and_sampler_holds_every_suite(tmp_path, ckpt, store, tiny_bundle):
    import time

    import mlflow

    opts = dict(tracking=True, tracking_uri=store, experiment="runner-test", command="rtdmd-bench eval --test",
                tags={"arm": "teacher-a", "seed": "7"})
    t0 = time.time()
    (a,) = runner.run_eval([ckpt], _opts(tmp_path, steps=2, **opts))
    (aes,) = runner.run_eval([ckpt], _opts(tmp_path, steps=2, suites=["aesthetic"], **opts))  # same images: same run
    (b,) = runner.run_eval([ckpt], _opts(tmp_path, steps=3, **opts))
    (c,) = runner.run_eval([ckpt], _opts(tmp_path, steps=2, seed=1, **opts))
    (a2,) = runner.run_eval([ckpt], _opts(tmp_path, steps=2, **opts))  # a rerun reuses its run
    assert aes.run_id == a.run_id == a2.run_id and aes.generated == 0 and len({a.run_id, b.run_id, c.run_id}) == 3
    mlflow.set_tracking_uri(store)
    df = mlflow.search_runs(experiment_names=["runner-test"], filter_string="tags.kind = 'eval'")
    assert len(df) == 3
    run = mlflow.get_run(a.run_id)
    p, t, m = run.data.params, run.data.tags, run.data.metrics
    sha = EM.describe_checkpoint(ckpt).meta["model_sha256"]
    assert p["checkpoint"] == f"run/checkpoints/step_000003@{sha[:8]}" and not any(v.startswith("/") for v in p.values())
    assert p["method"] == "teacher" and p["backend"] == "shapes" and p["prompt_set"] == "default:shapes"
    assert (p["sampler"], p["steps"], p["guidance"], p["eta"], p["seed"]) == ("cps", "2", "1.0", "0.9", "0")
    assert p["images_per_prompt"] == "2" and p["prompt_count"] == "5"
    assert t["kind"] == "eval" and t["suites"] == "aesthetic,geneval" and t["geneval.detector"].startswith("shapes-detector")
    assert t["aesthetic.scorers"] == "shapes_aes=shapes_aes[tiny-bundle@sha256:0]"  # no absolute path
    assert (t["method"], t["arm"], t["seed"], t["backend"], t["train_seconds"]) == ("teacher", "teacher-a", "7", "shapes", "120")
    assert t["nfe"] == "2" and t["git_commit"] and t["command"] == "rtdmd-bench eval --test" and "train_run_id" in t
    assert m["geneval/overall"] == pytest.approx(a2.metrics["geneval/overall"]) and m["nfe"] == 2
    assert m["reward/shapes_aes"] == pytest.approx(aes.metrics["reward/shapes_aes"])
    # the run's span is the time spent generating and scoring its images, logged as metrics too
    assert m["generate_seconds"] > 0 and m["score_seconds"] == pytest.approx(
        m["score_seconds/geneval"] + m["score_seconds/aesthetic"])
    assert abs(run.info.end_time - run.info.start_time - 1000 * (m["generate_seconds"] + m["score_seconds"])) <= 2
    assert t0 * 1000 <= run.info.start_time <= t0 * 1000 + 1000 * a.seconds["generate"] + 60_000
    arts = {f.path for f in mlflow.tracking.MlflowClient().list_artifacts(a.run_id)}
    assert {"geneval", "aesthetic", "grid.png", "grid_prompts.txt"} <= arts
    inner = {f.path for f in mlflow.tracking.MlflowClient().list_artifacts(a.run_id, "geneval")}
    assert inner == {"geneval/results.jsonl", "geneval/per_prompt.csv", "geneval/summary.json"}
    (g,) = runner.run_eval([ckpt], _opts(tmp_path, steps=2, guidance=3.0, **opts))
    assert mlflow.get_run(g.run_id).data.tags["nfe"] == "4"


def test_default_checkpoints_newest_per_method_plus_teacher(tmp_path, ckpt, store):
    import shutil
    import time

    import mlflow

    mlflow.set_tracking_uri(store)
    mlflow.set_experiment("train-exp")
    dirs = {}
    for name, method in (("old", "dmd2"), ("new", "dmd2"), ("lcm", "lcm"), ("gone", "hypersd")):
        d = tmp_path / name
        if name != "gone":
            shutil.copytree(ckpt.parent.parent, d)
        dirs[name] = d
        time.sleep(0.01)  # distinct start times: the newest run of a method wins
        with mlflow.start_run():
            mlflow.set_tags({"kind": "train", "method": method, "backend": "shapes", "run_dir": str(d)})
    with mlflow.start_run():  # an eval run is not a training run
        mlflow.set_tags({"kind": "eval", "method": "rtdmd", "backend": "shapes", "run_dir": str(dirs["old"])})
    warnings = []
    found = EM.default_checkpoints("train-exp", store, warn=warnings.append)
    step = ckpt.name
    assert found == [(dirs["lcm"] / "checkpoints" / step).resolve(), (dirs["new"] / "checkpoints" / step).resolve(),
                     EM.SHIPPED_TEACHER.resolve()]
    assert len(warnings) == 1 and "hypersd" in warnings[0]
    assert EM.default_checkpoints("no-such-experiment", store) == [EM.SHIPPED_TEACHER.resolve()]


def _rank_eval(ckpt: str, out: str):
    """One rank of a 2-process eval (spawned like torchrun: WORLD_SIZE/RANK in the environment)."""
    import torch

    torch.set_num_threads(1)
    res = runner.run_eval([ckpt], runner.EvalOptions(max_prompts=3, images_per_prompt=2, tracking=False,
                                                     out=Path(out), progress=False, batch_size=2, device="cpu"))
    from rtdmd.distributed import rank

    Path(out, f"rank{rank()}.json").write_text(json.dumps([r.generated for r in res] + [r.metrics for r in res]))


@pytest.mark.slow
def test_two_processes_share_generation_and_rank0_scores(tmp_path, ckpt):
    from rtdmd import distributed as D

    D.spawn(_rank_eval, 2, args=(str(ckpt), str(tmp_path / "two")))
    r0 = json.loads((tmp_path / "two" / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "two" / "rank1.json").read_text())
    assert r0[0] == 3 and r1 == []  # rank 0 generated 3 of the 6 images and scored; rank 1 generated 3, no results
    (one,) = runner.run_eval([ckpt], _opts(tmp_path, max_prompts=3, out=tmp_path / "one"))
    assert one.generated == 6 and one.metrics == r0[1]
    a, b = _pngs(tmp_path / "one"), _pngs(tmp_path / "two")
    assert [p.relative_to(tmp_path / "one") for p in a] == [p.relative_to(tmp_path / "two") for p in b]


def test_preference_suite_end_to_end_with_the_oracle(tmp_path, ckpt, monkeypatch):
    """The preference suite through the runner, with the registry's oracle (the learned rewards need the shipped bundle)."""
    import benchmarks.rewards as BR

    monkeypatch.setattr(BR, "suite_rewards", lambda backend, suite: ["oracle"])
    (g,) = runner.run_eval([ckpt], _opts(tmp_path))
    (p,) = runner.run_eval([ckpt], _opts(tmp_path, suites=["preference"]))
    assert p.generated == 0 and p.image_dir == g.image_dir  # same prompts -> the same images, not regenerated
    rows = [json.loads(x) for x in (p.eval_dir / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and all(0.0 <= r["oracle"] <= 1.0 for r in rows)
    assert p.metrics["reward/oracle"] == pytest.approx(np.mean([r["oracle"] for r in rows]))
    import pandas as pd

    df = pd.read_csv(p.eval_dir / "per_prompt.csv")
    assert list(df.columns) == ["index", "prompt", "tag", "n_images", "reward/oracle"] and len(df) == 5


@pytest.mark.parametrize("suite, fragments", [
    ("preference", ("xswu/HPSv2", "huggingface-cli download")),
    ("aesthetic", ("weights/sac+logos+ava1-l14-linearMSE.pth", "place the file there")),
])
def test_missing_real_scorer_weights_name_path_and_fix(suite, fragments, monkeypatch, tmp_path):
    import benchmarks.scorers.clip_family as CF

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as HC

    monkeypatch.setattr(HC, "HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty cache, wherever the real one is
    monkeypatch.setattr(CF, "AESTHETIC_DEFAULT", tmp_path / "weights" / CF.AESTHETIC_FILE)
    with pytest.raises(UserError) as e:
        make_suite(suite).load(BackendInfo("sd3", None), "cpu")
    assert all(f in str(e.value) for f in fragments), str(e.value)


def test_suite_all_on_shapes_generates_once_and_reports_every_metric(tmp_path, ckpt, tiny_bundle):
    """--suite all: one image folder, then GenEval, oracle + learned rewards, FD-shapes (a random tiny reward bundle)."""
    res = {r.suite: r for r in runner.run_eval([ckpt], _opts(tmp_path, suites=["all"], max_prompts=4))}
    assert list(res) == ["geneval", "preference", "aesthetic", "fid"]
    assert len({r.image_dir for r in res.values()}) == 1 and res["geneval"].generated == 8
    assert set(res["preference"].metrics) == {"reward/oracle", "reward/shapes_pref"}
    assert set(res["aesthetic"].metrics) == {"reward/shapes_aes"}
    assert set(res["fid"].metrics) == {"fd_shapes"} and res["fid"].metrics["fd_shapes"] >= 0
    assert all(np.isfinite(v) for r in res.values() for v in r.metrics.values())
    assert json.loads((res["fid"].eval_dir / "summary.json").read_text())["tags"]["scorers"] == f"shapes_encoder={tmp_bundle_path()}@sha256:0"
