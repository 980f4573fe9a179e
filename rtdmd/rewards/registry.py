"""Reward registry: name -> an object implementing rtdmd.rewards.base.Reward.

Names (docs/shapes-rewards.md):
- ``geneval_partial``: GenEval partial credit (fraction of checks met) with the shapes
  detector on the shapes backend, Mask2Former + CLIP on real backends; not differentiable.
- ``shapes_pref``, ``shapes_aes``: the learned shapes rewards (differentiable; shipped
  weights in rtdmd/assets/shapes_rewards unless ``path`` is given).
- ``oracle``: the shapes preference oracle, for evaluation only (``training_reward``
  refuses it: it plays the human raters).
- ``hpsv21``, ``imagereward``, ``pickscore``, ``clipscore``, ``aesthetic``: the real
  scorers (benchmarks.scorers.get_scorer; options such as ``path`` pass through).
User rewards (any backend, toy2d included): ``register_reward(name, fn, differentiable)``.
Everything from ``benchmarks`` is imported on first use: rtdmd never imports benchmarks at
module import time.
"""

from __future__ import annotations

from pathlib import Path

from rtdmd.errors import UserError

SHAPES_REWARDS = ("geneval_partial", "shapes_pref", "shapes_aes", "oracle")
REAL_SCORERS = ("hpsv21", "imagereward", "pickscore", "clipscore", "aesthetic")
REWARD_NAMES = SHAPES_REWARDS + REAL_SCORERS
DIFFERENTIABLE = {"shapes_pref", "shapes_aes", *REAL_SCORERS}
SHAPES_ONLY = ("shapes_pref", "shapes_aes", "oracle")
IMAGE_BACKENDS = ("shapes", "sd3", "flux2")

#: evaluation suite -> reward names it reports, per kind of backend
SUITES = {
    "shapes": {"preference": ["oracle", "shapes_pref"], "aesthetic": ["shapes_aes"]},
    "real": {"preference": ["hpsv21", "imagereward", "pickscore", "clipscore"], "aesthetic": ["aesthetic"]},
}

ORACLE_REFUSAL = ("the preference oracle plays the human raters and is never a training signal; "
                  "train on shapes_pref / shapes_aes / geneval_partial")


#: user rewards added with register_reward: name -> (callable, differentiable)
_CUSTOM: dict[str, tuple] = {}


def register_reward(name: str, fn, differentiable: bool = False) -> None:
    """Make a user-written reward ``fn(images, prompts) -> (B,) scores`` available by ``name`` to every
    method (``method.rewards: {name: weight}``), on any backend, toy2d included (its "images" are the
    points). ``differentiable=True`` promises gradients w.r.t. the images (reward back-propagation)."""
    if not isinstance(name, str) or not name or name in REWARD_NAMES:
        raise UserError(f"cannot register reward {name!r}: use a new non-empty name (the built-in names are "
                        f"{', '.join(REWARD_NAMES)}).")
    if not callable(fn):
        raise UserError(f"register_reward('{name}', fn) needs a callable fn(images, prompts) -> scores.")
    _CUSTOM[name] = (fn, bool(differentiable))


def unregister_reward(name: str) -> None:
    _CUSTOM.pop(name, None)


def is_differentiable(name: str) -> bool:
    """Whether reward ``name`` (built-in or registered) can give gradients w.r.t. the images."""
    if name in _CUSTOM:
        return _CUSTOM[name][1]
    return name in DIFFERENTIABLE


class CustomReward:
    """A registered user callable behind the Reward protocol (shape-checked)."""

    def __init__(self, name: str, fn, differentiable: bool):
        self.name, self.fn, self.differentiable = name, fn, differentiable
        self.identity = f"custom:{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"

    def __call__(self, images, prompts):
        import torch

        out = self.fn(images, prompts)
        if not torch.is_tensor(out) or out.shape != (images.shape[0],):
            shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise UserError(f"reward '{self.name}' returned {shape} for {images.shape[0]} inputs; it must return a "
                            f"tensor of shape ({images.shape[0]},).")
        return out


def reward_names() -> list[str]:
    return list(REWARD_NAMES) + sorted(_CUSTOM)


def _backend_name(backend) -> str:
    if backend is None:
        return "shapes"
    name = backend if isinstance(backend, str) else getattr(backend, "name", None)
    if name not in IMAGE_BACKENDS:
        raise UserError(f"rewards score images, and backend {name!r} has none; use one of {', '.join(IMAGE_BACKENDS)}.")
    return name


def _world_spec(backend):
    """The backend's world (a shapes backend object carries one), else the default world."""
    spec = getattr(backend, "spec", None)
    if spec is not None:
        return spec
    from rtdmd.world.shapes import WorldSpec

    return WorldSpec()


class PartialCreditReward:
    """GenEval partial credit as a reward: one detection pass and the rule checks per image."""

    name = "geneval_partial"
    differentiable = False

    def __init__(self, detector, parse, device="cpu"):
        self.detector = detector
        self.parse = parse  # prompt -> GenEval metadata record (UserError when unknown)
        self.identity = f"geneval_partial[{detector.name}]"
        self.device = device

    def __call__(self, images, prompts):
        import torch

        from benchmarks.geneval.rules import partial_credit
        from rtdmd.images import to_uint8

        if images.ndim != 4 or images.shape[1] != 3:
            raise UserError(f"geneval_partial takes (B, 3, H, W) images in [0, 1], got shape {tuple(images.shape)}.")
        if len(prompts) != len(images):
            raise UserError(f"geneval_partial got {len(images)} images but {len(prompts)} prompts; pass one prompt per image.")
        arrays = to_uint8(images)
        scores = [partial_credit(a, self.parse(p), self.detector) for a, p in zip(arrays, prompts)]
        return torch.tensor(scores, dtype=torch.float32, device=images.device)


