"""Exclusive use of a directory by one process: an fcntl lock on a file inside it.

The kernel drops the lock when its holder exits (killed included), so a stale lock file never
blocks a later run; the file records the holder's pid and host for the refusal message.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from rtdmd.errors import UserError

LOCK_FILE = ".lock"


class DirLock:
    """``with DirLock(run_dir, what="train"):`` - a second process on the same directory gets a UserError."""

    def __init__(self, directory: str | os.PathLike, what: str = "run", name: str = LOCK_FILE, wait: bool = False):
        self.path = Path(directory) / name
        self.what = what
        self.wait = wait
        self._fd: int | None = None

    def __enter__(self) -> "DirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"{self.path.parent} is in use by {self.what} {holder}; wait for it to finish or "
                            "choose another --out.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> bool:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        return False
