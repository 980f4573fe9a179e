"""The benchmark rewards, registered into rtdmd's reward registry (entry points ``rtdmd_bench.rewards``).

Names (docs/shapes-rewards.md):
- ``geneval_partial``: GenEval partial credit (fraction of checks met) with the shapes
  detector on the shapes backend, Mask2Former + CLIP on real backends; not differentiable.
- ``shapes_pref``, ``shapes_aes``: the learned shapes rewards (differentiable; shipped
  weights in rtdmd/assets/shapes_rewards unless ``path`` is given).
- ``oracle``: the shapes preference oracle, for evaluation only (``training_reward``
  refuses it: it plays the human raters).
- ``hpsv21``, ``imagereward``, ``pickscore``, ``clipscore``, ``aesthetic``: the real
  scorers (benchmarks.scorers.get_scorer; options such as ``path`` pass through).

``suite_rewards`` says which of them each evaluation suite reports.
"""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.geneval.mask2former import Mask2FormerDetector
from benchmarks.geneval.prompts import COCO_CLASSES, generate_metadata, read_metadata, validate_entry
from benchmarks.geneval.rules import partial_credit
from benchmarks.scorers import get_scorer
from benchmarks.shapes import reward_models
from benchmarks.shapes.detector import ShapesDetector
from benchmarks.shapes.oracle import PreferenceOracle
from rtdmd.errors import UserError
from rtdmd.images import to_uint8
from rtdmd.rewards.registry import backend_name, no_options, register_reward_factory
from rtdmd.world.shapes import ALL_CLASSES, WorldSpec, parse_caption

REAL_SCORERS = ("hpsv21", "imagereward", "pickscore", "clipscore", "aesthetic")
SHAPES_ONLY = ("shapes_pref", "shapes_aes", "oracle")

#: evaluation suite -> reward names it reports, per kind of backend
SUITES = {
    "shapes": {"preference": ["oracle", "shapes_pref"], "aesthetic": ["shapes_aes"]},
    "real": {"preference": ["hpsv21", "imagereward", "pickscore", "clipscore"], "aesthetic": ["aesthetic"]},
}

ORACLE_REFUSAL = ("the preference oracle plays the human raters and is never a training signal; "
                  "train on shapes_pref / shapes_aes / geneval_partial.")


def suite_rewards(backend: str, suite: str) -> list[str]:
    """Reward names an evaluation suite reports on a backend (shapes: learned + oracle; real: the scorers)."""
    name = backend_name(backend)
    table = SUITES["shapes" if name == "shapes" else "real"]
    if suite not in table:
        raise UserError(f"suite '{suite}' reports no rewards; reward suites are {', '.join(table)}.")
    return list(table[suite])


def _world_spec(backend):
    """The backend's world (a shapes backend object carries one), else the default world."""
    spec = getattr(backend, "spec", None)
    return spec if spec is not None else WorldSpec()


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
        if images.ndim != 4 or images.shape[1] != 3:
            raise UserError(f"geneval_partial takes (B, 3, H, W) images in [0, 1], got shape {tuple(images.shape)}.")
        if len(prompts) != len(images):
            raise UserError(f"geneval_partial got {len(images)} images but {len(prompts)} prompts; pass one prompt per image.")
        arrays = to_uint8(images)
        scores = [partial_credit(a, self.parse(p), self.detector) for a, p in zip(arrays, prompts)]
        return torch.tensor(scores, dtype=torch.float32, device=images.device)


def _metadata_lookup(metadata) -> dict[str, dict]:
    """prompt -> record from a list of GenEval records or a GenEval .jsonl file."""
    if isinstance(metadata, (str, Path)):
        records = read_metadata(metadata)
    else:
        records = [validate_entry(m, f"metadata[{i}]") for i, m in enumerate(metadata)]
    return {m["prompt"]: m for m in records}


def _shapes_partial_credit(backend, device, lookup, options: dict) -> PartialCreditReward:
    spec = options.pop("spec", None) or _world_spec(backend)
    no_options("geneval_partial", options, "metadata, spec")
    grammar = WorldSpec(image_size=spec.image_size, classes=ALL_CLASSES, size_range=spec.size_range)

    def parse(prompt):
        if lookup is not None and prompt in lookup:
            return lookup[prompt]
        return parse_caption(prompt, grammar)

    return PartialCreditReward(ShapesDetector(spec), parse, device)


@register_reward_factory("geneval_partial", differentiable=False)
def geneval_partial(bname: str, backend, device, differentiable: bool, **options) -> PartialCreditReward:
    metadata = options.pop("metadata", None)
    lookup = _metadata_lookup(metadata) if metadata is not None else None
    if bname == "shapes":
        return _shapes_partial_credit(backend, device, lookup, options)
    allowed = {"path", "clip_path", "dtype", "max_per_image", "clip_batch_size"}
    no_options("geneval_partial", {k: v for k, v in options.items() if k not in allowed}, "metadata, " + ", ".join(sorted(allowed)))
    if lookup is None:
        lookup = _metadata_lookup(generate_metadata(list(COCO_CLASSES)))  # the official 553 prompts

    def parse_real(prompt):
        if prompt not in lookup:
            raise UserError(f"prompt {prompt!r} has no GenEval metadata; pass metadata=<records or .jsonl> to "
                            "get_reward('geneval_partial', ...) covering the training prompts.")
        return lookup[prompt]

    return PartialCreditReward(Mask2FormerDetector(device=device, **options), parse_real, device)


@register_reward_factory("oracle", differentiable=False, backends=("shapes",), not_for_training=ORACLE_REFUSAL)
def oracle(bname: str, backend, device, differentiable: bool, **options) -> PreferenceOracle:
    spec = options.pop("spec", None) or _world_spec(backend)
    no_options("oracle", options, "spec")
    return PreferenceOracle(spec)


def _learned(name: str, device, differentiable: bool, options: dict):
    path = options.pop("path", None)
    batch_size = options.pop("batch_size", 256)
    no_options(name, options, "path, batch_size")
    bundle = reward_models.load_bundle(path, device)
    return reward_models.LearnedReward(name, bundle, differentiable=differentiable, batch_size=batch_size)


@register_reward_factory("shapes_pref", differentiable=True, backends=("shapes",))
def shapes_pref(bname: str, backend, device, differentiable: bool, **options):
    return _learned("shapes_pref", device, differentiable, options)


@register_reward_factory("shapes_aes", differentiable=True, backends=("shapes",))
def shapes_aes(bname: str, backend, device, differentiable: bool, **options):
    return _learned("shapes_aes", device, differentiable, options)


def _scorer_factory(name: str):
    def factory(bname: str, backend, device, differentiable: bool, **options):
        return get_scorer(name, device=device, differentiable=differentiable, **options)

    factory.__name__ = factory.__qualname__ = name
    return register_reward_factory(name, differentiable=True)(factory)


hpsv21 = _scorer_factory("hpsv21")
imagereward = _scorer_factory("imagereward")
pickscore = _scorer_factory("pickscore")
clipscore = _scorer_factory("clipscore")
aesthetic = _scorer_factory("aesthetic")
