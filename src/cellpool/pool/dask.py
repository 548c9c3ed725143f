"""Batches as dask tasks on a dask.distributed cluster.

dask does the scheduling across machines; cellpool keeps its own window, batching and
records on top. Each batch is one dask task (``pure=False``, so identical calls are
never merged), which runs the batch's tasks in the dask worker and returns their
outcomes column-wise, with the worker's address and name.

A dask worker goes by a short name in records and rows (``d0`` for a ``LocalCluster``'s
worker 0, a short name of its own as it is, ``d<n>`` otherwise); rows give its address.

In the dask worker, a batch runs on a thread of cellpool's own (``_Runner``) while the
dask thread that was given it watches: it reports a task that has run for a while (its
position and how long it has run, as an event on the pool's topic), so the timeout
counts from the task's start, and it walks away from a batch that was cancelled (a
timeout or a cancel), so the dask thread takes the next batch while the task it cannot
interrupt goes on alone.

A batch that dask gives up on (``KilledWorker``: it was running on every worker that
died) is split: its tasks come back one per batch, and while such suspects wait, the
pool runs one batch at a time, so a dask worker that dies with a suspect alone on the
cluster names the culprit. Finished results of a batch that failed are run again: a
batch holds about ``batch_seconds`` of work.

Everything that talks to the scheduler and may wait (its figures, closing the client
and the cluster) runs on the pool's own thread, never on the dispatcher's. Each time it
has new figures it tells the dispatcher, which publishes the rows again even when idle.
"""

from __future__ import annotations

import ast
import contextlib
import contextvars
import itertools
import logging
import os
import queue
import re
import sys
import threading
import time
import uuid
from array import array
from dataclasses import dataclass
from typing import Any

from ..runs import Run, RunState
from ..shipping import pack, unpack
from ..tasks import Batch, Outcomes, call, call_async
from .base import Changed, Completed, Pool, Report, Running, WorkerGone

PREFETCH = 4  # batches handed to dask per worker thread
PACKED_RUNS = 8  # runs whose packed function is kept for their next batches
INFO_SECONDS = 1.0  # how often the scheduler's figures are asked for
WATCH_SECONDS = 0.1  # how often a dask thread looks at its batch; a task this long is reported
SHORT_NAME = 12  # a dask worker's own name up to this long is shown as it is


def _dask_distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise ImportError(
            'kind="dask" needs dask.distributed: pip install "cellpool[dask]"'
        ) from None
    return distributed


# -- in the dask worker ------------------------------------------------------------------


class _Job:
    """A batch as a runner thread runs it; ``now`` is (position, monotonic start) of the
    task running, position -1 when none is."""

    def __init__(self, fn: Any, star: bool, retry_on: tuple, timeout: float | None, items: list):
        self.fn = fn
        self.star = star
        self.retry_on = retry_on
        self.timeout = timeout
        self.items = items
        self.outcomes = Outcomes.empty()
        self.now = (-1, 0.0)
        self.done = threading.Event()
        self.abandoned = False

    def run(self) -> None:
        import inspect

        if inspect.iscoroutinefunction(self.fn):

            def on_step(position: int, started: float) -> None:
                self.now = (position, started)

            self.outcomes = call_async(
                self.fn, self.star, self.items, self.retry_on, self.timeout, _never, on_step
            )
            return
        for position, item in enumerate(self.items):
            self.now = (position, time.monotonic())
            self.outcomes.add(call(self.fn, item, self.star, self.retry_on))
            if self.abandoned:
                return
        self.now = (-1, 0.0)


def _on_this_clock(outcomes: Outcomes, epoch_offset: float) -> Outcomes:
    """Outcomes timed on another machine's monotonic clock (``epoch_offset`` from its
    epoch), moved to this one's, as records expect."""
    shift = epoch_offset - (time.time() - time.monotonic())
    return outcomes._replace(
        started=array("d", [t + shift for t in outcomes.started]),
        finished=array("d", [t + shift for t in outcomes.finished]),
    )


