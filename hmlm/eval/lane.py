"""A second worker thread for `hmlm eval`: the work that needs no lm-eval runs beside it.

`hmlm eval` spends its time in two kinds of work. lm-eval's loop for each memory mode is mostly Python between small
kernels (request building, greedy decoding one token per step, metrics) and keeps about one core busy; the held-out
perplexity and the embedder's forward over the retrieval keys are large matmuls that release the GIL. On a 2-core CPU
the second kind runs here, on one OpenMP thread, while lm-eval's loop runs on the caller's thread, also on one:
two independent streams of work instead of one stream that splits each kernel across both cores.

Jobs run one at a time in priority order (lower first, then submission order); `submit` returns a Future.
Every job runs with `threads` torch threads on this worker only: torch's thread count (OpenMP's and MKL's) is a
per-thread setting, so the caller's own count is unchanged.
"""
from __future__ import annotations

import itertools
import queue
import threading
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, Callable, Iterator


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """This thread's torch thread count set to n (None: unchanged) for the block."""
    import torch

    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n is not None and n != before:
            torch.set_num_threads(before)


class Lane:
    """One worker thread with a priority queue of jobs; `close()` waits for the queued jobs and ends the thread."""

    def __init__(self, *, threads: int = 1, name: str = "hmlm-eval-lane"):
        self.threads = threads
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = itertools.count()
        self._pending = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, priority: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        with self._lock:
            self._pending += 1
        self._jobs.put((priority, next(self._seq), future, fn, args, kwargs))
        return future

    @property
    def busy(self) -> bool:
        """Jobs queued or running."""
        with self._lock:
            return self._pending > 0

    def threads_beside(self) -> int | None:
        """The torch threads for a batch on the caller's thread now: one while the lane has work (each stream its own
        core), else None (unchanged: every core for the caller)."""
        return 1 if self.busy else None

    def close(self) -> None:
        self._jobs.put((float("inf"), next(self._seq), None, None, (), {}))
        self._thread.join()

    def _run(self) -> None:
        import torch

        torch.set_num_threads(self.threads)   # this thread's OpenMP/MKL count only
        while True:
            _, _, future, fn, args, kwargs = self._jobs.get()
            if future is None:
                return
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:   # handed to whoever waits on the future
                    future.set_exception(exc)
            with self._lock:
                self._pending -= 1
