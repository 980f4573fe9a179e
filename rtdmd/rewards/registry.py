"""Reward registry: name -> a factory of objects implementing rtdmd.rewards.base.Reward.

A package adds rewards with an entry point in the group ``rtdmd_bench.rewards`` that names the
factory, decorated with ``register_reward_factory`` (rtdmd-bench's own: the GenEval partial
credit, the learned shapes rewards, the shapes oracle and the real scorers, registered by
benchmarks.rewards; docs/shapes-rewards.md). A user's own reward function needs no package:
``register_reward(name, fn, differentiable)`` makes it available on any backend, toy2d included.
Only the module of the reward asked for is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rtdmd.errors import UserError
from rtdmd import registry

REWARD_GROUP = "rtdmd_bench.rewards"
IMAGE_BACKENDS = ("shapes", "sd3", "flux2")


@dataclass
class RewardEntry:
    name: str
    #: (backend_name, backend, device, differentiable, **options) -> Reward; backend is a name or object
    factory: Callable
    differentiable: bool
    backends: tuple[str, ...] = IMAGE_BACKENDS  # the backends it exists on
    #: why it is never a training signal ("" when it may be one)
    not_for_training: str = ""


_FACTORIES: dict[str, RewardEntry] = {}

#: user rewards added with register_reward: name -> (callable, differentiable)
_CUSTOM: dict[str, tuple] = {}


def register_reward_factory(name: str, differentiable: bool, backends=IMAGE_BACKENDS, not_for_training: str = ""):
    """Decorator registering ``factory(backend_name, backend, device, differentiable, **options) -> Reward`` as the
    reward ``name`` (the module named by the entry point of ``name`` in the group ``rtdmd_bench.rewards``)."""

    def deco(factory):
        _FACTORIES[name] = RewardEntry(name, factory, bool(differentiable), tuple(backends), not_for_training)
        return factory

    return deco


def _builtin_names() -> list[str]:
    return sorted({*registry.entry_points(REWARD_GROUP), *_FACTORIES})


def register_reward(name: str, fn, differentiable: bool = False) -> None:
    """Make a user-written reward ``fn(images, prompts) -> (B,) scores`` available by ``name`` to every
    method (``method.rewards: {name: weight}``), on any backend, toy2d included (its "images" are the
    points). ``differentiable=True`` promises gradients w.r.t. the images (reward back-propagation)."""
    builtin = _builtin_names()
    if not isinstance(name, str) or not name or name in builtin:
        raise UserError(f"cannot register reward {name!r}: use a new non-empty name (the built-in names are "
                        f"{', '.join(builtin)}).")
    if not callable(fn):
        raise UserError(f"register_reward('{name}', fn) needs a callable fn(images, prompts) -> scores.")
    _CUSTOM[name] = (fn, bool(differentiable))


def unregister_reward(name: str) -> None:
    _CUSTOM.pop(name, None)


def reward_names() -> list[str]:
    return _builtin_names() + sorted(_CUSTOM)


def _entry(name: str) -> RewardEntry:
    if name not in _FACTORIES and name not in registry.entry_points(REWARD_GROUP):
        registry.require_installed("reward", REWARD_GROUP)
        raise UserError(f"unknown reward '{name}'; choose one of {', '.join(reward_names())}, or add your own with "
                        "rtdmd.rewards.registry.register_reward.")
    return registry.load_entry("reward", name, REWARD_GROUP, _FACTORIES)


def is_differentiable(name: str) -> bool:
    """Whether reward ``name`` (built-in or registered) can give gradients w.r.t. the images."""
    if name in _CUSTOM:
        return _CUSTOM[name][1]
    return _entry(name).differentiable


def differentiable_names() -> list[str]:
    """The built-in rewards that give gradients w.r.t. the images (imports their modules)."""
    return sorted(n for n in _builtin_names() if _entry(n).differentiable)


class CustomReward:
    """A registered user callable behind the Reward protocol (shape-checked)."""

    def __init__(self, name: str, fn, differentiable: bool):
        self.name, self.fn, self.differentiable = name, fn, differentiable
        self.identity = f"custom:{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"

    def __call__(self, images, prompts):
        out = self.fn(images, prompts)
        if not torch.is_tensor(out) or out.shape != (images.shape[0],):
            shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise UserError(f"reward '{self.name}' returned {shape} for {images.shape[0]} inputs; it must return a "
                            f"tensor of shape ({images.shape[0]},).")
        return out


def backend_name(backend) -> str:
    """The name of ``backend`` (a name or a backend object; None: shapes), which must have images."""
    if backend is None:
        return "shapes"
    name = backend if isinstance(backend, str) else getattr(backend, "name", None)
    if name not in IMAGE_BACKENDS:
        raise UserError(f"rewards score images, and backend {name!r} has none; use one of {', '.join(IMAGE_BACKENDS)}.")
    return name


def no_options(name: str, options: dict, allowed: str) -> None:
    """UserError when a reward factory got options it does not take (``allowed``: the ones it takes)."""
    if options:
        raise UserError(f"reward '{name}' has no option {', '.join(sorted(options))}; its options are {allowed or 'none'}.")


def get_reward(name: str, backend=None, device="cpu", differentiable: bool = False, **options):
    """Build reward ``name`` for ``backend`` (a backend name or object; None: shapes).

    ``differentiable=True`` asks for gradients w.r.t. the images (UserError for rewards
    that have none); options: ``path`` (weights), and each reward's own (docs/scorers.md).
    """
    if name in _CUSTOM:
        fn, diff = _CUSTOM[name]
        if differentiable and not diff:
            raise UserError(f"reward '{name}' was registered as not differentiable; use it through GRPO only or "
                            "register it with differentiable=True.")
        no_options(name, dict(options), "")
        return CustomReward(name, fn, diff)
    entry = _entry(name)
    bname = backend_name(backend)
    if bname not in entry.backends:
        others = [n for n in _builtin_names() if bname in _entry(n).backends]
        where = "the shapes world" if entry.backends == ("shapes",) else "backends " + ", ".join(entry.backends)
        raise UserError(f"reward '{name}' exists only in {where}, not on backend '{bname}'; "
                        f"use one of {', '.join(others)} there.")
    if differentiable and not entry.differentiable:
        raise UserError(f"reward '{name}' is not differentiable; use it through GRPO (differentiable=False) or pick one of "
                        f"{', '.join(differentiable_names())}.")
    return entry.factory(bname, backend, device, differentiable, **options)


def training_reward(name: str, backend=None, device="cpu", differentiable: bool = False, **options):
    """get_reward for training: refuses the rewards that are evaluation only (the shapes oracle)."""
    if name not in _CUSTOM:
        refusal = _entry(name).not_for_training
        if refusal:
            raise UserError(refusal)
    return get_reward(name, backend=backend, device=device, differentiable=differentiable, **options)
