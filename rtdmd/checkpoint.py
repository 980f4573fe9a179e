"""Checkpoints: written atomically, verified on load, found from a run or step directory.

Layout of a run directory::

    <run>/config.yaml                  resolved config of the run
    <run>/checkpoints/step_000500/     one checkpoint (written as step_000500.tmp<pid>, then renamed)
        meta.json                      step, method, backend, sampler, the sha256 of every other file
                                       ("files") and of its own content ("meta_sha256")
        config.yaml                    the resolved config (a checkpoint is self-contained)
        model.safetensors              the inference network (its EMA copy when one exists)
        state/                         training state: networks, EMA copies (safetensors), optimisers
                                       and trainer counters (trainer.pt, loaded with weights_only=True)
    <run>/checkpoints/latest           name of the newest complete checkpoint

A shipped model (rtdmd/assets/...) has the same layout as a checkpoint, without state/; one
written before manifests existed is checked by its model_sha256 alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rtdmd import registry
from rtdmd.config import load_resolved
from rtdmd.errors import UserError
from rtdmd.fileio import honour_umask, pid_alive

MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"
TRAINER_FILE = "trainer.pt"
_HASH_LIMIT = 1 << 30  # verify sha256 of model files up to 1 GiB on load for inference
_TMP_RE = re.compile(r"^(?:step_\d+|latest)\.tmp(\d+)$")
EARLIER = "resume from an earlier checkpoint with --resume-from STEP or retrain"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _contiguous(state) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def meta_digest(meta: dict) -> str:
    """sha256 of a meta dict's canonical JSON, without its own meta_sha256."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def clean_stale_tmp(root: Path) -> list[Path]:
    """Remove step_*.tmp<pid> / latest.tmp<pid> left by a killed process (its pid is not alive, or is ours)."""
    removed = []
    for p in Path(root).glob("*.tmp*") if Path(root).is_dir() else ():
        m = _TMP_RE.match(p.name)
        if m and (int(m.group(1)) == os.getpid() or not pid_alive(int(m.group(1)))):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _write_files(tmp: Path, config_yaml: str, inference_state: dict, training_state: dict | None) -> None:
    save_file(_contiguous(inference_state), str(tmp / MODEL_FILE))
    (tmp / "config.yaml").write_text(config_yaml)
    if training_state is not None:
        (tmp / "state").mkdir()
        for name, tensors in training_state.get("tensors", {}).items():
            save_file(_contiguous(tensors), str(tmp / "state" / f"{name}.safetensors"))
        torch.save(training_state.get("objects", {}), tmp / "state" / TRAINER_FILE)


def _manifest(step_dir: Path) -> dict[str, str]:
    files = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != META_FILE)
    return {p.relative_to(step_dir).as_posix(): sha256_file(p) for p in files}


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename tmp to final; an existing final (a step re-written after --resume-from) goes only afterwards."""
    old = final.with_name(f"{final.name}.tmp{os.getpid()}old") if final.exists() else None
    if old is not None:
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def point_latest(root: Path, target: str) -> None:
    """Atomically write root/latest (the name, or relative path, of the newest checkpoint)."""
    tmp = root / f"latest.tmp{os.getpid()}"
    tmp.write_text(target + "\n")
    honour_umask(tmp)
    os.replace(tmp, root / "latest")


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
    """Write checkpoint ``step`` under run_dir/checkpoints atomically, verify it, prune old ones; return its path.

    A failed write (disk full...) removes its temporary directory; older checkpoints are pruned only once
    the new one has been read back and verified."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(root)
    final, tmp = root / f"step_{step:06d}", root / f"step_{step:06d}.tmp{os.getpid()}"
    try:
        tmp.mkdir()
        _write_files(tmp, config_yaml, inference_state, training_state)
        meta = {"step": step, "method": method, "backend": backend,
                "sampler": asdict(sampler) if not isinstance(sampler, dict) else sampler,
                "model_sha256": sha256_file(tmp / MODEL_FILE), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                **(extra_meta or {}), "files": _manifest(tmp)}
        meta["meta_sha256"] = meta_digest(meta)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        for p in tmp.rglob("*"):
            if p.is_file():
                honour_umask(p)
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    point_latest(root, final.name)
    verify_files(final, read_meta(final), advice="check the disk and rerun")
    _prune(root, keep, final)
    return final


