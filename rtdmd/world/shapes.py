"""The shapes world: GenEval's caption grammar over the world's scenes, and scene sampling.

Captions and metadata follow GenEval's prompt generator (Ghosh et al. 2023): templates,
articles ("an" before a vowel letter), plurals ("es" after a final "s") and the
metadata format (tag, include, exclude, prompt). The scenes and the renderer live in
rtdmd.world.render; this module is the world's public face and names them too, so
``from rtdmd.world.shapes import WorldSpec, render, parse_caption`` reads the whole world.
"""

from __future__ import annotations

import re

import numpy as np

from rtdmd.errors import UserError
from rtdmd.world.geneval import GENEVAL_COLORS, NUMBER_WORDS, RELATIONS, with_article
from rtdmd.world.geneval import GENEVAL_TAGS as TASKS
from rtdmd.world.geneval import plural as make_plural
from rtdmd.world.render import (ALL_CLASSES, CROSS_ARM, PALETTE, RING_BAND, RenderOutput,  # noqa: F401  (the world)
                                Scene, ShapeObject, WorldSpec, coverage, relation_margin, relations, render,
                                shape_sdf, to_uint8)

# ---------------------------------------------------------------------------- caption grammar


def prompt_for_metadata(meta: dict) -> str:
    """The GenEval prompt of a metadata record (tag + include)."""
    tag, inc = meta["tag"], meta["include"]
    if tag == "single_object":
        return f"a photo of {with_article(inc[0]['class'])}"
    if tag == "two_object":
        return f"a photo of {with_article(inc[0]['class'])} and {with_article(inc[1]['class'])}"
    if tag == "counting":
        return f"a photo of {NUMBER_WORDS[inc[0]['count']]} {make_plural(inc[0]['class'])}"
    if tag == "colors":
        return f"a photo of {with_article(inc[0]['color'])} {inc[0]['class']}"
    if tag == "position":
        rel = inc[1]["position"][0]
        return f"a photo of {with_article(inc[1]['class'])} {rel} {with_article(inc[0]['class'])}"
    if tag == "color_attr":
        a, b = inc
        return (
            f"a photo of {with_article(a['color'])} {a['class']} and {with_article(b['color'])} {b['class']}"
        )
    raise UserError(f"unknown GenEval tag {tag!r}; use one of {list(TASKS)}.")


def sample_metadata(rng: np.random.Generator, spec: WorldSpec, tag: str) -> dict:
    """One GenEval-format record of the given task over the world's classes (GenEval's draws)."""
    C = list(spec.classes)
    if tag in ("two_object", "position", "color_attr") and len(C) < 2:
        raise UserError(f"task {tag!r} needs at least two world classes; add classes to the world spec.")
    if tag == "single_object":
        include = [{"class": C[rng.choice(len(C))], "count": 1}]
    elif tag == "two_object":
        a, b = rng.choice(len(C), size=2, replace=False)
        include = [{"class": C[a], "count": 1}, {"class": C[b], "count": 1}]
    elif tag == "counting":
        if spec.max_objects < 2:
            raise UserError("counting needs max_objects >= 2; raise max_objects in the world spec.")
        n = int(rng.integers(2, min(4, spec.max_objects), endpoint=True))
        include = [{"class": C[rng.choice(len(C))], "count": n}]
        meta = {"tag": tag, "include": include, "exclude": [{"class": include[0]["class"], "count": n + 1}]}
        meta["prompt"] = prompt_for_metadata(meta)
        return meta
    elif tag == "colors":
        include = [{"class": C[rng.choice(len(C))], "count": 1, "color": GENEVAL_COLORS[rng.choice(10)]}]
    elif tag == "position":
        a, b = rng.choice(len(C), size=2, replace=False)
        rel = RELATIONS[rng.choice(4)]
        include = [{"class": C[b], "count": 1}, {"class": C[a], "count": 1, "position": [rel, 0]}]
    elif tag == "color_attr":
        a, b = rng.choice(len(C), size=2, replace=False)
        c1, c2 = rng.choice(10, size=2, replace=False)
        include = [
            {"class": C[a], "count": 1, "color": GENEVAL_COLORS[c1]},
            {"class": C[b], "count": 1, "color": GENEVAL_COLORS[c2]},
        ]
    else:
        raise UserError(f"unknown GenEval tag {tag!r}; use one of {list(TASKS)}.")
    meta = {"tag": tag, "include": include}
    meta["prompt"] = prompt_for_metadata(meta)
    return meta


