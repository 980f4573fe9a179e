"""GenEval prompt set: the official recipe, its writer and a validating reader.

With ``COCO_CLASSES`` and the defaults, ``write_metadata(generate_metadata(COCO_CLASSES), p)``
reproduces the official ``evaluation_metadata.jsonl`` byte for byte (553 lines; see
docs/evaluation.md, "GenEval").
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from rtdmd.errors import UserError
from rtdmd.world.geneval import GENEVAL_COLORS, GENEVAL_TAGS, NUMBER_WORDS, RELATIONS, plural, with_article

GENEVAL_POSITIONS = RELATIONS
COUNTING_MIN, COUNTING_MAX = 2, 4  # counting draws N in [2, 4] inclusive

COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)


def generate_metadata(
    classes: Sequence[str],
    seed: int = 43,
    per_task: int = 100,
    colors: Sequence[str] = GENEVAL_COLORS,
    positions: Sequence[str] = GENEVAL_POSITIONS,
    exclude_color_class: str | None = "person",
) -> list[dict]:
    """GenEval's prompt recipe on any class list; official set for COCO_CLASSES and defaults.

    Draw order from ``np.random.default_rng(seed)``: single_object (a permutation of all n
    classes), then ``per_task`` each of two_object, counting, colors, position, color_attr;
    exact duplicates are then dropped (first occurrence kept).

    Generalisation beyond the official script: with ``exclude_color_class=None`` the colors
    task draws ``rng.choice(n)`` and color_attr ``rng.choice(n, size=2, replace=False)`` over
    all classes; with a class name, that class is skipped exactly as the official code
    skips "person" (draw over n-1, add 1, shift by the class index, modulo n).
    """
    classes = list(classes)
    n = len(classes)
    _check_recipe(classes, colors, positions, exclude_color_class)
    shift = None if exclude_color_class is None else classes.index(exclude_color_class)
    rng = np.random.default_rng(seed)

    def color_class(size: int | None):
        if shift is None:
            return rng.choice(n, size=size, replace=False) if size else rng.choice(n)
        # Official: skip the excluded class by drawing over n-1, +1, then rotate by its index.
        drawn = rng.choice(n - 1, size=size, replace=False) + 1 if size else rng.choice(n - 1) + 1
        return (drawn + shift) % n

    samples = _object_prompts(rng, classes, per_task)
    for _ in range(per_task):
        c = classes[rng.choice(n)]
        k = int(rng.integers(COUNTING_MIN, COUNTING_MAX, endpoint=True))
        samples.append({"tag": "counting", "include": [{"class": c, "count": k}],
                        "exclude": [{"class": c, "count": k + 1}],
                        "prompt": f"a photo of {NUMBER_WORDS[k]} {plural(c)}"})
    for _ in range(per_task):
        c = classes[color_class(None)]
        col = colors[rng.choice(len(colors))]
        samples.append({"tag": "colors", "include": [{"class": c, "count": 1, "color": col}],
                        "prompt": f"a photo of {with_article(col)} {c}"})
    for _ in range(per_task):
        a, b = (classes[i] for i in rng.choice(n, size=2, replace=False))
        rel = positions[rng.choice(len(positions))]
        samples.append({"tag": "position",
                        "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
                        "prompt": f"a photo of {with_article(a)} {rel} {with_article(b)}"})
    for _ in range(per_task):
        a, b = (classes[i] for i in color_class(2))
        ca, cb = (colors[i] for i in rng.choice(len(colors), size=2, replace=False))
        samples.append({"tag": "color_attr",
                        "include": [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
                        "prompt": f"a photo of {with_article(ca)} {a} and {with_article(cb)} {b}"})
    return _drop_duplicates(samples)


def _check_recipe(classes: list[str], colors: Sequence[str], positions: Sequence[str], exclude_color_class) -> None:
    n = len(classes)
    if n < 2 or len(set(classes)) != n or not all(isinstance(c, str) and c for c in classes):
        raise UserError("GenEval prompt generation needs at least 2 distinct non-empty class names; fix the class list.")
    if len(colors) < 2 or len(positions) < 1:
        raise UserError("GenEval prompt generation needs at least 2 colours and 1 relation; fix the colors/positions arguments.")
    if exclude_color_class is not None and exclude_color_class not in classes:
        raise UserError(
            f"exclude_color_class {exclude_color_class!r} is not among the classes; pass one of them or None."
        )
    if exclude_color_class is not None and n < 3:
        raise UserError("Excluding a class from colour prompts needs at least 3 classes; pass exclude_color_class=None.")


def _object_prompts(rng: np.random.Generator, classes: list[str], per_task: int) -> list[dict]:
    """The recipe's first draws: single_object (a permutation of all classes), then per_task two_object."""
    n = len(classes)
    samples: list[dict] = []
    for i in rng.choice(n, size=n, replace=False):
        c = classes[i]
        samples.append({"tag": "single_object", "include": [{"class": c, "count": 1}],
                        "prompt": f"a photo of {with_article(c)}"})
    for _ in range(per_task):
        a, b = (classes[i] for i in rng.choice(n, size=2, replace=False))
        samples.append({"tag": "two_object",
                        "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
                        "prompt": f"a photo of {with_article(a)} and {with_article(b)}"})
    return samples