class _QuietLogs:
    """dask's loggers held at ERROR while any local cluster cellpool started lives.

    ``LocalCluster(silence_logs=...)`` restores the level when *its* cluster closes,
    even while another one still runs: that one's closing lines (INFO) then reach the
    user's stderr, depending on which closes first. Held here first, the level is
    already ERROR when each cluster looks, so none of them restores it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clusters = 0
        self._held: contextlib.ExitStack | None = None

    def enter(self) -> None:
        from distributed.utils import silence_logging_cmgr

        with self._lock:
            self._clusters += 1
            if self._held is None:
                self._held = contextlib.ExitStack()
                self._held.enter_context(silence_logging_cmgr(logging.ERROR))
                self._held.enter_context(silence_logging_cmgr(logging.ERROR, root="bokeh"))

    def leave(self) -> None:
        with self._lock:
            self._clusters -= 1
            if self._clusters == 0 and self._held is not None:
                self._held.close()
                self._held = None


_quiet_logs = _QuietLogs()


def _never(item: Any) -> None:
    """Nothing keeps an async task of a dask batch from running."""


class _Runner:
    """A thread that runs the batches of one dask worker thread, one at a time."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[tuple[contextvars.Context, _Job]] = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="cellpool-dask-runner", daemon=True).start()

    def _serve(self) -> None:
        while True:
            context, job = self.jobs.get()
            try:
                context.run(job.run)
            finally:
                job.done.set()
            if job.abandoned:
                return  # its dask thread has a new runner


_runners = threading.local()  # each dask worker thread's runner


def run_batch(
    fn: Any, star: bool, retry_on: tuple, timeout: float | None, items: list, topic: str
) -> tuple | None:
    """Runs in a dask worker: where the batch's tasks ran (the worker's address, name
    and pid), this machine's epoch offset (task times are on its monotonic clock) and
    their outcomes; ``None`` if the batch was cancelled meanwhile: nobody waits for it.

    ``fn`` comes as ``shipping.pack`` bytes (the scheduler passes them on untouched),
    or as itself when those could not be made. A task that has run ``WATCH_SECONDS``
    is reported on ``topic`` as ``[key, position, seconds run, worker address]``."""
    from distributed import get_worker

    if isinstance(fn, bytes):
        fn = unpack(fn)
    worker = get_worker()
    key = worker.get_current_task()
    runner = getattr(_runners, "runner", None) or _Runner()
    _runners.runner = runner
    job = _Job(fn, star, retry_on, timeout, items)
    runner.jobs.put((contextvars.copy_context(), job))  # get_worker() works in tasks
    reported = -1
    while not job.done.wait(WATCH_SECONDS):
        position, started = job.now
        ran = time.monotonic() - started
        if position >= 0 and position != reported and ran >= WATCH_SECONDS:
            worker.log_event(topic, [key, position, ran, worker.address])
            reported = position
        task = worker.state.tasks.get(key)
        if task is None or task.state != "executing":  # cancelled: walk away
            job.abandoned = True
            _runners.runner = None
            return None
    epoch_offset = time.time() - time.monotonic()
    return worker.address, worker.name, os.getpid(), epoch_offset, job.outcomes


# -- in the client -----------------------------------------------------------------------


@dataclass(slots=True)
class _Started:
    """A dask worker reports that task ``position`` of batch ``seq`` has run a while."""

    seq: int
    position: int
    started: float  # monotonic, on this machine
    worker: str


@dataclass(slots=True)
class _Ran:
    """A dask worker ran a batch; ``outcomes`` are timed on this machine's clock."""

    batch: Batch
    address: str
    name: Any  # the dask worker's own name
    pid: int
    outcomes: Outcomes


@dataclass(slots=True)
class _Failed:
    """dask could not run a batch."""

    batch: Batch
    error: BaseException


def shown_name(name: Any) -> str | None:
    """How a dask worker's own name is shown, if it is short: ``d3`` for the number 3
    (a ``LocalCluster`` numbers its workers), a short string as it is. ``None`` for the
    others: dask names a worker without one by its address."""
    if isinstance(name, int) and not isinstance(name, bool) and name >= 0:
        return f"d{name}"
    if not isinstance(name, str) or not 0 < len(name) <= SHORT_NAME:
        return None
    if name.isascii() and name.isdigit():
        return f"d{name}"
    if "://" in name or not name.isprintable() or any(c.isspace() for c in name):
        return None
    return name


class ShortNames:
    """The names dask workers go by in records and rows: ``shown_name`` of a worker's
    own name, or ``d<n>`` (the first not given) when that is long or already given. The
    same own name keeps its short name: the worker a nanny starts again in place of a
    ``LocalCluster``'s worker 0 is ``d0`` again. Used on the dispatcher thread only."""

    def __init__(self) -> None:
        self._given: dict[Any, str] = {}  # a worker's own name -> its short name

    def __call__(self, name: Any, address: str) -> str:
        if name is None:
            name = address  # as dask names a worker without a name of its own
        elif not isinstance(name, (int, str)):
            name = repr(name)
        short = self._given.get(name)
        if short is None:
            given = set(self._given.values())
            short = shown_name(name)
            if short is None or short in given:
                short = next(f"d{n}" for n in itertools.count() if f"d{n}" not in given)
            self._given[name] = short
        return short