_ART = r"an? "


def parse_caption(caption: str, spec: WorldSpec | None = None) -> dict:
    """Inverse of the grammar: a caption -> its GenEval metadata record (UserError if foreign)."""
    classes = spec.classes if spec is not None else ALL_CLASSES
    cls = "|".join(sorted(classes, key=len, reverse=True))
    col = "|".join(GENEVAL_COLORS)
    plural = "|".join(make_plural(c) for c in classes)
    rel = "|".join(RELATIONS)
    pats = [
        ("color_attr", rf"a photo of {_ART}({col}) ({cls}) and {_ART}({col}) ({cls})"),
        ("colors", rf"a photo of {_ART}({col}) ({cls})"),
        ("position", rf"a photo of {_ART}({cls}) ({rel}) {_ART}({cls})"),
        ("two_object", rf"a photo of {_ART}({cls}) and {_ART}({cls})"),
        ("counting", rf"a photo of (two|three|four|five|six|seven|eight|nine|ten) ({plural})"),
        ("single_object", rf"a photo of {_ART}({cls})"),
    ]
    for tag, pat in pats:
        m = re.fullmatch(pat, caption)
        if m is None:
            continue
        g = m.groups()
        if tag == "color_attr":
            include = [{"class": g[1], "count": 1, "color": g[0]}, {"class": g[3], "count": 1, "color": g[2]}]
        elif tag == "colors":
            include = [{"class": g[1], "count": 1, "color": g[0]}]
        elif tag == "position":
            include = [{"class": g[2], "count": 1}, {"class": g[0], "count": 1, "position": [g[1], 0]}]
        elif tag == "two_object":
            include = [{"class": g[0], "count": 1}, {"class": g[1], "count": 1}]
        elif tag == "counting":
            n = NUMBER_WORDS.index(g[0])
            name = next(c for c in classes if make_plural(c) == g[1])
            meta = {"tag": tag, "include": [{"class": name, "count": n}], "exclude": [{"class": name, "count": n + 1}]}
            meta["prompt"] = caption
            return meta
        else:
            include = [{"class": g[0], "count": 1}]
        meta = {"tag": tag, "include": include, "prompt": caption}
        if prompt_for_metadata(meta) != caption:  # wrong article, e.g. "a orange circle"
            break
        return meta
    raise UserError(f"caption {caption!r} is not in the shapes grammar; use GenEval's templates over the world's classes.")


def vocabulary(spec: WorldSpec) -> list[str]:
    """Every word the caption grammar can produce for this world, sorted."""
    words = {"a", "an", "photo", "of", "and"}
    for r in RELATIONS:
        words.update(r.split())
    words.update(NUMBER_WORDS[2 : min(4, spec.max_objects) + 1])
    words.update(GENEVAL_COLORS)
    for c in spec.classes:
        words.update((c, make_plural(c)))
    return sorted(words)


# ---------------------------------------------------------------------------- scene sampling


