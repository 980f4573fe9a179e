"""Stable seeds derived from tuples, so draws depend only on what they are for.

Python's hash() is salted per process; these use hashlib so every process and every
resumed run derives the same seed for the same (seed, step, ...) tuple.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def derive_seed(*parts) -> int:
    """A 63-bit seed from any printable parts (ints, strings)."""
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def torch_generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


def numpy_generator(*parts) -> np.random.Generator:
    return np.random.default_rng(derive_seed(*parts))


def step_seed(train_seed: int, step: int) -> int:
    """The seed of training step ``step``: every draw of that step derives from it."""
    return derive_seed(train_seed, "step", step)
