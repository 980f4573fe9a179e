"""Checkpoints of the real backends (sd3, flux2) for stock diffusers: a LoRA file or a whole pipeline folder.

    rtdmd-bench export runs/acdmd-sd35m --format lora --out exports/acdmd-lora
    rtdmd-bench export runs/acdmd-sd35m --format pipeline --out exports/acdmd-pipeline

``lora``: ``pytorch_lora_weights.safetensors`` with its LoRA config (alpha != rank survives), which a stock
pipeline of the base model loads with ``load_lora_weights``. ``pipeline``: the base model's folder with the
trained transformer in place of its own (the LoRA merged into the weights, or the fully fine-tuned copy),
which ``DiffusionPipeline.from_pretrained`` loads alone. The other components are hard links to the base
model's files where the file system allows it (copies otherwise): nothing in an export is ever rewritten in
place. Both formats add ``export.json`` naming the checkpoint they came from. The output folder is built
under a temporary name and renamed, so an interrupted export leaves nothing half-written.

The shapes backend's networks (a word-tokenizer CLIP text encoder driving a pixel-space UNet through
class embeddings) fit no stock diffusers pipeline, so shapes checkpoints are refused.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from rtdmd.backends import lora as L
from rtdmd.backends.real_common import RealBackend
from rtdmd.checkpoint import find_checkpoint, load_for_inference
from rtdmd.errors import UserError

FORMATS = ("lora", "pipeline")


def export_checkpoint(checkpoint: str | Path, fmt: str, out: str | Path) -> Path:
    """Write ``checkpoint`` as ``fmt`` (lora or pipeline) into the new folder ``out``; returns ``out``."""

    if fmt not in FORMATS:
        raise UserError(f"unknown export format '{fmt}'; choose lora or pipeline.")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not an empty folder; pass a new --out folder.")
    step_dir = find_checkpoint(checkpoint).resolve()
    cfg, backend, net, meta = load_for_inference(step_dir, device="cpu")
    if not isinstance(backend, RealBackend):
        raise UserError(f"checkpoint {step_dir} is a {cfg.backend_name} model, and only sd3 and flux2 checkpoints fit "
                        "a stock diffusers pipeline; export a checkpoint of a real backend.")
    net = backend._unwrap(net)
    if fmt == "lora" and not (isinstance(net, L.AdapterNet) and net.adapter):
        raise UserError(f"checkpoint {step_dir} trained the whole transformer (generator_mode=full), which has no LoRA "
                        "form; export it with --format pipeline.")
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if fmt == "lora":
            backend.export(net, tmp)
        else:
            _write_pipeline(backend, net, tmp)
        _write_record(tmp, step_dir, cfg, meta, backend, fmt)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(os.path.realpath(src), dst)  # hub snapshots hold symlinks into the blob store
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _write_pipeline(backend, net, directory: Path) -> None:
    """The base model's folder with the trained transformer saved in place of its own."""

    src = backend.source.path if backend.source is not None else None
    if src is None:
        raise UserError("this backend was built from in-memory components and has no model folder to export; "
                        "set backend.model to the model's diffusers folder.")
    directory.mkdir(parents=True)
    index = backend.source.model_index()
    for name in index:
        if name.startswith("_") or name == "transformer" or not (src / name).is_dir():
            continue
        shutil.copytree(src / name, directory / name, copy_function=_link_or_copy)
    shutil.copy2(src / "model_index.json", directory / "model_index.json")
    model = L.merged_copy(net.base, net.adapter) if isinstance(net, L.AdapterNet) else net.model
    model.to("cpu", backend.dtype).save_pretrained(str(directory / "transformer"))


def _write_record(directory: Path, step_dir: Path, cfg, meta: dict, backend, fmt: str) -> None:
    record = {"format": fmt, "checkpoint": str(step_dir), "step": meta.get("step"), "method": cfg.method_name,
              "backend": cfg.backend_name, "base_model": backend.identity,
              "model_sha256": meta.get("model_sha256", ""), "dtype": str(backend.dtype).replace("torch.", "")}
    (directory / "export.json").write_text(json.dumps(record, indent=1) + "\n")
