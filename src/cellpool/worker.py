"""The loop of a worker process (this module runs in the child).

Parent to worker, over the worker's own duplex pipe, cloudpickled:
    ``(seq, run_id, job, count, items)``: run ``job`` (a pickled ``(fn, star, retry_on,
    timeout)``, or
    ``None`` when this worker already holds the run's) over each of the ``count`` items
    (pickled apart, so that a batch the worker cannot unpickle fails as records rather
    than killing the worker), ``fn(*item)`` if ``star`` else ``fn(item)``; ``None``: exit.
Worker to parent:
    ``("ready",)`` once started;
    ``("done", seq, start, count, final, outcomes)``: ``count`` outcomes of positions
    ``start``..., pickled apart so that the parent can still tell which tasks they were
    when it cannot unpickle them; ``("out", stream, text)``: what tasks printed.

The task being run is also written to a shared slot (see ``Slot``), so that the parent
knows which task a crash or a timeout belongs to, even when its results are not sent yet.
"""

from __future__ import annotations

import inspect
import mmap
import os
import pickle
import queue
import signal
import struct
import sys
import threading
import time
from collections.abc import Iterator
from multiprocessing import reduction
from typing import Any

import cloudpickle

from .results import Failure
from .tasks import (
    Outcomes,
    call_async,
    failure_of,
    initializer_failure,
    release_worker_process,
    release_worker_thread,
)

FLUSH_SECONDS = 0.05  # send finished outcomes at least this often during a long batch
JOB_CACHE = 8  # functions kept, newest last; the parent mirrors this to know what we hold
_LANE = struct.Struct("ddd")  # ticket running, when it started, ticket last finished
THREADS: int | None = None  # in a worker process: how many threads run its tasks


SEQ_SPAN = 1_048_576  # a task's ticket is seq * SEQ_SPAN + position: exact in a double


class Slot:
    """Shared memory with one lane per worker thread; a lane is three doubles: the ticket
    of the task it runs, when that started, and the ticket of the last task it finished.

    Each is written with one aligned 8-byte store, so a reader never sees half a value.
    The worker writes the start time before the ticket, so a reader that sees a new
    ticket may pair it with an old time only in the direction that delays a timeout.
    """

    def __init__(self, fd: int, lanes: int) -> None:
        self._lanes = lanes
        self._map = mmap.mmap(fd, lanes * _LANE.size)
        self.cells = memoryview(self._map).cast("d")  # the worker writes these directly

    @classmethod
    def create(cls, lanes: int) -> tuple[Slot, int]:
        """A new slot and the fd to hand to the child (the caller closes it)."""
        fd = os.memfd_create("cellpool-slot", os.MFD_CLOEXEC)
        os.ftruncate(fd, lanes * _LANE.size)
        slot = cls(fd, lanes)
        for lane in range(lanes):
            _LANE.pack_into(slot._map, lane * _LANE.size, -1.0, 0.0, -1.0)
        return slot, fd

    def lane(self, index: int) -> memoryview:
        return self.cells[3 * index : 3 * index + 3]

    def read(self) -> list[tuple[int, int, float]]:
        """(seq, position, started) of each task running now."""
        running = []
        for lane in range(self._lanes):
            ticket, started, finished = _LANE.unpack_from(self._map, lane * _LANE.size)
            if ticket != finished:
                seq, position = divmod(int(ticket), SEQ_SPAN)
                running.append((seq, position, started))
        return running

    def close(self) -> None:
        self.cells.release()
        self._map.close()


