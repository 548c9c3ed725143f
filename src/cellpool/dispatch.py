"""The dispatcher: one thread per executor that owns every scheduling decision.

Threads of an executor, and what each owns::

    caller threads    Executor, Job     post events; read snapshots and run counters
    dispatcher        this module       runs, batches, retries, stop orders, records
    feeder (per run)  feeder.py         iterating the run's input (user code); lists,
                                        tuples and ranges have none (runs.SequenceInput)
    delivery          delivery.py       completing futures (user callbacks)
    pool threads      pool/*.py         running tasks (threads), or the process pool's
                                        reader (pipes, reaping) and senders (pickling,
                                        pipe writes); they post facts, decide nothing
    monitor           monitor.py        psutil samples of the rows the dispatcher publishes

Event flow::

    submit/run/map --AddRun--> dispatcher --send/give_back--> pool --> workers
    feeder --Wake-->               |   <--Completed/Returned/WorkerReady/WorkerGone/PoolBroken--
    cancel/shutdown/gc/exit -->    |--records--> sink --futures--> delivery threads

The dispatcher never blocks on anything but its own event queue, and never runs user
code: it does not iterate inputs, pickle, write to pipes or complete futures. Timeouts
are its alone to enforce, on the monotonic clock, for every kind of pool: it orders a
stop and, when the pool reports the worker gone, gives the task its record. When a
worker idles and nothing waits, it recalls the batch holding the most work not started
(``_rebalance``); what the worker gives back (``Returned``) is sent again. A run sizes
its batches from the seconds per task it measures, starting from its function's last
run on this executor if there was one (``_estimates``).
"""

from __future__ import annotations

import concurrent.futures.thread  # noqa: F401 (its exit hook first: ours must run before it)
import contextlib
import enum
import heapq
import itertools
import queue
import random
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from . import hooks
from .admission import Admission
from .delivery import Deliveries
from .errors import BrokenPool, TaskTimeout, WorkerCrashed
from .monitor import Monitor
from .pool.base import (
    Changed,
    Completed,
    Phase,
    Pool,
    PoolBroken,
    Returned,
    WorkerGone,
    WorkerReady,
)
from .results import Failure
from .runs import Run, RunState, StopMode
from .sinks import Finished, FinishedBatch
from .tasks import Batch, Task

BACKOFF_BASE = 0.1  # first retry after about this long, doubling per attempt
BACKOFF_CAP = 30.0
TICK = 0.1  # how often timeouts are checked while tasks run
PUBLISH_SECONDS = 0.05  # the workers' rows are published at most this often while busy
DEPARTURES = 256  # how many departed workers' reasons are kept for the views
START_FAILURES = 3  # workers in a row that die before they are ready: the pool is broken

CANCELLED = Failure("TaskCancelled", "the task was cancelled before it finished")

_RETRYABLE: dict[str, type[BaseException]] = {"timeout": TaskTimeout, "crashed": WorkerCrashed}


class DispatcherState(enum.Enum):
    SERVING = "serving"  # takes new runs
    CLOSING = "closing"  # takes no new run; the runs it has finish
    STOPPING = "stopping"  # every run has ended; the pool's workers are stopping
    STOPPED = "stopped"  # the pool is closed and the thread has ended


# -- events ----------------------------------------------------------------------------


@dataclass(slots=True)
class AddRun:
    run: Run


@dataclass(slots=True)
class CancelRun:
    run: Run
    mode: StopMode


@dataclass(slots=True)
class Wake:
    """Something changed that the dispatcher should look at: input arrived, a consumer
    took values."""


@dataclass(slots=True)
class Shutdown:
    """Take no new runs; finish (or with ``cancel_futures``, cancel) the ones there are.

    ``abandoned`` is set when nobody will wait: the executor was collected, or the
    interpreter is exiting."""

    cancel_futures: bool
    abandoned: bool = False
    handled: threading.Event = field(default_factory=threading.Event)


class StopOrder(NamedTuple):
    """Why the dispatcher stopped a worker, and for which task (``None``: all it runs)."""

    status: str
    reason: str
    task: tuple[int, int] | None


