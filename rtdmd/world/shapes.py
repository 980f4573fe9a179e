"""The shapes world: scenes, a batched anti-aliased SDF renderer, and GenEval's caption grammar.

Coordinates are continuous pixels: x right, y down, the centre of pixel (row i, column j)
at (j + 0.5, i + 0.5), the image spans [0, W] x [0, H]. Every shape of ``size`` s spans
exactly the axis-aligned box [cx - s/2, cx + s/2] x [cy - s/2, cy + s/2].

Captions and metadata follow GenEval's prompt generator (Ghosh et al. 2023): templates,
articles ("an" before a vowel letter), plurals ("es" after a final "s") and the
metadata format (tag, include, exclude, prompt).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from rtdmd.errors import UserError
from rtdmd.world.geneval import GENEVAL_COLORS, NUMBER_WORDS, POSITION_THRESHOLD, RELATIONS, relative_position, with_article
from rtdmd.world.geneval import GENEVAL_TAGS as TASKS
from rtdmd.world.geneval import plural as make_plural

# Saturated, pairwise distinct; black and white far from the #999999 background.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (220 / 255, 30 / 255, 30 / 255),
    "orange": (255 / 255, 140 / 255, 0 / 255),
    "yellow": (250 / 255, 225 / 255, 30 / 255),
    "green": (30 / 255, 170 / 255, 50 / 255),
    "blue": (30 / 255, 70 / 255, 230 / 255),
    "purple": (140 / 255, 40 / 255, 190 / 255),
    "pink": (255 / 255, 130 / 255, 200 / 255),
    "brown": (130 / 255, 75 / 255, 30 / 255),
    "black": (15 / 255, 15 / 255, 15 / 255),
    "white": (250 / 255, 250 / 255, 250 / 255),
}

ALL_CLASSES = ("circle", "square", "triangle", "diamond", "cross", "ring")

# Shape proportions (fractions of size): cross arm width, ring band width.
CROSS_ARM = 0.36
RING_BAND = 0.25


@dataclass(frozen=True)
class WorldSpec:
    """What the world draws: canvas, classes, object sizes (px), background, edge softness."""

    image_size: int = 32
    classes: tuple[str, ...] = ALL_CLASSES
    size_range: tuple[float, float] = (10.0, 15.0)
    max_objects: int = 4
    background: tuple[float, float, float] = (0.6, 0.6, 0.6)  # #999999
    aa_width: float = 1.0  # anti-aliasing ramp width in px: coverage = clamp(0.5 - sdf / aa_width, 0, 1)
    gap: float = 2.0  # minimum free space between sampled objects' boxes, px
    margin: float = 1.0  # minimum distance from a sampled object's box to the frame, px

    def __post_init__(self):
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "size_range", tuple(float(s) for s in self.size_range))
        object.__setattr__(self, "background", tuple(float(c) for c in self.background))
        bad = [c for c in self.classes if c not in ALL_CLASSES]
        if bad or not self.classes or len(set(self.classes)) != len(self.classes):
            raise UserError(
                f"world classes {list(self.classes)} are invalid; use distinct names from {list(ALL_CLASSES)}."
            )
        if self.image_size < 16:
            raise UserError(f"image_size={self.image_size} is too small; use 16 or more (32 or 64 are standard).")
        lo, hi = self.size_range
        if not (2.0 <= lo <= hi <= self.image_size - 2 * self.margin):
            raise UserError(
                f"size_range={self.size_range} does not fit a {self.image_size} px image; "
                f"use 2 <= min <= max <= {self.image_size - 2 * self.margin}."
            )
        if self.max_objects < 1:
            raise UserError(f"max_objects={self.max_objects} must be at least 1.")
        if self.aa_width <= 0:
            raise UserError(f"aa_width={self.aa_width} must be positive.")


@dataclass
class ShapeObject:
    cls: str
    color: str
    cx: float
    cy: float
    size: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


@dataclass
class Scene:
    objects: list[ShapeObject] = field(default_factory=list)


@dataclass
class RenderOutput:
    images: torch.Tensor  # (B, 3, H, W) float in [0, 1]
    masks: list[torch.Tensor]  # per image (n_i, H, W) bool: visible pixels (occlusion aware)
    boxes: list[torch.Tensor]  # per image (n_i, 4) float x0, y0, x1, y1 (the whole shape's box)
    alphas: list[torch.Tensor]  # per image (n_i, H, W) float visible coverage in [0, 1]


# ---------------------------------------------------------------------------- geometry


def _box_sdf(x: torch.Tensor, y: torch.Tensor, hx: torch.Tensor, hy: torch.Tensor) -> torch.Tensor:
    """Exact signed distance to an axis-aligned box of half-sides (hx, hy) centred at 0."""
    qx = x.abs() - hx
    qy = y.abs() - hy
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    inside = torch.maximum(qx, qy).clamp(max=0)
    return outside + inside


def _segment_dist2(x, y, ax, ay, bx, by):
    ex, ey = bx - ax, by - ay
    t = (((x - ax) * ex + (y - ay) * ey) / (ex * ex + ey * ey)).clamp(0, 1)
    dx, dy = x - ax - t * ex, y - ay - t * ey
    return dx * dx + dy * dy


def shape_sdf(cls: str, x: torch.Tensor, y: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Signed distance (px, negative inside) of a shape centred at 0; ``size`` broadcasts."""
    h = size / 2
    if cls == "circle":
        return torch.sqrt(x * x + y * y) - h
    if cls == "square":
        return _box_sdf(x, y, h, h)
    if cls == "diamond":
        # a square turned 45 degrees with vertices on the axes at distance h
        s = math.sqrt(0.5)
        return _box_sdf((x + y) * s, (x - y) * s, h * s, h * s)
    if cls == "cross":
        t = h * CROSS_ARM
        return torch.minimum(_box_sdf(x, y, h, t), _box_sdf(x, y, t, h))
    if cls == "ring":
        w = size * RING_BAND
        return (torch.sqrt(x * x + y * y) - (h - w / 2)).abs() - w / 2
    if cls == "triangle":
        # apex at (0, -h), base from (-h, h) to (h, h): exact polygon distance, signed by the half-planes
        zero = torch.zeros_like(h)
        verts = [(zero, -h), (h, h), (-h, h)]
        d2 = None
        for i in range(3):
            (ax, ay), (bx, by) = verts[i], verts[(i + 1) % 3]
            s = _segment_dist2(x, y, ax, ay, bx, by)
            d2 = s if d2 is None else torch.minimum(d2, s)
        # inward-facing half-plane tests: the base (y <= h) and the two slanted sides |x| <= (y + h) / 2
        inside = (y <= h) & (2 * x.abs() <= y + h)
        d = torch.sqrt(d2)
        return torch.where(inside, -d, d)
    raise UserError(f"unknown shape class {cls!r}; use one of {list(ALL_CLASSES)}.")