def _metadata_lookup(metadata) -> dict[str, dict]:
    """prompt -> record from a list of GenEval records or a GenEval .jsonl file."""
    from benchmarks.geneval.prompts import read_metadata, validate_entry

    if isinstance(metadata, (str, Path)):
        records = read_metadata(metadata)
    else:
        records = [validate_entry(m, f"metadata[{i}]") for i, m in enumerate(metadata)]
    return {m["prompt"]: m for m in records}


def _geneval_partial(backend_name: str, backend, device, options: dict) -> PartialCreditReward:
    metadata = options.pop("metadata", None)
    lookup = _metadata_lookup(metadata) if metadata is not None else None
    if backend_name == "shapes":
        from benchmarks.shapes.detector import ShapesDetector
        from rtdmd.world.shapes import ALL_CLASSES, WorldSpec, parse_caption

        spec = options.pop("spec", None) or _world_spec(backend)
        _no_options("geneval_partial", options, "metadata, spec")
        grammar = WorldSpec(image_size=spec.image_size, classes=ALL_CLASSES, size_range=spec.size_range)

        def parse(prompt):
            if lookup is not None and prompt in lookup:
                return lookup[prompt]
            return parse_caption(prompt, grammar)

        return PartialCreditReward(ShapesDetector(spec), parse, device)
    from benchmarks.geneval.mask2former import Mask2FormerDetector
    from benchmarks.geneval.prompts import COCO_CLASSES, generate_metadata

    allowed = {"path", "clip_path", "dtype", "max_per_image", "clip_batch_size"}
    _no_options("geneval_partial", {k: v for k, v in options.items() if k not in allowed}, "metadata, " + ", ".join(sorted(allowed)))
    if lookup is None:
        lookup = _metadata_lookup(generate_metadata(list(COCO_CLASSES)))  # the official 553 prompts

    def parse_real(prompt):
        if prompt not in lookup:
            raise UserError(f"prompt {prompt!r} has no GenEval metadata; pass metadata=<records or .jsonl> to "
                            "get_reward('geneval_partial', ...) covering the training prompts.")
        return lookup[prompt]

    return PartialCreditReward(Mask2FormerDetector(device=device, **options), parse_real, device)


def _no_options(name: str, options: dict, allowed: str) -> None:
    if options:
        raise UserError(f"reward '{name}' has no option {', '.join(sorted(options))}; its options are {allowed or 'none'}.")


def get_reward(name: str, backend=None, device="cpu", differentiable: bool = False, **options):
    """Build reward ``name`` for ``backend`` (a backend name or object; None: shapes).

    ``differentiable=True`` asks for gradients w.r.t. the images (UserError for rewards
    that have none); options: ``path`` (weights), and each scorer's own (docs/scorers.md).
    """
    if name in _CUSTOM:
        fn, diff = _CUSTOM[name]
        if differentiable and not diff:
            raise UserError(f"reward '{name}' was registered as not differentiable; use it through GRPO only or "
                            "register it with differentiable=True.")
        _no_options(name, dict(options), "")
        return CustomReward(name, fn, diff)
    if name not in REWARD_NAMES:
        raise UserError(f"unknown reward '{name}'; choose one of {', '.join(reward_names())}, or add your own with "
                        "rtdmd.rewards.registry.register_reward.")
    bname = _backend_name(backend)
    if name in SHAPES_ONLY and bname != "shapes":
        raise UserError(f"reward '{name}' exists only in the shapes world, not on backend '{bname}'; "
                        f"use one of {', '.join(REAL_SCORERS)} or geneval_partial there.")
    if differentiable and name not in DIFFERENTIABLE:
        raise UserError(f"reward '{name}' is not differentiable; use it through GRPO (differentiable=False) or pick one of "
                        f"{', '.join(sorted(DIFFERENTIABLE))}.")
    options = dict(options)
    if name in REAL_SCORERS:
        from benchmarks.scorers import get_scorer

        return get_scorer(name, device=device, differentiable=differentiable, **options)
    if name == "geneval_partial":
        return _geneval_partial(bname, backend, device, options)
    if name == "oracle":
        from benchmarks.shapes.oracle import PreferenceOracle

        spec = options.pop("spec", None) or _world_spec(backend)
        _no_options(name, options, "spec")
        return PreferenceOracle(spec)
    from benchmarks.shapes.reward_models import LearnedReward, load_bundle

    path = options.pop("path", None)
    batch_size = options.pop("batch_size", 256)
    _no_options(name, options, "path, batch_size")
    return LearnedReward(name, load_bundle(path, device), differentiable=differentiable, batch_size=batch_size)


def training_reward(name: str, backend=None, device="cpu", differentiable: bool = False, **options):
    """get_reward for training: refuses the oracle (evaluation only)."""
    if name == "oracle":
        raise UserError(ORACLE_REFUSAL + ".")
    return get_reward(name, backend=backend, device=device, differentiable=differentiable, **options)


def suite_rewards(backend_name: str, suite: str) -> list[str]:
    """Reward names an evaluation suite reports on a backend (shapes: learned + oracle; real: the scorers)."""
    name = _backend_name(backend_name)
    table = SUITES["shapes" if name == "shapes" else "real"]
    if suite not in table:
        raise UserError(f"suite '{suite}' reports no rewards; reward suites are {', '.join(table)}.")
    return list(table[suite])
