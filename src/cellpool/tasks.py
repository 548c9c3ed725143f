"""Units of work, and the one function that runs a task in a thread or a worker process.

Tasks travel in batches and come back as columns (``Outcomes``), so that a batch of
tiny tasks costs a few list operations rather than a Python object per task.
"""

from __future__ import annotations

import itertools
import time
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from .results import Failure

if TYPE_CHECKING:
    from .dispatch import Run

# What one task did: (value, failure or None, retryable, started, finished).
Result = tuple[Any, Failure | None, bool, float, float]


class Task(NamedTuple):
    """One input outside a fresh batch: a retry, or one a lost worker never finished."""

    index: int
    item: Any
    attempts: int  # tries made so far


class Outcomes(NamedTuple):
    """What a worker did with consecutive positions of a batch, as columns.

    ``failures`` maps a position (counted from the first of these) to the failure and
    whether ``retry_on`` matched it; its value in ``values`` is ``None``.
    """

    values: list[Any]
    started: list[float]
    finished: list[float]
    failures: dict[int, tuple[Failure, bool]]

    @classmethod
    def empty(cls) -> Outcomes:
        return cls([], [], [], {})

    def add(self, result: Result) -> None:
        value, failure, retryable, started, finished = result
        if failure is not None:
            self.failures[len(self.values)] = (failure, retryable)
        self.values.append(value)
        self.started.append(started)
        self.finished.append(finished)


_batch_numbers = itertools.count(1)


class Batch:
    """Inputs of one run that travel to a worker together; each gets its own record.

    ``attempts`` is ``None`` for a fresh batch (no input tried yet), else the tries
    made so far per position.
    """

    __slots__ = ("attempts", "closed", "indices", "items", "resolved", "run", "seq", "unresolved")

    def __init__(
        self,
        run: Run,
        indices: Sequence[int],
        items: list[Any],
        attempts: list[int] | None = None,
    ) -> None:
        self.seq = next(_batch_numbers)
        self.run = run
        self.indices = indices
        self.items = items
        self.attempts = attempts
        self.resolved = bytearray(len(items))
        self.unresolved = len(items)
        self.closed = False

    @classmethod
    def of(cls, run: Run, task: Task) -> Batch:
        return cls(run, [task.index], [task.item], [task.attempts])

    def task(self, position: int) -> Task:
        tried = 0 if self.attempts is None else self.attempts[position]
        return Task(self.indices[position], self.items[position], tried)

    def resolve(self, position: int) -> bool:
        """Mark a position finished; False if it already was, or the batch was closed."""
        if self.closed or self.resolved[position]:
            return False
        self.resolved[position] = 1
        self.unresolved -= 1
        return True

    def resolve_range(self, start: int, count: int) -> bool:
        """Mark positions ``start``... finished at once; False if the batch was closed.

        Reports for one batch cover disjoint ranges, so an open batch has them all open.
        """
        if self.closed:
            return False
        self.resolved[start : start + count] = b"\x01" * count
        self.unresolved -= count
        return True


def failure_of(exc: BaseException) -> Failure:
    """Describe an exception raised by a task, its traceback starting in the task's code.

    The caller must be the function that called the task (its frame is dropped).
    """
    tb = exc.__traceback__
    tb = tb.tb_next if tb is not None else None
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    if tb is not None:
        traceback.clear_frames(tb)  # keep the exception, not every local of every frame
    return Failure(type(exc).__name__, str(exc), text, exc)


def call(fn: Any, item: Any, star: bool, retry_on: tuple[type[BaseException], ...]) -> Result:
    """Run one task, ``fn(*item)`` if ``star`` else ``fn(item)``; never raises."""
    started = time.time()
    try:
        value = fn(*item) if star else fn(item)
    except BaseException as exc:  # a task's SystemExit is its failure, not the worker's
        return (None, failure_of(exc), isinstance(exc, retry_on), started, time.time())
    return (value, None, False, started, time.time())
