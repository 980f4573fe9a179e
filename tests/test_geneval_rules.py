import json
import math

import numpy as np
import pytest

from benchmarks.geneval.detection import Detection, Detector
from benchmarks.geneval.rules import (
    RuleConfig,
    assess,
    evaluate_image,
    keep_detections,
    partial_credit,
    relative_position,
    summarize,
)
from rtdmd.errors import UserError

IMG = np.zeros((64, 64, 3), np.uint8)


class FakeDetector:
    """Returns the given detections; colour of a detection = colors[its box] (default 'red')."""

    name = "fake-detector-v1"

    def __init__(self, dets, colors=None):
        self.dets = list(dets)
        self.colors = colors or {}
        self.color_calls = []

    def detect(self, image):
        return sorted(self.dets, key=lambda d: -d.score)

    def classify_colors(self, image, detections, class_name):
        self.color_calls.append((class_name, len(detections)))
        return [self.colors.get(tuple(d.box), "red") for d in detections]


def det(label, score, box=(0, 0, 10, 10)):
    return Detection(label, score, tuple(float(v) for v in box))


def single(cls="dog"):
    return {"tag": "single_object", "include": [{"class": cls, "count": 1}], "prompt": f"a photo of a {cls}"}


def counting(cls, n):
    return {"tag": "counting", "include": [{"class": cls, "count": n}], "exclude": [{"class": cls, "count": n + 1}],
            "prompt": f"a photo of {n} {cls}s"}


def position(a, rel, b):
    return {"tag": "position", "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
            "prompt": f"a photo of a {a} {rel} a {b}"}


def colors_prompt(cls, color):
    return {"tag": "colors", "include": [{"class": cls, "count": 1, "color": color}], "prompt": f"a photo of a {color} {cls}"}


def test_fake_detector_satisfies_protocol():
    assert isinstance(FakeDetector([]), Detector)


# ---- thresholds and caps --------------------------------------------------------------

def test_threshold_is_strict():
    cfg = RuleConfig()
    assert not evaluate_image(IMG, single(), FakeDetector([det("dog", 0.3)]), cfg)["correct"]
    assert evaluate_image(IMG, single(), FakeDetector([det("dog", 0.30001)]), cfg)["correct"]
    kept = keep_detections([det("dog", 0.9), det("dog", 0.95), det("dog", 0.5)], "counting", cfg)
    assert [d.score for d in kept["dog"]] == [0.95]
    kept = keep_detections([det("dog", 0.9), det("dog", 0.95), det("dog", 0.5)], "two_object", cfg)
    assert [d.score for d in kept["dog"]] == [0.95, 0.9, 0.5]


def test_counting_uses_09_threshold():
    dets = [det("cat", 0.95, (0, 0, 5, 5)), det("cat", 0.9, (10, 0, 15, 5))]
    r = evaluate_image(IMG, counting("cat", 2), FakeDetector(dets))
    assert not r["correct"] and r["reason"] == "expected cat>=2, found 1"


def test_at_most_16_per_class_by_confidence():
    dets = [det("dog", 0.31 + 0.01 * i, (i, 0, i + 1, 1)) for i in range(17)]
    kept = keep_detections(dets, "single_object", RuleConfig())["dog"]
    assert len(kept) == 16 and kept[0].score == pytest.approx(0.47) and min(d.score for d in kept) == pytest.approx(0.32)
    r = evaluate_image(IMG, single(), FakeDetector(dets))
    assert len(json.loads(r["details"])["dog"]) == 16
    assert len(keep_detections(dets, "single_object", RuleConfig(max_objects=3))["dog"]) == 3


def test_counting_exclude_at_n_plus_one():
    three = [det("cat", 0.95, (i * 10, 0, i * 10 + 5, 5)) for i in range(3)]
    r = evaluate_image(IMG, counting("cat", 3), FakeDetector(three))
    assert r["correct"] and r["reason"] == ""
    four = three + [det("cat", 0.91, (40, 0, 45, 5))]
    r = evaluate_image(IMG, counting("cat", 3), FakeDetector(four))
    assert not r["correct"] and r["reason"] == "expected cat<4, found 4"
    # a fourth cat below the counting threshold does not count
    assert evaluate_image(IMG, counting("cat", 3), FakeDetector(three + [det("cat", 0.9)]))["correct"]
    # the exclude count sees the capped list: 17 confident cats -> found 16
    many = [det("cat", 0.91 + 0.001 * i, (i, 0, i + 1, 1)) for i in range(17)]
    assert evaluate_image(IMG, counting("cat", 2), FakeDetector(many))["reason"] == "expected cat<3, found 16"


# ---- colour ---------------------------------------------------------------------------

def test_colour_checked_on_top_count_objects_only():
    top, low = (0, 0, 10, 10), (20, 0, 30, 10)
    fd = FakeDetector([det("dog", 0.8, top), det("dog", 0.5, low)], {top: "red", low: "blue"})
    r = evaluate_image(IMG, colors_prompt("dog", "blue"), fd)
    assert not r["correct"] and r["reason"] == "expected blue dog>=1, found 0 blue; and 1 red"
    assert fd.color_calls == [("dog", 1)]
    assert evaluate_image(IMG, colors_prompt("dog", "red"), fd)["correct"]


