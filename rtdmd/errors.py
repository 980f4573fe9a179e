"""User-facing errors: one clear sentence naming the problem and the fix.

The CLI catches UserError, prints its message (no traceback) and exits with code 2.
Anything else is a bug and keeps its traceback.
"""

import errno
import signal
import threading


class UserError(Exception):
    """A mistake the user can fix (bad path, unknown name, bad config value...)."""

    exit_code = 2


class NonFiniteLossError(UserError):
    """A loss became NaN or infinite; the trainer stops before writing a corrupt checkpoint."""


class InterruptedRun(UserError):
    """Ctrl-C or SIGTERM outside training (training checkpoints first and says so itself)."""

    def __init__(self, message: str = "interrupted (Ctrl-C or SIGTERM) before finishing; rerun the same command to "
                                      "continue, work already written to disk is kept."):
        super().__init__(message)


def as_user_error(exc: BaseException) -> UserError | None:
    """The one-sentence form of an exception the user can act on; None for a bug (it keeps its traceback)."""
    if isinstance(exc, UserError):
        return exc
    if isinstance(exc, KeyboardInterrupt):
        return InterruptedRun()
    if isinstance(exc, OSError):
        return os_error_as_user_error(exc)
    return None


class interrupt_on_sigterm:
    """While active (main thread only), SIGTERM - what ``timeout``, schedulers and ``kill`` send - raises
    KeyboardInterrupt like Ctrl-C, so cleanup runs (MLflow runs end, training checkpoints)."""

    def __enter__(self):
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, _raise_interrupt)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


_DISK_ERRNOS = {errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.EROFS: "read-only file system",
                errno.ENOTDIR: "a parent path is a file", errno.EISDIR: "it is a directory",
                errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded"}


def os_error_as_user_error(exc: OSError) -> UserError | None:
    """A UserError for an OSError the user fixes (permissions, read-only or full disk, a file where a folder
    must be); None for anything else (a bug keeps its traceback)."""
    why = _DISK_ERRNOS.get(exc.errno)
    if why is None:
        return None
    where = str(exc.filename) if exc.filename is not None else "the output folder"
    where_text = where if len(where) <= 300 else f"{where[:300]}... ({len(where)} characters)"
    fix = "free disk space and rerun" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else \
        "choose a writable --out (or fix its permissions) and rerun"
    return UserError(f"cannot write {where_text} ({why}); {fix}.")