def _prune(root: Path, keep: int, newest: Path) -> None:
    if keep <= 0:
        return
    # checkpoints after ``newest`` (left by a run continued with --resume-from) are not counted or removed
    steps = sorted(p for p in root.glob("step_*") if p.is_dir() and ".tmp" not in p.name and p.name <= newest.name)
    for old in steps[:-keep]:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path: str | Path, step: int | None = None) -> Path:
    """Resolve a run directory, a checkpoints directory or a step directory to one checkpoint
    (``step``: that step of the run instead of the newest)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"checkpoint {p} does not exist; pass a run directory or a checkpoint directory made by 'rtdmd-bench train'.")
    if p.is_file() and p.name in (MODEL_FILE, META_FILE):
        p = p.parent
    if step is not None:
        return _step_checkpoint(p, step)
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


def list_steps(run_dir: Path) -> list[int]:
    root = Path(run_dir) / "checkpoints"
    names = root.glob("step_*") if root.is_dir() else ()
    return sorted(int(p.name[5:]) for p in names if re.fullmatch(r"step_\d+", p.name) and (p / META_FILE).is_file())


def _step_checkpoint(run_dir: Path, step: int) -> Path:
    d = run_dir / "checkpoints" / f"step_{step:06d}"
    if not (d / META_FILE).is_file():
        have = ", ".join(str(s) for s in list_steps(run_dir)) or "none"
        raise UserError(f"{run_dir} holds no checkpoint of step {step} (steps there: {have}); pass one of those to --resume-from.")
    return d


def read_meta(step_dir: Path) -> dict:
    try:
        meta = json.loads((step_dir / META_FILE).read_text())
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict) or ("meta_sha256" in meta and meta["meta_sha256"] != meta_digest(meta)):
        raise UserError(f"checkpoint metadata {step_dir / META_FILE} is unreadable or corrupt; use another checkpoint or retrain.")
    return meta


def verify_files(step_dir: Path, meta: dict, names: list[str] | None = None, advice: str = EARLIER,
                 limit: int | None = None) -> None:
    """Check files of a checkpoint against the sha256 manifest in its meta.json (``names``: only those;
    ``limit``: skip files larger than this). A checkpoint without a manifest is checked by its model_sha256."""
    manifest = meta.get("files")
    if manifest is None:
        manifest = {MODEL_FILE: meta["model_sha256"]} if meta.get("model_sha256") else {}
        names = [n for n in (names if names is not None else manifest) if n in manifest]
    for rel in (names if names is not None else sorted(manifest)):
        f = step_dir / rel
        if rel not in manifest or not f.is_file():
            raise UserError(f"checkpoint {step_dir} is incomplete ({rel} is missing); {advice}.")
        if (limit is None or f.stat().st_size <= limit) and sha256_file(f) != manifest[rel]:
            raise UserError(f"checkpoint file {f} does not match the sha256 in its meta.json (corrupt or modified); {advice}.")


def load_model_state(step_dir: Path, verify: bool = True) -> dict[str, torch.Tensor]:
    f = step_dir / MODEL_FILE
    if not f.is_file():
        raise UserError(f"checkpoint {step_dir} has no {MODEL_FILE}; it is incomplete, use another checkpoint or retrain.")
    meta = read_meta(step_dir)
    if verify:
        verify_files(step_dir, meta, [MODEL_FILE], advice="use another checkpoint or retrain", limit=_HASH_LIMIT)
    try:
        return load_file(str(f))
    except Exception as exc:  # safetensors raises several types for truncated files
        raise UserError(f"checkpoint file {f} is corrupt ({type(exc).__name__}); use another checkpoint or retrain.") from None


WEIGHTS = ("ema", "online")  # which weights of a checkpoint are sampled: model.safetensors, or the training weights


def online_file(step_dir: Path, meta: dict) -> str:
    """The online (training) weights of the inference network, ``state/net_<name>.safetensors``, relative to
    ``step_dir``; refused unless the checkpoint's manifest lists the file (so it can be verified)."""
    name = meta.get("inference_network") or meta.get("role") or "generator"
    rel = f"state/net_{name}.safetensors"
    if not (Path(step_dir) / rel).is_file():
        raise UserError(f"checkpoint {step_dir} holds no online weights ({rel}); evaluate its EMA weights with "
                        "--weights ema or pass a checkpoint written with its training state.")
    if rel not in (meta.get("files") or {}):
        raise UserError(f"checkpoint {step_dir} lists no sha256 for {rel} in its meta.json, so its online weights "
                        "cannot be verified; evaluate --weights ema or retrain.")
    return rel


