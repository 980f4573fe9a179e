"""Training data of the learned shapes rewards: corrupted renders, a cached image pool, oracle pairs.

Pool: groups of images for one prompt each (a caption of the training distribution):
``teacher_per_group`` teacher samples (a few Euler steps and CFG weights, so of varied
quality) and ``renders_per_group`` renders of a scene that makes the prompt true, each
with 0-3 corruptions (CORRUPTIONS). Every image is labelled once by the preference oracle
(the detector costs ~20 ms an image, too slow to label on the fly). Images and labels are
stored as shards on disk; the pool of (seed, split) is deterministic, and a shard already
on disk is never rebuilt.

Pairs: the rater model is Bradley-Terry, P(a preferred to b) = sigmoid((o_a - o_b) / T),
with o the oracle (or its quality part for the aesthetic model) and T the temperature.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from rtdmd.errors import UserError
from rtdmd.seeding import numpy_generator
from rtdmd.world.shapes import (
    GENEVAL_COLORS,
    PALETTE,
    Scene,
    ShapeObject,
    WorldSpec,
    render,
    sample_training_example,
    to_uint8,
)

POOL_VERSION = "1"
SCENE_CORRUPTIONS = ("drop", "add", "recolor", "reclass", "move", "overlap", "cut", "resize", "swap_scene")
PIXEL_CORRUPTIONS = ("blur", "noise", "stain", "tint", "ghost")
CORRUPTIONS = SCENE_CORRUPTIONS + PIXEL_CORRUPTIONS
TERM_NAMES = ("background", "edges", "frame", "overlap", "size")


# ---------------------------------------------------------------------------- corruptions


def _copy(scene: Scene) -> Scene:
    return Scene([ShapeObject(o.cls, o.color, o.cx, o.cy, o.size) for o in scene.objects])


def _random_object(rng: np.random.Generator, spec: WorldSpec) -> ShapeObject:
    s = float(rng.uniform(*spec.size_range))
    lo, hi = spec.margin + s / 2, spec.image_size - spec.margin - s / 2
    return ShapeObject(spec.classes[rng.integers(len(spec.classes))], GENEVAL_COLORS[rng.integers(10)],
                       float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)), s)


def corrupt_scene(scene: Scene, kind: str, rng: np.random.Generator, spec: WorldSpec) -> Scene:
    """A copy of ``scene`` with one content or layout mistake of the given kind."""
    out = _copy(scene)
    objs = out.objects
    S = spec.image_size
    if kind == "swap_scene":  # the scene of another caption
        return sample_training_example(rng, spec)[0]
    if kind == "add" or (not objs and kind != "drop"):
        objs.append(_random_object(rng, spec))
        if kind == "add":
            return out
    if not objs:
        return out
    i = int(rng.integers(len(objs)))
    o = objs[i]
    if kind == "drop":
        objs.pop(i)
    elif kind == "recolor":
        o.color = [c for c in GENEVAL_COLORS if c != o.color][rng.integers(9)]
    elif kind == "reclass":
        others = [c for c in spec.classes if c != o.cls]
        if others:
            o.cls = others[rng.integers(len(others))]
    elif kind == "move":
        lo, hi = spec.margin + o.size / 2, S - spec.margin - o.size / 2
        o.cx, o.cy = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
    elif kind == "overlap":
        if len(objs) < 2:
            objs.append(_random_object(rng, spec))
        j = int(rng.choice([k for k in range(len(objs)) if k != i]))
        o.cx = float(objs[j].cx + rng.uniform(-0.5, 0.5) * objs[j].size)
        o.cy = float(objs[j].cy + rng.uniform(-0.5, 0.5) * objs[j].size)
    elif kind == "cut":  # 15 % to 60 % of the object outside the frame, on one side
        inside = float(rng.uniform(-0.1, 0.35)) * o.size
        side = int(rng.integers(4))
        if side == 0:
            o.cx = inside
        elif side == 1:
            o.cx = S - inside
        elif side == 2:
            o.cy = inside
        else:
            o.cy = S - inside
    elif kind == "resize":
        f = rng.uniform(0.35, 0.7) if rng.random() < 0.5 else rng.uniform(1.4, 1.9)
        o.size = float(min(o.size * f, S))
    else:
        raise UserError(f"unknown scene corruption {kind!r}; use one of {list(SCENE_CORRUPTIONS)}.")
    return out


def corrupt_pixels(image: np.ndarray, kind: str, rng: np.random.Generator, spec: WorldSpec) -> np.ndarray:
    """(3, H, W) float image in [0, 1] -> a degraded copy (clipped to [0, 1])."""
    x = np.array(image, dtype=np.float64)
    _, H, W = x.shape
    scale = spec.image_size / 32
    bg = np.asarray(spec.background).reshape(3, 1, 1)
    yy, xx = np.mgrid[0:H, 0:W] + 0.5
    if kind == "blur":
        sigma = rng.uniform(0.4, 2.0) * scale
        x = ndimage.gaussian_filter(x, (0, sigma, sigma), mode="nearest")
    elif kind == "noise":
        x = x + rng.normal(0.0, rng.uniform(0.01, 0.1), x.shape)
    elif kind == "stain":  # 1-3 soft ellipses of a palette or arbitrary colour
        for _ in range(int(rng.integers(1, 4))):
            cx, cy = rng.uniform(0, W), rng.uniform(0, H)
            rx, ry = rng.uniform(1.5, 5.0, size=2) * scale
            col = np.asarray(PALETTE[GENEVAL_COLORS[rng.integers(10)]]) if rng.random() < 0.5 else rng.random(3)
            d = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
            a = np.clip((1 - d) * min(rx, ry) + 0.5, 0, 1) * rng.uniform(0.3, 1.0)
            x = x * (1 - a) + col.reshape(3, 1, 1) * a
    elif kind == "tint":  # a colour cast plus a linear gradient over the whole image
        th = rng.uniform(0, 2 * np.pi)
        ramp = ((xx - W / 2) * np.cos(th) + (yy - H / 2) * np.sin(th)) / (W / 2)
        x = x + rng.uniform(-0.08, 0.08, size=(3, 1, 1)) + rng.uniform(0, 0.1) * ramp * rng.choice([-1, 1], size=(3, 1, 1))
    elif kind == "ghost":  # a shifted, faded double of everything
        dy, dx = 0, 0
        while dy == 0 and dx == 0:
            dy, dx = (int(v) for v in rng.integers(-3, 4, size=2))
        shifted = np.stack([ndimage.shift(x[c], (dy * scale, dx * scale), order=0, cval=float(bg[c, 0, 0]))
                            for c in range(3)])
        a = rng.uniform(0.2, 0.5)
        x = (1 - a) * x + a * shifted
    else:
        raise UserError(f"unknown pixel corruption {kind!r}; use one of {list(PIXEL_CORRUPTIONS)}.")
    return np.clip(x, 0.0, 1.0)


def random_corruptions(rng: np.random.Generator, count_probs=(0.1, 0.4, 0.35, 0.15)) -> list[str]:
    """0..3 distinct corruption kinds (count drawn from count_probs), in a fixed order: scene first."""
    n = int(rng.choice(len(count_probs), p=np.asarray(count_probs) / np.sum(count_probs)))
    kinds = set(rng.choice(len(CORRUPTIONS), size=n, replace=False).tolist())
    return [CORRUPTIONS[k] for k in sorted(kinds)]


def corrupted_render(scene: Scene, kinds: list[str], rng: np.random.Generator, spec: WorldSpec) -> np.ndarray:
    """Apply scene corruptions, render, apply pixel corruptions -> (H, W, 3) uint8."""
    for k in kinds:
        if k in SCENE_CORRUPTIONS:
            scene = corrupt_scene(scene, k, rng, spec)
    x = render([scene], spec).images[0].numpy().astype(np.float64)
    for k in kinds:
        if k in PIXEL_CORRUPTIONS:
            x = corrupt_pixels(x, k, rng, spec)
    return to_uint8(torch.from_numpy(x).float()[None])[0]


# ---------------------------------------------------------------------------- Bradley-Terry


def preference_probability(o_a, o_b, temperature: float) -> torch.Tensor:
    """P(a preferred to b) = sigmoid((o_a - o_b) / T)."""
    if temperature <= 0:
        raise UserError(f"the Bradley-Terry temperature must be positive, got {temperature}; use e.g. 0.05.")
    return torch.sigmoid((torch.as_tensor(o_a, dtype=torch.float64) - torch.as_tensor(o_b, dtype=torch.float64))
                         / temperature).float()


def bradley_terry_labels(o_a, o_b, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """One noisy rater per pair: 1.0 where a is preferred, drawn from preference_probability."""
    p = preference_probability(o_a, o_b, temperature)
    return (torch.rand(p.shape, generator=generator) < p).float()


def pairwise_agreement(scores, reference, pairs: np.ndarray, min_gap: float = 0.0) -> tuple[float, int]:
    """Share of pairs (i, j) with |ref_i - ref_j| > min_gap whose score order matches the reference's."""
    s, r = np.asarray(scores, np.float64), np.asarray(reference, np.float64)
    i, j = np.asarray(pairs).T
    keep = np.abs(r[i] - r[j]) > min_gap
    if not keep.any():
        return float("nan"), 0
    agree = np.sign(s[i] - s[j])[keep] == np.sign(r[i] - r[j])[keep]
    return float(agree.mean()), int(keep.sum())


