"""Interrupts at step boundaries: the trainer defers Ctrl-C and SIGTERM to the end of a step."""

from __future__ import annotations

import signal
import threading


class DeferredSignals:
    """Ctrl-C (SIGINT) and SIGTERM are deferred to the end of the step (after its checkpoint, if any), so the
    state saved on an interrupt is always a step boundary and --resume repeats the uninterrupted run; a second
    signal stops at once. Only the main thread can install handlers; elsewhere this does nothing."""

    def __init__(self):
        self.received: list[int] = []
        self._old: dict = {}

    def _defer(self, signum, frame):
        self.received.append(signum)
        if len(self.received) > 1:
            raise KeyboardInterrupt

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {sig: signal.signal(sig, self._defer) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False