class SharedFd:
    """An fd for a worker process, duplicated into it when the worker starts.

    It lives here, in the module the forkserver preloads, so that unpickling it in a new
    worker imports nothing more.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, tuple]:
        return _received_fd, (reduction.DupFd(self.fd),)

    def detach(self) -> int:
        return self.fd


def _received_fd(dup: Any) -> SharedFd:
    return SharedFd(dup.detach())


class _Forward:
    """A text stream that sends what a task prints to the parent, a line at a time."""

    def __init__(self, send: Any, name: str) -> None:
        self._send = send
        self._name = name
        self._buffer: list[str] = []
        self.encoding = "utf-8"

    def write(self, text: str) -> int:
        self._buffer.append(text)
        if "\n" in text:
            self.flush()
        return len(text)

    def flush(self) -> None:
        if self._buffer:
            text, self._buffer = "".join(self._buffer), []
            self._send(("out", self._name, text))

    def isatty(self) -> bool:
        return False


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

    def send_outcomes(self, seq: int, start: int, outcomes: Outcomes, final: bool) -> None:
        sys.stdout.flush()
        sys.stderr.flush()  # what a task printed arrives before its record
        outcomes = _portable(outcomes)
        try:
            payload = cloudpickle.dumps(outcomes)
        except Exception:
            payload = cloudpickle.dumps(_picklable(outcomes))
        self.send(("done", seq, start, len(outcomes.values), final, payload))


def main(conn: Any, slot_fd: Any, init: bytes, threads: int) -> None:
    """Run batches from ``conn`` on ``threads`` threads until told to stop or the parent
    goes away."""
    global THREADS
    THREADS = threads
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what Ctrl-C stops
    fd = slot_fd.detach()
    slot = Slot(fd, threads)
    os.close(fd)
    channel = _Channel(conn)
    sys.stdout = _Forward(channel.send, "stdout")  # type: ignore[assignment]
    sys.stderr = _Forward(channel.send, "stderr")  # type: ignore[assignment]
    channel.send(("ready",))
    init_failure = None
    try:
        initializer, initargs = pickle.loads(init)
        if initializer is not None:
            initializer(*initargs)
    except BaseException as exc:
        init_failure = initializer_failure(exc)
    batches = _received(conn, init_failure)
    try:
        if threads == 1:
            for batch in batches:
                _run_batch(channel, slot.lane(0), *batch)
        else:
            _run_on_threads(channel, slot, batches, threads)
    finally:
        release_worker_thread()
        release_worker_process()  # after every thread that shares it has stopped


def _received(conn: Any, init_failure: Failure | None) -> Iterator[tuple]:
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
        seq, run_id, job, count, payload = message  # the header always loads
        if job is not None:
            loaded = _unpickled(job, "function")
            unloadable = isinstance(loaded, Unpicklable)
            jobs[run_id] = (loaded, False, (), None) if unloadable else loaded
            if len(jobs) > JOB_CACHE:
                del jobs[next(iter(jobs))]
        fn, star, retry_on, timeout = jobs[run_id]
        items = _unpickled(payload, "arguments")
        lost = items.failure if isinstance(items, Unpicklable) else None
        if lost is not None:
            items = [None] * count
        blocked = init_failure or (fn.failure if isinstance(fn, Unpicklable) else None) or lost
        yield seq, fn, star, retry_on, timeout, items, blocked


def _run_on_threads(channel: _Channel, slot: Slot, batches: Iterator[tuple], threads: int) -> None:
    """Hand the batches to ``threads`` threads, each writing its own lane of the slot."""
    waiting: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()

    def serve(lane: memoryview) -> None:
        try:
            while (batch := waiting.get()) is not None:
                _run_batch(channel, lane, *batch)
        finally:
            release_worker_thread()

    runners = [
        threading.Thread(target=serve, args=(slot.lane(i),), name=f"cellpool-lane-{i}")
        for i in range(threads)
    ]
    for runner in runners:
        runner.start()
    try:
        for batch in batches:
            waiting.put(batch)
    finally:
        for _ in runners:
            waiting.put(None)
        for runner in runners:
            runner.join()


def _run_batch(
    channel: _Channel,
    cells: memoryview,
    seq: int,
    fn: Any,
    star: bool,
    retry_on: tuple[type[BaseException], ...],
    timeout: float | None,
    items: list[Any],
    blocked: Failure | None,
) -> None:
    """Run a batch, sending outcomes at its end and at least every ``FLUSH_SECONDS``.

    This is the hot loop for tiny tasks, so it is written out rather than calling
    ``tasks.call``: one clock read per task (a task starts when the one before ends),
    and the slot written through a memoryview.
    """
    if inspect.iscoroutinefunction(fn):
        cells[1], cells[0] = time.time(), seq * SEQ_SPAN  # the batch runs as one
        outcomes = call_async(
            fn,
            star,
            items,
            retry_on,
            timeout,
            lambda item: blocked or (item.failure if isinstance(item, Unpicklable) else None),
        )
        cells[2] = seq * SEQ_SPAN
        channel.send_outcomes(seq, 0, outcomes, final=True)
        return
    values, started, finished, failures = outcomes = Outcomes.empty()
    clock = time.time
    base = seq * SEQ_SPAN
    start = 0
    now = flushed = clock()
    for position, item in enumerate(items):
        cells[1] = now
        cells[0] = base + position
        if blocked is not None or isinstance(item, Unpicklable):
            failures[len(values)] = (blocked or item.failure, False)
            value = None
        else:
            try:
                value = fn(*item) if star else fn(item)
            except BaseException as exc:  # a task's SystemExit is its failure
                failures[len(values)] = (failure_of(exc), isinstance(exc, retry_on))
                value = None
        values.append(value)
        started.append(now)
        now = clock()
        finished.append(now)
        cells[2] = base + position
        if now - flushed > FLUSH_SECONDS and position + 1 < len(items):
            channel.send_outcomes(seq, start, outcomes, final=False)
            values, started, finished, failures = outcomes = Outcomes.empty()
            start, flushed = position + 1, now
    channel.send_outcomes(seq, start, outcomes, final=True)
