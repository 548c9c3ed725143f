"""The loop of a worker process (this module runs in the child).

Parent to worker, over the worker's own duplex pipe:
    ``(seq, run_id, job, count, stand_ins, items)``: run ``job`` (a pickled ``(fn, star,
    retry_on, timeout)``, or ``None`` when this worker already holds the run's) over each
    of the ``count`` items (pickled apart, so that a batch the worker cannot unpickle
    fails as records rather than killing the worker), ``fn(*item)`` if ``star`` else
    ``fn(item)``; ``stand_ins`` says whether some items are ``Unpicklable`` stand-ins
    for inputs the parent could not pickle; ``None``: exit.
Worker to parent:
    ``("hello",)`` once started; ``("ready",)`` once the initializer has run (or
    ``("init-failed", why)``: the pool is then broken, as the standard library's);
    ``("done", seq, start, count, final, outcomes)``: ``count`` outcomes of positions
    ``start``..., pickled apart so that the parent can still tell which tasks they were
    when it cannot unpickle them; ``("returned", seq, first)``: positions ``first``...
    were not started and are given back (the parent recalled the batch, see ``Slot``);
    ``("out", stream, text)``: what tasks printed.

The worker writes what it is doing to shared memory (see ``Slot``): which task it runs
and since when, or which batch it is loading or sending. So the parent knows what a
crash or a timeout belongs to, even when no result was sent yet, and whether the worker
died inside a task or outside of one.

The worker leads a process group of its own, so that killing the group also kills the
processes its tasks started.
"""

from __future__ import annotations

import inspect
import io
import os
import pickle
import queue
import signal
import struct
import sys
import threading
import time
from collections import ChainMap
from collections.abc import Iterator
from multiprocessing.reduction import ForkingPickler
from typing import Any

import cloudpickle

from .results import Failure
from .shared import SharedDoubles
from .streams import ForwardedStream
from .tasks import (
    Outcomes,
    call_async,
    failure_of,
    release_worker_process,
    release_worker_thread,
)

FLUSH_SECONDS = 0.05  # send finished outcomes at least this often during a long batch
JOB_CACHE = 8  # functions kept, newest last; the parent mirrors this to know what we hold
THREADS: int | None = None  # in a worker process: how many threads run its tasks
SEQ_SPAN = 1_048_576  # a task's ticket is seq * SEQ_SPAN + position: exact in a double

# Phases, as written to a lane (the values of ``pool.base.Phase``).
IDLE, INITIALIZING, LOADING_FUNCTION, LOADING_ARGUMENTS, RUNNING, SENDING = range(6)
LANE = 5  # doubles per lane: phase, seq, ticket running, when it started, ticket finished
_FRESH_LANE = struct.pack("5d", IDLE, -1.0, -1.0, 0.0, -1.0)


class Slot:
    """Shared memory (``shared.SharedDoubles``) with a lane for the worker's receiving
    thread (lane 0) and one per thread running tasks.

    A lane is five doubles: a phase and the batch it is about; the ticket of the task
    running, when it started (``time.monotonic()``: one clock for every process), and
    the ticket of the last task finished. A task runs while the two tickets differ.
    After the lanes, one double the parent writes: batches numbered up to it are
    *recalled*, and the worker gives back what it has not started of them.
    Each double is written with one aligned 8-byte store, so a reader never sees half
    a value; the worker writes the start time before the ticket, so a reader that sees
    a new ticket may pair it with an old time only in the direction that delays a
    timeout.
    """

    def __init__(self, shared: SharedDoubles, threads: int) -> None:
        self.shared = shared
        self.threads = threads
        self.cells = shared.view

    @classmethod
    def create(cls, ctx: Any, threads: int) -> Slot:
        shared = SharedDoubles.create(ctx, LANE * (threads + 1) + 1)
        shared.view.cast("B")[: 8 * LANE * (threads + 1)] = _FRESH_LANE * (threads + 1)
        return cls(shared, threads)

    def lane(self, index: int) -> memoryview:
        return self.cells[LANE * index : LANE * index + LANE]

    @property
    def recall_cell(self) -> memoryview:
        return self.cells[LANE * (self.threads + 1) :]

    def recall(self, seq: int) -> None:
        """Recall every batch numbered up to ``seq`` (the parent's side)."""
        self.cells[LANE * (self.threads + 1)] = seq

    def read(self) -> list[tuple[int, int, float]]:
        """(seq, position, started) of each task running now."""
        running = []
        cells = self.cells
        for lane in range(1, self.threads + 1):
            base = LANE * lane
            ticket, started, finished = cells[base + 2], cells[base + 3], cells[base + 4]
            if ticket != finished:
                seq, position = divmod(int(ticket), SEQ_SPAN)
                running.append((seq, position, started))
        return running

    def phases(self) -> list[tuple[int, int]]:
        """(phase, seq) of every lane that is loading or sending a batch."""
        found = []
        for lane in range(self.threads + 1):
            phase, seq = int(self.cells[LANE * lane]), int(self.cells[LANE * lane + 1])
            if phase in (LOADING_FUNCTION, LOADING_ARGUMENTS, SENDING):
                found.append((phase, seq))
        return found

    def close(self) -> None:
        self.shared.close()