def backoff(attempt: int) -> float:
    """Seconds before retry number ``attempt``: exponential, capped, with full jitter."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def _cancel_future(future: Future[Any]) -> None:
    """Cancel a submit's future that never started, and wake its waiters (runs on a
    delivery thread: ``cancel`` runs the future's callbacks)."""
    if future.cancel():
        future.set_running_or_notify_cancel()


# -- lifetime --------------------------------------------------------------------------

_live: weakref.WeakSet[Dispatcher] = weakref.WeakSet()
_exiting = False


def interpreter_exiting() -> bool:
    return _exiting


def _at_exit() -> None:
    """As the standard library's executors: at exit, submitted work finishes and its
    futures' done-callbacks run, then every pool shuts down, before ``multiprocessing``
    reaps what is left."""
    global _exiting
    _exiting = True
    dispatchers = list(_live)
    for dispatcher in dispatchers:
        dispatcher.post(Shutdown(cancel_futures=False, abandoned=True))
    for dispatcher in dispatchers:
        if dispatcher.thread.is_alive():
            dispatcher.thread.join()
        for thread in dispatcher.deliveries.threads():  # the done-callbacks run too
            if thread is not threading.current_thread():
                thread.join()


threading._register_atexit(_at_exit)  # type: ignore[attr-defined]  # as concurrent.futures


