"""Atomic file writes: a temporary file in the same folder, then os.replace.

An interrupted process never leaves a truncated file under the final name, so resumable
work (checkpoints, generated images, results) can trust what it finds on disk. Files get
the permissions the umask allows (mkstemp alone would make them private, 0600).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process umask (os.umask can only be read by setting it; it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as fp:
            fp.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def honour_umask(path: str | os.PathLike) -> None:
    """Give a file written by a library that creates it private (safetensors: 0600) the umask's permissions."""
    os.chmod(path, 0o666 & ~current_umask())


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a process of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