def within_group_pairs(group: np.ndarray) -> np.ndarray:
    """Every unordered pair (i, j), i < j, of images that share a group (prompt): (P, 2)."""
    group = np.asarray(group)
    out = []
    for g in np.unique(group):
        idx = np.nonzero(group == g)[0]
        a, b = np.triu_indices(len(idx), k=1)
        out.append(np.stack([idx[a], idx[b]], 1))
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.int64)


# ---------------------------------------------------------------------------- the pool


@dataclass
class PoolConfig:
    """What a pool holds; its hash names the cache folder."""

    split: str = "train"  # "train" or "heldout": disjoint seed streams
    groups: int = 1200
    teacher_per_group: int = 2
    renders_per_group: int = 6
    #: (Euler steps, CFG weight) of teacher samples, used in turn
    teacher_settings: list[list[float]] = field(default_factory=lambda: [[3, 1.0], [4, 1.0], [6, 2.0], [8, 3.0], [12, 4.0]])
    corruption_counts: list[float] = field(default_factory=lambda: [0.1, 0.4, 0.35, 0.15])
    distractor_prob: float = 0.3
    seed: int = 0
    shard_groups: int = 100

    def key(self, world: dict, teacher_id: str) -> str:
        blob = json.dumps({"pool": asdict(self), "world": world, "teacher": teacher_id, "version": POOL_VERSION},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Pool:
    images: np.ndarray  # (N, H, W, 3) uint8
    group: np.ndarray  # (N,) int: index into prompts
    prompts: list[str]  # one per group
    source: list[str]  # per image: "teacher:<steps>x<cfg>" or "render:<kinds joined by +>"
    oracle: np.ndarray  # (N,) oracle score
    faithfulness: np.ndarray  # (N,)
    quality: np.ndarray  # (N,) the oracle's quality part Q
    terms: np.ndarray  # (N, 5) quality terms in TERM_NAMES order

    def __len__(self) -> int:
        return len(self.images)

    def image_prompts(self) -> list[str]:
        return [self.prompts[g] for g in self.group]

    def group_index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image indices sorted by group, start of each group in that order, images per group)."""
        counts = np.bincount(self.group, minlength=len(self.prompts))
        if (counts < 2).any():
            raise UserError("every prompt group of the reward pool needs at least 2 images; rebuild the pool.")
        return np.argsort(self.group, kind="stable"), np.concatenate([[0], np.cumsum(counts)[:-1]]), counts


#: teacher(prompts, keys, steps, guidance) -> (B, 3, H, W) float images in [0, 1]
TeacherFn = Callable[[list[str], list[tuple], int, float], torch.Tensor]


@contextlib.contextmanager
def _torch_threads(n: int):
    # the detector's small convolutions run ~10x faster on one thread when cores are shared
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _group_prompt(cfg: PoolConfig, spec: WorldSpec, g: int) -> tuple[Scene, str]:
    rng = numpy_generator(cfg.seed, "reward-pool", cfg.split, "prompt", g)
    return sample_training_example(rng, spec, cfg.distractor_prob)


def _build_images(cfg: PoolConfig, spec: WorldSpec, groups: range, teacher: TeacherFn | None) -> dict:
    prompts, scenes = [], []
    for g in groups:
        scene, caption = _group_prompt(cfg, spec, g)
        scenes.append(scene)
        prompts.append(caption)
    images, group, source = [], [], []
    # teacher samples, batched by sampling setting
    if cfg.teacher_per_group > 0:
        if teacher is None:
            raise UserError("the pool needs teacher samples but no teacher was given; set teacher_per_group=0 or pass a teacher.")
        settings = cfg.teacher_settings
        todo: dict[int, list[tuple[int, int]]] = {}
        for gi, g in enumerate(groups):
            for k in range(cfg.teacher_per_group):
                todo.setdefault((g * cfg.teacher_per_group + k) % len(settings), []).append((gi, k))
        for si in sorted(todo):
            steps, guidance = int(settings[si][0]), float(settings[si][1])
            items = todo[si]
            for start in range(0, len(items), 64):
                chunk = items[start:start + 64]
                keys = [(cfg.seed, "reward-pool", cfg.split, "teacher", groups[gi], k) for gi, k in chunk]
                out = to_uint8(teacher([prompts[gi] for gi, _ in chunk], keys, steps, guidance))
                for (gi, _), arr in zip(chunk, out):
                    images.append(arr)
                    group.append(groups[gi])
                    source.append(f"teacher:{steps}x{guidance:g}")
    for gi, g in enumerate(groups):
        for k in range(cfg.renders_per_group):
            rng = numpy_generator(cfg.seed, "reward-pool", cfg.split, "render", g, k)
            kinds = random_corruptions(rng, cfg.corruption_counts)
            images.append(corrupted_render(scenes[gi], kinds, rng, spec))
            group.append(g)
            source.append("render:" + "+".join(kinds))
    return {"images": np.stack(images), "group": np.asarray(group, dtype=np.int64), "prompts": np.asarray(prompts),
            "source": np.asarray(source)}


def _label(shard: dict, oracle) -> dict:
    prompts, first = shard["prompts"], int(shard["group"].min())
    with _torch_threads(1):
        scores = [oracle.score_image(img, str(prompts[g - first])) for img, g in zip(shard["images"], shard["group"])]
    return {"oracle": np.asarray([s.total for s in scores]),
            "faithfulness": np.asarray([s.faithfulness for s in scores]),
            "quality": np.asarray([s.quality for s in scores]),
            "terms": np.asarray([[s.terms[t] for t in TERM_NAMES] for s in scores])}


def _save(path: Path, arrays: dict) -> None:
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def build_pool(cfg: PoolConfig, spec: WorldSpec, directory: str | Path, teacher: TeacherFn | None, oracle,
               key: str = "", progress: bool = True, shards=None) -> Pool | None:
    """Build (or finish) the pool in ``directory`` shard by shard, label it with ``oracle``, load it.

    Images are stored once (images_<i>.npz); labels per oracle identity under labels/<hash>/,
    so a changed oracle relabels the same images instead of regenerating them. ``shards``: build
    only these shard indices and return None (several processes can share one pool's work).
    """
    if cfg.split not in ("train", "heldout"):
        raise UserError(f"pool split {cfg.split!r} is unknown; use 'train' or 'heldout'.")
    if cfg.groups <= 0 or cfg.teacher_per_group + cfg.renders_per_group < 2:
        raise UserError("a reward pool needs groups > 0 and at least 2 images per group; raise groups or the per-group counts.")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    info = {"key": key, "config": asdict(cfg), "world": _world_dict(spec)}
    info_file = d / "pool.json"
    if info_file.is_file():
        old = json.loads(info_file.read_text())
        if old.get("key") != key or old.get("config") != info["config"]:
            raise UserError(f"{d} holds a reward pool built with other settings; choose another method.pool_dir or delete that folder.")
    else:
        info_file.write_text(json.dumps(info, indent=2) + "\n")
    label_dir = d / "labels" / hashlib.sha256(oracle.identity.encode()).hexdigest()[:16]
    label_dir.mkdir(parents=True, exist_ok=True)
    (label_dir / "oracle.txt").write_text(oracle.identity + "\n")
    n_shards = -(-cfg.groups // cfg.shard_groups)
    wanted = range(n_shards) if shards is None else [i for i in shards if 0 <= i < n_shards]
    todo = [i for i in wanted if not (label_dir / f"shard_{i:04d}.npz").is_file()]
    bar = None
    if progress and todo:
        bar = tqdm(total=len(todo), desc=f"reward pool ({cfg.split})", unit="shard", dynamic_ncols=True)
    for i in todo:
        img_file = d / f"images_{i:04d}.npz"
        if img_file.is_file():
            shard = dict(np.load(img_file, allow_pickle=False))
        else:
            groups = range(i * cfg.shard_groups, min((i + 1) * cfg.shard_groups, cfg.groups))
            shard = _build_images(cfg, spec, groups, teacher)
            _save(img_file, shard)
        _save(label_dir / f"shard_{i:04d}.npz", _label(shard, oracle))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return load_pool(d, label_dir, n_shards) if shards is None else None


def load_pool(directory: str | Path, label_dir: str | Path, n_shards: int) -> Pool:
    """The pool's images in ``directory`` with the labels in ``label_dir`` (n_shards of each)."""
    d, ld = Path(directory), Path(label_dir)
    files = [(d / f"images_{i:04d}.npz", ld / f"shard_{i:04d}.npz") for i in range(n_shards)]
    if not all(a.is_file() and b.is_file() for a, b in files):
        raise UserError(f"{d} holds no complete labelled reward pool; build it with build_pool (rtdmd-bench train reward does).")
    parts = [{**dict(np.load(a, allow_pickle=False)), **dict(np.load(b, allow_pickle=False))} for a, b in files]
    prompts: list[str] = []
    for p in parts:
        if int(p["group"].min()) != len(prompts):
            raise UserError(f"the reward pool in {d} has a gap before group {len(prompts)}; delete the folder and rebuild.")
        prompts.extend(str(x) for x in p["prompts"])
    cat = {k: np.concatenate([p[k] for p in parts]) for k in ("images", "group", "source", "oracle", "faithfulness",
                                                              "quality", "terms")}
    return Pool(images=cat["images"], group=cat["group"], prompts=prompts, source=[str(s) for s in cat["source"]],
                oracle=cat["oracle"], faithfulness=cat["faithfulness"], quality=cat["quality"], terms=cat["terms"])


def _world_dict(spec: WorldSpec) -> dict:
    return {"image_size": spec.image_size, "classes": list(spec.classes), "size_range": list(spec.size_range),
            "max_objects": spec.max_objects}


# ---------------------------------------------------------------------------- sampling pairs


def sample_pairs(pool: Pool, n: int, generator: torch.Generator, same_group: bool) -> tuple[np.ndarray, np.ndarray]:
    """n pairs of distinct images: within one group (same prompt) or anywhere in the pool."""
    if same_group:
        order, starts, counts = pool.group_index()
        g = torch.randint(0, len(counts), (n,), generator=generator).numpy()
        c = counts[g]
        a = (torch.rand(n, generator=generator).numpy() * c).astype(np.int64)
        b = (torch.rand(n, generator=generator).numpy() * (c - 1)).astype(np.int64)
        b = b + (b >= a)  # another member of the same group
        return order[starts[g] + a], order[starts[g] + b]
    N = len(pool)
    a = torch.randint(0, N, (n,), generator=generator).numpy()
    b = torch.randint(0, N - 1, (n,), generator=generator).numpy()
    return a, b + (b >= a)


def sample_groups(pool: Pool, n_groups: int, generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """All images of ``n_groups`` random prompt groups: (image indices, position of each image's group in the draw)."""
    order, starts, counts = pool.group_index()
    gs = torch.randint(0, len(counts), (n_groups,), generator=generator).numpy()
    idx = np.concatenate([order[starts[g]:starts[g] + counts[g]] for g in gs])
    slot = np.concatenate([np.full(counts[g], k) for k, g in enumerate(gs)])
    return idx, slot


def all_pairs(slot: np.ndarray, same_group: bool) -> tuple[np.ndarray, np.ndarray]:
    """Every unordered pair (i < j) of positions in a batch, or only those with equal ``slot`` (same prompt)."""
    if same_group:
        i, j = within_group_pairs(slot).T
        return i, j
    return np.triu_indices(len(slot), k=1)


def flip_prompt(prompt: str) -> str:
    """The caption of the mirrored scene: "left of" and "right of" swap (every shape is mirror-symmetric)."""
    return prompt.replace("left of", "\0").replace("right of", "left of").replace("\0", "right of")

