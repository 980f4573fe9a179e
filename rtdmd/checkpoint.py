"""Checkpoints: written atomically, found from a run or step directory, loaded for inference.

Layout of a run directory::

    <run>/config.yaml                  resolved config of the run
    <run>/checkpoints/step_000500/     one checkpoint (written as step_000500.tmp, then renamed)
        meta.json                      step, method, backend, sampler, sha256 of model.safetensors
        config.yaml                    the resolved config (a checkpoint is self-contained)
        model.safetensors              the inference network (its EMA copy when one exists)
        state/                         training state: networks, EMA copies, optimisers, trainer
    <run>/checkpoints/latest           name of the newest complete checkpoint

A shipped model (rtdmd/assets/...) has the same layout as a checkpoint, without state/.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rtdmd.errors import UserError

MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"
_HASH_LIMIT = 1 << 30  # verify sha256 of model files up to 1 GiB on load


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _contiguous(state) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def write_checkpoint(
    run_dir: Path,
    step: int,
    *,
    config_yaml: str,
    sampler: Any,
    method: str,
    backend: str,
    inference_state: dict[str, torch.Tensor],
    training_state: dict[str, Any] | None,
    keep: int = 2,
    extra_meta: dict | None = None,
) -> Path:
    """Write checkpoint ``step`` under run_dir/checkpoints atomically; prune old ones; return its path."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(_contiguous(inference_state), str(tmp / MODEL_FILE))
    (tmp / "config.yaml").write_text(config_yaml)
    if training_state is not None:
        (tmp / "state").mkdir()
        for name, tensors in training_state.get("tensors", {}).items():
            save_file(_contiguous(tensors), str(tmp / "state" / f"{name}.safetensors"))
        torch.save(training_state.get("objects", {}), tmp / "state" / "trainer.pt")
    meta = {
        "step": step,
        "method": method,
        "backend": backend,
        "sampler": asdict(sampler) if not isinstance(sampler, dict) else sampler,
        "model_sha256": sha256_file(tmp / MODEL_FILE),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **(extra_meta or {}),
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if final.exists():  # re-written after a resume from an earlier step
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = root / f"latest.tmp{os.getpid()}"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, root / "latest")
    _prune(root, keep, final)
    return final


def _prune(root: Path, keep: int, newest: Path) -> None:
    if keep <= 0:
        return
    steps = sorted(p for p in root.glob("step_*") if p.is_dir() and ".tmp" not in p.name)
    for old in steps[:-keep]:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path: str | Path) -> Path:
    """Resolve a run directory, a checkpoints directory or a step directory to one checkpoint."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"checkpoint {p} does not exist; pass a run directory or a checkpoint directory made by 'rtdmd-bench train'.")
    if p.is_file() and p.name in (MODEL_FILE, META_FILE):
        p = p.parent
    if (p / META_FILE).is_file():
        return p
    for root in (p / "checkpoints", p):
        latest = root / "latest"
        if latest.is_file():
            step_dir = root / latest.read_text().strip()
            if (step_dir / META_FILE).is_file():
                return step_dir
    raise UserError(
        f"no checkpoint found in {p} (expected meta.json there or checkpoints/latest); "
        "pass a directory written by 'rtdmd-bench train'."
    )


def read_meta(step_dir: Path) -> dict:
    try:
        return json.loads((step_dir / META_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"checkpoint metadata {step_dir / META_FILE} is unreadable or corrupt; use another checkpoint or retrain.") from None


def load_model_state(step_dir: Path, verify: bool = True) -> dict[str, torch.Tensor]:
    f = step_dir / MODEL_FILE
    if not f.is_file():
        raise UserError(f"checkpoint {step_dir} has no {MODEL_FILE}; it is incomplete, use another checkpoint or retrain.")
    meta = read_meta(step_dir)
    if verify and meta.get("model_sha256") and f.stat().st_size <= _HASH_LIMIT:
        if sha256_file(f) != meta["model_sha256"]:
            raise UserError(f"checkpoint file {f} does not match the sha256 in its meta.json (corrupt or modified); use another checkpoint or retrain.")
    try:
        return load_file(str(f))
    except Exception as exc:  # safetensors raises several types for truncated files
        raise UserError(f"checkpoint file {f} is corrupt ({type(exc).__name__}); use another checkpoint or retrain.") from None


def load_training_state(step_dir: Path) -> dict[str, Any]:
    state_dir = step_dir / "state"
    if not state_dir.is_dir():
        raise UserError(f"checkpoint {step_dir} holds no training state (it is an inference-only model); cannot --resume from it.")
    try:
        tensors = {f.stem: load_file(str(f)) for f in sorted(state_dir.glob("*.safetensors"))}
        objects = torch.load(state_dir / "trainer.pt", map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UserError(f"training state in {state_dir} is corrupt ({type(exc).__name__}); resume from an earlier checkpoint or restart.") from None
    return {"tensors": tensors, "objects": objects}


def load_for_inference(path: str | Path, device: str | torch.device = "cpu", backend_overrides: dict | None = None):
    """Checkpoint -> (cfg, backend, network, sampler meta dict). The network is in eval mode."""
    from rtdmd import registry
    from rtdmd.config import load_resolved

    step_dir = find_checkpoint(path)
    meta = read_meta(step_dir)
    cfg = load_resolved(step_dir / "config.yaml")
    if backend_overrides:
        for k, v in backend_overrides.items():
            setattr(cfg.backend, k, v)
    backend = registry.get_backend(cfg.backend_name).factory(cfg.backend, device)
    role = meta.get("role", "generator")
    net = backend.make_trainable(role)
    state = load_model_state(step_dir)
    try:
        backend.load_network_state(net, state)
    except (RuntimeError, KeyError) as exc:
        raise UserError(f"checkpoint {step_dir} does not fit backend '{cfg.backend_name}' as configured ({str(exc).splitlines()[0][:120]}); "
                        "use the config the checkpoint was trained with.") from None
    net.eval().requires_grad_(False)
    return cfg, backend, net, meta
