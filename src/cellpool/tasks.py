"""Units of work and the one function that runs a task, in a thread or a worker process."""

from __future__ import annotations

import itertools
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .results import Failure

if TYPE_CHECKING:
    from .dispatch import Run

# What a worker reports for one task: (ok, value or Failure, retryable, started, finished).
Outcome = tuple[bool, Any, bool, float, float]


@dataclass(slots=True)
class Task:
    """One input of a run: its position, the input as the user gave it, the call's arguments."""

    index: int
    item: Any
    args: tuple
    attempts: int = 0


_batch_numbers = itertools.count(1)


class Batch:
    """Tasks of one run that travel to a worker together; each still gets its own record."""

    __slots__ = ("closed", "resolved", "run", "seq", "tasks", "unresolved")

    def __init__(self, run: Run, tasks: list[Task]) -> None:
        self.seq = next(_batch_numbers)
        self.run = run
        self.tasks = tasks
        self.resolved = bytearray(len(tasks))
        self.unresolved = len(tasks)
        self.closed = False

    def resolve(self, position: int) -> Task | None:
        """Mark a position finished; ``None`` if it already was, or the batch was closed."""
        if self.closed or self.resolved[position]:
            return None
        self.resolved[position] = 1
        self.unresolved -= 1
        return self.tasks[position]


def failure_of(exc: BaseException) -> Failure:
    """Describe an exception raised by a task, its traceback starting in the task's code."""
    tb = exc.__traceback__
    # The first frame is call() below: the user's traceback starts one further in.
    tb = tb.tb_next if tb is not None else None
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    if tb is not None:
        traceback.clear_frames(tb)  # keep the exception, not every local of every frame
    return Failure(type(exc).__name__, str(exc), text, exc)


def call(fn: Any, args: tuple, retry_on: tuple[type[BaseException], ...]) -> Outcome:
    """Run one task and describe what happened; never raises."""
    started = time.time()
    try:
        value = fn(*args)
    except BaseException as exc:  # a task's SystemExit is its failure, not the worker's
        return (False, failure_of(exc), isinstance(exc, retry_on), started, time.time())
    return (True, value, False, started, time.time())
