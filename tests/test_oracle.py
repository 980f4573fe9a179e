"""The preference oracle: each term's formula, each term moving the right way, determinism, protocol."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks.shapes import oracle as O
from benchmarks.shapes.oracle import PreferenceOracle
from benchmarks.shapes.pairs import corrupt_pixels, flip_prompt
from rtdmd.errors import UserError
from rtdmd.rewards.base import Reward
from rtdmd.world.shapes import ALL_CLASSES, Scene, ShapeObject, WorldSpec, render, to_uint8

SPEC = WorldSpec()
ORACLE = PreferenceOracle(SPEC)
PROMPT = "a photo of a red circle and a blue square"
POSITION = "a photo of a circle left of a square"
SCENE = Scene([ShapeObject("circle", "red", 9, 16, 12), ShapeObject("square", "blue", 24, 16, 11)])


def _img(scene: Scene = SCENE) -> np.ndarray:
    return to_uint8(render([scene], SPEC).images)[0]


def _pixels(kind: str, seed: int = 0) -> np.ndarray:
    x = render([SCENE], SPEC).images[0].numpy()
    return to_uint8(torch.from_numpy(corrupt_pixels(x, kind, np.random.default_rng(seed), SPEC)).float()[None])[0]


# ---------------------------------------------------------------------------- formulas, by hand


def test_term_formulas_hand_computed():
    assert O.background_term(0.0) == 1.0
    assert O.background_term(0.08) == pytest.approx(math.exp(-1))
    assert O.edge_width(np.array([0.75, 1.0, 0.0]), 1.0) == pytest.approx(0.75)  # 4 * 0.75 * 0.25
    assert O.edge_term(1.0) == 1.0 and O.edge_term(0.1) == 1.0
    assert O.edge_term(2.0) == pytest.approx(math.exp(-1))
    assert O.frame_term(1, 4) == 0.75 and O.frame_term(0, 0) == 1.0
    # two boxes sharing half their area, one far away: 1 - mean(0.5, 0.5, 0)
    assert O.overlap_term(np.array([[0, 0, 10, 10], [5, 0, 15, 10], [30, 30, 31, 31]])) == pytest.approx(2 / 3)
    assert O.overlap_term(np.zeros((1, 4))) == 1.0
    for s, want in ((12, 1.0), (7.5, 0.5), (5, 0.0), (3, 0.0), (18.75, 0.5), (22.5, 0.0), (30, 0.0)):
        assert O.size_term(s, 10, 15) == pytest.approx(want), s
    ones = {k: 1.0 for k in O.QUALITY_WEIGHTS}
    assert O.combine(1.0, ones) == pytest.approx((1.0, 1.0))
    only_bg = {k: float(k == "background") for k in O.QUALITY_WEIGHTS}
    assert O.combine(0.5, only_bg) == pytest.approx((0.6 * 0.5 + 0.4 * 0.3, 0.3))
    assert sum(O.WEIGHTS.values()) == pytest.approx(1) and sum(O.QUALITY_WEIGHTS.values()) == pytest.approx(1)


def test_ramp_widths_over_subpixel_offsets():
    # a straight edge at sub-pixel offset u: the one mixed pixel has coverage u, width 4 u (1 - u)
    u = (np.arange(10000) + 0.5) / 10000
    assert O.edge_width(u, len(u)) == pytest.approx(O.RAMP_MEAN_WIDTH, rel=1e-6)
    assert max(O.edge_width(np.array([v]), 1.0) for v in u) == pytest.approx(O.CRISP_WIDTH, abs=1e-6)


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_perimeters_match_the_renderer(cls):
    # the renderer's 1 px ramp over the closed-form perimeter gives the mean ramp width 2/3, on
    # average over sub-pixel positions (an axis-aligned edge at one offset u gives 4 u (1 - u))
    offsets = (np.arange(16) + 0.5) / 16
    scenes = [Scene([ShapeObject(cls, "red", 16 + u, 16 + offsets[(5 * i) % 16], 24)]) for i, u in enumerate(offsets)]
    alpha = torch.cat(render(scenes, SPEC).alphas).numpy()
    width = O.edge_width(alpha, O.PERIMETER_FACTOR[cls] * 24 * len(scenes))
    assert width == pytest.approx(O.RAMP_MEAN_WIDTH, rel=0.03), cls


# ---------------------------------------------------------------------------- behaviour on hand-made images


def test_clean_render_scores_near_one():
    s = ORACLE.score_image(_img(), PROMPT)
    assert s.faithfulness == 1.0
    assert s.terms["background"] == 1.0 and s.terms["frame"] == 1.0 and s.terms["overlap"] == 1.0
    assert s.terms["size"] == 1.0 and s.terms["edges"] == 1.0
    assert s.total > 0.99


def test_each_term_moves_the_right_way():
    clean = ORACLE.score_image(_img(), PROMPT)
    cases = {
        "edges": ORACLE.score_image(_pixels("blur", 3), PROMPT),
        "background": ORACLE.score_image(_pixels("noise", 1), PROMPT),
        "frame": ORACLE.score_image(_img(Scene([ShapeObject("circle", "red", 2, 16, 12),
                                                 ShapeObject("square", "blue", 24, 16, 11)])), PROMPT),
        "overlap": ORACLE.score_image(_img(Scene([ShapeObject("circle", "red", 13, 16, 12),
                                                   ShapeObject("square", "blue", 20, 16, 11)])), PROMPT),
        "size": ORACLE.score_image(_img(Scene([ShapeObject("circle", "red", 9, 16, 20),
                                                ShapeObject("square", "blue", 25, 16, 11)])), PROMPT),
    }
    for term, s in cases.items():
        assert s.terms[term] < clean.terms[term] - 0.05, (term, s.terms)
        assert s.total < clean.total, term
    stain = Scene(SCENE.objects)
    img = _img(stain).astype(np.float64)
    img[24:29, 4:9] = (40, 200, 90)  # a square-ish off-palette stain: not a shape, lowers the background
    s = ORACLE.score_image(img.astype(np.uint8), PROMPT)
    assert s.terms["background"] < clean.terms["background"] - 0.05 and s.total < clean.total


def test_faithfulness_follows_the_prompt():
    img = _img()
    assert ORACLE.score_image(img, POSITION).faithfulness == 1.0
    assert ORACLE.score_image(img, "a photo of a blue circle and a red square").faithfulness == 0.5  # colours swapped
    assert ORACLE.score_image(img, "a photo of a square left of a circle").faithfulness == pytest.approx(2 / 3)
    missing = _img(Scene(SCENE.objects[:1]))
    s = ORACLE.score_image(missing, PROMPT)
    assert s.faithfulness == 0.5 and s.total < ORACLE.score_image(img, PROMPT).total  # square and its colour
    empty = ORACLE.score_image(_img(Scene([])), "a photo of a circle")
    # nothing drawn: no faithfulness, no edges and no sensible size, a clean background and frame
    assert empty.faithfulness == 0.0 and empty.terms["edges"] == 0.0 and empty.terms["size"] == 0.0
    assert empty.quality == pytest.approx(0.6) and empty.total == pytest.approx(0.4 * 0.6)


def test_deterministic_and_mirror_symmetric():
    img = _pixels("ghost", 2)
    a = ORACLE.score_image(img, POSITION)
    assert ORACLE.score_image(img.copy(), POSITION) == a
    assert flip_prompt(POSITION) == "a photo of a circle right of a square"
    flipped = ORACLE.score_image(np.ascontiguousarray(img[:, ::-1]), flip_prompt(POSITION))
    assert flipped.total == pytest.approx(a.total, abs=0.01)


def test_reward_protocol():
    assert isinstance(ORACLE, Reward)
    assert ORACLE.name == "oracle" and not ORACLE.differentiable
    assert ORACLE.identity.startswith(f"shapes-oracle-v{O.VERSION}[shapes-detector-v")
    images = render([SCENE, Scene(SCENE.objects[1:])], SPEC).images
    out = ORACLE(images, [PROMPT, PROMPT])
    assert out.shape == (2,) and out.dtype == torch.float32 and out[0] > out[1]
    meta = ORACLE.metadata(PROMPT)
    assert ORACLE.score_image(to_uint8(images)[0], meta).total == pytest.approx(float(out[0]))
    with pytest.raises(UserError, match="one prompt per image"):
        ORACLE(images, [PROMPT])
    with pytest.raises(UserError, match="not in the shapes grammar"):
        ORACLE(images[:1], ["a photo of a dog"])
    with pytest.raises(UserError):
        ORACLE(images[0], [PROMPT])
