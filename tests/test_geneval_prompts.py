import hashlib
import json
from collections import Counter

import numpy as np
import pytest

from benchmarks.geneval.prompts import (
    COCO_CLASSES,
    generate_metadata,
    plural,
    read_metadata,
    with_article,
    write_metadata,
)
from rtdmd.errors import UserError

OFFICIAL_SHA256 = "5c48e0813e812e3c373fa5c8ed07a8f0a483be30272b4427b0559c8048e67c13"


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    path = tmp_path_factory.mktemp("geneval") / "evaluation_metadata.jsonl"
    write_metadata(generate_metadata(COCO_CLASSES), path)
    return path


def test_official_file_is_byte_identical(official):
    data = official.read_bytes()
    assert hashlib.sha256(data).hexdigest() == OFFICIAL_SHA256
    assert data.count(b"\n") == 553 and data.endswith(b"}\n")


def test_official_task_counts_and_examples(official):
    entries = read_metadata(official)
    assert len(COCO_CLASSES) == 80
    assert list(Counter(e["tag"] for e in entries).items()) == [
        ("single_object", 80), ("two_object", 99), ("counting", 80),
        ("colors", 94), ("position", 100), ("color_attr", 100),
    ]
    lines = official.read_text().splitlines()
    assert lines[0] == '{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}'
    assert ('{"tag": "position", "include": [{"class": "teddy bear", "count": 1}, {"class": "dog", "count": 1, '
            '"position": ["right of", 0]}], "prompt": "a photo of a dog right of a teddy bear"}') in lines
    for e in entries:
        if e["tag"] in ("colors", "color_attr"):
            assert all(c["class"] != "person" for c in e["include"])
        if e["tag"] == "counting":
            n = e["include"][0]["count"]
            assert 2 <= n <= 4 and e["exclude"] == [{"class": e["include"][0]["class"], "count": n + 1}]
            assert list(e) == ["tag", "include", "exclude", "prompt"]


def test_article_and_plural_rules():
    assert with_article("apple") == "an apple" and with_article("orange") == "an orange"
    assert with_article("umbrella") == "an umbrella" and with_article("hot dog") == "a hot dog"
    assert plural("bus") == "buses" and plural("skis") == "skises" and plural("dog") == "dogs"


def test_shapes_generalisation_draws_over_all_classes():
    classes = ["circle", "square", "triangle"]
    m = generate_metadata(classes, seed=5, per_task=30, exclude_color_class=None)
    rng = np.random.default_rng(5)
    perm = rng.choice(3, size=3, replace=False)  # the first draw is the single_object permutation
    assert [e["include"][0]["class"] for e in m[:3]] == [classes[i] for i in perm]
    color_classes = {c["class"] for e in m if e["tag"] in ("colors", "color_attr") for c in e["include"]}
    assert color_classes == set(classes)
    skipped = generate_metadata(classes, seed=5, per_task=30, exclude_color_class="circle")
    assert "circle" not in {c["class"] for e in skipped if e["tag"] in ("colors", "color_attr") for c in e["include"]}
    # same draws with the same seed; duplicates removed keeping the first
    assert m == generate_metadata(classes, seed=5, per_task=30, exclude_color_class=None)
    assert len({json.dumps(e) for e in m}) == len(m)


@pytest.mark.parametrize("kwargs", [
    dict(classes=["circle"]),
    dict(classes=["a", "a", "b"]),
    dict(classes=["circle", "square", "x"], exclude_color_class="person"),
])
def test_bad_generation_arguments(kwargs):
    with pytest.raises(UserError):
        generate_metadata(**kwargs)


GOOD = {"tag": "position", "include": [{"class": "a", "count": 1}, {"class": "b", "count": 1, "position": ["left of", 0]}],
        "prompt": "p"}


def _bad(**change):
    e = json.loads(json.dumps(GOOD))
    for k, v in change.items():
        if v is None:
            del e[k]
        else:
            e[k] = v
    return json.dumps(e)


MALFORMED = {
    "not json": ("{not json", "not valid JSON"),
    "missing tag": (_bad(tag=None), "missing 'tag'"),
    "missing prompt": (_bad(prompt=None), "missing 'prompt'"),
    "missing include": (_bad(include=None), "missing 'include'"),
    "unknown tag": (_bad(tag="shapes"), "unknown tag"),
    "no class": (_bad(include=[{"count": 1}]), "no 'class'"),
    "no count": (_bad(include=[{"class": "a"}]), "no 'count'"),
    "zero count": (_bad(include=[{"class": "a", "count": 0}]), "not a positive integer"),
    "string count": (_bad(include=[{"class": "a", "count": "2"}]), "not a positive integer"),
    "bool count": (_bad(include=[{"class": "a", "count": True}]), "not a positive integer"),
    "position not pair": (_bad(include=[{"class": "a", "count": 1}, {"class": "b", "count": 1, "position": "left of"}]), "[relation, index]"),
    "bad relation": (_bad(include=[{"class": "a", "count": 1}, {"class": "b", "count": 1, "position": ["near", 0]}]), "relation 'near'"),
    "index not earlier": (_bad(include=[{"class": "a", "count": 1}, {"class": "b", "count": 1, "position": ["above", 1]}]), "index 1"),
    "exclude not list": (_bad(exclude={"class": "a", "count": 2}), "'exclude' is not a list"),
    "exclude bad count": (_bad(exclude=[{"class": "a", "count": -1}]), "exclude[0] 'count'"),
    "exclude no class": (_bad(exclude=[{"count": 2}]), "exclude[0] has no 'class'"),
    "not an object": ("[1, 2]", "not a JSON object"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_line_names_file_line_and_problem(tmp_path, name):
    line, what = MALFORMED[name]
    p = tmp_path / "prompts.jsonl"
    p.write_text(json.dumps(GOOD) + "\n\n" + line + "\n")
    with pytest.raises(UserError) as e:
        read_metadata(p)
    msg = str(e.value)
    assert str(p) in msg and "line 3" in msg and what in msg


def test_empty_and_missing_files(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n  \n")
    with pytest.raises(UserError, match="no prompts"):
        read_metadata(p)
    with pytest.raises(UserError, match="Cannot read"):
        read_metadata(tmp_path / "absent.jsonl")


def test_read_accepts_file_without_trailing_newline(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps(GOOD))
    assert read_metadata(p) == [GOOD]
