"""Helpers for the eval / report tests: a tiny shapes checkpoint (16 px, ~20k parameters) and fixtures.

A test module uses the fixtures by importing them: ``from tests.eval_fixtures import ckpt, one_torch_thread``
(and ``tiny_bundle``: a random tiny shapes reward bundle in place of the shipped one).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY_BACKEND = {"image_size": 16, "size_range": [4, 6], "max_objects": 2, "unet_channels": [8, 16],
                "unet_attention_head_dim": 4, "text_width": 16, "text_heads": 2, "text_layers": 1}
TINY_SAMPLER = {"kind": "cps", "steps": 2, "guidance": 1.0, "eta": 0.9}


def tiny_checkpoint(run_dir: Path, method: str = "teacher", step: int = 3, seed: int = 0,
                    train_seconds: float = 120.0) -> Path:
    """Write a randomly initialised tiny shapes network as a checkpoint of ``run_dir``; returns its step dir."""
    from rtdmd import checkpoint as ckpt
    from rtdmd.config import dump, resolve
    from rtdmd.registry import get_backend

    cfg = resolve("teacher", backend="shapes", overrides={"backend": dict(TINY_BACKEND), "tracking": {"enabled": False}})
    backend = get_backend("shapes").factory(cfg.backend, "cpu")
    torch.manual_seed(seed)
    net = backend.make_trainable("teacher")
    return ckpt.write_checkpoint(run_dir, step, config_yaml=dump(cfg), sampler=dict(TINY_SAMPLER), method=method,
                                 backend="shapes", inference_state=dict(backend.network_state(net)),
                                 training_state=None, extra_meta={"role": "teacher", "train_seconds": train_seconds})


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny networks: one torch thread is faster, and far faster on a shared, oversubscribed CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread_per_module():
    """The module-scoped twin of one_torch_thread, for modules whose module-scoped fixtures run networks
    (the shapes detector's small convolutions are ~10x faster on one thread on shared cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """One tiny checkpoint per test module."""
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "run")


@pytest.fixture
def tiny_bundle(ckpt, monkeypatch):
    """A random tiny shapes reward bundle in place of the shipped one (the tiny checkpoint's 16 px world)."""
    import benchmarks.shapes.reward_models as RM
    import benchmarks.shapes.reward_nets as RN
    from benchmarks import eval_models as EM
    from rtdmd.world.shapes import vocabulary

    spec = EM.describe_checkpoint(ckpt).info.spec
    torch.manual_seed(0)
    arch = RN.Architecture(vocab=vocabulary(spec), n_classes=len(spec.classes), width=8, aesthetic_width=8,
                           encoder_width=8, embed_dim=8, text_hidden=8, feature_dim=16)
    nets = {n: arch.build(n).eval() for n in RN.NETWORKS}
    bundle = RM.RewardBundle(nets["preference"], nets["aesthetic"], nets["encoder"], arch, spec,
                             f"{tmp_bundle_path()}@sha256:0", {})
    monkeypatch.setattr(RM, "load_bundle", lambda path=None, device="cpu": bundle)
    return bundle


def tmp_bundle_path() -> str:
    """The tiny bundle's recorded path: absolute and outside the working directory (never written)."""
    return str(Path("/nonexistent/abs/tiny-bundle"))
