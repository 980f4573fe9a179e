"""Checks of values and files a user hands us, each failing with one UserError sentence."""

from __future__ import annotations

import errno
import math
import re
import struct
from pathlib import Path

import torch

from rtdmd.errors import UserError

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_number(name: str, value, low=None, high=None, hint: str = "a finite number") -> None:
    """``value`` is finite and within [low, high]; else a UserError naming the key."""
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        raise UserError(f"config key '{name}' must be {hint}, got {value!r}; fix it in your config or --set.")


def check_device(name: str, key: str = "--device") -> None:
    if not isinstance(name, str) or not _DEVICE_RE.match(name):
        raise UserError(f"{key} must be auto, cpu, mps, cuda or cuda:N, got {clip(str(name), 40)!r}.")


def check_guidance(guidance: float | None, eta: float | None = None) -> None:
    """--guidance (CFG weight, 1 = off) and --eta of sample / eval: finite, guidance >= 0, eta in [0, 1]."""
    if guidance is not None and not (math.isfinite(guidance) and guidance >= 0):
        raise UserError(f"--guidance must be a finite number >= 0 (1 disables CFG), got {guidance}.")
    if eta is not None and not (math.isfinite(eta) and 0.0 <= eta <= 1.0):
        raise UserError(f"--eta must be in [0, 1], got {eta}.")


def _first_tensor(output):
    if hasattr(output, "sample"):
        output = output.sample
    if isinstance(output, (tuple, list)):
        output = output[0] if output else None
    return output


def refuse_non_finite(net, where) -> None:
    """Make every forward of ``net`` raise a UserError when its output holds NaN or infinity, so no
    black image made from a non-finite prediction is written, scored or logged as a result."""

    def hook(module, inputs, output):
        t = _first_tensor(output)
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserError(f"the network of {where} produced NaN or infinite values, so no image or score is "
                            "written; use another checkpoint or a finite --guidance.")

    net.register_forward_hook(hook)


def png_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR header (24 bytes read), or None if it is not a PNG."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError:
        return None
    if len(head) < 24 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", head[16:24])


def check_image_sizes(paths, size: int | None) -> None:
    """Every PNG of an --images set is ``size`` x ``size`` (header only: no image is decoded before scoring)."""
    if not size:
        return
    for p in paths:
        wh = png_size(p)
        if wh is not None and wh != (size, size):
            raise UserError(f"image {p} is {wh[0]}x{wh[1]} px but this backend's images are {size}x{size}; "
                            "pass a folder of images generated for this backend.")


def clip(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters (the cut named), for echoing user input in messages."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def clip_message(msg: str, limit: int = 600) -> str:
    """A long error message keeps its start and its advice (the end); echoed user text in between is cut."""
    if len(msg) <= limit:
        return msg
    tail = msg[-limit // 2:]
    return f"{msg[:limit // 2]} ...({len(msg) - limit} characters cut)... {tail}"


