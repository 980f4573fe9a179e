"""Helpers for CLI and trainer tests: tiny run arguments and the user-error contract."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

# Tiny configurations: a run of a few steps takes milliseconds (toy2d) or a fraction of a second (shapes).
TOY2D_SETS = ("backend.hidden=16", "backend.depth=2", "train.batch_size=8", "train.device=cpu",
              "tracking.enabled=false", "method.ema_decay=0.9", "method.optim.lr=0.01")
SHAPES_SETS = ("backend.image_size=16", "backend.size_range=[4,6]", "backend.max_objects=2",
               "backend.unet_channels=[8,16]", "backend.unet_attention_head_dim=4", "backend.text_width=16",
               "backend.text_heads=2", "backend.text_layers=1", "train.batch_size=4", "train.device=cpu",
               "tracking.enabled=false", "method.ema_decay=0.9")


def toy_ctx(seed: int = 3, step: int = 0):
    """A StepContext with its own seeded generator, for calling a method's hooks outside the trainer."""
    from rtdmd.methods.base import StepContext
    from rtdmd.seeding import torch_generator

    return StepContext(step=step, generator=torch_generator(seed), seed=seed)


def tiny_toy_backend(**over):
    """A toy2d backend with a 16-wide, 2-deep MLP (the tests' tiny size)."""
    from rtdmd.backends.toy2d import Toy2DOptions, make_toy2d

    return make_toy2d(Toy2DOptions(hidden=16, depth=2, **over))


def train_args(backend: str, out: Path, steps: int, *sets: str, extra: tuple[str, ...] = ()) -> list[str]:
    """Arguments of `rtdmd-bench train teacher` on a tiny ``backend`` run into ``out``."""
    base = TOY2D_SETS if backend == "toy2d" else SHAPES_SETS
    args = ["train", "teacher", "--backend", backend, "--out", str(out), "--max-steps", str(steps), "--quiet"]
    for s in (*base, *sets):
        args += ["--set", s]
    return args + list(extra)


def assert_user_error(result, *fragments: str) -> str:
    """The CLI error contract: exit 2, exactly one stderr line starting with 'error:', no traceback."""
    exc = result.exception
    assert exc is None or isinstance(exc, SystemExit), f"uncaught {exc!r}"
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not re.search(r"[a-z]\. [A-Z]", lines[0]), f"more than one sentence: {lines[0]}"
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def checkpoint_tensors(step_dir: Path) -> dict:
    """Every tensor of a checkpoint: inference weights, training weights, EMA copies, optimiser moments and steps."""
    from rtdmd.checkpoint import checkpoint_tensors as tensors

    return tensors(step_dir)


def assert_same_tensors(a: dict, b: dict) -> None:
    """Bitwise equality of two checkpoint_tensors() dicts."""
    import torch

    assert a.keys() == b.keys()
    diff = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:5]}"


@contextlib.contextmanager
def registered_rewards(**rewards):
    """Register test rewards for the block: name=(fn, differentiable); unregistered afterwards."""
    from rtdmd.rewards.registry import register_reward, unregister_reward

    for name, (fn, diff) in rewards.items():
        register_reward(name, fn, differentiable=diff)
    try:
        yield
    finally:
        for name in rewards:
            unregister_reward(name)