def _drop_duplicates(samples: list[dict]) -> list[dict]:
    """Exact duplicates dropped, first occurrence kept."""
    seen: set[str] = set()
    unique = []
    for s in samples:
        key = json.dumps(s, sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(s)
    return unique


def write_metadata(entries: Sequence[dict], path: str | os.PathLike) -> None:
    """One ``json.dumps`` line per entry, each ending in a newline (the official file format)."""
    with open(path, "w", encoding="utf-8") as fp:
        for e in entries:
            fp.write(json.dumps(e) + "\n")


def validate_entry(entry: object, where: str) -> dict:
    """Check one prompt's metadata; ``where`` prefixes the error (e.g. 'file.jsonl line 3')."""

    def bad(what: str) -> UserError:
        return UserError(f"{where}: {what}; fix that prompt entry (see docs/evaluation.md, GenEval format).")

    if not isinstance(entry, dict):
        raise bad("entry is not a JSON object")
    for key in ("tag", "prompt", "include"):
        if key not in entry:
            raise bad(f"missing '{key}'")
    if entry["tag"] not in GENEVAL_TAGS:
        raise bad(f"unknown tag {entry['tag']!r} (expected one of {', '.join(GENEVAL_TAGS)})")
    if not isinstance(entry["prompt"], str) or not entry["prompt"]:
        raise bad("'prompt' is not a non-empty string")
    include = entry["include"]
    if not isinstance(include, list) or not include:
        raise bad("'include' is not a non-empty list")
    for j, clause in enumerate(include):
        _check_clause(clause, f"include[{j}]", bad)
        if "color" in clause and not (isinstance(clause["color"], str) and clause["color"]):
            raise bad(f"include[{j}] 'color' is not a non-empty string")
        if "position" in clause:
            pos = clause["position"]
            if not (isinstance(pos, list) and len(pos) == 2):
                raise bad(f"include[{j}] 'position' is not [relation, index]")
            rel, idx = pos
            if rel not in GENEVAL_POSITIONS:
                raise bad(f"include[{j}] position relation {rel!r} is not one of {', '.join(GENEVAL_POSITIONS)}")
            if not (isinstance(idx, int) and not isinstance(idx, bool) and 0 <= idx < j):
                raise bad(f"include[{j}] position index {idx!r} must be an integer in [0, {j}) naming an earlier clause")
    if "exclude" in entry:
        exclude = entry["exclude"]
        if not isinstance(exclude, list):
            raise bad("'exclude' is not a list")
        for j, clause in enumerate(exclude):
            _check_clause(clause, f"exclude[{j}]", bad)
    return entry


def _check_clause(clause: object, name: str, bad) -> None:
    if not isinstance(clause, dict):
        raise bad(f"{name} is not a JSON object")
    if "class" not in clause or not isinstance(clause["class"], str) or not clause["class"]:
        raise bad(f"{name} has no 'class' name")
    if "count" not in clause:
        raise bad(f"{name} has no 'count'")
    cnt = clause["count"]
    if not (isinstance(cnt, int) and not isinstance(cnt, bool) and cnt >= 1):
        raise bad(f"{name} 'count' {cnt!r} is not a positive integer")


def read_metadata(path: str | os.PathLike) -> list[dict]:
    """Read and validate a GenEval-format JSONL prompt file (blank lines are skipped)."""
    try:
        with open(path, encoding="utf-8") as fp:
            lines = fp.read().splitlines()
    except OSError as e:
        raise UserError(f"Cannot read GenEval prompt file {os.fspath(path)!r} ({e.strerror}); check the path.") from e
    except UnicodeDecodeError as e:
        raise UserError(f"GenEval prompt file {os.fspath(path)!r} is not UTF-8 text; pass a JSONL file.") from e
    entries = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{os.fspath(path)} line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg}); fix that line.") from e
        entries.append(validate_entry(obj, where))
    if not entries:
        raise UserError(f"GenEval prompt file {os.fspath(path)!r} has no prompts; pass a non-empty JSONL file.")
    return entries
