"""The loop of a worker process (this module runs in the child).

Parent to worker, over the worker's own duplex pipe:
    ``(seq, run_id, job, count, stand_ins, items)``: run ``job`` (a pickled ``(fn, star,
    retry_on, timeout, concurrency)``, or ``None`` when this worker already holds the
    run's) over each of the ``count`` items (pickled apart, so that a batch the worker
    cannot unpickle fails as records rather than killing the worker), ``fn(*item)`` if
    ``star`` else ``fn(item)``; ``stand_ins`` says whether some items are
    ``Unpicklable`` stand-ins for inputs the parent could not pickle; ``None``: exit.
Worker to parent:
    ``("hello",)`` once started; ``("ready",)`` once the initializer has run (or
    ``("init-failed", why)``: the pool is then broken, as the standard library's);
    ``("done", seq, start, count, final, outcomes)``: ``count`` outcomes of positions
    ``start``..., pickled apart so that the parent can still tell which tasks they were
    when it cannot unpickle them; ``("returned", seq, first, final)``: positions
    ``first``... were not started and are given back (the parent recalled the batch, see
    ``Slot``); unless ``final``, the outcomes of the positions before follow;
    ``("out", stream, text)``: what tasks printed.

A thread running ``async def`` tasks runs them as one stream (``lanes.py``): up to the
run's ``concurrency`` in flight, across batches; it reads the next batch as it has room.

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
import signal
import struct
import sys
import threading
import time
from collections import ChainMap
from collections.abc import Callable, Iterator
from multiprocessing.reduction import ForkingPickler
from typing import Any, NamedTuple

import cloudpickle

from .lanes import EMPTY, AsyncLane, Inbox, OnStep, Work
from .results import Failure
from .shared import SharedDoubles
from .streams import ForwardedStream
from .tasks import Outcomes, failure_of, release_worker_process, release_worker_thread

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
            _serve(channel, slot, 1, _Pipe(conn, batches))
        else:
            _run_on_threads(channel, slot, batches, threads)
    finally:
        release_worker_thread()
        release_worker_process()  # after every thread that shares it has stopped


class Received(NamedTuple):
    """A batch as the worker received it."""

    seq: int
    fn: Any
    star: bool
    retry_on: tuple[type[BaseException], ...]
    timeout: float | None
    concurrency: int  # async def tasks in flight at most on a thread
    items: list[Any]
    blocked: Failure | None  # why no task of it can run, if none can
    stand_ins: bool  # some items are ``Unpicklable`` stand-ins


def _received(conn: Any, lane: memoryview) -> Iterator[Received]:
    """The batches the parent sends, until it says stop."""
    jobs: dict[int, tuple[Any, bool, tuple, float | None, int]] = {}
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
            jobs[run_id] = (loaded, False, (), None, 1) if unloadable else loaded
            if len(jobs) > JOB_CACHE:
                del jobs[next(iter(jobs))]
        fn, star, retry_on, timeout, concurrency = jobs[run_id]
        lane[0] = LOADING_ARGUMENTS
        items = _unpickled(payload, "arguments")
        lane[0] = IDLE
        lost = items.failure if isinstance(items, Unpicklable) else None
        if lost is not None:
            items = [None] * count
        blocked = (fn.failure if isinstance(fn, Unpicklable) else None) or lost
        yield Received(seq, fn, star, retry_on, timeout, concurrency, items, blocked, stand_ins)
        del items, fn  # hold no task's arguments while waiting for the next batch


class _Pipe:
    """The batches of a worker with one thread, read from its pipe; a lane running
    async tasks watches the pipe from its event loop."""

    def __init__(self, conn: Any, batches: Iterator[Received]) -> None:
        self.conn = conn
        self.batches = batches

    def get(self) -> Received | None:
        return next(self.batches, None)

    def poll(self) -> Any:
        return self.get() if self.conn.poll() else EMPTY

    def watch(self, loop: Any, wake: Callable[[], None]) -> None:
        fd = self.conn.fileno()

        def readable() -> None:
            loop.remove_reader(fd)
            wake()

        loop.add_reader(fd, readable)

    def unwatch(self, loop: Any) -> None:
        loop.remove_reader(self.conn.fileno())


class _ProcessLane(AsyncLane):
    """A worker thread's stream of async batches, reported over the pipe and written to
    its lane of the slot."""

    def __init__(self, channel: _Channel, lane: memoryview, recall: memoryview, source: Any):
        super().__init__(source)
        self.channel = channel
        self.lane = lane
        self.recall = recall

    def work(self, item: Received | None) -> Work | None:
        if item is None or not inspect.iscoroutinefunction(item.fn):
            return None
        blocked = item.blocked

        def reason(task: Any) -> Failure | None:
            return blocked or (task.failure if isinstance(task, Unpicklable) else None)

        return Work(
            item.seq,
            item.fn,
            item.star,
            item.retry_on,
            item.timeout,
            item.concurrency,
            item.items,
            reason,
        )

    def stepper(self, work: Work) -> OnStep:
        lane, base = self.lane, work.key * SEQ_SPAN

        def on_step(position: int, started: float) -> None:
            if position < 0:
                lane[4] = lane[2]  # the loop is free: no task of this lane runs now
            else:
                lane[3], lane[4], lane[2] = started, -1.0, base + position

        return on_step

    def recalled(self, work: Work, waited: bool) -> bool:
        return waited and self.recall[0] >= work.key

    def finished(self, work: Work, outcomes: Outcomes, final: bool) -> None:
        self.channel.send_outcomes(self.lane, work.key, 0, outcomes, final)

    def gave_back(self, work: Work, first: int, final: bool) -> None:
        self.channel.send(("returned", work.key, first, final))


def _serve(channel: _Channel, slot: Slot, index: int, source: Any) -> None:
    """Run ``source``'s batches on this thread, which writes lane ``index`` of the slot."""
    lane, recall = slot.lane(index), slot.recall_cell

    def run_plain(batch: Received) -> bool:
        _run_batch(channel, lane, recall, batch)
        return True

    _ProcessLane(channel, lane, recall, source).serve(run_plain)


def _run_on_threads(
    channel: _Channel, slot: Slot, batches: Iterator[Received], threads: int
) -> None:
    """Hand the batches to ``threads`` threads, each writing its own lane of the slot."""
    waiting: Inbox[Received | None] = Inbox()

    def serve(index: int) -> None:
        try:
            _serve(channel, slot, index, waiting)
        finally:
            release_worker_thread()

    runners = [
        threading.Thread(target=serve, args=(i + 1,), name=f"cellpool-lane-{i}")
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


def _run_batch(channel: _Channel, lane: memoryview, recall: memoryview, batch: Received) -> None:
    """Run a batch of plain tasks, sending outcomes at its end and at least every
    ``FLUSH_SECONDS``; if the parent recalls it (``recall``), give back the tasks not
    started then.

    This is the hot loop for tiny tasks, so it is written out rather than calling
    ``tasks.call``: one clock read per task (a task starts when the one before ends, so
    start times are filled in per flush, not per task), on the monotonic clock, which
    the lane and the records share.
    """
    seq, fn, star, retry_on, _, _, items, blocked, stand_ins = batch
    if recall[0] >= seq:
        channel.send(("returned", seq, 0, True))
        return
    base = seq * SEQ_SPAN
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
                channel.send(("returned", seq, position + 1, True))
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
