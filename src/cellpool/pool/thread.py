"""Worker threads in this process.

A thread cannot be killed. When the dispatcher stops one (a task past its timeout, a
cancelled job, an initializer that hangs) the thread is *abandoned*: its task is
written off, a fresh thread takes its place, and the abandoned one is reported by
``workers_info`` until its call returns, when it exits without reporting anything.
At most ``MAX_ABANDONED`` abandoned threads may run at once; past that no replacement
starts until one returns.

Ownership: the dispatcher thread calls every ``ThreadPool`` method and owns the pool's
dicts and counters. A ``_Worker``'s ``state``, ``batch``, ``current`` and ``outcomes``
are shared with its thread and guarded by its ``lock``: whoever moves the state first
(the thread to IDLE, the dispatcher to ABANDONED) decides who reports the batch.
"""

from __future__ import annotations

import enum
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

from .. import hooks
from ..admission import Admission
from ..tasks import Batch, Outcomes, call_async, failure_of, release_worker_thread
from . import base
from .base import Completed, Pool, Report, Returned, Running, WorkerGone

PREFETCH = 2  # batches queued per worker, so a worker never waits for the dispatcher


class ThreadState(enum.Enum):
    STARTING = "starting"  # running the initializer
    IDLE = "idle"  # waiting for a batch
    BUSY = "busy"  # running a batch
    RETURNING = "returning"  # running a batch it gives back the rest of after this task
    ABANDONED = "abandoned"  # written off by the dispatcher; exits when its call returns


class _Worker:
    """One worker thread; ``lock`` guards ``state``, ``batch``, ``current``, ``outcomes``."""

    __slots__ = (
        "batch",
        "current",
        "done",
        "errors",
        "id",
        "lock",
        "native_id",
        "outcomes",
        "since",
        "state",
        "thread",
    )

    def __init__(self, worker_id: str) -> None:
        self.id = worker_id
        self.lock = threading.Lock()
        self.state = ThreadState.STARTING
        self.since = time.monotonic()  # when the current state began
        self.batch: Batch | None = None
        self.current: tuple[int, float] | None = None  # (position, monotonic start)
        self.outcomes = Outcomes.empty()
        self.done = 0
        self.errors = 0
        self.native_id: int | None = None
        self.thread: threading.Thread | None = None