def _in_order(name: str) -> list:
    """Sorts ``d2`` before ``d10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def dashboard_link(client: Any) -> str | None:
    """The address of the dashboard of ``client``'s scheduler, as dask gives it; ``None``
    when it gives none (dask says ``""``, or has no dashboard service to name)."""
    try:
        link = client.dashboard_link
    except Exception:  # no scheduler figures, or no "dashboard" among its services
        return None
    return link if isinstance(link, str) and link else None


def unguarded_line() -> int | None:
    """The line of the running script that is starting a local cluster outside an
    ``if __name__ == "__main__":`` block, if it is: the cluster's worker processes,
    started by spawn, would run it again."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None:  # a notebook, a REPL, python -c: nothing is run again
        return None
    line = None
    frame = sys._getframe()
    while frame is not None:  # the outermost line of __main__'s own code
        if frame.f_globals is vars(main) and frame.f_code.co_name == "<module>":
            line = frame.f_lineno
        frame = frame.f_back
    try:
        with open(path, encoding="utf-8") as file:
            tree = ast.parse(file.read())
    except (OSError, SyntaxError, ValueError):
        return None
    guards = ('__name__ == "__main__"', '"__main__" == __name__')
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.If)
            and ast.unparse(node.test).replace("'", '"') in guards
            and node.lineno <= (line or 0) <= (node.end_lineno or 0)
        ):
            return None
    return line