def coverage(sdf: torch.Tensor, aa_width: float) -> torch.Tensor:
    """Anti-aliased coverage of a pixel from the signed distance at its centre."""
    return (0.5 - sdf / aa_width).clamp(0.0, 1.0)


def relations(box_a, box_b, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """GenEval's relative position of box A to box B, as a set (rtdmd.world.geneval.relative_position)."""
    return set(relative_position(box_a, box_b, threshold))


def _relation_margin(box_a: np.ndarray, box_b: np.ndarray, rel: str) -> np.ndarray:
    """How far the relation's normalised component is past GenEval's 0.5 cut (negative: fails).

    Boxes are (..., 4) arrays; the result has shape (...).
    """
    a = np.asarray(box_a, dtype=np.float64)
    b = np.asarray(box_b, dtype=np.float64)
    offset = (a[..., :2] + a[..., 2:]) / 2 - (b[..., :2] + b[..., 2:]) / 2
    norm = np.linalg.norm(offset, axis=-1, keepdims=True)
    dims = np.abs(a[..., 2:] - a[..., :2]) + np.abs(b[..., 2:] - b[..., :2])
    rev = np.maximum(np.abs(offset) - POSITION_THRESHOLD * dims, 0) * np.sign(offset) / np.maximum(norm, 1e-9)
    value = {"left of": -rev[..., 0], "right of": rev[..., 0], "above": -rev[..., 1], "below": rev[..., 1]}[rel]
    return np.where(norm[..., 0] < 1e-9, -1.0, value - 0.5)


# ---------------------------------------------------------------------------- rendering


def render(scenes: list[Scene], spec: WorldSpec, device: str | torch.device = "cpu") -> RenderOutput:
    """Draw scenes in painter's order (later objects on top) with batched torch SDFs."""
    B = len(scenes)
    H = W = spec.image_size
    N = max([len(s.objects) for s in scenes] + [1])
    cls_idx = np.full((B, N), -1, dtype=np.int64)
    params = np.zeros((B, N, 3), dtype=np.float32)
    colors = np.zeros((B, N, 3), dtype=np.float32)
    for b, scene in enumerate(scenes):
        for n, o in enumerate(scene.objects):
            if o.cls not in ALL_CLASSES:
                raise UserError(f"unknown shape class {o.cls!r}; use one of {list(ALL_CLASSES)}.")
            if o.color not in PALETTE:
                raise UserError(f"unknown colour {o.color!r}; use one of {GENEVAL_COLORS}.")
            cls_idx[b, n] = ALL_CLASSES.index(o.cls)
            params[b, n] = (o.cx, o.cy, o.size)
            colors[b, n] = PALETTE[o.color]
    dev = torch.device(device)
    p = torch.from_numpy(params).to(dev)
    col = torch.from_numpy(colors).to(dev)
    cidx = torch.from_numpy(cls_idx).to(dev)
    xs = torch.arange(W, device=dev, dtype=torch.float32) + 0.5
    ys = torch.arange(H, device=dev, dtype=torch.float32) + 0.5
    cov = torch.zeros(B, N, H, W, device=dev)
    for k, name in enumerate(ALL_CLASSES):
        sel = cidx == k
        if not bool(sel.any()):
            continue
        q = p[sel]  # (M, 3)
        x = xs.view(1, 1, W) - q[:, 0].view(-1, 1, 1)
        y = ys.view(1, H, 1) - q[:, 1].view(-1, 1, 1)
        cov[sel] = coverage(shape_sdf(name, x, y, q[:, 2].view(-1, 1, 1)), spec.aa_width)
    bg = torch.tensor(spec.background, device=dev, dtype=torch.float32).view(1, 3, 1, 1)
    img = bg.expand(B, 3, H, W).clone()
    for n in range(N):
        a = cov[:, n : n + 1]
        img = img * (1 - a) + a * col[:, n].view(B, 3, 1, 1)
    # visible coverage: own coverage times the transmittance of everything drawn later
    vis = torch.empty_like(cov)
    trans = torch.ones(B, H, W, device=dev)
    for n in reversed(range(N)):
        vis[:, n] = cov[:, n] * trans
        trans = trans * (1 - cov[:, n])
    half = p[..., 2] / 2
    boxes_all = torch.stack([p[..., 0] - half, p[..., 1] - half, p[..., 0] + half, p[..., 1] + half], dim=-1)
    masks, boxes, alphas = [], [], []
    for b, scene in enumerate(scenes):
        n = len(scene.objects)
        alphas.append(vis[b, :n])
        masks.append(vis[b, :n] >= 0.5)
        boxes.append(boxes_all[b, :n])
    return RenderOutput(images=img.clamp(0, 1), masks=masks, boxes=boxes, alphas=alphas)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float [0, 1] -> (B, H, W, 3) uint8, as written to PNG."""
    return (images.detach().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)


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
            alive &= _relation_margin(boxes[:, i], boxes[:, j], rel) >= rel_margin
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
