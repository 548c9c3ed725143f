"""Worker threads in this process.

A thread cannot be killed. When the dispatcher stops one (a task past its timeout, a
cancelled job, an initializer that hangs) the thread is *abandoned*: its task is
written off, a fresh thread takes its place, and the abandoned one is reported by
``workers_info`` until its call returns, when it exits without reporting anything.
At most ``MAX_ABANDONED`` abandoned threads may run at once; past that no replacement
starts until one returns.

A thread runs ``async def`` tasks as one stream on its event loop (``lanes.py``): up to
``concurrency`` in flight, across batches, so it may hold several batches at once.

Ownership: the dispatcher thread calls every ``ThreadPool`` method and owns the pool's
dicts and counters. A ``_Worker``'s ``state``, ``held``, ``current`` and ``outcomes``
are shared with its thread and guarded by its ``lock``: whoever moves first (the thread
reporting a batch and dropping it from ``held``, the dispatcher setting ABANDONED)
decides who reports the batch. The dispatcher abandons a thread only while one of its
tasks runs (``current``), never while the thread takes a batch.
"""

from __future__ import annotations

import enum
import os
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

from .. import hooks
from ..admission import Admission
from ..lanes import AsyncLane, Inbox, OnStep, Work
from ..tasks import Batch, Outcomes, failure_of, release_worker_thread
from . import base
from .base import Completed, Pool, Report, Returned, Running, WorkerGone

PREFETCH = 2  # batches queued per worker, so a worker never waits for the dispatcher


class ThreadState(enum.Enum):
    STARTING = "starting"  # running the initializer
    IDLE = "idle"  # waiting for a batch
    BUSY = "busy"  # running a batch (or a stream of async batches)
    RETURNING = "returning"  # running a batch it gives back what it has not started of
    ABANDONED = "abandoned"  # written off by the dispatcher; exits when its call returns


