"""The dispatcher: one thread per executor that owns every scheduling decision.

It pulls inputs lazily from each run (never more than the run's window ahead of what
has been consumed), groups them into batches sized from measured task times, hands
batches to the pool, turns outcomes into records, retries with backoff, enforces
timeouts and cancels. Pools and callers talk to it only through ``post``; its state is
touched by no other thread, so it needs no locks.
"""

from __future__ import annotations

import heapq
import inspect
import itertools
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from .admission import Admission
from .errors import TaskCancelled, TaskTimeout, WorkerCrashed
from .pool.base import Completed, Pool, WorkerLost
from .results import Failure
from .sinks import Finished, FinishedBatch
from .tasks import Batch, Task

BACKOFF_BASE = 0.1  # first retry after about this long, doubling per attempt
BACKOFF_CAP = 30.0
TICK = 0.1  # how often timeouts are checked while tasks run

CANCELLED = Failure("TaskCancelled", "the task was cancelled before it finished")

_STATUS_ERRORS: dict[str, type[BaseException]] = {
    "timeout": TaskTimeout,
    "crashed": WorkerCrashed,
    "cancelled": TaskCancelled,
}


class Sink(Protocol):
    """Where a run's records go: a Results, an ordered value stream, or a Future."""

    def put(self, done: Finished) -> None: ...

    def put_many(self, done: FinishedBatch) -> None: ...

    def buffered(self) -> int: ...

    def finish(self, run: Run) -> None: ...


_run_serials = itertools.count(1)


class Run:
    """One stream of tasks: a ``run``, ``start`` or ``map`` call, or one ``submit``.

    ``star`` means each item is a tuple of arguments (several iterables, or ``submit``).
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        items: Iterator[Any],
        star: bool,
        total: int | None,
        sink: Sink,
        *,
        timeout: float | None,
        retries: int,
        retry_on: tuple[type[BaseException], ...],
        max_pending: int,
        concurrency: int = 1,
    ) -> None:
        self.serial = next(_run_serials)
        # async def tasks run a batch at a time on a worker's event loop: the batch is
        # as large as the coroutines each worker keeps in flight
        self.is_async = inspect.iscoroutinefunction(fn)
        self.concurrency = concurrency
        self.fn = fn
        self.items = self._guarded(items)
        self.star = star
        self.total = total
        self.sink = sink
        self.timeout = timeout
        self.retries = retries
        self.retry_on = retry_on
        self.max_pending = max_pending
        self.next_index = 0
        self.in_flight = 0  # taken from the input and not yet recorded
        self.starved = False  # no room left: a consumer of map() must wake the dispatcher
        self.exhausted = False
        self.cancelled = False  # read by worker threads to skip the rest of a batch
        self.finishing = False  # stopped, but what workers already hold runs to its end
        self.input_error: BaseException | None = None
        self.done = 0
        self.failed = 0  # recorded as error, timeout or crashed
        self.cancelled_tasks = 0
        self.item_seconds: float | None = None
        self.created = time.monotonic()
        self.finished = threading.Event()

    def _guarded(self, items: Iterator[Any]) -> Iterator[Any]:
        """The input, ending early (and noting why) if iterating it raises."""
        try:
            yield from items
        except BaseException as exc:  # even SystemExit: it is the input's, not ours
            self.input_error = exc

    def accepts_retries(self) -> bool:
        return not (self.cancelled or self.finishing)

    def count(self, status: str, n: int) -> None:
        """Add ``n`` records of ``status`` to the counters the views show."""
        self.in_flight -= n
        self.done += n
        if status == "cancelled":
            self.cancelled_tasks += n
        elif status != "ok":
            self.failed += n

    def room(self) -> int:
        """How many more inputs may be taken without passing ``max_pending``."""
        return self.max_pending - self.in_flight - self.sink.buffered()

    def observe(self, started: float, finished: float, count: int) -> None:
        """Fold the measured time per task into a moving average."""
        seconds = (finished - started) / count
        if self.item_seconds is None:
            self.item_seconds = seconds
        else:
            self.item_seconds = 0.8 * self.item_seconds + 0.2 * seconds

    def batch_size(self, workers: int, target_seconds: float) -> int:
        if self.is_async:
            return max(1, min(self.concurrency, self.max_pending // (2 * workers)))
        if self.item_seconds is None:
            return 1  # measure before batching
        # A batch holds about target_seconds of work, so the last ones leave workers idle
        # for no longer than that: no need to shrink them near the end.
        size = int(target_seconds / max(self.item_seconds, 1e-7))
        return max(1, min(size, self.max_pending // (2 * workers)))

    def take(self, count: int) -> Batch | None:
        """A fresh batch of up to ``count`` inputs, or ``None`` if the input has ended."""
        items = list(itertools.islice(self.items, count))
        if len(items) < count:
            self.exhausted = True
        if not items:
            return None
        first = self.next_index
        self.next_index += len(items)
        self.in_flight += len(items)
        return Batch(self, range(first, self.next_index), items)


@dataclass(slots=True)
class AddRun:
    run: Run


@dataclass(slots=True)
class CancelRun:
    """Stop a run. What happens to its running tasks is ``running``:

    ``"kill"`` stops them (a process is killed; a thread cannot be and runs on, its
    outcome ignored), ``"drop"`` records them cancelled and ignores their outcome,
    ``"finish"`` lets them finish and records their outcome.
    """

    run: Run
    running: str


@dataclass(slots=True)
class Wake:
    """Something changed that may free room: a consumer took values."""


@dataclass(slots=True)
class Shutdown:
    cancel_futures: bool
    handled: threading.Event = field(default_factory=threading.Event)


def backoff(attempt: int) -> float:
    """Seconds before retry number ``attempt``: exponential, capped, with full jitter."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