class DaskPool(Pool):
    """Batches submitted to a dask cluster: an existing ``Client``, a scheduler
    ``address`` (with ``security`` for TLS), or a ``LocalCluster`` of ``workers``
    processes started (and closed) here, listening on 127.0.0.1 only."""

    kind = "dask"
    batch_seconds = 0.05  # a dask task costs about a millisecond or more: fewer, larger

    def __init__(
        self,
        workers: int | None,
        report: Report,
        address: str | None,
        client: Any,
        security: Any = None,
    ) -> None:
        distributed = _dask_distributed()
        if security is not None and not isinstance(security, distributed.security.Security):
            raise TypeError("security must be a distributed.security.Security")
        if security is not None and client is not None:
            raise ValueError(
                "security applies to address= or a local cluster: a client has its own"
            )
        self._killed_worker = distributed.KilledWorker
        self._report = report
        self._cluster = None
        if client is None and address is None:
            line = unguarded_line()
            if line is not None:
                raise SystemExit(
                    f'cellpool: kind="dask" starts worker processes that run this script '
                    f"again: put the code that makes the Executor (line {line}) under "
                    f'`if __name__ == "__main__":`'
                )
            _quiet_logs.enter()
            try:
                self._cluster = distributed.LocalCluster(
                    n_workers=workers,
                    threads_per_worker=1,
                    processes=True,
                    host="127.0.0.1",
                    dashboard_address="127.0.0.1:0",  # any free port: never a clash with another
                    silence_logs=logging.ERROR,  # its workers'; here _quiet_logs holds it
                    security=security,
                )
            except BaseException:
                _quiet_logs.leave()
                raise
            address = self._cluster.scheduler_address
            self._local_workers = len(self._cluster.workers)
        self._own_client = client is None
        self._client = client or distributed.Client(address, security=security)
        # dask merges tasks with equal keys: batch numbers restart in every process, so
        # two notebooks on one scheduler need keys of their own
        self._key = f"cellpool-{uuid.uuid4().hex[:12]}"
        self._client.subscribe_topic(self._key, self._on_started)
        self._futures: dict[int, Any] = {}  # batch seq -> its dask future
        self._batches: dict[int, Batch] = {}
        self._started: dict[int, _Started] = {}  # batch seq -> its task running a while
        self._suspects: dict[Run, set[int]] = {}  # inputs of batches dask gave up on
        self._alone: set[int] = set()  # batches sent while nothing else ran
        self._packed: dict[int, Any] = {}  # run serial -> its function, pickled once
        self._counts: dict[str, list[int]] = {}  # short name -> [done, errors]
        self._pids: dict[str, int] = {}  # address -> the pid its batches reported
        self._names = ShortNames()
        self._info: dict[str, Any] = self._scheduler_workers()
        self._dashboard = dashboard_link(self._client)
        self._closing = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="cellpool-dask", daemon=True)
        self._thread.start()

    # -- the pool's own thread: everything that waits on the scheduler ---------------

    def _serve(self) -> None:
        try:
            while not self._closing.wait(INFO_SECONDS):
                self._info = self._scheduler_workers()
                self._report(Changed())  # rows from these figures, even while idle
                cluster = self._cluster
                if cluster is not None and len(cluster.workers) < self._local_workers:
                    # a nanny whose new worker died while starting (a task that kills
                    # every worker it runs on) gives up: start another in its place
                    cluster.scale(self._local_workers)
        finally:
            self._shut()
            self._closed = True
            self._report(Changed())

    def _scheduler_workers(self) -> dict[str, Any]:
        try:
            return self._client.scheduler_info(n_workers=-1).get("workers", {})
        except Exception:  # the scheduler is gone or unreachable: keep the last figures
            return getattr(self, "_info", {})

    def _shut(self) -> None:
        client = self._client
        if client.status == "running":
            client.unsubscribe_topic(self._key)
            client.cancel(list(self._futures.values()))
        if self._own_client:
            client.close()
        if self._cluster is not None:
            try:
                self._cluster.close()
            finally:
                _quiet_logs.leave()

    def _on_started(self, event: tuple[float, list]) -> None:
        """On the client's thread: a dask worker's report of a task running a while."""
        key, position, ran, worker = event[1]
        seq = int(key.rsplit("-", 1)[1])
        self._report(_Started(seq, position, time.monotonic() - ran, worker))

    # -- the Pool interface (dispatcher thread) ----------------------------------------

    @property
    def dashboard_link(self) -> str | None:
        """The address of the dask dashboard (``None`` when dask names none); read-only,
        known from the start: it never waits on the scheduler."""
        return self._dashboard

    @property
    def size(self) -> int:
        """Worker threads in the cluster now."""
        return max(1, sum(w.get("nthreads", 1) for w in self._info.values()))

    def capacity(self, prefetch: bool = True, stream: bool = False) -> int:
        # dask runs a batch of async tasks as one dask task: nothing streams
        if self._suspects or self._alone:
            return 0 if self._futures else 1
        return (PREFETCH if prefetch else 1) * self.size - len(self._futures)

    def send(self, batch: Batch) -> None:
        run = batch.run
        suspects = self._suspects.get(run)
        if suspects is not None and len(batch.items) == 1 and batch.indices[0] in suspects:
            self._alone.add(batch.seq)  # nothing else runs: a death now is this task's
            suspects.discard(batch.indices[0])
            if not suspects:
                del self._suspects[run]
        future = self._client.submit(
            run_batch,
            self._fn(run),
            run.star,
            run.retry_on,
            run.timeout if run.is_async else None,
            batch.items,
            self._key,
            pure=False,
            key=f"{self._key}-{batch.seq}",
        )
        self._futures[batch.seq] = future
        self._batches[batch.seq] = batch
        future.add_done_callback(lambda done, batch=batch: self._done(batch, done))

    def _fn(self, run: Any) -> Any:
        """The run's function as it travels, pickled once: in the worker, its tracebacks
        name its own files and show its lines, cells' included."""
        fn = self._packed.get(run.serial)
        if fn is None:
            try:
                fn = pack(run.fn)
            except Exception:
                fn = run.fn  # dask says why it cannot pickle it, as before
            self._packed[run.serial] = fn
            if len(self._packed) > PACKED_RUNS:
                del self._packed[next(iter(self._packed))]
        return fn

    def _done(self, batch: Batch, future: Any) -> None:
        """Runs on the client's thread: turn a finished dask task into an event."""
        status = future.status
        if status == "finished":
            result = future.result()
            if result is not None:  # None: the worker walked away from a cancelled batch
                address, name, pid, epoch_offset, outcomes = result
                outcomes = _on_this_clock(outcomes, epoch_offset)
                self._report(_Ran(batch, address, name, pid, outcomes))
        elif status == "error":
            self._report(_Failed(batch, future.exception()))
        elif status != "cancelled":  # a cancelled future was reported by stop()
            # "lost": the worker holding its result died, and dask computes it again.
            # The callback fires once, so wait for that second completion.
            future.add_done_callback(lambda again: self._done(batch, again))

    def handle(self, event: Any) -> list[Any]:
        if isinstance(event, _Ran):
            self._pids[event.address] = event.pid
            worker = self._names(event.name, event.address)
            return [Completed(event.batch, 0, event.outcomes, worker, event.pid)]
        if isinstance(event, _Started):
            if event.seq in self._batches:
                self._started[event.seq] = event
            return []
        if isinstance(event, _Failed):
            return [self._failed(event.batch, event.error)]
        return super().handle(event)

    def _failed(self, batch: Batch, error: BaseException) -> WorkerGone:
        """What a batch dask could not run means: a single task's record, or its tasks
        sent again one by one (after a death, as suspects, each alone on the cluster)."""
        killed = isinstance(error, self._killed_worker)
        reason = f"dask could not run the task: {error!r}"
        last = getattr(error, "last_worker", None)  # the scheduler's record of it
        address = getattr(last, "address", None)
        where = "dask" if address is None else self._names(getattr(last, "name", None), address)
        if len(batch.items) == 1 and (batch.seq in self._alone or not killed):
            return WorkerGone(where, 0, reason, True, running=[(batch, 0)])
        if killed:  # it ran beside the culprit, or is it: which one, alone will tell
            self._suspects.setdefault(batch.run, set()).update(batch.indices)
        return WorkerGone(where, 0, reason, True, unreported=[(batch, 0)])

    def settle(self, event: Completed | WorkerGone) -> None:
        if isinstance(event, Completed):
            batch = event.batch
            counts = self._counts.setdefault(event.worker, [0, 0])  # as its records say
            counts[0] += len(event.outcomes.values)
            counts[1] += len(event.outcomes.failures)
        else:
            batch = (event.running or event.unreported)[0][0]
        self._forget(batch.seq)

    def _forget(self, seq: int) -> None:
        self._futures.pop(seq, None)
        self._batches.pop(seq, None)
        self._started.pop(seq, None)
        self._alone.discard(seq)

    def running(self) -> list[Running]:
        # only tasks a dask worker reported: each counts from its own start there
        return [
            Running(f"batch-{seq}", self._batches[seq], started.position, started.started)
            for seq, started in self._started.items()
        ]

    def stop(self, worker: str, why: str, task: tuple[int, int] | None = None) -> bool:
        seq = int(worker.removeprefix("batch-"))
        future = self._futures.get(seq)
        batch = self._batches.get(seq)
        if future is None or batch is None or future.status == "cancelled":
            return False
        self._cancel([future])
        running = [] if task is None else [(batch, task[1])]
        self._report(WorkerGone(worker, 0, why, True, running, unreported=[(batch, 0)]))
        return True

    def _cancel(self, futures: list[Any]) -> None:
        """Cancel dask futures without waiting: the client's own thread sends it."""
        client = self._client
        client.loop.add_callback(client.cancel, futures, asynchronous=True)

    def tick(self) -> None:
        """Cancel the dask tasks of batches the dispatcher closed (a cancelled run), and
        forget the suspects of runs that will send none of them again."""
        closed = [seq for seq, batch in self._batches.items() if batch.closed]
        if closed:
            self._cancel([self._futures[seq] for seq in closed])
            for seq in closed:
                self._forget(seq)
        for run in [r for r in self._suspects if r.state is not RunState.ACTIVE]:
            del self._suspects[run]

    def workers_info(self) -> list[dict[str, Any]]:
        if self._closed:
            return []
        now = time.monotonic()
        longest = {  # per dask worker, its task that has run longest
            started.worker: started
            for started in sorted(self._started.values(), key=lambda s: -s.started)
        }
        rows = []
        for address, info in sorted(self._info.items()):
            metrics = info.get("metrics", {})
            # the scheduler's count is a heartbeat old and counts any client's tasks: it
            # says busy only while batches of this pool are out
            executing = bool(self._futures) and metrics.get("task_counts", {}).get("executing", 0)
            paused = info.get("status") == "paused"
            worker = self._names(info.get("name"), address)
            done, errors = self._counts.get(worker, [0, 0])
            task = longest.get(address)
            batch = None if task is None else self._batches.get(task.seq)
            rows.append(
                {
                    "worker": worker,
                    "address": address,
                    "pid": self._pids.get(address),
                    "state": "paused" if paused else "busy" if executing or task else "idle",
                    "task": None if batch is None else batch.indices[task.position],
                    "task_seconds": None if batch is None else now - task.started,
                    "done": done,
                    "errors": errors,
                    "cpu_percent": metrics.get("cpu"),
                    "rss": metrics.get("memory"),
                    "fds": metrics.get("num_fds"),
                    "threads": info.get("nthreads"),
                    "reason": "the dask worker paused itself (memory)" if paused else None,
                }
            )
        return sorted(rows, key=lambda row: _in_order(row["worker"]))

    def close(self, cancel_running: bool) -> None:
        self._closing.set()  # the pool's thread cancels, closes, then reports Changed

    def closed(self) -> bool:
        return self._closed