class _SpawningPickler(cloudpickle.Pickler):
    """cloudpickle (functions by value) that also passes what only process creation
    can pass: ``multiprocessing`` queues, locks and connections."""

    dispatch_table = ChainMap(ForkingPickler._extra_reducers, cloudpickle.Pickler.dispatch_table)


class Boot:
    """The initializer and its arguments, handed to a worker as it is created (as the
    standard library does, so ``initargs`` may hold a ``multiprocessing.Queue``)."""

    def __init__(self, initializer: Any, initargs: tuple) -> None:
        self.initializer = initializer
        self.initargs = initargs

    def __reduce__(self) -> tuple[Any, tuple]:
        buffer = io.BytesIO()
        _SpawningPickler(buffer).dump((self.initializer, self.initargs))
        return _booted, (buffer.getvalue(),)


def _booted(data: bytes) -> Boot:
    return Boot(*pickle.loads(data))


class Unpicklable:
    """Stands in for an input or a function that could not cross the pipe."""

    def __init__(self, what: str, error: BaseException, direction: str = "pickle") -> None:
        kind = "PicklingError" if direction == "pickle" else "UnpicklingError"
        where = "" if direction == "pickle" else " in the worker"
        self.failure = Failure(kind, f"could not {direction} the {what}{where}: {error!r}")


def _unpickled(data: bytes, what: str) -> Any:
    """``data`` loaded, or a stand-in saying why it could not be (the batch then fails)."""
    try:
        return pickle.loads(data)
    except Exception as error:
        return Unpicklable(what, error, "unpickle")


def _portable(outcomes: Outcomes) -> Outcomes:
    """Replace each exception by its pickled bytes, or by nothing if it cannot travel."""
    for position, (failure, retryable) in outcomes.failures.items():
        try:
            data = cloudpickle.dumps(failure.exception)
            pickle.loads(data)  # an exception class that pickle cannot rebuild fails here
        except Exception:
            data = None
        outcomes.failures[position] = (failure._replace(exception=data), retryable)
    return outcomes


def _picklable(outcomes: Outcomes) -> Outcomes:
    """The outcomes, with each value that does not pickle turned into an error naming why."""
    for position, value in enumerate(outcomes.values):
        try:
            cloudpickle.dumps(value)
        except Exception as error:
            message = f"could not pickle the result: {type(error).__name__}: {error}"
            outcomes.values[position] = None
            outcomes.failures[position] = (Failure("PicklingError", message), False)
    return outcomes


