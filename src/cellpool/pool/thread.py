"""Worker threads in this process.

A thread cannot be killed. When a task runs past its timeout its thread is abandoned:
the task is written off as ``"timeout"``, a fresh thread takes the worker's place, and
the abandoned one is reported by ``workers_info`` until it returns and exits by itself.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from ..admission import Admission
from ..tasks import (
    Batch,
    Outcomes,
    call,
    call_async,
    initializer_failure,
    release_worker_thread,
)
from .base import Completed, Pool, Report, Running, WorkerLost

PREFETCH = 2  # batches queued per worker, so a worker never waits for the dispatcher


class _Worker:
    """One worker thread and what it is doing; ``lock`` guards the task fields."""

    __slots__ = (
        "abandoned",
        "batch",
        "done",
        "errors",
        "id",
        "lock",
        "native_id",
        "outcomes",
        "position",
        "started",
        "thread",
    )

    def __init__(self, worker_id: str) -> None:
        self.id = worker_id
        self.lock = threading.Lock()
        self.batch: Batch | None = None
        self.position = 0
        self.started = 0.0
        self.outcomes = Outcomes.empty()
        self.abandoned = False
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
        self._report = report
        self._admission = admission
        self._initializer = initializer
        self._initargs = initargs
        self._queue: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        self._workers: dict[str, _Worker] = {}
        self._abandoned: list[_Worker] = []
        self._in_flight = 0
        self._serial = 0
        self._pid = os.getpid()
        for _ in range(workers):
            self._spawn()

    def _spawn(self) -> None:
        self._serial += 1
        worker = _Worker(f"t{self._serial}")
        worker.thread = threading.Thread(
            target=self._work, args=(worker,), name=f"cellpool-{worker.id}", daemon=True
        )
        self._workers[worker.id] = worker
        worker.thread.start()

    def _work(self, worker: _Worker) -> None:
        try:
            self._serve(worker)
        finally:
            release_worker_thread()

    def _serve(self, worker: _Worker) -> None:
        worker.native_id = threading.get_native_id()
        init_failure = None
        if self._initializer is not None:
            try:
                self._initializer(*self._initargs)
            except Exception as exc:  # as in a process: its tasks fail, the pool goes on
                init_failure = initializer_failure(exc)
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            run = batch.run
            if init_failure is not None:
                outcomes = Outcomes.empty()
                for _ in batch.items:
                    outcomes.add((None, init_failure, False, time.time(), time.time()))
                self._report(Completed(batch, 0, outcomes, worker.id, self._pid))
                continue
            if run.is_async:
                self._run_async(worker, batch)
                continue
            for position, item in enumerate(batch.items):
                if run.cancelled:
                    break
                with worker.lock:
                    worker.batch, worker.position, worker.started = batch, position, time.time()
                result = call(run.fn, item, run.star, run.retry_on)
                with worker.lock:
                    if worker.abandoned:
                        return  # the dispatcher wrote this task off and moved on
                    worker.outcomes.add(result)
                    worker.done += 1
                    worker.errors += result[1] is not None
            with worker.lock:
                outcomes, worker.outcomes, worker.batch = worker.outcomes, Outcomes.empty(), None
            self._report(Completed(batch, 0, outcomes, worker.id, self._pid))

    def _run_async(self, worker: _Worker, batch: Batch) -> None:
        """The batch's coroutines together on this thread's event loop."""
        run = batch.run
        with worker.lock:
            worker.batch, worker.position, worker.started = batch, 0, time.time()
        outcomes = call_async(
            run.fn, run.star, batch.items, run.retry_on, run.timeout, lambda item: None
        )
        with worker.lock:
            worker.batch = None
            worker.done += len(outcomes.values)
            worker.errors += len(outcomes.failures)
        self._report(Completed(batch, 0, outcomes, worker.id, self._pid))

    # -- the dispatcher's side -----------------------------------------------------

    def _paused(self) -> str | None:
        """Threads share their process: its memory and fds pause them all together."""
        any_thread = next(iter(self._workers))
        return self._admission.machine_pause() or self._admission.worker_pause(any_thread)

    def capacity(self) -> int:
        if self._paused() is not None:
            return 0
        return PREFETCH * len(self._workers) - self._in_flight

    def pause_reasons(self) -> list[str]:
        paused = self._paused()
        return [] if paused is None else [f"the process: {paused}"]

    def send(self, batch: Batch) -> None:
        self._in_flight += 1
        self._queue.put(batch)

    def settle(self, event: Completed | WorkerLost) -> None:
        if isinstance(event, WorkerLost) or event.final:
            self._in_flight -= 1

    def running(self) -> list[Running]:
        busy = []
        for worker in self._workers.values():
            with worker.lock:
                if worker.batch is not None:
                    busy.append(Running(worker.id, worker.batch, worker.position, worker.started))
        return busy

    def stop(
        self, worker: str, status: str, reason: str, task: tuple[int, int] | None = None
    ) -> None:
        if status != "timeout":
            return  # a running thread cannot be stopped; its outcome will be ignored
        stuck = self._workers[worker]
        with stuck.lock:
            batch, position, finished = stuck.batch, stuck.position, stuck.outcomes
            if batch is None or (task is not None and (batch.seq, position) != task):
                return  # that task ended meanwhile: nothing to abandon
            stuck.abandoned = True
            stuck.outcomes = Outcomes.empty()
        del self._workers[worker]
        self._abandoned.append(stuck)
        self._spawn()
        if batch is None:
            return
        if finished.values:
            self._report(Completed(batch, 0, finished, worker, self._pid, final=False))
        self._report(
            WorkerLost(
                worker,
                self._pid,
                status,
                reason,
                culprits=[(batch, position)],
                unfinished=[(batch, position + 1)],
            )
        )

    def workers_info(self) -> list[dict[str, Any]]:
        now = time.time()
        self._abandoned = [w for w in self._abandoned if w.thread and w.thread.is_alive()]
        paused = self._paused()
        rows = []
        for worker in [*self._workers.values(), *self._abandoned]:
            with worker.lock:
                batch, position, started = worker.batch, worker.position, worker.started
            if worker.abandoned:
                state, reason = "abandoned", "ran past its timeout; the thread cannot be killed"
            elif batch is not None:
                state, reason = "busy", None
            else:
                state, reason = ("idle", None) if paused is None else ("paused", paused)
            rows.append(
                {
                    "worker": worker.id,
                    "pid": self._pid,
                    "native_id": worker.native_id,
                    "state": state,
                    "task": batch.indices[position] if batch is not None else None,
                    "task_seconds": now - started if batch is not None else None,
                    "done": worker.done,
                    "errors": worker.errors,
                    "reason": reason,
                }
            )
        return rows

    def abandoned_threads(self) -> list[threading.Thread]:
        """Threads written off after a timeout that are still running their task."""
        return [w.thread for w in self._abandoned if w.thread and w.thread.is_alive()]

    def shutdown(self, wait: bool) -> None:
        workers = list(self._workers.values())
        for _ in workers:
            self._queue.put(None)
        if wait:
            for worker in workers:
                if worker.thread is not None:
                    worker.thread.join()