def scene_satisfies(scene: Scene, meta: dict) -> bool:
    """Ground-truth truth of a GenEval record for a scene, strict enough that any detection order passes.

    include: at least ``count`` objects of the class (exactly, if an exclude names the class),
    all of that class in the required colour; position: every object of the clause stands in
    the relation to every object of the referenced clause (GenEval's rule on true boxes).
    """
    by_cls: dict[str, list[ShapeObject]] = {}
    for o in scene.objects:
        by_cls.setdefault(o.cls, []).append(o)
    for req in meta.get("exclude", []):
        if len(by_cls.get(req["class"], [])) >= req["count"]:
            return False
    inc = meta["include"]
    for req in inc:
        objs = by_cls.get(req["class"], [])
        if len(objs) < req["count"]:
            return False
        if "color" in req and any(o.color != req["color"] for o in objs):
            return False
        if "position" in req:
            rel, target = req["position"]
            ref = by_cls.get(inc[target]["class"], [])
            if not ref or any(rel not in relations(o.box, r.box) for o in objs for r in ref):
                return False
    return True


def _place(
    rng: np.random.Generator,
    n: int,
    spec: WorldSpec,
    constraints: list[tuple[int, int, str]],
    rel_margin: float,
    attempts: int = 32,
    candidates: int = 32,
) -> list[tuple[float, float, float]]:
    """(cx, cy, size) for n objects: inside the frame, boxes apart by spec.gap, relations held.

    Rejection sampling, vectorised over ``attempts`` scenes at once: objects are placed in
    turn, each at the first of ``candidates`` uniform positions clear of those already
    placed; the first attempt that placed everything and meets the relations wins. When a
    whole round fails, the next draws smaller sizes (the upper bound shrinks to the lower,
    then, as a last resort, below it down to 80 %): four 15 px objects cannot fit in 32 px.
    """
    lo, hi = spec.size_range
    S, K, C = spec.image_size, attempts, candidates
    rows = np.arange(K)
    for level in range(16):
        top = hi - (hi - lo) * min(level, 10) / 10
        if level > 10:
            top = lo * (1 - 0.04 * (level - 10))
        sizes = rng.uniform(min(lo, top), top, size=(K, n))
        pos = np.zeros((K, n, 2))
        alive = np.ones(K, dtype=bool)
        for i in range(n):
            s = sizes[:, i]
            lo_c = spec.margin + s / 2
            cand = lo_c[:, None, None] + rng.random((K, C, 2)) * (S - 2 * lo_c)[:, None, None]
            ok = np.ones((K, C), dtype=bool)
            for j in range(i):
                need = ((s + sizes[:, j]) / 2 + spec.gap)[:, None]
                ok &= (np.abs(cand[..., 0] - pos[:, j, 0:1]) >= need) | (np.abs(cand[..., 1] - pos[:, j, 1:2]) >= need)
            alive &= ok.any(axis=1)
            pos[:, i] = cand[rows, ok.argmax(axis=1)]
        half = sizes[..., None] / 2
        boxes = np.concatenate([pos - half, pos + half], axis=-1)  # (K, n, 4)
        for i, j, rel in constraints:
            alive &= relation_margin(boxes[:, i], boxes[:, j], rel) >= rel_margin
        if alive.any():
            k = int(alive.argmax())
            return [(float(pos[k, i, 0]), float(pos[k, i, 1]), float(sizes[k, i])) for i in range(n)]
    raise UserError(
        f"could not place {n} objects in a {S} px image with sizes {spec.size_range}; "
        "lower max_objects or the object sizes, or raise image_size."
    )