class _Channel:
    """The worker's end of its pipe; sending is locked because tasks may print from threads."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self._lock = threading.Lock()

    def send(self, message: Any) -> None:
        data = cloudpickle.dumps(message)
        with self._lock:
            self.conn.send_bytes(data)

    def send_outcomes(
        self, lane: memoryview, seq: int, start: int, outcomes: Outcomes, final: bool
    ) -> None:
        lane[1], lane[0] = seq, SENDING
        sys.stdout.flush()
        sys.stderr.flush()  # what a task printed arrives before its record
        outcomes = _portable(outcomes)
        try:
            payload = cloudpickle.dumps(outcomes)
        except Exception:
            payload = cloudpickle.dumps(_picklable(outcomes))
        self.send(("done", seq, start, len(outcomes.values), final, payload))
        lane[0] = IDLE


def main(conn: Any, shared: Any, boot: Boot, threads: int) -> None:
    """Run batches from ``conn`` on ``threads`` threads until told to stop or the parent
    goes away."""
    global THREADS
    THREADS = threads
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what Ctrl-C stops
    if hasattr(os, "setpgid"):
        os.setpgid(0, 0)
    slot = Slot(shared, threads)
    receiving = slot.lane(0)
    channel = _Channel(conn)
    sys.stdout = ForwardedStream(channel.send, "stdout", 1)
    sys.stderr = ForwardedStream(channel.send, "stderr", 2)
    channel.send(("hello",))
    receiving[0] = INITIALIZING
    try:
        if boot.initializer is not None:
            boot.initializer(*boot.initargs)
    except BaseException as exc:
        channel.send(("init-failed", f"{type(exc).__name__}: {exc}"))
        return
    del boot
    receiving[0] = IDLE
    channel.send(("ready",))
    batches = _received(conn, receiving)
    try:
        if threads == 1:
            for batch in batches:
                _run_batch(channel, slot.lane(1), slot.recall_cell, *batch)
                del batch  # hold no task's arguments while waiting for the next batch
        else:
            _run_on_threads(channel, slot, batches, threads)
    finally:
        release_worker_thread()
        release_worker_process()  # after every thread that shares it has stopped


def _received(conn: Any, lane: memoryview) -> Iterator[tuple]:
    """The batches the parent sends, as ``_run_batch`` arguments, until it says stop."""
    jobs: dict[int, tuple[Any, bool, tuple, float | None]] = {}
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        message = pickle.loads(data)
        if message is None:
            return
        seq, run_id, job, count, stand_ins, payload = message  # the header always loads
        lane[1] = seq
        if job is not None:
            lane[0] = LOADING_FUNCTION
            loaded = _unpickled(job, "function")
            unloadable = isinstance(loaded, Unpicklable)
            jobs[run_id] = (loaded, False, (), None) if unloadable else loaded
            if len(jobs) > JOB_CACHE:
                del jobs[next(iter(jobs))]
        fn, star, retry_on, timeout = jobs[run_id]
        lane[0] = LOADING_ARGUMENTS
        items = _unpickled(payload, "arguments")
        lane[0] = IDLE
        lost = items.failure if isinstance(items, Unpicklable) else None
        if lost is not None:
            items = [None] * count
        blocked = (fn.failure if isinstance(fn, Unpicklable) else None) or lost
        yield seq, fn, star, retry_on, timeout, items, blocked, stand_ins
        del items, fn  # hold no task's arguments while waiting for the next batch


def _run_on_threads(channel: _Channel, slot: Slot, batches: Iterator[tuple], threads: int) -> None:
    """Hand the batches to ``threads`` threads, each writing its own lane of the slot."""
    waiting: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()

    def serve(lane: memoryview) -> None:
        try:
            while (batch := waiting.get()) is not None:
                _run_batch(channel, lane, slot.recall_cell, *batch)
                del batch
        finally:
            release_worker_thread()

    runners = [
        threading.Thread(target=serve, args=(slot.lane(i + 1),), name=f"cellpool-lane-{i}")
        for i in range(threads)
    ]
    for runner in runners:
        runner.start()
    try:
        for batch in batches:
            waiting.put(batch)
            del batch
    finally:
        for _ in runners:
            waiting.put(None)
        for runner in runners:
            runner.join()


def _run_batch(
    channel: _Channel,
    lane: memoryview,
    recall: memoryview,
    seq: int,
    fn: Any,
    star: bool,
    retry_on: tuple[type[BaseException], ...],
    timeout: float | None,
    items: list[Any],
    blocked: Failure | None,
    stand_ins: bool,
) -> None:
    """Run a batch, sending outcomes at its end and at least every ``FLUSH_SECONDS``;
    if the parent recalls it (``recall``), give back the tasks not started then.

    This is the hot loop for tiny tasks, so it is written out rather than calling
    ``tasks.call``: one clock read per task (a task starts when the one before ends, so
    start times are filled in per flush, not per task), on the monotonic clock, which
    the lane and the records share.
    """
    if recall[0] >= seq:
        channel.send(("returned", seq, 0))
        return
    base = seq * SEQ_SPAN
    if inspect.iscoroutinefunction(fn):

        def on_step(position: int, started: float) -> None:
            if position < 0:
                lane[4] = lane[2]  # the loop is free: nothing of this batch runs now
            else:
                lane[3], lane[4], lane[2] = started, -1.0, base + position

        outcomes = call_async(
            fn,
            star,
            items,
            retry_on,
            timeout,
            lambda item: blocked or (item.failure if isinstance(item, Unpicklable) else None),
            on_step,
        )
        channel.send_outcomes(lane, seq, 0, outcomes, final=True)
        return
    values, _, finished, failures = outcomes = Outcomes.empty()
    checked = blocked is not None or stand_ins
    clock = time.monotonic
    start, last = 0, len(items) - 1
    now = began = clock()
    flush_at = now + FLUSH_SECONDS
    for position, item in enumerate(items):
        ticket = base + position
        lane[3] = now
        lane[2] = ticket
        if checked and (blocked is not None or type(item) is Unpicklable):
            failures[len(values)] = (blocked or item.failure, False)
            value = None
        else:
            try:
                value = fn(*item) if star else fn(item)
            except BaseException as exc:  # a task's SystemExit is its failure
                failures[len(values)] = (failure_of(exc), isinstance(exc, retry_on))
                value = None
        values.append(value)
        now = clock()
        finished.append(now)
        lane[4] = ticket
        if now > flush_at and position < last:
            channel.send_outcomes(lane, seq, start, _started(outcomes, began), final=False)
            if recall[0] >= seq:
                channel.send(("returned", seq, position + 1))
                return
            values, _, finished, failures = outcomes = Outcomes.empty()
            start, began, flush_at = position + 1, now, now + FLUSH_SECONDS
    channel.send_outcomes(lane, seq, start, _started(outcomes, began), final=True)


def _started(outcomes: Outcomes, began: float) -> Outcomes:
    """Fill in start times: the first task began at ``began``, each other one as the
    one before it finished."""
    outcomes.started.append(began)
    outcomes.started.extend(outcomes.finished[:-1])
    return outcomes