def test_colour_reason_lists_colours_in_official_order():
    boxes = [(0, 0, 1, 1), (2, 0, 3, 3), (4, 0, 5, 5)]
    meta = {"tag": "colors", "include": [{"class": "cup", "count": 3, "color": "green"}], "prompt": "p"}
    fd = FakeDetector([det("cup", 0.9 - 0.1 * i, b) for i, b in enumerate(boxes)],
                      dict(zip(boxes, ["white", "green", "red"])))
    r = evaluate_image(IMG, meta, fd)
    assert r["reason"] == "expected green cup>=3, found 1 green; and 1 red, 1 green, 1 white"


def test_colour_not_classified_when_count_fails():
    fd = FakeDetector([])
    r = evaluate_image(IMG, colors_prompt("dog", "red"), fd)
    assert r["reason"] == "expected dog>=1, found 0" and fd.color_calls == []


# ---- position arithmetic --------------------------------------------------------------

B = (20, 20, 30, 30)  # centre (25, 25), size 10 x 10


@pytest.mark.parametrize("box_a,expected", [
    ((0, 20, 10, 30), ["left of"]),    # offset (-20, 0): revised -18, dx = -0.9
    ((40, 20, 50, 30), ["right of"]),
    ((20, 0, 30, 10), ["above"]),      # image y points down
    ((20, 40, 30, 50), ["below"]),
    ((50, 50, 60, 60), ["right of", "below"]),   # offset (30, 30): dx = dy = 28 / 42.43 = 0.66
    ((0, 0, 10, 10), ["left of", "above"]),
    ((50, 30, 60, 40), ["right of"]),  # offset (30, 10): revised (28, 8) / 31.62 = (0.885, 0.253)
    ((21, 20, 31, 30), []),            # offset 1 < 0.1 * 20: inside the threshold
    ((24, 20, 34, 30), []),            # offset 4: revised 2, dx = 0.5 exactly -> not "right of"
    ((22.0005, 20, 32.0005, 30), []),  # revised 0.0005 < 1e-3 on both axes
    ((20, 20, 30, 30), []),            # same centre
])
def test_relative_position_cases(box_a, expected):
    assert relative_position(box_a, B, 0.1) == expected


def test_relative_position_min_offset_rule():
    # zero-size boxes: revised == offset, so only the 1e-3 rule decides
    point = (25, 25, 25, 25)
    assert relative_position((25.0009, 25, 25.0009, 25), point, 0.1) == []
    assert relative_position((25.0011, 25, 25.0011, 25), point, 0.1) == ["right of"]


def test_relative_position_hand_values():
    # offset (30, 30) with sizes 10+10 per axis: revised = 30 - 2 = 28 per axis, /|offset|.
    a = (50, 50, 60, 60)
    d = 28 / math.hypot(30, 30)
    assert d > 0.5 and relative_position(a, B, 0.1) == ["right of", "below"]
    # a larger threshold shrinks the x offset of 30 by 0.7 * 20 = 14 -> 16 / 31.62 = 0.506 still right
    assert relative_position((50, 30, 60, 40), B, 0.7) == ["right of"]
    # 0.8: x 30 - 16 = 14 -> 0.443; y max(10 - 16, 0) = 0 -> nothing
    assert relative_position((50, 30, 60, 40), B, 0.8) == []


def test_position_target_is_top_detection_of_first_clause():
    left_bear, right_bear, dog = (0, 20, 10, 30), (60, 20, 70, 30), (30, 20, 40, 30)
    meta = position("dog", "right of", "teddy bear")
    ok = FakeDetector([det("teddy bear", 0.9, left_bear), det("teddy bear", 0.6, right_bear), det("dog", 0.8, dog)])
    assert evaluate_image(IMG, meta, ok)["correct"]
    swapped = FakeDetector([det("teddy bear", 0.6, left_bear), det("teddy bear", 0.9, right_bear), det("dog", 0.8, dog)])
    r = evaluate_image(IMG, meta, swapped)
    assert not r["correct"] and r["reason"] == "expected dog right of target, found left of target"


def test_position_overlap_fails_with_empty_relation():
    meta = position("dog", "left of", "cat")
    r = evaluate_image(IMG, meta, FakeDetector([det("cat", 0.9, (21, 20, 31, 30)), det("dog", 0.9, B)]))
    assert not r["correct"] and r["reason"] == "expected dog left of target, found  target"


def test_position_without_target():
    meta = position("dog", "above", "cat")
    r = evaluate_image(IMG, meta, FakeDetector([det("dog", 0.9)]))
    assert r["reason"] == "expected cat>=1, found 0\nno target for dog to be above"
    assert partial_credit(IMG, meta, FakeDetector([det("dog", 0.9)])) == pytest.approx(1 / 3)


