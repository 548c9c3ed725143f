"""Where a run's records go: a ``Results`` (run, start), an ordered stream (map), a Future.

Every sink takes records one at a time (``put``) or many with one status (``put_many``,
positions equal to input indices).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from typing import TYPE_CHECKING, Any

from .results import Failure, Results, exception_of
from .tasks import Task

if TYPE_CHECKING:
    from .dispatch import Run


def _with_results(error: BaseException, results: Results) -> BaseException:
    if hasattr(error, "add_note"):  # Python 3.11+
        error.add_note(
            f"cellpool: the input raised this after {len(results)} items; "
            "their records are in this exception's .results"
        )
    error.results = results  # type: ignore[attr-defined]
    return error


class RecordSink:
    """Collects a ``Results``; its future completes when the run has ended."""

    def __init__(self) -> None:
        self.results = Results()
        self.future: Future[Results] = Future()
        self._lock = threading.Lock()

    def put(
        self,
        task: Task,
        status: str,
        value: Any,
        failure: Failure | None,
        worker: str | None,
        pid: int | None,
        started: float | None,
        finished: float | None,
    ) -> None:
        with self._lock:
            self.results._put(
                task.index,
                task.index,
                task.item,
                status,
                value,
                failure,
                worker,
                pid,
                task.attempts,
                started,
                finished,
            )

    def put_many(
        self,
        indices: Sequence[int],
        items: list[Any],
        attempts: int | list[int],
        status: str,
        values: list[Any] | None,
        failure: Failure | None,
        started: list[float] | None,
        finished: list[float] | None,
        worker: str | None,
        pid: int | None,
    ) -> None:
        with self._lock:
            self.results._put_many(
                indices, items, status, values, failure, attempts, started, finished, worker, pid
            )

    def buffered(self) -> int:
        return 0

    def snapshot(self) -> Results:
        """The records made so far, in input order."""
        with self._lock:
            return self.results._filled()

    def finish(self, run: Run) -> None:
        if run.input_error is not None:
            self.future.set_exception(_with_results(run.input_error, self.results))
        else:
            self.future.set_result(self.results)


class OrderedSink:
    """Holds finished values until the consumer of ``map`` reaches them, in input order."""

    def __init__(self) -> None:
        self._ready: dict[int, tuple[bool, Any]] = {}
        self._next = 0
        self._ended = False
        self._input_error: BaseException | None = None
        self._changed = threading.Condition()

    def put(
        self,
        task: Task,
        status: str,
        value: Any,
        failure: Failure | None,
        worker: str | None,
        pid: int | None,
        started: float | None,
        finished: float | None,
    ) -> None:
        entry = (True, value) if failure is None else (False, exception_of(status, failure))
        with self._changed:
            self._ready[task.index] = entry
            if task.index == self._next:
                self._changed.notify()

    def put_many(
        self,
        indices: Sequence[int],
        items: list[Any],
        attempts: int | list[int],
        status: str,
        values: list[Any] | None,
        failure: Failure | None,
        started: list[float] | None,
        finished: list[float] | None,
        worker: str | None,
        pid: int | None,
    ) -> None:
        if failure is None:
            entries = [(True, value) for value in values or [None] * len(items)]
        else:
            entries = [(False, exception_of(status, failure))] * len(items)
        with self._changed:
            self._ready.update(zip(indices, entries, strict=True))
            if self._next in self._ready:
                self._changed.notify()

    def buffered(self) -> int:
        return len(self._ready)

    def finish(self, run: Run) -> None:
        with self._changed:
            self._ended = True
            self._input_error = run.input_error
            self._changed.notify()

    def next(self, deadline: float | None) -> tuple[bool, Any]:
        """The next value in input order as (ok, value or exception).

        Raises ``StopIteration`` at the end and ``TimeoutError`` past ``deadline``.
        """
        with self._changed:
            while self._next not in self._ready and not self._ended:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError("map() timed out waiting for a result")
                self._changed.wait(remaining)
            if self._next in self._ready:
                self._next += 1
                return self._ready.pop(self._next - 1)
            if self._input_error is not None:
                raise self._input_error
            raise StopIteration


class FutureSink:
    """Completes the ``Future`` of one ``submit`` call."""

    def __init__(self, future: Future[Any]) -> None:
        self.future = future

    def put(
        self,
        task: Task,
        status: str,
        value: Any,
        failure: Failure | None,
        worker: str | None,
        pid: int | None,
        started: float | None,
        finished: float | None,
    ) -> None:
        try:
            if failure is None:
                self.future.set_result(value)
            elif status == "cancelled":
                self.future.cancel()
            else:
                self.future.set_exception(exception_of(status, failure))
        except InvalidStateError:
            pass  # the caller cancelled the future first

    def put_many(
        self,
        indices: Sequence[int],
        items: list[Any],
        attempts: int | list[int],
        status: str,
        values: list[Any] | None,
        failure: Failure | None,
        started: list[float] | None,
        finished: list[float] | None,
        worker: str | None,
        pid: int | None,
    ) -> None:
        value = None if values is None else values[0]
        self.put(Task(indices[0], items[0], 1), status, value, failure, worker, pid, None, None)

    def buffered(self) -> int:
        return 0

    def finish(self, run: Run) -> None:
        pass
