"""The shapes world: geometry of the renderer, scene sampling, GenEval caption grammar."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rtdmd.errors import UserError
from rtdmd.world.shapes import (
    ALL_CLASSES,
    CROSS_ARM,
    GENEVAL_COLORS,
    PALETTE,
    RING_BAND,
    TASKS,
    Scene,
    ShapeObject,
    WorldSpec,
    make_plural,
    parse_caption,
    relations,
    render,
    sample_metadata,
    sample_training_batch,
    scene_for_metadata,
    scene_satisfies,
    to_uint8,
    vocabulary,
    with_article,
)

SPEC = WorldSpec()


def _area(cls: str, s: float) -> float:
    t = CROSS_ARM * s
    R, w = s / 2, RING_BAND * s
    return {
        "circle": math.pi * R * R,
        "square": s * s,
        "diamond": s * s / 2,
        "triangle": s * s / 2,
        "cross": 2 * s * t - t * t,
        "ring": math.pi * (R * R - (R - w) ** 2),
    }[cls]


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_shape_area_and_box(cls):
    s = 13.0
    out = render([Scene([ShapeObject(cls, "red", 15.3, 16.7, s)])], SPEC)
    cov = out.alphas[0][0]
    # Anti-aliased coverage integrates to the closed-form area (1.5 % AA tolerance).
    assert float(cov.sum()) == pytest.approx(_area(cls, s), rel=0.015)
    assert torch.allclose(out.boxes[0][0], torch.tensor([15.3 - 6.5, 16.7 - 6.5, 15.3 + 6.5, 16.7 + 6.5]))
    ys, xs = np.nonzero(out.masks[0][0].numpy())
    # the visible mask (pixel centres inside the shape) spans the geometric box to 1.5 px (acute triangle tips)
    assert xs.min() + 0.5 == pytest.approx(15.3 - 6.5, abs=1.5) and xs.max() + 0.5 == pytest.approx(15.3 + 6.5, abs=1.5)
    assert ys.min() + 0.5 == pytest.approx(16.7 - 6.5, abs=1.5) and ys.max() + 0.5 == pytest.approx(16.7 + 6.5, abs=1.5)


def test_colours_and_background_exact():
    out = render([Scene([ShapeObject("square", "blue", 16, 16, 12)])], SPEC)
    img = out.images[0]
    assert torch.allclose(img[:, 16, 16], torch.tensor(PALETTE["blue"]))
    assert torch.allclose(img[:, 1, 1], torch.tensor([0.6, 0.6, 0.6]))
    u8 = to_uint8(out.images)
    assert u8.shape == (1, 32, 32, 3) and u8.dtype == np.uint8 and tuple(u8[0, 1, 1]) == (153, 153, 153)


def test_masks_are_occlusion_aware():
    # square B (drawn last) covers the right part of square A
    a = ShapeObject("square", "red", 12, 16, 12)
    b = ShapeObject("square", "green", 18, 16, 12)
    out = render([Scene([a, b])], SPEC)
    ma, mb = out.masks[0].numpy()
    assert not (ma & mb).any()
    assert mb.sum() == 144  # B whole: 12 x 12 pixels
    assert ma.sum() == 6 * 12  # A keeps x in [6, 12): 6 columns of 12 rows
    assert torch.allclose(out.images[0][:, 16, 13], torch.tensor(PALETTE["green"]))


def test_render_is_batched_and_padded():
    scenes = [Scene([]), Scene([ShapeObject("ring", "white", 10, 10, 12), ShapeObject("cross", "black", 22, 22, 10)])]
    out = render(scenes, SPEC)
    assert out.images.shape == (2, 3, 32, 32)
    assert out.masks[0].shape == (0, 32, 32) and out.boxes[0].shape == (0, 4)
    assert torch.allclose(out.images[0], torch.full((3, 32, 32), 0.6))
    single = render(scenes[1:], SPEC)
    assert torch.allclose(single.images[0], out.images[1])


def test_grammar_matches_geneval():
    assert make_plural("cross") == "crosses" and make_plural("ring") == "rings"
    assert with_article("orange") == "an orange" and with_article("circle") == "a circle"
    cases = {
        "a photo of a circle": "single_object",
        "a photo of a ring and a cross": "two_object",
        "a photo of three crosses": "counting",
        "a photo of an orange diamond": "colors",
        "a photo of a triangle left of a square": "position",
        "a photo of a white circle and an orange ring": "color_attr",
    }
    for cap, tag in cases.items():
        meta = parse_caption(cap)
        assert meta["tag"] == tag and meta["prompt"] == cap
    pos = parse_caption("a photo of a triangle left of a square")
    # GenEval: include[0] is the reference object B, include[1] carries [relation, 0]
    assert pos["include"] == [{"class": "square", "count": 1}, {"class": "triangle", "count": 1, "position": ["left of", 0]}]
    cnt = parse_caption("a photo of three crosses")
    assert cnt["exclude"] == [{"class": "cross", "count": 4}]
    for bad in ["a photo of a orange circle", "a photo of a dog", "a photo of an circle"]:
        with pytest.raises(UserError):
            parse_caption(bad)


def test_relations_hand_computed():
    # offset (-20, 0), dims (20, 20): rev_x = -(20 - 2) = -18, normalised -0.9: left of
    assert relations((0, 0, 10, 10), (20, 0, 30, 10)) == {"left of"}
    # offset (-3, -10), dims (20, 20): rev = (-1, -8), ||offset|| = sqrt(109): dy = -0.766 -> above only
    assert relations((2, 0, 12, 10), (5, 10, 15, 20)) == {"above"}
    # offset (-12, -12): rev = (-10, -10)/16.97 = -0.589 both -> left of and above
    assert relations((0, 0, 10, 10), (12, 12, 22, 22)) == {"left of", "above"}
    # offsets within the 0.1 (dimA + dimB) dead zone: no relation
    assert relations((0, 0, 10, 10), (1.5, 1.5, 11.5, 11.5)) == set()


def test_scene_satisfies_rejects_false_scenes():
    red_circle = ShapeObject("circle", "red", 8, 8, 10)
    blue_circle = ShapeObject("circle", "blue", 24, 8, 10)
    square = ShapeObject("square", "green", 24, 24, 10)
    assert scene_satisfies(Scene([red_circle, square]), parse_caption("a photo of a red circle"))
    assert not scene_satisfies(Scene([red_circle, blue_circle]), parse_caption("a photo of a red circle"))
    assert not scene_satisfies(Scene([red_circle, blue_circle]), parse_caption("a photo of three circles"))
    assert scene_satisfies(Scene([red_circle, blue_circle, square]), parse_caption("a photo of two circles"))
    assert not scene_satisfies(Scene([red_circle, blue_circle, ShapeObject("circle", "red", 8, 24, 10)]), parse_caption("a photo of two circles"))
    assert scene_satisfies(Scene([red_circle, square]), parse_caption("a photo of a circle above a square"))
    assert scene_satisfies(Scene([red_circle, square]), parse_caption("a photo of a circle left of a square"))
    assert not scene_satisfies(Scene([red_circle, square]), parse_caption("a photo of a circle below a square"))
    assert not scene_satisfies(Scene([red_circle]), parse_caption("a photo of a circle and a square"))


def test_training_captions_cover_all_templates_and_are_true():
    rng = np.random.default_rng(0)
    scenes, caps = sample_training_batch(rng, SPEC, 300, distractor_prob=0.5)
    tags, n_distract = set(), 0
    vocab = set(vocabulary(SPEC))
    for scene, cap in zip(scenes, caps):
        meta = parse_caption(cap, SPEC)
        tags.add(meta["tag"])
        assert scene_satisfies(scene, meta), cap
        assert set(cap.split()) <= vocab
        assert 1 <= len(scene.objects) <= SPEC.max_objects
        n_distract += len(scene.objects) > sum(r["count"] for r in meta["include"])
        for i, o in enumerate(scene.objects):
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 and 0 <= y0 and x1 <= 32 and y1 <= 32
            assert 0.8 * SPEC.size_range[0] <= o.size <= SPEC.size_range[1]
            for p in scene.objects[i + 1 :]:
                gap = max(abs(o.cx - p.cx), abs(o.cy - p.cy)) - (o.size + p.size) / 2
                assert gap >= SPEC.gap - 1e-9
    assert tags == set(TASKS)
    assert n_distract > 30
    colours = {o.color for s in scenes for o in s.objects}
    assert colours == set(GENEVAL_COLORS)


def test_sampling_is_deterministic():
    a = sample_training_batch(np.random.default_rng(7), SPEC, 20)
    b = sample_training_batch(np.random.default_rng(7), SPEC, 20)
    assert a == b
    assert torch.equal(render(a[0], SPEC).images, render(b[0], SPEC).images)
    c = sample_training_batch(np.random.default_rng(8), SPEC, 20)
    assert c != a


def test_scene_for_metadata_all_tasks():
    rng = np.random.default_rng(1)
    for tag in TASKS:
        for _ in range(10):
            meta = sample_metadata(rng, SPEC, tag)
            scene = scene_for_metadata(meta, rng, SPEC)
            assert scene_satisfies(scene, meta)
            assert len(scene.objects) == sum(r["count"] for r in meta["include"])  # no distractors
    with pytest.raises(UserError):
        scene_for_metadata({"tag": "single_object", "include": [{"class": "dog", "count": 1}]}, rng, SPEC)


def test_64px_world():
    spec = WorldSpec(image_size=64, size_range=(20, 30))
    scenes, caps = sample_training_batch(np.random.default_rng(3), spec, 16)
    out = render(scenes, spec)
    assert out.images.shape == (16, 3, 64, 64)
    for scene, cap, m in zip(scenes, caps, out.masks):
        assert scene_satisfies(scene, parse_caption(cap, spec)) and m.shape[1:] == (64, 64)
    circ = render([Scene([ShapeObject("circle", "pink", 32, 32, 26)])], spec)
    assert float(circ.alphas[0].sum()) == pytest.approx(math.pi * 13 * 13, rel=0.01)


def test_subset_world_and_vocabulary():
    spec = WorldSpec(classes=("circle", "square", "cross"))
    v = vocabulary(spec)
    assert v == sorted(v) and "crosses" in v and "ring" not in v and "above" in v and "four" in v
    _, caps = sample_training_batch(np.random.default_rng(0), spec, 50)
    for cap in caps:
        assert set(cap.split()) <= set(v)
    with pytest.raises(UserError):
        WorldSpec(classes=("circle", "hexagon"))
    with pytest.raises(UserError):
        WorldSpec(size_range=(10, 40))


def test_relations_agree_with_rule_engine():
    # the world samples position scenes with its own copy of GenEval's rule; it must match the rule engine's
    from benchmarks.geneval.rules import relative_position

    rng = np.random.default_rng(5)
    for _ in range(500):
        a = np.sort(rng.uniform(0, 32, size=(2, 2)), axis=0).T.reshape(-1)[[0, 2, 1, 3]]
        b = np.sort(rng.uniform(0, 32, size=(2, 2)), axis=0).T.reshape(-1)[[0, 2, 1, 3]]
        assert relations(a, b) == set(relative_position(a, b))


def test_task_weights_select_tasks():
    _, caps = sample_training_batch(np.random.default_rng(0), SPEC, 40, task_weights={"counting": 1.0})
    assert all(parse_caption(c)["tag"] == "counting" for c in caps)
    with pytest.raises(UserError):
        sample_training_batch(np.random.default_rng(0), SPEC, 1, task_weights={"count": 1.0})