class ThreadPool(Pool):
    """``workers`` threads pulling batches from one queue."""

    kind = "thread"

    def __init__(
        self,
        workers: int,
        report: Report,
        admission: Admission,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple = (),
    ) -> None:
        self._size = workers
        self._report = report
        self._admission = admission
        self._initializer = initializer
        self._initargs = initargs
        self._queue: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        self._workers: dict[str, _Worker] = {}
        self._abandoned: list[_Worker] = []
        self._max_abandoned = max(32, 4 * workers)
        self._warned = False
        self._in_flight = 0  # batches queued or running
        self._serial = 0
        self._closing = False
        self._pid = os.getpid()
        for _ in range(workers):
            self._spawn()

    def _spawn(self) -> None:
        self._serial += 1
        worker = _Worker(f"t{self._serial}")
        worker.thread = threading.Thread(
            target=self._work, args=(worker,), name=f"cellpool-{worker.id}", daemon=True
        )
        worker.thread.cellpool_pool = id(self)  # type: ignore[attr-defined]  # see owns()
        self._workers[worker.id] = worker
        worker.thread.start()

    # -- the worker threads --------------------------------------------------------

    def _work(self, worker: _Worker) -> None:
        try:
            if self._start(worker):
                self._serve(worker)
        finally:
            release_worker_thread()
            self._report(base.Changed())  # the pool may have closed

    def _start(self, worker: _Worker) -> bool:
        worker.native_id = threading.get_native_id()
        if self._initializer is not None:
            try:
                self._initializer(*self._initargs)
            except BaseException as exc:
                failure = failure_of(exc)
                self._report(
                    base.PoolBroken(f"the initializer failed: {failure.error_type}: {exc}")
                )
                return False
        with worker.lock:
            if worker.state is ThreadState.ABANDONED:
                return False
            worker.state, worker.since = ThreadState.IDLE, time.monotonic()
        self._report(base.WorkerReady(worker.id))
        return True

    def _serve(self, worker: _Worker) -> None:
        while (batch := self._queue.get()) is not None:
            with worker.lock:
                worker.state, worker.batch = ThreadState.BUSY, batch
            if batch.run.is_async:
                unstarted = self._run_async(worker, batch)
            else:
                unstarted = self._run_batch(worker, batch)
            if unstarted is None:
                return  # abandoned: the dispatcher wrote this batch off and moved on
            hooks.at("thread.batch-ran")
            with worker.lock:
                if worker.state is ThreadState.ABANDONED:
                    return
                outcomes, worker.outcomes = worker.outcomes, Outcomes.empty()
                worker.state, worker.batch, worker.since = ThreadState.IDLE, None, time.monotonic()
            if unstarted == len(batch.items):
                self._report(Completed(batch, 0, outcomes, worker.id, self._pid))
            else:
                self._report(Completed(batch, 0, outcomes, worker.id, self._pid, final=False))
                self._report(Returned(batch, unstarted))
            del batch, outcomes  # hold no task's values while waiting for the next batch

    def _run_batch(self, worker: _Worker, batch: Batch) -> int | None:
        """The hot loop for tiny tasks, written out as the process worker's is: one
        clock read per task, on the monotonic clock (timeouts and records share it).

        Returns the first position it did not run (all ran: the batch's length), or
        ``None`` if the dispatcher abandoned the thread."""
        run = batch.run
        fn, star, retry_on = run.fn, run.star, run.retry_on
        lock, abandoned, returning = worker.lock, ThreadState.ABANDONED, ThreadState.RETURNING
        values, started, finished, failures = worker.outcomes
        clock = time.monotonic
        now = clock()
        for position, item in enumerate(batch.items):
            if run.stopped:
                return position
            with lock:
                worker.current = (position, now)
            failure = None
            try:
                value = fn(*item) if star else fn(item)
            except BaseException as exc:  # a task's SystemExit is its failure
                failure, value = (failure_of(exc), isinstance(exc, retry_on)), None
            end = clock()
            with lock:
                state = worker.state
                if state is abandoned:
                    return None
                worker.current = None
                if failure is not None:
                    failures[len(values)] = failure
                    worker.errors += 1
                values.append(value)
                started.append(now)
                finished.append(end)
                worker.done += 1
            if state is returning:
                return position + 1
            now = end
        return len(batch.items)

    def _run_async(self, worker: _Worker, batch: Batch) -> int | None:
        """The batch's coroutines together on this thread's event loop."""
        run = batch.run

        def on_step(position: int, started: float) -> None:
            with worker.lock:
                worker.current = None if position < 0 else (position, started)

        outcomes = call_async(
            run.fn, run.star, batch.items, run.retry_on, run.timeout, lambda item: None, on_step
        )
        with worker.lock:
            if worker.state is ThreadState.ABANDONED:
                return None
            worker.outcomes = outcomes
            worker.done += len(outcomes.values)
            worker.errors += len(outcomes.failures)
        return len(batch.items)

    # -- the dispatcher's side -----------------------------------------------------

    def _paused(self) -> str | None:
        """Threads share their process: its memory and fds pause them all together."""
        if not self._workers:
            return None
        any_thread = next(iter(self._workers))
        return self._admission.machine_pause() or self._admission.worker_pause(any_thread)

    def capacity(self, prefetch: bool = True) -> int:
        if self._paused() is not None or self._closing:
            return 0
        return (PREFETCH if prefetch else 1) * len(self._workers) - self._in_flight

    def pause_reasons(self) -> list[str]:
        paused = self._paused()
        return [] if paused is None else [f"the process: {paused}"]

    def send(self, batch: Batch) -> None:
        self._in_flight += 1
        self._queue.put(batch)

    def settle(self, event: Completed | WorkerGone | Returned) -> None:
        if isinstance(event, WorkerGone):
            self._in_flight -= bool(event.running)
        elif isinstance(event, Returned) or event.final:
            self._in_flight -= 1

    def give_back(self, batch: Batch) -> bool:
        for worker in self._workers.values():
            with worker.lock:
                if worker.batch is batch and worker.state is ThreadState.BUSY:
                    worker.state = ThreadState.RETURNING
                    return True
        return False

    def running(self) -> list[Running]:
        busy = []
        for worker in self._workers.values():
            with worker.lock:
                batch, current = worker.batch, worker.current
            if batch is not None and current is not None:
                busy.append(Running(worker.id, batch, current[0], current[1]))
        return busy

    def starting(self) -> list[tuple[str, float]]:
        return [(w.id, w.since) for w in self._workers.values() if w.state is ThreadState.STARTING]

    def stop(self, worker: str, why: str, task: tuple[int, int] | None = None) -> bool:
        stuck = self._workers.get(worker)
        if stuck is None:
            return False
        with stuck.lock:
            batch, current, starting = stuck.batch, stuck.current, stuck.state
            if starting is ThreadState.STARTING:
                running = []
            elif batch is None or current is None:
                return False  # between tasks: the task it was stopped for has ended
            elif task is not None and (batch.seq, current[0]) != task:
                return False
            else:
                running = [(batch, current[0])]
            stuck.state = ThreadState.ABANDONED
            finished, stuck.outcomes = stuck.outcomes, Outcomes.empty()
        del self._workers[worker]
        self._abandoned.append(stuck)
        hooks.at("thread.worker-abandoned")  # between losing a worker and replacing it
        self._replace()
        if batch is not None and finished.values:
            self._report(Completed(batch, 0, finished, worker, self._pid, final=False))
        unreported = [] if batch is None or current is None else [(batch, current[0] + 1)]
        ready = starting is not ThreadState.STARTING
        self._report(WorkerGone(worker, self._pid, why, ready, running, None, unreported))
        return True

    def _replace(self) -> None:
        """Start threads up to the pool's size, unless too many abandoned ones still run."""
        self._abandoned = [w for w in self._abandoned if w.thread and w.thread.is_alive()]
        if len(self._abandoned) >= self._size and not self._warned:
            self._warned = True
            warnings.warn(
                f"cellpool: {len(self._abandoned)} threads still run tasks that were stopped "
                "(threads cannot be killed); use kind='process' to have them killed",
                RuntimeWarning,
                stacklevel=1,
            )
        while (
            not self._closing
            and len(self._workers) < self._size
            and len(self._abandoned) < self._max_abandoned
        ):
            self._spawn()

    def tick(self) -> None:
        if len(self._workers) < self._size:
            self._replace()

    def workers_info(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        self._abandoned = [w for w in self._abandoned if w.thread and w.thread.is_alive()]
        paused = self._paused()
        rows = []
        for worker in [*self._workers.values(), *self._abandoned]:
            with worker.lock:
                state, batch, current = worker.state, worker.batch, worker.current
            reason = None
            if state is ThreadState.ABANDONED:
                reason = "stopped while running; the thread cannot be killed"
                shown = "abandoned"
            elif state in (ThreadState.BUSY, ThreadState.RETURNING):
                shown = "busy"
            elif state is ThreadState.STARTING:
                shown = "starting"
            else:
                shown, reason = ("idle", None) if paused is None else ("paused", paused)
            running = batch is not None and current is not None
            rows.append(
                {
                    "worker": worker.id,
                    "pid": self._pid,
                    "native_id": worker.native_id,
                    "state": shown,
                    "task": batch.indices[current[0]] if running else None,  # type: ignore[index, union-attr]
                    "task_seconds": now - current[1] if running else None,  # type: ignore[index]
                    "done": worker.done,
                    "errors": worker.errors,
                    "reason": reason,
                }
            )
        return rows

    def abandoned_threads(self) -> list[threading.Thread]:
        """Threads written off that are still running their task."""
        return [w.thread for w in self._abandoned if w.thread and w.thread.is_alive()]

    def owns(self, thread: threading.Thread) -> bool:
        """True for this pool's worker threads (which must not wait for the pool); safe
        from any thread: it reads only the thread's own mark."""
        return getattr(thread, "cellpool_pool", None) == id(self)

    def close(self, cancel_running: bool) -> None:
        if not self._closing:
            self._closing = True
            for _ in self._workers:
                self._queue.put(None)

    def closed(self) -> bool:
        return all(not (w.thread and w.thread.is_alive()) for w in self._workers.values())