def scene_for_metadata(
    meta: dict, rng: np.random.Generator, spec: WorldSpec, n_distractors: int = 0, rel_margin: float = 0.1
) -> Scene:
    """A scene that makes a GenEval record true: exactly its objects, plus optional distractors.

    Unspecified colours are drawn uniformly; distractors are of classes the record does not
    mention (so counts, colours and relations stay true); a position relation holds with its
    normalised component at least ``rel_margin`` past GenEval's 0.5 cut.
    """
    inc = meta.get("include", [])
    mentioned = {r["class"] for r in inc} | {r["class"] for r in meta.get("exclude", [])}
    for r in inc:
        if r["class"] not in spec.classes:
            raise UserError(f"class {r['class']!r} is not in this world; use one of {list(spec.classes)}.")
        if "color" in r and r["color"] not in PALETTE:
            raise UserError(f"colour {r['color']!r} is unknown; use one of {GENEVAL_COLORS}.")
    specs: list[tuple[str, str | None, int]] = []  # (class, colour or None, clause index or -1)
    first_of_clause = []
    for ci, r in enumerate(inc):
        first_of_clause.append(len(specs))
        specs.extend((r["class"], r.get("color"), ci) for _ in range(int(r["count"])))
    others = [c for c in spec.classes if c not in mentioned]
    n_distractors = min(n_distractors, spec.max_objects - len(specs)) if others else 0
    for _ in range(max(n_distractors, 0)):
        specs.append((others[rng.choice(len(others))], None, -1))
    if len(specs) > spec.max_objects:
        raise UserError(
            f"the prompt {meta.get('prompt', '')!r} needs {len(specs)} objects but max_objects={spec.max_objects}; "
            "raise max_objects."
        )
    constraints = []
    for ci, r in enumerate(inc):
        if "position" in r:
            rel, target = r["position"]
            # every object of clause ci against every object of the target clause
            for i in range(first_of_clause[ci], first_of_clause[ci] + int(r["count"])):
                for j in range(first_of_clause[target], first_of_clause[target] + int(inc[target]["count"])):
                    constraints.append((i, j, rel))
    placed = _place(rng, len(specs), spec, constraints, rel_margin)
    objects = []
    for (cls, color, _), (cx, cy, s) in zip(specs, placed):
        if color is None:
            color = GENEVAL_COLORS[rng.choice(10)]
        objects.append(ShapeObject(cls, color, cx, cy, s))
    return Scene(objects)


DEFAULT_TASK_WEIGHTS = {t: 1.0 for t in TASKS}


def sample_training_example(
    rng: np.random.Generator,
    spec: WorldSpec,
    distractor_prob: float = 0.3,
    task_weights: dict[str, float] | None = None,
) -> tuple[Scene, str]:
    """One (scene, caption) pair: a GenEval task drawn by weight, its record, a scene that makes it true.

    With probability ``distractor_prob`` the scene also holds 1.. (max_objects - needed)
    objects of classes the caption does not mention.
    """
    weights = dict(task_weights or DEFAULT_TASK_WEIGHTS)
    if len(spec.classes) < 2:
        for t in ("two_object", "position", "color_attr"):
            weights.pop(t, None)
    if spec.max_objects < 2:
        for t in ("two_object", "position", "color_attr", "counting"):
            weights.pop(t, None)
    bad = [t for t in weights if t not in TASKS]
    if bad:
        raise UserError(f"unknown task names {bad} in task_weights; use names from {list(TASKS)}.")
    tags = [t for t in TASKS if weights.get(t, 0) > 0]
    if not tags:
        raise UserError("task_weights leave no task with positive weight; give at least one task a weight > 0.")
    w = np.array([weights[t] for t in tags], dtype=np.float64)
    tag = tags[rng.choice(len(tags), p=w / w.sum())]
    meta = sample_metadata(rng, spec, tag)
    n_needed = sum(int(r["count"]) for r in meta["include"])
    n_distractors = 0
    if spec.max_objects > n_needed and rng.random() < distractor_prob:
        n_distractors = int(rng.integers(1, spec.max_objects - n_needed, endpoint=True))
    return scene_for_metadata(meta, rng, spec, n_distractors=n_distractors), meta["prompt"]


def sample_training_batch(
    rng: np.random.Generator,
    spec: WorldSpec,
    n: int,
    distractor_prob: float = 0.3,
    task_weights: dict[str, float] | None = None,
) -> tuple[list[Scene], list[str]]:
    """n independent training examples."""
    pairs = [sample_training_example(rng, spec, distractor_prob, task_weights) for _ in range(n)]
    return [p[0] for p in pairs], [p[1] for p in pairs]
