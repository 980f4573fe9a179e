"""The official GenEval image layout, read and written.

    <out>/<index:05d>/metadata.jsonl     the prompt's one JSON object (json.dump, no newline)
    <out>/<index:05d>/samples/<k:05d>.png
    <out>/<index:05d>/grid.png           optional

PNGs are written to a temporary file in the same folder and moved into place with
``os.replace``, so an interrupted run never leaves a truncated ``<k>.png``; resuming
regenerates exactly the images that are missing or incomplete.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.geneval.prompts import validate_entry
from rtdmd.errors import UserError
from rtdmd.fileio import atomic_write_bytes
from rtdmd.images import load_png as load_image
from rtdmd.images import make_grid, save_png

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the fixed last chunk of every complete PNG
_SAMPLE_RE = re.compile(r"(\d+)\.png")


def prompt_dir(out: str | os.PathLike, index: int) -> Path:
    return Path(out) / f"{index:05d}"


def image_path(out: str | os.PathLike, index: int, k: int) -> Path:
    return prompt_dir(out, index) / "samples" / f"{k:05d}.png"


def write_prompt_dir(out: str | os.PathLike, index: int, metadata: dict) -> Path:
    """Create ``<out>/<index:05d>/samples`` and its metadata.jsonl; returns the prompt folder.

    An existing folder holding a different prompt raises UserError (resuming into the
    wrong output folder would mix prompt sets).
    """
    d = prompt_dir(out, index)
    (d / "samples").mkdir(parents=True, exist_ok=True)
    meta_path = d / "metadata.jsonl"
    text = json.dumps(metadata)
    if meta_path.exists():
        try:
            existing = json.loads(meta_path.read_text(encoding="utf-8"))
        except (ValueError, OSError):
            existing = None  # unreadable leftovers are rewritten below
        if existing is not None and existing != json.loads(text):
            raise UserError(
                f"{meta_path} holds a different prompt ({existing.get('prompt') if isinstance(existing, dict) else existing!r}); "
                "use a fresh output folder or the same prompt file as before."
            )
        if existing is not None:
            return d
    atomic_write_bytes(meta_path, text.encode("utf-8"))
    return d


def save_image(out: str | os.PathLike, index: int, k: int, image) -> Path:
    p = image_path(out, index, k)
    p.parent.mkdir(parents=True, exist_ok=True)
    save_png(p, image)
    return p


def write_grid(out: str | os.PathLike, index: int, images: Sequence, nrow: int | None = None, pad: int = 2) -> Path:
    """Optional ``grid.png``: images tiled ``nrow`` per row with ``pad`` black pixels around each."""
    arrs = [np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images]
    if not arrs or any(a.shape != arrs[0].shape for a in arrs):
        raise UserError("write_grid needs one or more images of the same size; pass the prompt's samples.")
    p = prompt_dir(out, index) / "grid.png"
    save_png(p, make_grid(arrs, ncols=nrow or len(arrs), pad=pad, fill=0))
    return p


def is_complete_png(path: str | os.PathLike) -> bool:
    """True if the file starts with the PNG signature and ends with the IEND chunk."""
    try:
        with open(path, "rb") as fp:
            head = fp.read(8)
            fp.seek(0, os.SEEK_END)
            if fp.tell() < 8 + len(_PNG_IEND):
                return False
            fp.seek(-len(_PNG_IEND), os.SEEK_END)
            tail = fp.read()
    except OSError:
        return False
    return head == _PNG_SIGNATURE and tail == _PNG_IEND


def done_images(out: str | os.PathLike, index: int, n_samples: int) -> list[int]:
    """Sample numbers k < n_samples whose PNG exists and is complete."""
    return [k for k in range(n_samples) if is_complete_png(image_path(out, index, k))]


def missing_images(out: str | os.PathLike, n_prompts: int, n_samples: int) -> list[tuple[int, int]]:
    """(index, k) pairs still to generate, in order; a resumed run generates only these."""
    return [
        (i, k)
        for i in range(n_prompts)
        for k in range(n_samples)
        if not is_complete_png(image_path(out, i, k))
    ]


def read_images_dir(directory: str | os.PathLike) -> Iterator[tuple[int, int, dict, Path]]:
    """Yield (index, k, metadata, png path) for a folder in the official layout, sorted.

    Like the official evaluator, only all-digit subfolders and ``<digits>.png`` samples
    are read; a missing or invalid metadata.jsonl, a missing samples folder, or a PNG
    that is truncated or fails its checksum raises UserError naming the path.
    """
    root = Path(directory)
    if not root.is_dir():
        raise UserError(f"GenEval image folder {root} does not exist; pass the folder generation wrote.")
    subdirs = sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    if not subdirs:
        raise UserError(f"{root} holds no <index:05d> prompt folders; pass a folder in the GenEval image layout.")
    for d in subdirs:
        meta_path = d / "metadata.jsonl"
        if not meta_path.is_file():
            raise UserError(f"{meta_path} is missing; every prompt folder needs its metadata.jsonl.")
        try:
            metadata = json.loads(meta_path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as e:
            raise UserError(f"{meta_path} is not one readable JSON object ({e}); rewrite it from the prompt file.") from e
        validate_entry(metadata, str(meta_path))
        samples = d / "samples"
        if not samples.is_dir():
            raise UserError(f"{samples} is missing; every prompt folder needs a samples/ folder of PNGs.")
        found = []
        for p in samples.iterdir():
            m = _SAMPLE_RE.fullmatch(p.name)
            if m and p.is_file():
                found.append((int(m.group(1)), p))
        for k, p in sorted(found):
            _verify_png(p)
            yield int(d.name), k, metadata, p


def _verify_png(path: Path) -> None:
    if not is_complete_png(path):
        raise UserError(f"{path} is not a complete PNG (truncated or another format); regenerate or remove it.")
    try:
        with Image.open(path) as im:
            im.verify()  # chunk CRCs: catches corruption inside an otherwise complete file
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path} is a corrupt PNG ({e}); regenerate or remove it.") from e
