"""Learned shapes rewards: networks, Bradley-Terry labelling, the pair pool, training through the trainer, bundles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.shapes import pairs as P
from benchmarks.shapes import reward_models as RM
from benchmarks.shapes import reward_nets as RN
from rtdmd.errors import UserError
from rtdmd.rewards.base import Reward
from rtdmd.world.shapes import ALL_CLASSES, Scene, ShapeObject, WorldSpec, render, vocabulary

SPEC = WorldSpec(classes=("circle", "square", "triangle", "cross"))


from tests.eval_fixtures import one_torch_thread_per_module  # noqa: E402,F401  (autouse)


def _arch(**kw) -> RN.Architecture:
    return RN.Architecture(vocab=vocabulary(SPEC), n_classes=len(SPEC.classes), width=8, aesthetic_width=8,
                           encoder_width=8, embed_dim=8, text_hidden=8, feature_dim=16, **kw)


def _bundle(seed: int = 0) -> RM.RewardBundle:
    torch.manual_seed(seed)
    arch = _arch()
    nets = {n: arch.build(n).eval() for n in RN.NETWORKS}
    return RM.RewardBundle(nets["preference"], nets["aesthetic"], nets["encoder"], arch, SPEC, "test@sha256:0", {})


# ---------------------------------------------------------------------------- networks


def test_default_sizes_are_small():
    arch = RN.Architecture(vocab=vocabulary(SPEC), n_classes=4)
    for n in RN.NETWORKS:
        count = sum(p.numel() for p in arch.build(n).parameters())
        assert 50_000 < count < 1_000_000, (n, count)


def test_forward_shapes_and_gradients_reach_images():
    b = _bundle()
    x = torch.rand(3, 3, 32, 32, requires_grad=True)
    ids, mask = b.tokenize(["a photo of a red circle", "a photo of two squares", "a photo of a cross above a circle"], "cpu")
    r = b.preference(x, ids, mask)
    a = b.aesthetic(x)
    f = b.encoder.features(x)
    assert r.shape == (3,) and a.shape == (3,) and f.shape == (3, 16) and (f >= -0.3).all()  # SiLU floor
    (r.sum() + a.sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    out = b.encoder(torch.rand(2, 3, 64, 64))  # any image size: global pooling
    assert out["class_counts"].shape == (2, 4, RN.MAX_COUNT + 1) and out["occupancy"].shape == (2, 9)


def test_prompt_word_order_matters():
    b = _bundle()
    torch.nn.init.normal_(b.preference.trunk.film.weight, std=0.1)  # FiLM starts as the identity
    ids, mask = b.tokenize(["a photo of a circle left of a square", "a photo of a square left of a circle"], "cpu")
    x = torch.rand(1, 3, 32, 32).expand(2, -1, -1, -1)
    with torch.no_grad():
        r = b.preference(x, ids, mask)
    assert abs(float(r[0] - r[1])) > 1e-6


def test_reader_targets_hand_values_and_loss():
    scene = Scene([ShapeObject("circle", "red", 8, 16, 12), ShapeObject("circle", "red", 24, 8, 12),
                   ShapeObject("square", "blue", 16, 24, 11)])
    t = RN.reader_targets([scene, Scene([])], SPEC)
    red, blue = RN.GENEVAL_COLORS.index("red"), RN.GENEVAL_COLORS.index("blue")
    assert t["color_class_counts"][0, 0, red] == 2 and t["color_class_counts"][0, 1, blue] == 1
    assert int(t["color_class_counts"].sum()) == 3 and t["class_counts"][0].tolist() == [2, 1, 0, 0]
    # centroid of the two circles: x = (8 + 24) / 2 = 16 -> 0; y = (16 + 8) / 2 = 12 -> 12 / 32 * 2 - 1 = -0.25
    assert t["centroids"][0, 0].tolist() == pytest.approx([0.0, -0.25])
    assert t["present"][0].tolist() == [1, 1, 0, 0] and t["present"][1].sum() == 0
    reader = RN.SceneReader(4, width=8)
    out = reader(torch.rand(2, 3, 32, 32))
    assert reader.read(torch.rand(2, 3, 32, 32)).shape == (2, reader.out_dim)
    loss, logs = RN.reader_loss(out, t)
    assert loss.item() > 0 and 0.0 <= logs["reader/exact_counts"] <= 1.0
    # a reader that outputs the targets exactly (large one-hot logits) has only the centroid error of absent classes
    perfect = {"color_class_counts": F.one_hot(t["color_class_counts"], RN.MAX_COUNT + 1).float() * 50,
               "class_counts": F.one_hot(t["class_counts"], RN.MAX_COUNT + 1).float() * 50, "centroids": t["centroids"]}
    loss, logs = RN.reader_loss(perfect, t)
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and logs["reader/exact_counts"] == 1.0


def test_reader_preference_is_bounded_faithfulness_plus_weighted_quality():
    arch = _arch(preference_net="reader", checks=3, mirror_average=False)  # one view: compared with a direct call below
    net = arch.build("preference").eval()
    ids, mask = arch.tokenizer()(["a photo of a red circle", "a photo of two squares"])
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        f = net.faithfulness(x, ids, mask)
        r0 = net(x, ids, mask, torch.zeros(2))
        r1 = net(x, ids, mask, torch.ones(2))
    assert ((f > 0) & (f < 1)).all()
    assert r0.tolist() == pytest.approx((0.6 / 0.05 * f).tolist(), rel=1e-5)  # initial weights 0.6 / T and 0.4
    assert (r1 - r0).tolist() == pytest.approx([0.4, 0.4], rel=1e-5)
    r, read = net(x, ids, mask, torch.zeros(2), renders=torch.rand(3, 3, 32, 32))
    assert read["class_counts"].shape == (3, 4, RN.MAX_COUNT + 1)
    wide = _arch(preference_net="reader", checks=3, check_inputs="reading+hidden").build("preference")
    assert wide.checks[0].in_features == net.checks[0].in_features + wide.reader.hidden_dim
    assert wide.faithfulness(x, ids, mask).shape == (2,)
    # the shapes_pref reward of a bundle with this network feeds it the bundle's aesthetic logit
    b = _bundle()
    b = RM.RewardBundle(net, b.aesthetic, b.encoder, arch, SPEC, "test@sha256:0", {})
    got = RM.LearnedReward("shapes_pref", b)(x, ["a photo of a red circle", "a photo of two squares"])
    with torch.no_grad():
        want = net.scale * net(x, ids, mask, b.aesthetic(x)) + net.offset
    assert torch.allclose(got, want)


def test_mirror_average_makes_the_rewards_exactly_mirror_symmetric():
    b = _bundle()
    torch.nn.init.normal_(b.preference.trunk.film.weight, std=0.1)
    x = torch.rand(2, 3, 32, 32)
    p = ["a photo of a circle left of a square", "a photo of a red cross"]
    q = ["a photo of a circle right of a square", "a photo of a red cross"]
    for kind in ("shapes_pref", "shapes_aes"):
        r = RM.LearnedReward(kind, b)
        assert b.architecture.mirror_average
        assert torch.allclose(r(x, p), r(x.flip(-1), q), atol=1e-6)
        raw = r._raw_view(x, p)
        assert torch.allclose(r._raw(x, p), 0.5 * (raw + r._raw_view(x.flip(-1), q)))
    b.architecture.mirror_average = False
    assert not torch.allclose(RM.LearnedReward("shapes_pref", b)(x, p), RM.LearnedReward("shapes_pref", b)(x.flip(-1), q))


def test_calibration_offset_update_hand_computed():
    net = _bundle().aesthetic
    assert float(net.scale) == pytest.approx(0.05) and float(net.offset) == 0.0
    raw, target = torch.tensor([2.0, 4.0]), torch.tensor([0.5, 0.7])
    # estimate mean(target - 0.05 raw) = mean(0.4, 0.5) = 0.45; offset = 0.9 * 0 + 0.1 * 0.45
    net.calibrate(raw, target, momentum=0.9)
    assert float(net.offset) == pytest.approx(0.045)


def test_learned_reward_protocol_and_differentiability():
    b = _bundle()
    x = torch.rand(5, 3, 32, 32, requires_grad=True)
    prompts = ["a photo of a red circle"] * 5
    pref = RM.LearnedReward("shapes_pref", b, differentiable=True, batch_size=2)
    assert isinstance(pref, Reward) and pref.name == "shapes_pref" and pref.differentiable
    assert pref.identity == "shapes_pref[test@sha256:0]"
    s = pref(x, prompts)
    assert s.shape == (5,)
    s.sum().backward()
    assert x.grad.abs().sum() > 0
    # batching does not change scores; scores are scale * raw + offset, raw averaged over the image and its mirror
    ids, mask = b.tokenize(prompts, "cpu")
    with torch.no_grad():
        raw = 0.5 * (b.preference(x, ids, mask) + b.preference(x.flip(-1), ids, mask))  # no left / right to swap
        want = b.preference.scale * raw + b.preference.offset
    assert torch.allclose(s.detach(), want, atol=1e-5)
    aes = RM.LearnedReward("shapes_aes", b)
    assert not aes(x, prompts).requires_grad and aes(x, prompts).shape == (5,)
    with pytest.raises(UserError, match="one prompt per image"):
        aes(x, prompts[:2])
    with pytest.raises(UserError):
        RM.LearnedReward("oracle", b)


def test_encoder_targets_and_loss():
    scenes = [Scene([ShapeObject("circle", "red", 5, 5, 10), ShapeObject("circle", "blue", 27, 27, 10),
                     ShapeObject("cross", "red", 16, 16, 10)]), Scene([])]
    t = RN.encoder_targets(scenes, SPEC)
    assert t["class_counts"][0].tolist() == [2, 0, 0, 1] and t["class_counts"][1].tolist() == [0, 0, 0, 0]
    assert t["color_counts"][0, 0] == 2 and t["color_counts"][0, 4] == 1 and t["color_counts"][0].sum() == 3
    assert t["occupancy"][0].tolist() == [1, 0, 0, 0, 1, 0, 0, 0, 1] and t["occupancy"][1].sum() == 0
    enc = _bundle().encoder
    loss, logs = RN.encoder_loss(enc(render(scenes, SPEC).images), t)
    # an untrained head is near uniform: ln 5 per count head, ln 2 for occupancy
    assert float(loss.detach()) == pytest.approx(2 * math.log(5) + math.log(2), rel=0.2)
    assert set(logs) == {"encoder/class_count_acc", "encoder/color_count_acc"}


# ---------------------------------------------------------------------------- Bradley-Terry and pairs


def test_bradley_terry_probability_and_labels():
    assert float(P.preference_probability(0.6, 0.5, 0.1)) == pytest.approx(1 / (1 + math.exp(-1)))
    assert float(P.preference_probability(0.5, 0.5, 0.05)) == 0.5
    g = torch.Generator().manual_seed(0)
    y = P.bradley_terry_labels(torch.full((20000,), 0.6), torch.full((20000,), 0.5), 0.1, g)
    assert set(y.unique().tolist()) <= {0.0, 1.0}
    assert float(y.mean()) == pytest.approx(1 / (1 + math.exp(-1)), abs=0.01)
    y2 = P.bradley_terry_labels(torch.full((4,), 0.6), torch.full((4,), 0.5), 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(y2, y[:4])  # the generator decides
    with pytest.raises(UserError, match="temperature"):
        P.preference_probability(1.0, 0.0, 0.0)


def test_pairwise_agreement_and_group_pairs():
    pairs = P.within_group_pairs(np.array([0, 0, 1, 1, 1]))
    assert sorted(map(tuple, pairs.tolist())) == [(0, 1), (2, 3), (2, 4), (3, 4)]
    ref = np.array([0.1, 0.9, 0.5, 0.5, 0.2])
    score = np.array([1.0, 2.0, 3.0, 0.0, 1.0])
    # pair (2,3) is a reference tie (skipped); (0,1) agrees, (2,4) agrees, (3,4) disagrees
    assert P.pairwise_agreement(score, ref, pairs) == (pytest.approx(2 / 3), 3)
    assert P.pairwise_agreement(score, ref, pairs, min_gap=0.4) == (1.0, 1)


def _pool(groups: int = 3, per: int = 4) -> P.Pool:
    n = groups * per
    return P.Pool(images=np.zeros((n, 32, 32, 3), np.uint8), group=np.repeat(np.arange(groups), per),
                  prompts=[f"p{g}" for g in range(groups)], source=[""] * n, oracle=np.linspace(0, 1, n),
                  faithfulness=np.zeros(n), quality=np.zeros(n), terms=np.zeros((n, 5)))


def test_sample_pairs_same_group_and_any():
    pool = _pool()
    a, b = P.sample_pairs(pool, 500, torch.Generator().manual_seed(0), same_group=True)
    assert (a != b).all() and (pool.group[a] == pool.group[b]).all()
    assert len(set(zip(a.tolist(), b.tolist()))) == 3 * 4 * 3  # every ordered pair of each group appears
    a, b = P.sample_pairs(pool, 500, torch.Generator().manual_seed(0), same_group=False)
    assert (a != b).all() and (pool.group[a] != pool.group[b]).any()


def test_sample_groups_and_all_pairs():
    pool = _pool(groups=5, per=4)
    idx, slot = P.sample_groups(pool, 3, torch.Generator().manual_seed(0))
    assert len(idx) == 12 and slot.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for k in range(3):  # each slot holds one whole group
        assert sorted(idx[slot == k].tolist()) == [i for i in range(20) if pool.group[i] == pool.group[idx[slot == k][0]]]
    a, b = P.all_pairs(slot, same_group=True)
    assert len(a) == 3 * 6 and (slot[a] == slot[b]).all() and (a < b).all()  # C(4, 2) pairs per group
    a, b = P.all_pairs(slot, same_group=False)
    assert len(a) == 12 * 11 // 2 and len(set(zip(a.tolist(), b.tolist()))) == 66


def test_corruptions_change_the_image_deterministically():
    scene = Scene([ShapeObject("circle", "red", 9, 16, 12), ShapeObject("square", "blue", 24, 16, 11)])
    clean = P.corrupted_render(scene, [], np.random.default_rng(0), SPEC)
    for kind in P.CORRUPTIONS:
        a = P.corrupted_render(scene, [kind], np.random.default_rng(1), SPEC)
        b = P.corrupted_render(scene, [kind], np.random.default_rng(1), SPEC)
        assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
        assert np.array_equal(a, b), kind
        assert not np.array_equal(a, clean), kind
    with pytest.raises(UserError):
        P.corrupt_scene(scene, "explode", np.random.default_rng(0), SPEC)
    kinds = P.random_corruptions(np.random.default_rng(0), [0, 0, 1])
    assert len(kinds) == 2 and len(set(kinds)) == 2 and all(k in P.CORRUPTIONS for k in kinds)


def test_flip_prompt_swaps_left_and_right():
    assert P.flip_prompt("a photo of a circle left of a square") == "a photo of a circle right of a square"
    assert P.flip_prompt("a photo of a ring right of a cross") == "a photo of a ring left of a cross"
    assert P.flip_prompt("a photo of a ring above a cross") == "a photo of a ring above a cross"


# ---------------------------------------------------------------------------- training through the trainer


def test_independent_pairs_train_through_the_trainer(tmp_path):
    from rtdmd.api import make_config, run_training

    over = {"method": {"groups": 2, "heldout_groups": 1, "teacher_per_group": 0, "renders_per_group": 3,
                       "pool_dir": str(tmp_path / "pools"), "width": 8, "pairs": "independent",
                       "aesthetic_width": 8, "encoder_width": 8, "embed_dim": 8, "text_hidden": 8, "feature_dim": 16},
            "train": {"max_steps": 2, "batch_size": 4, "checkpoint_every": 2, "num_threads": 1, "device": "cpu"},
            "tracking": {"enabled": False}}
    result = run_training(make_config("reward", backend="shapes", overrides=over), out=tmp_path / "run", show_progress=False)
    assert {"loss/preference", "loss/aesthetic", "preference/batch_agreement"} <= set(result.last_logs)


def test_reader_preference_trains_through_the_trainer(tmp_path):
    from rtdmd.api import make_config, run_training

    over = {"method": {"groups": 2, "heldout_groups": 1, "teacher_per_group": 0, "renders_per_group": 3,
                       "pool_dir": str(tmp_path / "pools"), "width": 8, "preference_net": "reader", "checks": 2,
                       "reader_batch": 4, "groups_per_step": 2,
                       "aesthetic_width": 8, "encoder_width": 8, "embed_dim": 8, "text_hidden": 8, "feature_dim": 16},
            "train": {"max_steps": 2, "batch_size": 4, "checkpoint_every": 2, "num_threads": 1, "device": "cpu"},
            "tracking": {"enabled": False}}
    result = run_training(make_config("reward", backend="shapes", overrides=over), out=tmp_path / "run", show_progress=False)
    assert {"loss/preference", "loss/reader", "reader/exact_counts"} <= set(result.last_logs)
    bundle = RM.load_bundle(RM.export_bundle(result.run_dir, tmp_path / "bundle"))
    assert isinstance(bundle.preference, RN.ReaderPreferenceNet) and bundle.architecture.checks == 2
    s = RM.LearnedReward("shapes_pref", bundle)(torch.rand(2, 3, 32, 32), ["a photo of a circle"] * 2)
    assert s.shape == (2,) and torch.isfinite(s).all()


def test_short_training_runs_through_the_trainer(tmp_path):
    from rtdmd.api import make_config, run_training
    from rtdmd.checkpoint import find_checkpoint

    # renders only: loading the teacher costs ~10 s of imports (the teacher path is tested on the pool below)
    over = {"method": {"groups": 2, "heldout_groups": 1, "teacher_per_group": 0, "renders_per_group": 3,
                       "pool_dir": str(tmp_path / "pools"), "width": 8, "groups_per_step": 2,
                       "aesthetic_width": 8, "encoder_width": 8, "embed_dim": 8, "text_hidden": 8, "feature_dim": 16},
            "train": {"max_steps": 2, "batch_size": 4, "checkpoint_every": 2, "num_threads": 1, "device": "cpu"},
            "tracking": {"enabled": False}}
    cfg = make_config("reward", backend="shapes", overrides=over)
    result = run_training(cfg, out=tmp_path / "run", show_progress=False)
    step = find_checkpoint(result.run_dir)
    assert {f"net_{n}.safetensors" for n in RN.NETWORKS} <= {p.name for p in (step / "state").iterdir()}
    for n in ("preference", "aesthetic"):
        assert {f"loss/{n}", f"{n}/batch_agreement"} <= set(result.last_logs)
    assert "loss/encoder" in result.last_logs
    # the pool: 2 groups of 3 renders, labelled by the oracle, cached on disk
    pool_dirs = list((tmp_path / "pools").iterdir())
    assert len(pool_dirs) == 1 and pool_dirs[0].name.startswith("train-")
    # a checkpoint loads as a bundle, and an exported bundle gives the same scores
    from_ckpt = RM.load_bundle(result.run_dir)
    out = RM.export_bundle(result.run_dir, tmp_path / "bundle")
    from_bundle = RM.load_bundle(out)
    assert from_bundle.identity.startswith(str(out.resolve()) + "@sha256:")
    x = torch.rand(2, 3, 32, 32)
    for kind in ("shapes_pref", "shapes_aes"):
        s1 = RM.LearnedReward(kind, from_ckpt)(x, ["a photo of a circle"] * 2)
        s2 = RM.LearnedReward(kind, from_bundle)(x, ["a photo of a circle"] * 2)
        assert torch.equal(s1, s2)
    assert float(from_bundle.preference.offset) != 0.0  # calibrated against the oracle during training
    assert from_ckpt.meta["weights"]["preference"] == "ema_preference.safetensors"
    # recalibrated on a pool, each reward's mean over the pool is the reference's mean
    from benchmarks.shapes.reward_training import load_or_build_pool
    from rtdmd.registry import get_backend

    pool = load_or_build_pool(cfg.method, get_backend("shapes").factory(cfg.backend, "cpu"), "train", progress=False)
    assert len(pool) == 6 and all(s.startswith("render:") for s in pool.source)
    cal = RM.load_bundle(RM.export_bundle(result.run_dir, tmp_path / "calibrated", pool=pool))
    imgs = torch.from_numpy(pool.images).permute(0, 3, 1, 2).float() / 255
    pref = RM.LearnedReward("shapes_pref", cal)(imgs, pool.image_prompts())
    aes = RM.LearnedReward("shapes_aes", cal)(imgs, pool.image_prompts())
    assert float(pref.mean()) == pytest.approx(pool.oracle.mean(), abs=1e-5)
    assert float(aes.mean()) == pytest.approx(pool.quality.mean(), abs=1e-5)
    (out / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes()[:-8] + b"\0" * 8)
    RM._BUNDLES.clear()
    with pytest.raises(UserError, match="sha256"):
        RM.load_bundle(out)


class _CountingOracle:
    """The real oracle under another identity, counting its calls (to see what is relabelled)."""

    def __init__(self, identity):
        from benchmarks.shapes.oracle import PreferenceOracle

        self.inner, self.identity, self.calls = PreferenceOracle(SPEC), identity, 0

    def score_image(self, image, prompt):
        self.calls += 1
        return self.inner.score_image(image, prompt)


def test_pool_batches_teacher_samples_by_setting_and_relabels_without_regenerating(tmp_path):
    calls = []

    def teacher(prompts, keys, steps, guidance):  # a deterministic stand-in for the teacher sampler
        calls.append((len(prompts), steps, guidance))
        return torch.stack([render([Scene([ShapeObject("circle", "red", 16, 16, 12)])], SPEC).images[0]
                            * (1 - 0.01 * steps)] * len(prompts))

    cfg = P.PoolConfig(groups=3, teacher_per_group=2, renders_per_group=1, teacher_settings=[[2, 1.0], [3, 4.0]],
                       shard_groups=2)
    first = _CountingOracle("oracle-a")
    pool = P.build_pool(cfg, SPEC, tmp_path, teacher, first, key="k", progress=False)
    # 3 groups x (2 teacher + 1 render), two shards; teacher calls batched per setting within a shard
    assert len(pool) == 9 and len(pool.prompts) == 3 and first.calls == 9
    assert sorted(calls) == [(1, 2, 1.0), (1, 3, 4.0), (2, 2, 1.0), (2, 3, 4.0)]
    assert sorted(s for s in pool.source if s.startswith("teacher:")) == ["teacher:2x1"] * 3 + ["teacher:3x4"] * 3
    assert sum(s.startswith("render:") for s in pool.source) == 3
    assert (np.bincount(pool.group) == 3).all()
    again = P.build_pool(cfg, SPEC, tmp_path, teacher, first, key="k", progress=False)
    assert len(calls) == 4 and first.calls == 9 and np.array_equal(again.images, pool.images)  # all cached
    second = _CountingOracle("oracle-b")
    relabelled = P.build_pool(cfg, SPEC, tmp_path, teacher, second, key="k", progress=False)
    assert len(calls) == 4 and second.calls == 9  # new labels, same images
    assert np.array_equal(relabelled.oracle, pool.oracle)
    with pytest.raises(UserError, match="other settings"):
        P.build_pool(P.PoolConfig(groups=4), SPEC, tmp_path, teacher, first, key="k", progress=False)
    with pytest.raises(UserError, match="no teacher"):
        P.build_pool(cfg, SPEC, tmp_path / "other", None, first, key="k", progress=False)

    # a pool built in parts: shard 1 alone (another process's share), then the rest; same images as built at once
    part = _CountingOracle("oracle-a")
    assert P.build_pool(cfg, SPEC, tmp_path / "parts", teacher, part, key="k", progress=False, shards=[1]) is None
    assert part.calls == 3 and len(calls) == 6  # shard 1: one group x 3 images, 2 teacher settings
    whole = P.build_pool(cfg, SPEC, tmp_path / "parts", teacher, part, key="k", progress=False)
    assert part.calls == 9 and np.array_equal(whole.images, pool.images) and np.array_equal(whole.oracle, pool.oracle)


def test_bundle_errors(tmp_path):
    with pytest.raises(UserError, match="do not exist"):
        RM.load_bundle(tmp_path / "missing")
    with pytest.raises(UserError):
        RM.load_bundle(tmp_path)


def test_shipped_bundle_is_small_and_verified():
    files = sorted(p.name for p in RM.SHIPPED.iterdir())
    assert {"model.safetensors", "config.yaml", "bundle.json", "README.md"} <= set(files)
    assert (RM.SHIPPED / "model.safetensors").stat().st_size < 5 * 2**20
    b = RM.load_bundle()
    assert b.spec.classes == SPEC.classes and b.identity.startswith(str(RM.SHIPPED.resolve()) + "@sha256:")
    assert b.meta["sha256"] in (RM.SHIPPED / "README.md").read_text()
    assert set(ALL_CLASSES) >= set(b.spec.classes)