def load_online_state(step_dir: Path) -> dict[str, torch.Tensor]:
    """The inference network's online weights (``online_file``), verified against the manifest."""
    meta = read_meta(step_dir)
    rel = online_file(step_dir, meta)
    verify_files(step_dir, meta, [rel], advice="use another checkpoint or --weights ema", limit=_HASH_LIMIT)
    try:
        return load_file(str(Path(step_dir) / rel))
    except Exception as exc:  # safetensors raises several types for truncated files
        raise UserError(f"checkpoint file {Path(step_dir) / rel} is corrupt ({type(exc).__name__}); "
                        "use another checkpoint or --weights ema.") from None


def load_training_state(step_dir: Path) -> dict[str, Any]:
    """Every file verified against the manifest, then tensors (safetensors) and trainer counters and optimiser
    moments (trainer.pt: tensors and plain containers only, so a planted pickle cannot run code)."""
    state_dir = step_dir / "state"
    if not state_dir.is_dir():
        raise UserError(f"checkpoint {step_dir} holds no training state (it is an inference-only model); cannot --resume from it.")
    verify_files(step_dir, read_meta(step_dir))
    try:
        tensors = {f.stem: load_file(str(f)) for f in sorted(state_dir.glob("*.safetensors"))}
        with warnings.catch_warnings():  # a foreign pickle protocol warns before it is refused: one sentence is enough
            warnings.simplefilter("ignore", UserWarning)
            objects = torch.load(state_dir / TRAINER_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated files, foreign pickles: all refused the same way
        raise UserError(f"training state in {state_dir} is corrupt or holds more than tensors ({type(exc).__name__}); "
                        f"{EARLIER}.") from None
    return {"tensors": tensors, "objects": objects}


def require_checkpoint(run_dir: Path, shown: Path | None = None) -> None:
    """--resume on a directory that holds no checkpoint is an error (not a silent fresh start);
    ``shown``: the directory the user named (a two-stage run checks its stage1 folder)."""
    if not (Path(run_dir) / "checkpoints" / "latest").is_file():
        raise UserError(f"--resume given but {shown or run_dir} holds no checkpoint; drop --resume to start a new run there.")


def load_for_inference(path: str | Path, device: str | torch.device = "cpu", backend_overrides: dict | None = None,
                       weights: str = "ema"):
    """Checkpoint -> (cfg, backend, network, sampler meta dict). The network is in eval mode. ``weights``: "ema"
    (model.safetensors: the EMA copy where the method keeps one) or "online" (the training weights)."""

    step_dir = find_checkpoint(path)
    meta = read_meta(step_dir)
    if "files" in meta:
        verify_files(step_dir, meta, ["config.yaml"], advice="use another checkpoint or retrain")
    cfg = load_resolved(step_dir / "config.yaml")
    if backend_overrides:
        for k, v in backend_overrides.items():
            setattr(cfg.backend, k, v)
    backend = registry.get_backend(cfg.backend_name).factory(cfg.backend, device)
    net = backend.make_trainable(meta.get("role", "generator"))
    if weights not in WEIGHTS:
        raise UserError(f"unknown weights '{weights}'; choose ema or online.")
    state = load_model_state(step_dir) if weights == "ema" else load_online_state(step_dir)
    try:
        backend.load_network_state(net, state)
    except (RuntimeError, KeyError) as exc:
        raise UserError(f"checkpoint {step_dir} does not fit backend '{cfg.backend_name}' as configured ({str(exc).splitlines()[0][:120]}); "
                        "use the config the checkpoint was trained with.") from None
    net.eval().requires_grad_(False)
    return cfg, backend, net, meta


def checkpoint_tensors(step_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, for comparing runs bit for bit: inference weights, training weights, EMA
    copies, optimiser moments and learning rates, and the step (trainer.pt read with weights_only=True)."""
    step_dir = Path(step_dir)
    out = {f"model/{k}": v for k, v in load_file(str(step_dir / MODEL_FILE)).items()}
    for f in sorted((step_dir / "state").glob("*.safetensors")):
        out.update({f"{f.stem}/{k}": v for k, v in load_file(str(f)).items()})
    objects = torch.load(step_dir / "state" / "trainer.pt", map_location="cpu", weights_only=True)
    for name, opt in objects["optimizers"].items():
        for pid, st in opt["state"].items():
            out.update({f"optim_{name}/{pid}/{k}": torch.as_tensor(v) for k, v in st.items()})
        out[f"optim_{name}/param_groups"] = torch.tensor([g["lr"] for g in opt["param_groups"]], dtype=torch.float64)
    out["step"] = torch.tensor(objects["step"])
    return out
