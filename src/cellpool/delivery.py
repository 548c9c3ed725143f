"""Completing futures off the dispatcher thread.

Completing a ``Future`` runs its done-callbacks, which are user code: a callback may
block, wait on another future of the same executor, submit more work or shut the
executor down. So the dispatcher never completes a future itself: it hands the
completion to ``Deliveries``, whose threads run them. When every delivery thread is
busy (a callback blocks) and another completion comes, one more thread starts, so a
blocked callback never holds back the completion it waits for.

Ownership: ``_idle`` and ``_threads`` are guarded by ``_lock``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

MAX_THREADS = 64  # beyond this many blocked callbacks, completions wait their turn


class Deliveries:
    """A small, growing set of threads that run completions in order of arrival."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[..., Any], tuple] | None] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._idle = 0
        self._threads: list[threading.Thread] = []
        self._closed = False

    def put(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on a delivery thread (never blocks)."""
        with self._lock:
            if self._idle <= 0 and len(self._threads) < MAX_THREADS and not self._closed:
                thread = threading.Thread(target=self._serve, name="cellpool-delivery", daemon=True)
                self._threads.append(thread)
                self._idle += 1
                thread.start()
            self._idle -= 1  # this completion takes an idle thread, or waits for one
        self._queue.put((fn, args))

    def _serve(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, args = item
            try:
                fn(*args)
            finally:
                del item, fn, args  # hold no result while waiting for the next one
                with self._lock:
                    self._idle += 1

    def close(self) -> None:
        """Let every thread end once the completions queued so far have run."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(None)

    def threads(self) -> list[threading.Thread]:
        with self._lock:
            return list(self._threads)