class Dispatcher:
    """Feeds a pool from the runs posted to it; see the module docstring.

    Created before the pool, so that the pool's threads can post from the start;
    ``start(pool)`` starts its thread.
    """

    def __init__(self, workers: int, admission: Admission, init_timeout: float | None) -> None:
        self.workers = workers
        self.admission = admission
        self.init_timeout = init_timeout  # how long a worker may take to start
        self.deliveries = Deliveries()
        self.state = DispatcherState.SERVING
        self.broken: BrokenPool | None = None  # why the pool can run nothing more
        self.failure: RuntimeError | None = None  # set if this thread died of a bug
        self.rows: list[dict[str, Any]] = []  # the workers' rows, published for readers
        # worker -> (state, reason) of the latest workers to leave, published for readers:
        # replaced, never changed in place
        self.departures: dict[str, tuple[str, str]] = {}
        self._events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._pool: Pool | None = None
        self._monitor: Monitor | None = None
        self.owner: weakref.ref[Any] | None = None  # the executor, held weakly
        self._runs: list[Run] = []
        self._batches: dict[int, Batch] = {}
        self._requeued: deque[tuple[Run, Task]] = deque()
        self._returned: deque[Batch] = deque()  # tails given back, to be sent again
        self._retries: list[tuple[float, int, Run, Task]] = []
        self._retry_order = itertools.count()
        self._stops: dict[str, StopOrder] = {}
        self._start_failures = 0
        self._published = 0.0
        # function -> seconds per task its last run measured: a run of it on this warm
        # executor sizes its first batches from that instead of measuring one task first
        self._estimates: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        self._shutdowns: list[Shutdown] = []
        self._handlers: dict[type, str] = {  # names, not bound methods: no cycle
            AddRun: "_add_run",
            CancelRun: "_cancel_run",
            Completed: "_completed",
            WorkerReady: "_worker_ready",
            WorkerGone: "_worker_gone",
            Returned: "_returned_tail",
            PoolBroken: "_pool_broken",
            Wake: "_wake",
            Changed: "_wake",
            Shutdown: "_shutdown",
        }
        self.thread = threading.Thread(target=self._loop, name="cellpool-dispatcher", daemon=True)

    def start(self, pool: Pool, monitor: Monitor) -> None:
        self._pool = pool
        self._monitor = monitor
        _live.add(self)
        self.thread.start()

    def post(self, event: Any) -> None:
        """Hand an event to the dispatcher thread (safe from any thread, never blocks)."""
        self._events.put(event)

    @property
    def pool(self) -> Pool:
        assert self._pool is not None
        return self._pool

    # -- the loop ------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as exc:
            # A bug here must not leave callers waiting forever: end every run with it.
            self.failure = RuntimeError(f"cellpool's dispatcher failed: {exc!r}")
            for run in self._runs:
                run.input_error = self.failure
                self._end(run)
            self.pool.close(cancel_running=True)
            self.pool.abandon()
            raise
        finally:
            self.state = DispatcherState.STOPPED
            for event in self._shutdowns:
                event.handled.set()
            self.deliveries.close()
            if self._monitor is not None:
                self._monitor.stop(wait=False)

    def _serve(self) -> None:
        while True:
            try:
                event = self._events.get(timeout=self._wait())
                while True:
                    self._handle(event)
                    event = self._events.get_nowait()
            except queue.Empty:
                event = None  # hold nothing of a finished task while waiting
            self.pool.tick()
            self._expire()
            self._fill()
            self._finish_runs()
            self._check_blocked()
            self._publish()
            if self.state is DispatcherState.CLOSING and not self._runs:
                self.state = DispatcherState.STOPPING
                self.pool.close(cancel_running=False)
                if any(event.abandoned for event in self._shutdowns):
                    self.pool.abandon()
            if self.state is DispatcherState.STOPPING and self.pool.closed():
                self._publish(force=True)
                return

    def _handle(self, event: Any) -> None:
        handler = self._handlers.get(type(event))
        if handler is not None:
            getattr(self, handler)(event)
            return
        for fact in self.pool.handle(event):  # the pool's own threads: it says what they mean
            getattr(self, self._handlers[type(fact)])(fact)

    def _wait(self) -> float | None:
        """Block on the next event, but wake for timeouts and due retries."""
        if self._retries:
            return max(0.0, min(TICK, self._retries[0][0] - time.monotonic()))
        idle = not self._runs and self.state is DispatcherState.SERVING
        return None if idle and not self.pool.starting() else TICK

    def _publish(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or not self._runs or now - self._published >= PUBLISH_SECONDS:
            self.rows = self.pool.workers_info()
            self._published = now

    # -- events --------------------------------------------------------------------

    def _cancel_run(self, event: CancelRun) -> None:
        self._cancel(event.run, event.mode)

    def _pool_broken(self, event: PoolBroken) -> None:
        self._break(event.reason)

    def _wake(self, event: Wake) -> None:
        pass  # the loop looks at everything after each batch of events

    def _add_run(self, event: AddRun) -> None:
        run = event.run
        if self.broken is not None:
            self._runs.append(run)
            self._break_run(run)
            return
        self._runs.append(run)
        with contextlib.suppress(TypeError):  # a callable that takes no weak reference
            run.item_seconds = self._estimates.get(run.fn)
        run.grant()

    def _shutdown(self, event: Shutdown) -> None:
        self._shutdowns.append(event)
        if self.state is DispatcherState.SERVING:
            self.state = DispatcherState.CLOSING
        if event.cancel_futures:
            self._fill()  # what free workers can start now runs, as the standard library's
            for run in list(self._runs):
                self._cancel(run, StopMode.FINISH)
        event.handled.set()

    def _cancel(self, run: Run, mode: StopMode) -> None:
        """End a run early: what has not started is recorded cancelled (see StopMode)."""
        if run.state in (RunState.CANCELLED, RunState.DONE):
            return
        started_cancel = run.state is RunState.ACTIVE
        run.leftover = ("cancelled", CANCELLED)
        if run.sized:
            run.input.drain()  # every item of a sized input gets its record
        else:
            run.input.stop()
        if mode is StopMode.FINISH:
            run.state = RunState.FINISHING
        else:
            run.state = RunState.CANCELLED  # set first: worker threads check it per task
            stopped: list[Task] = []
            for batch in [b for b in self._batches.values() if b.run is run]:
                stopped += [batch.task(p) for p in range(len(batch.items)) if batch.resolve(p)]
                self._close(batch)
            if mode is StopMode.KILL:
                for busy in self.pool.running():
                    if busy.batch.run is run and busy.worker not in self._stops:
                        task = (busy.batch.seq, busy.position)
                        self._stop_worker(busy.worker, "cancelled", "the run was cancelled", task)
            for task in stopped:
                self._complete(run, task, "cancelled", None, CANCELLED)
        self._drop_waiting(run, "cancelled", CANCELLED)
        if started_cancel and run.future is not None and run.next_index == 0:
            self.deliveries.put(_cancel_future, run.future)

    def _drop_waiting(self, run: Run, status: str, failure: Failure) -> None:
        """Record the run's tasks waiting for a retry or another worker as ``status``."""
        waiting = [task for r, task in self._requeued if r is run]
        waiting += [entry[3] for entry in self._retries if entry[2] is run]
        for tail in [t for t in self._returned if t.run is run]:
            waiting += [tail.task(position) for position in range(len(tail.items))]
        self._returned = deque(t for t in self._returned if t.run is not run)
        self._requeued = deque(e for e in self._requeued if e[0] is not run)
        self._retries = [e for e in self._retries if e[2] is not run]
        heapq.heapify(self._retries)
        for task in waiting:
            self._complete(run, task, status, None, failure)

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
                    run, batch, start, "ok", out.values, None, out.started, out.finished,
                    event.worker, event.pid,
                )  # fmt: skip
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

    def _returned_tail(self, event: Returned) -> None:
        """A worker gave back the tasks of a batch it had not started: they wait to be
        sent again, in batches sized by what is known now."""
        self.pool.settle(event)
        batch, first = event.batch, event.first
        tail = [p for p in range(first, len(batch.items)) if batch.resolve(p)]
        if tail:
            self._returned.append(batch.part(tail[0], tail[-1] + 1))
        if batch.unresolved == 0:
            self._close(batch)

    def _worker_ready(self, event: WorkerReady) -> None:
        self._start_failures = 0

    def _worker_gone(self, gone: WorkerGone) -> None:
        """One place decides what the tasks of a worker that stopped get."""
        order = self._stops.pop(gone.worker, None)
        self._departed(gone, order)
        if not gone.ready:
            self._start_failures += 1
            reason = order.reason if order is not None else gone.reason
            if self._start_failures >= START_FAILURES:
                self._break(f"{START_FAILURES} workers in a row failed to start: {reason}")
        self.pool.settle(gone)  # which replaces the worker, unless the pool is broken
        for batch, position in gone.running:
            task_id = (batch.seq, position)
            if order is None:
                self._culprit(batch, position, "crashed", gone.reason, gone)
            elif order.task is None or order.task == task_id:
                self._culprit(batch, position, order.status, order.reason, gone)
            elif batch.resolve(position):  # killed for another task: run it again elsewhere
                self._requeued.append((batch.run, batch.task(position)))
        if gone.batch_phase is not None and order is None:
            self._died_outside_a_task(gone, *gone.batch_phase)
        for batch, first in gone.unreported:
            for position in range(first, len(batch.items)):
                if batch.resolve(position):
                    self._requeued.append((batch.run, batch.task(position)))
            self._close(batch)

    def _departed(self, gone: WorkerGone, order: StopOrder | None) -> None:
        """Publish how ``gone`` left, for the views (the latest ``DEPARTURES`` kept)."""
        departures = dict(self.departures)
        state = "retired" if gone.retired else "dead"
        departures[gone.worker] = (state, order.reason if order is not None else gone.reason)
        while len(departures) > DEPARTURES:
            del departures[next(iter(departures))]
        self.departures = departures

    def _died_outside_a_task(self, gone: WorkerGone, batch: Batch, phase: Phase) -> None:
        """A worker died loading or sending ``batch``. Loading the function: every task
        of the batch is to blame. Otherwise only one of them may be: a batch of one gets
        the record, a larger one is split and each task sent alone."""
        waiting = [p for p in range(len(batch.items)) if not batch.resolved[p]]
        doing = {
            Phase.LOADING_FUNCTION: "loading the function",
            Phase.LOADING_ARGUMENTS: "loading the task's arguments",
            Phase.SENDING: "sending the task's result",
        }.get(phase, phase.name.lower())
        reason = f"{gone.reason} while {doing}"
        if phase is Phase.LOADING_FUNCTION or len(waiting) == 1:
            for position in waiting:
                self._culprit(batch, position, "crashed", reason, gone)
        else:
            for position in waiting:
                batch.resolve(position)
                self._requeued.append((batch.run, batch.task(position)))
            self._close(batch)

    def _culprit(self, batch: Batch, position: int, status: str, reason: str, gone: WorkerGone):
        """Give the task the worker was stopped for (or died running) its record."""
        if not batch.resolve(position):
            return
        run = batch.run
        task = batch.task(position)
        task = task._replace(attempts=task.attempts + 1)
        error = _RETRYABLE.get(status)
        retry = error is not None and issubclass(error, run.retry_on)
        if retry and task.attempts <= run.retries and run.accepts_retries():
            self._retry(run, task)
            return
        name = error.__name__ if error is not None else "TaskCancelled"
        failure = CANCELLED if status == "cancelled" else Failure(name, reason)
        self._complete(
            run, task, status, None, failure, gone.worker, gone.pid, finished=time.monotonic()
        )

    def _break(self, reason: str) -> None:
        """The pool can run nothing more: every run ends, its tasks recorded crashed."""
        if self.broken is not None:
            return
        self.broken = BrokenPool(f"the pool is broken: {reason}")
        for run in list(self._runs):
            self._break_run(run)
        self.pool.close(cancel_running=True)  # nothing more will run: start nothing more

    def _break_run(self, run: Run) -> None:
        assert self.broken is not None
        failure = Failure(type(self.broken).__name__, str(self.broken), None, self.broken)
        run.state = RunState.CANCELLED
        run.leftover = ("crashed", failure)
        if run.sized:
            run.input.drain()  # every item of a sized input gets its record, as on a cancel
        else:
            run.input.stop()
        for batch in [b for b in self._batches.values() if b.run is run]:
            for position in range(len(batch.items)):
                if batch.resolve(position):
                    self._complete(run, batch.task(position), "crashed", None, failure)
            self._close(batch)
        self._drop_waiting(run, "crashed", failure)

    # -- helpers -------------------------------------------------------------------

    def _close(self, batch: Batch) -> None:
        batch.closed = True
        self._batches.pop(batch.seq, None)

    def _retry(self, run: Run, task: Task) -> None:
        due = time.monotonic() + backoff(task.attempts)
        heapq.heappush(self._retries, (due, next(self._retry_order), run, task))

    def _stop_worker(self, worker: str, status: str, reason: str, task: tuple[int, int] | None):
        """Have the pool stop ``worker``; its ``WorkerGone`` then records ``task`` (or,
        with ``None``, every task it runs) as ``status``."""
        if self.pool.stop(worker, reason, task):
            self._stops[worker] = StopOrder(status, reason, task)

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
        run.count(status, 1, worker)
        run.sink.put(Finished(task, status, value, failure, worker, pid, started, finished))

    def _complete_many(
        self,
        run: Run,
        batch: Batch,
        start: int,
        status: str,
        values: list[Any] | None,
        failure: Failure | None,
        started: Sequence[float] | None,
        finished: Sequence[float] | None,
        worker: str | None = None,
        pid: int | None = None,
    ) -> None:
        """Make the records of a fresh batch's positions ``start``... with one status.

        With ``_complete``, the only places records are made.
        """
        count = len(batch.items) - start if values is None else len(values)
        run.count(status, count, worker)
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
        """Order a stop for each task past its run's timeout, and for each worker whose
        start (its initializer) has taken longer than the executor's timeout."""
        now = time.monotonic()
        timed = any(run.timeout is not None for run in self._runs)
        for busy in self.pool.running() if timed else ():
            timeout = busy.batch.run.timeout
            if busy.worker in self._stops or busy.batch.closed or timeout is None:
                continue
            if now - busy.started > timeout:
                reason = f"the task ran past its {timeout:g} s timeout"
                self._stop_worker(busy.worker, "timeout", reason, (busy.batch.seq, busy.position))
        if self.init_timeout is None:
            return
        for worker, since in self.pool.starting():
            if worker not in self._stops and now - since > self.init_timeout:
                reason = f"the initializer ran past the {self.init_timeout:g} s timeout"
                self._stop_worker(worker, "crashed", reason, None)

    def _fill(self) -> None:
        if self.broken is not None:
            return
        while True:
            batch = self._next_batch()
            if batch is None:
                break
            self._batches[batch.seq] = batch
            self.pool.send(batch)
        if self.pool.capacity(prefetch=False) > 0 and not self._waiting():
            self._rebalance()

    def _waiting(self) -> bool:
        """True if tasks wait to be sent (a worker may just not be free for them)."""
        return bool(self._requeued or self._returned or self._retries) or any(
            run.input.buffered() for run in self._runs if run.state is RunState.ACTIVE
        )

    def _rebalance(self) -> None:
        """A worker idles while nothing waits: the batch holding the most estimated work
        not started is recalled, and what its worker gives back is shared out again. So
        a batch sized when tasks were quick cannot keep slow ones from idle workers."""
        now = time.monotonic()
        for busy in self.pool.running():  # a task running long says tasks got slower
            run = busy.batch.run
            if run.item_seconds is not None and now - busy.started > run.item_seconds:
                run.observe_task(now - busy.started)
        best, most = None, 2 * self.pool.batch_seconds  # less is not worth a round trip
        for batch in self._batches.values():
            seconds = batch.run.item_seconds
            if batch.recalled or batch.closed or seconds is None or batch.unresolved < 2:
                continue
            if batch.unresolved * seconds > most:
                best, most = batch, batch.unresolved * seconds
        if best is not None and self.pool.give_back(best):
            best.recalled = True
            hooks.at("dispatch.recalled")

    def _check_blocked(self) -> None:
        """Tell admission whether waiting work has nowhere to go (it warns if it lasts)."""
        waiting = self._waiting()
        blocked = waiting and self.pool.capacity() == 0
        self.admission.blocked(self.pool.pause_reasons() if blocked else [], waiting)

    def _next_batch(self) -> Batch | None:
        if self._requeued:
            if self.pool.capacity() <= 0:
                return None
            run, task = self._requeued.popleft()
            return Batch.of(run, task)
        if self._retries and self._retries[0][0] <= time.monotonic():
            if self.pool.capacity() <= 0:
                return None
            _, _, run, task = heapq.heappop(self._retries)
            return Batch.of(run, task)
        if self._returned:
            if self.pool.capacity() <= 0:
                return None
            tail = self._returned[0]
            count = tail.run.batch_size(self.workers, self.pool.batch_seconds)
            if count >= len(tail.items):
                return self._returned.popleft()
            self._returned[0] = tail.part(count, len(tail.items))
            return tail.part(0, count)
        for run in self._runs:  # first come, first served, as concurrent.futures users expect
            if run.state is not RunState.ACTIVE:
                continue
            if self.pool.capacity(prefetch=run.future is None, stream=run.is_async) <= 0:
                return None  # a later run may not overtake this one
            if (
                run.future is not None
                and run.next_index == 0
                and not run.future.set_running_or_notify_cancel()
            ):
                run.future = None  # its caller cancelled it, and its waiters were just woken
                self._cancel(run, StopMode.DROP)
                continue
            count = run.batch_size(self.workers, self.pool.batch_seconds)
            limit = self.pool.batch_limit()
            if limit is not None:
                count = min(count, limit)
            batch = run.take(max(count, 1))
            if batch is not None:
                return batch
        return None

    def _finish_runs(self) -> None:
        for run in self._runs:
            if run.leftover is not None:  # stopped: what it read and never dispatched
                rest = run.take(1 << 20)
                if rest is not None:
                    status, failure = run.leftover
                    self._complete_many(run, rest, 0, status, None, failure, None, None)
            else:
                run.grant()
        for run in [r for r in self._runs if r.in_flight == 0 and r.input_ended()]:
            self._end(run)

    def _end(self, run: Run) -> None:
        if run in self._runs:
            self._runs.remove(run)
        run.input.stop()
        run.state = RunState.DONE
        run.sink.finish(run)
        if run.item_seconds is not None and run.future is None:
            with contextlib.suppress(TypeError):
                self._estimates[run.fn] = run.item_seconds
        run.fn = None  # type: ignore[assignment]  # a run's callable outlives no run
        run.finished.set()