class Dispatcher:
    """Feeds ``pool`` from the runs posted to it; see the module docstring."""

    def __init__(self, pool: Pool, workers: int, admission: Admission) -> None:
        self.pool = pool
        self.workers = workers
        self.admission = admission
        self._events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._runs: list[Run] = []
        self._batches: dict[int, Batch] = {}
        self._requeued: deque[tuple[Run, Task]] = deque()
        self._retries: list[tuple[float, int, Run, Task]] = []
        self._retry_order = itertools.count()
        self._closing = False
        self.failure: RuntimeError | None = None  # set if this thread died of a bug
        self._handlers: dict[type, Callable[[Any], None]] = {
            AddRun: self._add_run,
            CancelRun: self._cancel_run,
            Completed: self._completed,
            WorkerLost: self._worker_lost,
            Wake: lambda event: None,
            Shutdown: self._shutdown,
        }
        self.thread = threading.Thread(target=self._loop, name="cellpool-dispatcher", daemon=True)
        self.thread.start()

    def post(self, event: Any) -> None:
        """Hand an event to the dispatcher thread (safe from any thread)."""
        self._events.put(event)

    # -- the loop ------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as exc:
            # A bug here must not leave callers waiting forever: end every run with it.
            self.failure = RuntimeError(f"cellpool's dispatcher failed: {exc!r}")
            for run in self._runs:
                run.input_error = self.failure
                run.sink.finish(run)
                run.finished.set()
            self.pool.shutdown(wait=False)
            raise

    def _serve(self) -> None:
        while True:
            try:
                event = self._events.get(timeout=self._wait())
                while True:
                    self._handlers[type(event)](event)
                    event = self._events.get_nowait()
            except queue.Empty:
                pass
            self._expire()
            self._fill()
            self._check_blocked()
            self._finish_runs()
            if self._closing and not self._runs:
                self.pool.shutdown(wait=True)
                return

    def _wait(self) -> float | None:
        """Block on the next event, but wake for timeouts and due retries."""
        if self._retries:
            return max(0.0, min(TICK, self._retries[0][0] - time.monotonic()))
        return TICK if self._runs else None

    # -- events --------------------------------------------------------------------

    def _add_run(self, event: AddRun) -> None:
        self._runs.append(event.run)

    def _cancel_run(self, event: CancelRun) -> None:
        self._stop_run(event.run, event.running, "cancelled", CANCELLED)

    def _stop_run(self, run: Run, running_tasks: str, status: str, failure: Failure) -> None:
        """End a run early: every task not finished gets ``status`` (see ``CancelRun``)."""
        if run not in self._runs:
            return  # already finished
        stopped: list[Task] = []
        if running_tasks == "finish":
            run.finishing = True  # what workers hold finishes and is recorded as it ends
        else:
            run.cancelled = True  # set first: a worker thread checks it before each task
            if running_tasks == "kill":
                for busy in self.pool.running():
                    if busy.batch.run is run:
                        task = (busy.batch.seq, busy.position)
                        self.pool.stop(busy.worker, status, failure.error or status, task)
            for batch in [b for b in self._batches.values() if b.run is run]:
                stopped += [batch.task(p) for p in range(len(batch.items)) if batch.resolve(p)]
                self._close(batch)
        for entry in [e for e in self._requeued if e[0] is run]:
            self._requeued.remove(entry)
            stopped.append(entry[1])
        for entry in [e for e in self._retries if e[2] is run]:
            self._retries.remove(entry)
            stopped.append(entry[3])
        heapq.heapify(self._retries)
        for task in stopped:
            self._complete(run, task, status, None, failure)
        if run.total is not None and not run.exhausted and run.total > run.next_index:
            # a sized input is cheap to walk: its remaining items get records too
            rest = run.take(run.total - run.next_index)
            if rest is not None:
                self._complete_many(run, rest, 0, status, None, failure, None, None)
        run.exhausted = True

    def _completed(self, event: Completed) -> None:
        self.pool.settle(event)
        batch, out, start = event.batch, event.outcomes, event.start
        count = len(out.values)
        run = batch.run
        if count and not batch.closed:
            run.observe(out.started[0], out.finished[-1], count)
            if not out.failures and batch.attempts is None:
                batch.resolve_range(start, count)
                self._complete_many(
                    run,
                    batch,
                    start,
                    "ok",
                    out.values,
                    None,
                    out.started,
                    out.finished,
                    event.worker,
                    event.pid,
                )
            else:
                self._completed_one_by_one(event)
        if batch.unresolved == 0:
            self._close(batch)

    def _completed_one_by_one(self, event: Completed) -> None:
        batch, out, run = event.batch, event.outcomes, event.batch.run
        for offset, value in enumerate(out.values):
            position = event.start + offset
            if not batch.resolve(position):
                continue
            task = batch.task(position)
            task = task._replace(attempts=task.attempts + 1)
            started, finished = out.started[offset], out.finished[offset]
            failure, retryable = out.failures.get(offset, (None, False))
            if failure is None:
                self._complete(
                    run, task, "ok", value, None, event.worker, event.pid, started, finished
                )
            elif retryable and task.attempts <= run.retries and run.accepts_retries():
                self._retry(run, task)
            else:
                # an async task's timeout is caught on the worker's own event loop
                status = "timeout" if failure.error_type == TaskTimeout.__name__ else "error"
                self._complete(
                    run, task, status, None, failure, event.worker, event.pid, started, finished
                )

    def _worker_lost(self, event: WorkerLost) -> None:
        self.pool.settle(event)
        for batch, position in event.culprits:
            if batch.resolve(position):
                run = batch.run
                task = batch.task(position)
                task = task._replace(attempts=task.attempts + 1)
                error = _STATUS_ERRORS[event.status]
                retry = event.status != "cancelled" and issubclass(error, run.retry_on)
                if retry and task.attempts <= run.retries and run.accepts_retries():
                    self._retry(run, task)
                else:
                    failure = Failure(error.__name__, event.reason)
                    self._complete(
                        run,
                        task,
                        event.status,
                        None,
                        failure,
                        event.worker,
                        event.pid,
                        None,
                        time.time(),
                    )
        for batch, first in event.unfinished:
            for position in range(first, len(batch.items)):
                if batch.resolve(position):
                    if batch.run.cancelled:
                        self._complete(
                            batch.run, batch.task(position), "cancelled", None, CANCELLED
                        )
                    else:
                        self._requeued.append((batch.run, batch.task(position)))
            self._close(batch)

    def _shutdown(self, event: Shutdown) -> None:
        self._closing = True
        if event.cancel_futures:
            for run in list(self._runs):
                self._cancel_run(CancelRun(run, running="finish"))
        event.handled.set()

    # -- helpers -------------------------------------------------------------------

    def _close(self, batch: Batch) -> None:
        batch.closed = True
        self._batches.pop(batch.seq, None)

    def _retry(self, run: Run, task: Task) -> None:
        due = time.monotonic() + backoff(task.attempts)
        heapq.heappush(self._retries, (due, next(self._retry_order), run, task))

    def _complete(
        self,
        run: Run,
        task: Task,
        status: str,
        value: Any,
        failure: Failure | None,
        worker: str | None = None,
        pid: int | None = None,
        started: float | None = None,
        finished: float | None = None,
    ) -> None:
        """Make one task's record (see ``_complete_many``)."""
        run.count(status, 1)
        run.sink.put(Finished(task, status, value, failure, worker, pid, started, finished))

    def _complete_many(
        self,
        run: Run,
        batch: Batch,
        start: int,
        status: str,
        values: list[Any] | None,
        failure: Failure | None,
        started: list[float] | None,
        finished: list[float] | None,
        worker: str | None = None,
        pid: int | None = None,
    ) -> None:
        """Make the records of a fresh batch's positions ``start``... with one status.

        With ``_complete``, the only places records are made.
        """
        count = len(batch.items) - start if values is None else len(values)
        run.count(status, count)
        tried = 1 if status == "ok" else 0
        run.sink.put_many(
            FinishedBatch(
                batch.indices[start : start + count],
                batch.items[start : start + count],
                tried,
                status,
                values,
                failure,
                started,
                finished,
                worker,
                pid,
            )
        )

    def _expire(self) -> None:
        self.pool.tick()
        now = time.time()
        for busy in self.pool.running():
            timeout = busy.batch.run.timeout
            if busy.batch.run.is_async:
                continue  # its event loop enforces the timeout of each task
            if timeout is not None and not busy.batch.closed and now - busy.started > timeout:
                reason = f"the task ran past its {timeout:g} s timeout"
                self.pool.stop(busy.worker, "timeout", reason, (busy.batch.seq, busy.position))

    def _fill(self) -> None:
        if self.pool.broken is not None:
            failure = Failure(WorkerCrashed.__name__, self.pool.broken)
            for run in list(self._runs):
                self._stop_run(run, "drop", "crashed", failure)
            return
        while self.pool.capacity() > 0:
            batch = self._next_batch()
            if batch is None:
                return
            self._batches[batch.seq] = batch
            self.pool.send(batch)

    def _check_blocked(self) -> None:
        """Tell admission whether waiting work has nowhere to go (it warns if it lasts)."""
        waiting = bool(self._requeued or self._retries) or any(
            not run.exhausted and run.room() > 0 for run in self._runs
        )
        blocked = waiting and self.pool.capacity() == 0
        self.admission.blocked(self.pool.pause_reasons() if blocked else [], waiting)

    def _next_batch(self) -> Batch | None:
        if self._requeued:
            run, task = self._requeued.popleft()
            return Batch.of(run, task)
        if self._retries and self._retries[0][0] <= time.monotonic():
            _, _, run, task = heapq.heappop(self._retries)
            return Batch.of(run, task)
        for run in self._runs:  # first come, first served, as concurrent.futures users expect
            if run.exhausted or run.cancelled:
                continue
            count = min(run.batch_size(self.workers, self.pool.batch_seconds), run.room())
            run.starved = count <= 0
            limit = self.pool.batch_limit()
            if limit is not None:
                count = min(count, limit)
            if count <= 0:
                continue
            batch = run.take(count)
            if batch is not None:
                return batch
        return None

    def _finish_runs(self) -> None:
        for run in [r for r in self._runs if r.exhausted and r.in_flight == 0]:
            self._runs.remove(run)
            run.sink.finish(run)
            run.finished.set()