class _Worker:
    """One worker thread; ``lock`` guards ``state``, ``held``, ``current``, ``outcomes``."""

    __slots__ = (
        "current",
        "done",
        "errors",
        "held",
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
        self.held: list[Batch] = []  # taken and not yet reported in full, oldest first
        self.current: tuple[Batch, int, float] | None = None  # the task running:
        # (batch, position, monotonic start)
        self.outcomes = Outcomes.empty()  # of a plain batch, not yet reported
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
        self._queue: Inbox[Batch | None] = Inbox()
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
        _ThreadLane(self, worker).serve(lambda batch: self._run_plain(worker, batch))

    def _run_plain(self, worker: _Worker, batch: Batch) -> bool:
        """Run a batch of plain tasks and report it; False if the thread was abandoned."""
        with worker.lock:
            worker.state, worker.held = ThreadState.BUSY, [batch]
        unstarted = self._run_batch(worker, batch)
        if unstarted is None:
            return False  # abandoned: the dispatcher wrote this batch off and moved on
        hooks.at("thread.batch-ran")
        with worker.lock:
            if worker.state is ThreadState.ABANDONED:
                return False
            outcomes, worker.outcomes = worker.outcomes, Outcomes.empty()
            worker.state, worker.held, worker.since = ThreadState.IDLE, [], time.monotonic()
        if unstarted == len(batch.items):
            self._report(Completed(batch, 0, outcomes, worker.id, self._pid))
        else:
            self._report(Completed(batch, 0, outcomes, worker.id, self._pid, final=False))
            self._report(Returned(batch, unstarted))
        return True

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
                worker.current = (batch, position, now)
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

    # -- the dispatcher's side -----------------------------------------------------

    def _paused(self) -> str | None:
        """Threads share their process: its memory and fds pause them all together."""
        if not self._workers:
            return None
        any_thread = next(iter(self._workers))
        return self._admission.machine_pause() or self._admission.worker_pause(any_thread)

    def capacity(self, prefetch: bool = True, stream: bool = False) -> int:
        if self._paused() is not None or self._closing:
            return 0
        return (PREFETCH + stream if prefetch else 1) * len(self._workers) - self._in_flight

    def pause_reasons(self) -> list[str]:
        paused = self._paused()
        return [] if paused is None else [f"the process: {paused}"]

    def send(self, batch: Batch) -> None:
        self._in_flight += 1
        self._queue.put(batch)

    def settle(self, event: Completed | WorkerGone | Returned) -> None:
        if isinstance(event, WorkerGone):
            self._in_flight -= len(event.unreported)  # one entry per batch it held
        elif event.final:
            self._in_flight -= 1

    def give_back(self, batch: Batch) -> bool:
        for worker in self._workers.values():
            with worker.lock:
                if worker.state is ThreadState.BUSY and any(b is batch for b in worker.held):
                    worker.state = ThreadState.RETURNING
                    return True
        return False

    def running(self) -> list[Running]:
        busy = []
        for worker in self._workers.values():
            with worker.lock:
                current = worker.current
            if current is not None:
                busy.append(Running(worker.id, *current))
        return busy

    def starting(self) -> list[tuple[str, float]]:
        return [(w.id, w.since) for w in self._workers.values() if w.state is ThreadState.STARTING]

    def stop(self, worker: str, why: str, task: tuple[int, int] | None = None) -> bool:
        stuck = self._workers.get(worker)
        if stuck is None:
            return False
        with stuck.lock:
            held, current, starting = stuck.held, stuck.current, stuck.state
            if starting is ThreadState.STARTING:
                running = []
            elif current is None:
                return False  # between tasks: the task it was stopped for has ended
            elif task is not None and (current[0].seq, current[1]) != task:
                return False
            else:
                running = [(current[0], current[1])]
            stuck.state = ThreadState.ABANDONED
            finished, stuck.outcomes = stuck.outcomes, Outcomes.empty()
        del self._workers[worker]
        self._abandoned.append(stuck)
        hooks.at("thread.worker-abandoned")  # between losing a worker and replacing it
        self._replace()
        if finished.values:  # a plain batch: the tasks before the one stopped
            self._report(Completed(held[0], 0, finished, worker, self._pid, final=False))
        # the rest of every batch it held runs again elsewhere (what those records leave)
        unreported = [(batch, 0) for batch in held]
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
                state, current = worker.state, worker.current
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
            rows.append(
                {
                    "worker": worker.id,
                    "pid": self._pid,
                    "native_id": worker.native_id,
                    "state": shown,
                    "task": None if current is None else current[0].indices[current[1]],
                    "task_seconds": None if current is None else now - current[2],
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


class _ThreadLane(AsyncLane):
    """A worker thread's stream of async batches, reported as the thread's facts."""

    def __init__(self, pool: ThreadPool, worker: _Worker) -> None:
        super().__init__(pool._queue)
        self.pool = pool
        self.worker = worker

    def work(self, item: Batch | None) -> Work | None:
        if item is None or not item.run.is_async:
            return None
        run = item.run
        return Work(
            item, run.fn, run.star, run.retry_on, run.timeout, run.concurrency, item.items, _never
        )

    def took(self, work: Work) -> None:
        with self.worker.lock:
            self.worker.held.append(work.key)
            self.worker.state = ThreadState.BUSY  # a recall was about the batches held before

    def stepper(self, work: Work) -> OnStep:
        batch, worker = work.key, self.worker

        def on_step(position: int, started: float) -> None:
            with worker.lock:
                worker.current = None if position < 0 else (batch, position, started)

        return on_step

    def recalled(self, work: Work, waited: bool) -> bool:
        return work.key.run.stopped or (waited and self.worker.state is ThreadState.RETURNING)

    def finished(self, work: Work, outcomes: Outcomes, final: bool) -> None:
        worker = self.worker
        with worker.lock:
            if worker.state is ThreadState.ABANDONED:
                return  # the dispatcher took every batch the thread held
            if final:
                worker.held.remove(work.key)
            worker.done += len(outcomes.values)
            worker.errors += len(outcomes.failures)
        self.pool._report(Completed(work.key, 0, outcomes, worker.id, self.pool._pid, final))

    def gave_back(self, work: Work, first: int, final: bool) -> None:
        worker = self.worker
        with worker.lock:
            if worker.state is ThreadState.ABANDONED:
                return
            if final:
                worker.held.remove(work.key)
            if worker.state is ThreadState.RETURNING:
                worker.state = ThreadState.BUSY
        self.pool._report(Returned(work.key, first, final))

    def abandoned(self) -> bool:
        return self.worker.state is ThreadState.ABANDONED

    def idle(self) -> None:
        with self.worker.lock:
            if self.worker.state is not ThreadState.ABANDONED:
                self.worker.state, self.worker.since = ThreadState.IDLE, time.monotonic()


def _never(item: Any) -> None:
    """A thread runs every item it is given (nothing crossed a pipe)."""
    return None
