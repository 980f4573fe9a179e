"""The shapes detector: protocol, geometry, colours, GenEval accuracy, and low scores for blobs."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.geneval.detection import Detector
from benchmarks.geneval.prompts import generate_metadata
from benchmarks.geneval.rules import assess
from benchmarks.shapes.detector import ShapesDetector
from benchmarks.shapes.probes import BLOB_KINDS, blob_image, degrade
from rtdmd.errors import UserError
from rtdmd.world.shapes import ALL_CLASSES, GENEVAL_COLORS, Scene, ShapeObject, WorldSpec, render, scene_for_metadata, to_uint8

SPEC = WorldSpec()
DET = ShapesDetector(SPEC)


def _img(*objects: ShapeObject, spec: WorldSpec = SPEC) -> np.ndarray:
    return to_uint8(render([Scene(list(objects))], spec).images)[0]


def test_protocol_and_name():
    assert isinstance(DET, Detector)
    assert DET.name.startswith("shapes-detector-v")
    with pytest.raises(UserError):
        DET.detect(np.zeros((32, 32, 3), dtype=np.float32))


def test_empty_and_noise_only_images():
    bg = np.full((32, 32, 3), 153, dtype=np.uint8)
    assert DET.detect(bg) == []
    noisy = degrade(render([Scene([])], SPEC).images, np.random.default_rng(0), 0.0, 0.05)[0]
    assert all(d.score <= 0.3 for d in DET.detect(noisy))


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_each_class_label_box_colour(cls):
    o = ShapeObject(cls, "purple", 14.6, 17.3, 12.5)
    img = _img(o)
    dets = DET.detect(img)
    assert len(dets) == 1
    d = dets[0]
    assert d.label == cls and d.score > 0.9
    assert np.allclose(d.box, o.box, atol=0.6)
    assert d.mask.shape == (32, 32) and d.mask.dtype == bool
    assert DET.classify_colors(img, dets, cls) == ["purple"]


def test_all_colours_after_degradation():
    rng = np.random.default_rng(1)
    for i, col in enumerate(GENEVAL_COLORS):
        scene = Scene([ShapeObject(ALL_CLASSES[i % 6], col, 16, 16, 11)])
        img = degrade(render([scene], SPEC).images, rng)[0]
        dets = DET.detect(img)
        assert [d.label for d in dets] == [ALL_CLASSES[i % 6]]
        assert DET.classify_colors(img, dets, dets[0].label) == [col]


def test_touching_objects_are_split_by_colour():
    # two squares sharing an edge, and a circle touching a triangle: four objects, two contacts
    img = _img(
        ShapeObject("square", "red", 8, 8, 12),
        ShapeObject("square", "blue", 20, 8, 12),
        ShapeObject("circle", "yellow", 8, 23.5, 12),
        ShapeObject("triangle", "green", 20, 23.5, 12),
    )
    dets = DET.detect(img)
    kept = sorted((d.label, c) for d, c in zip(dets, DET.classify_colors(img, dets, "")) if d.score > 0.9)
    assert kept == [("circle", "yellow"), ("square", "blue"), ("square", "red"), ("triangle", "green")]


def _accuracy(images, metas):
    return np.mean([assess(img, m, DET).correct for img, m in zip(images, metas)])


def test_geneval_accuracy_clean_and_degraded():
    # a small slice of the GenEval-shapes prompt set, every task; the full run is benchmarks/perf/bench_detector.py
    prompts = generate_metadata(ALL_CLASSES, per_task=6, exclude_color_class=None)
    rng = np.random.default_rng(0)
    scenes = [scene_for_metadata(m, rng, SPEC) for m in prompts]
    images = render(scenes, SPEC).images
    assert {m["tag"] for m in prompts} == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert _accuracy(to_uint8(images), prompts) == 1.0
    assert _accuracy(degrade(images, rng, 0.7, 0.05), prompts) >= 0.95


def test_shapeless_blobs_score_low():
    rng = np.random.default_rng(2)
    for kind in BLOB_KINDS:
        best = [max([d.score for d in DET.detect(blob_image(rng, kind))] or [0.0]) for _ in range(10)]
        assert np.mean(np.asarray(best) > 0.3) <= 0.3, kind  # GenEval's threshold keeps few
        assert max(best) <= 0.9, kind  # and counting's never


def test_scores_fall_with_blur():
    rng = np.random.default_rng(3)
    scene = Scene([ShapeObject("cross", "green", 16, 16, 12)])
    images = render([scene], SPEC).images
    scores = [DET.detect(degrade(images, rng, b, 0.0)[0])[0].score for b in (0.0, 1.0, 1.6, 2.5)]
    assert scores[0] > 0.9 and scores[1] > 0.9
    assert scores[3] < 0.3 and scores[3] <= scores[2] <= scores[1]


def test_64px_world():
    spec = WorldSpec(image_size=64, size_range=(20, 30))
    det = ShapesDetector(spec)
    objs = [ShapeObject("ring", "orange", 18, 20, 24), ShapeObject("diamond", "black", 46, 44, 22)]
    img = to_uint8(render([Scene(objs)], spec).images)[0]
    dets = det.detect(img)
    assert sorted(d.label for d in dets if d.score > 0.9) == ["diamond", "ring"]
    assert sorted(det.classify_colors(img, dets, "")) == ["black", "orange"]


def test_area_factors_match_renderer():
    from benchmarks.shapes.detector import AREA_FACTOR, CENTROID_DY

    for cls in ALL_CLASSES:
        out = render([Scene([ShapeObject(cls, "red", 16, 16, 14)])], SPEC)
        alpha = out.alphas[0][0].numpy()
        assert alpha.sum() == pytest.approx(AREA_FACTOR[cls] * 14**2, rel=0.015), cls
        cy = (alpha * (np.arange(32)[:, None] + 0.5)).sum() / alpha.sum()
        assert cy - 16 == pytest.approx(CENTROID_DY.get(cls, 0.0) * 14, abs=0.05), cls


def test_fit_quality_and_score_hand_computed():
    import torch

    from benchmarks.shapes.detector import fit_quality

    obs = torch.tensor([[1.0, 0.5]])
    tmpl = torch.tensor([[1.0, 1.0]])
    # sse 0.25, minus expected noise 0.1, over sum tmpl^2 = 2: q = 1 - 0.15 / 2
    assert float(fit_quality(obs, tmpl, 0.1)) == pytest.approx(0.925)
    # a perfect template under noise of known variance: q = 1 on average
    g = torch.Generator().manual_seed(0)
    t = (torch.rand(400, 20, 20, generator=g) > 0.5).float()
    noisy = t + 0.1 * torch.randn(400, 20, 20, generator=g)
    assert float(fit_quality(noisy, t, 400 * 0.01).mean()) == pytest.approx(1.0, abs=0.01)
    det = ShapesDetector(SPEC, q_low=0.8, q_high=1.0, distinct_margin=0.1, sharp_blur=1.0, max_blur=2.0)
    # lo = 10: size 6.5 is halfway from 5 (none) to 8 (full)
    assert det.score(0.9, 0.85, 1.5, 6.5) == pytest.approx(0.5 * 0.5 * 0.5 * 0.5)
    assert det.score(1.0, 0.5, 0.0, 12) == 1.0 and det.score(0.7, 0.1, 0.0, 12) == 0.0
    assert det.score(0.95, 0.95, 0.0, 12) == 0.0 and det.score(1.0, 0.5, 0.0, 4.0) == 0.0
