"""Background prefetch of per-step training data.

Training data of step i depends only on (train.seed, i), so it can be computed ahead in a
thread while the network trains on step i - 1 (torch and numpy release the GIL in their
kernels). With ``depth = 0`` data is computed synchronously.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable


class StepPrefetcher:
    def __init__(self, fn: Callable[[int], Any], depth: int = 2):
        self.fn = fn
        self.depth = depth
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") if depth > 0 else None
        self._futures: dict[int, Future] = {}

    def get(self, step: int) -> Any:
        if self._pool is None:
            return self.fn(step)
        fut = self._futures.pop(step, None)
        # steps requested out of order (a resume) drop stale work
        for s in [s for s in self._futures if s < step]:
            self._futures.pop(s).cancel()
        for s in range(step + 1, step + 1 + self.depth):
            if s not in self._futures:
                self._futures[s] = self._pool.submit(self.fn, s)
        return fut.result() if fut is not None else self.fn(step)

    def close(self) -> None:
        if self._pool is not None:
            for f in self._futures.values():
                f.cancel()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
