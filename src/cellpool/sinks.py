"""Where a run's records go: a ``Results`` (run, start), an ordered stream (map), a Future.

Every sink takes records one at a time (``put``, a ``Finished``) or many with one status
(``put_many``, a ``FinishedBatch``, whose positions are its input indices).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from typing import TYPE_CHECKING, Any, NamedTuple

from .results import Failure, Results, exception_of
from .tasks import Task

if TYPE_CHECKING:
    from .delivery import Deliveries
    from .runs import Run


def with_results(error: BaseException, results: Results) -> BaseException:
    if hasattr(error, "add_note"):  # Python 3.11+
        error.add_note(
            f"cellpool: the input raised this after {len(results)} items; "
            "their records are in this exception's .results"
        )
    error.results = results  # type: ignore[attr-defined]
    return error


class Finished(NamedTuple):
    """One task's record, as the dispatcher hands it to a sink."""

    task: Task
    status: str
    value: Any
    failure: Failure | None
    worker: str | None
    pid: int | None
    started: float | None
    finished: float | None


class FinishedBatch(NamedTuple):
    """Records of several inputs with one status; per-record lists, or ``None`` for none."""

    indices: Sequence[int]
    items: list[Any]
    attempts: int | list[int]
    status: str
    values: list[Any] | None
    failure: Failure | None
    started: Sequence[float] | None
    finished: Sequence[float] | None
    worker: str | None
    pid: int | None


class RecordSink:
    """Collects a ``Results``; its future completes (on a delivery thread: it runs
    callbacks) when the run has ended."""

    def __init__(self, deliveries: Deliveries) -> None:
        self.results = Results()
        self.future: Future[Results] = Future()
        self._deliveries = deliveries
        self._lock = threading.Lock()

    def put(self, done: Finished) -> None:
        task = done.task
        with self._lock:
            self.results._put(
                task.index,
                task.index,
                task.item,
                done.status,
                done.value,
                done.failure,
                done.worker,
                done.pid,
                task.attempts,
                done.started,
                done.finished,
            )

    def put_many(self, done: FinishedBatch) -> None:
        with self._lock:
            self.results._put_many(
                done.indices,
                done.items,
                done.status,
                done.values,
                done.failure,
                done.attempts,
                done.started,
                done.finished,
                done.worker,
                done.pid,
            )

    def buffered(self) -> int:
        return 0

    def snapshot(self) -> Results:
        """The records made so far, in input order."""
        with self._lock:
            copy = self.results._copy()
        return copy._filled()  # the slow part, outside the lock the dispatcher takes

    def finish(self, run: Run) -> None:
        if run.input_error is not None:
            error = with_results(run.input_error, self.results)
            self._deliveries.put(self.future.set_exception, error)
        else:
            self._deliveries.put(self.future.set_result, self.results)


class Raised:
    """A ``map`` value that is an error: the iterator raises ``error`` in its place."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class OrderedSink:
    """Holds finished values until the consumer of ``map`` reaches them, in input order.

    Values are kept in *chunks*: the values of consecutive indices that finished
    together (a batch's, or a part of one), keyed by the first index. The consumer takes
    the chunk that comes next whole (``take``); it counts as held until the consumer
    has read it all (``returned``), so ``max_pending`` still bounds what is held.
    """

    def __init__(self) -> None:
        self._chunks: dict[int, list[Any]] = {}  # first index -> values (or Raised)
        self._held = 0  # values in _chunks
        self._next = 0
        self._lent = 0  # values of the chunk the consumer reads
        self._discarding = False  # nobody will read: the work goes on, values are dropped
        self._ended = False
        self._input_error: BaseException | None = None
        self._changed = threading.Condition()

    def put(self, done: Finished) -> None:
        value = (
            done.value if done.failure is None else Raised(exception_of(done.status, done.failure))
        )
        self._add(done.task.index, [value])

    def put_many(self, done: FinishedBatch) -> None:
        count = len(done.items)
        if done.failure is None:
            values = done.values or [None] * count
        else:
            values = [Raised(exception_of(done.status, done.failure))] * count
        indices = done.indices
        if isinstance(indices, range) and indices.step == 1:
            self._add(indices.start, values)
        else:
            for index, value in zip(indices, values, strict=True):
                self._add(index, [value])

    def _add(self, first: int, values: list[Any]) -> None:
        with self._changed:
            if self._discarding:
                return
            self._chunks[first] = values
            self._held += len(values)
            if first == self._next:
                self._changed.notify()

    def buffered(self) -> int:
        return self._held + self._lent

    def discard(self) -> None:
        """The iterator was dropped unread: keep no value from now on."""
        with self._changed:
            self._discarding = True
            self._chunks.clear()
            self._held = 0

    def finish(self, run: Run) -> None:
        with self._changed:
            self._ended = True
            self._input_error = run.input_error
            self._changed.notify()

    def returned(self) -> None:
        """The consumer has read every value of its chunk."""
        with self._changed:
            self._lent = 0

    def take(self, deadline: float | None) -> list[Any]:
        """The next chunk of values in input order (a value may be ``Raised``).

        Waits for it; raises ``StopIteration`` at the end and ``TimeoutError`` past
        ``deadline``.
        """
        with self._changed:
            chunks = self._chunks
            while self._next not in chunks and not self._ended:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError("map() timed out waiting for a result")
                self._changed.wait(remaining)
            chunk = chunks.pop(self._next, None)
            if chunk is None:
                if self._input_error is not None:
                    raise self._input_error
                raise StopIteration
            self._next += len(chunk)
            self._held -= len(chunk)
            self._lent = len(chunk)
            return chunk


class FutureSink:
    """Completes the ``Future`` of one ``submit`` call, on a delivery thread.

    A cancelled record needs nothing here: the dispatcher cancels the future itself.
    """

    def __init__(self, future: Future[Any], deliveries: Deliveries) -> None:
        self.future = future
        self._deliveries = deliveries

    def put(self, done: Finished) -> None:
        if done.failure is None:
            self._deliveries.put(_settle, self.future.set_result, done.value)
        elif done.status != "cancelled":
            error = exception_of(done.status, done.failure)
            self._deliveries.put(_settle, self.future.set_exception, error)

    def put_many(self, done: FinishedBatch) -> None:
        value = None if done.values is None else done.values[0]
        task = Task(done.indices[0], done.items[0], 1)
        self.put(
            Finished(task, done.status, value, done.failure, done.worker, done.pid, None, None)
        )

    def buffered(self) -> int:
        return 0

    def finish(self, run: Run) -> None:
        if run.input_error is not None:
            self._deliveries.put(_settle, self.future.set_exception, run.input_error)


def _settle(complete: Any, outcome: Any) -> None:
    with contextlib.suppress(InvalidStateError):  # the caller cancelled it first
        complete(outcome)