def test_position_threshold_configurable():
    meta = position("dog", "right of", "cat")
    fd = FakeDetector([det("cat", 0.9, B), det("dog", 0.9, (50, 30, 60, 40))])
    assert evaluate_image(IMG, meta, fd, RuleConfig(position_threshold=0.7))["correct"]
    assert not evaluate_image(IMG, meta, fd, RuleConfig(position_threshold=0.8))["correct"]


# ---- output record, partial credit ----------------------------------------------------

def test_output_record_fields():
    meta = single("dog")
    r = evaluate_image(IMG, meta, FakeDetector([det("dog", 0.5, (1, 2, 3, 4)), det("cat", 0.2)]))
    assert list(r) == ["filename", "tag", "prompt", "correct", "reason", "metadata", "details", "detector"]
    assert r["filename"] is None and r["tag"] == "single_object" and r["prompt"] == "a photo of a dog"
    assert r["metadata"] == json.dumps(meta) and r["detector"] == "fake-detector-v1"
    assert json.loads(r["details"]) == {"dog": [[1.0, 2.0, 3.0, 4.0, 0.5]]}


def test_partial_credit_counts():
    red, blue = (0, 0, 10, 10), (20, 0, 30, 10)
    meta = {"tag": "color_attr", "include": [{"class": "cup", "count": 1, "color": "red"},
                                             {"class": "vase", "count": 1, "color": "green"}], "prompt": "p"}
    fd = FakeDetector([det("cup", 0.9, red), det("vase", 0.9, blue)], {red: "red", blue: "blue"})
    a = assess(IMG, meta, fd)
    assert [ok for _, ok in a.checks] == [True, True, True, False] and a.credit == 0.75
    assert not a.correct
    # counting: include met, exclude failed -> 1/2
    four = [det("cat", 0.95, (i * 10, 0, i * 10 + 5, 5)) for i in range(4)]
    assert partial_credit(IMG, counting("cat", 3), FakeDetector(four)) == 0.5
    # position is scored even when the target's colour fails (pass/fail then skips it)
    meta = {"tag": "position", "include": [{"class": "cat", "count": 1, "color": "blue"},
                                           {"class": "dog", "count": 1, "position": ["left of", 0]}], "prompt": "p"}
    fd = FakeDetector([det("cat", 0.9, (40, 0, 50, 10)), det("dog", 0.9, (0, 0, 10, 10))])
    a = assess(IMG, meta, fd)
    assert [ok for _, ok in a.checks] == [True, False, True, True] and a.reasons == [
        "expected blue cat>=1, found 0 blue; and 1 red", "no target for dog to be left of"]


@pytest.mark.parametrize("dets,meta", [
    ([det("dog", 0.9)], single("dog")),
    ([det("cat", 0.9)], single("dog")),
    ([det("cat", 0.95, (0, 0, 5, 5)), det("cat", 0.95, (9, 0, 14, 5))], counting("cat", 2)),
    ([det("cat", 0.9, B), det("dog", 0.9, (0, 20, 10, 30))], position("dog", "left of", "cat")),
    ([det("cat", 0.9, B), det("dog", 0.9, (0, 20, 10, 30))], position("dog", "below", "cat")),
])
def test_full_credit_iff_correct(dets, meta):
    a = assess(IMG, meta, FakeDetector(dets))
    assert (a.credit == 1.0) == a.correct


# ---- summary --------------------------------------------------------------------------

def _r(tag, prompt, ok):
    return {"tag": tag, "metadata": json.dumps({"tag": tag, "prompt": prompt}), "correct": ok}


def test_summary_hand_numbers():
    res = [_r("single_object", "a", True), _r("single_object", "a", False),
           _r("two_object", "b", False), _r("two_object", "c", False),
           _r("counting", "d", True)]
    s = summarize(res)
    assert s["images"] == 5 and s["prompts"] == 4
    assert s["correct_images"] == pytest.approx(2 / 5)
    assert s["correct_prompts"] == pytest.approx(2 / 4)  # a (any image) and d
    assert s["tasks"] == {"single_object": 0.5, "two_object": 0.0, "counting": 1.0}
    assert s["overall"] == pytest.approx(0.5)
    assert s["tasks_missing"] == ["colors", "position", "color_attr"] and "missing" in s["note"]


def test_summary_all_tasks_unweighted():
    res = [_r("single_object", "a", True)] * 3 + [_r("two_object", "b", False),
           _r("counting", "c", True), _r("colors", "d", False), _r("position", "e", True), _r("color_attr", "f", True)]
    s = summarize(res)
    assert s["overall"] == pytest.approx(4 / 6) and s["tasks_missing"] == []
    with pytest.raises(UserError):
        summarize([])


def test_invalid_metadata_is_a_user_error():
    with pytest.raises(UserError, match="unknown tag"):
        evaluate_image(IMG, {"tag": "x", "include": [{"class": "a", "count": 1}], "prompt": "p"}, FakeDetector([]))
