"""Units of work, and the one function that runs a task in a thread or a worker process.

Tasks travel in batches and come back as columns (``Outcomes``), so that a batch of
tiny tasks costs a few list operations rather than a Python object per task.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
import traceback
import types
from array import array
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from .errors import TaskTimeout
from .results import Failure

if TYPE_CHECKING:
    from .runs import Run

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
    whether ``retry_on`` matched it; its value in ``values`` is ``None``. ``started``
    and ``finished`` are on this machine's ``time.monotonic()`` clock, in arrays of
    doubles, which pickle as one block of bytes and go into records as they are.
    """

    values: list[Any]
    started: array[float]
    finished: array[float]
    failures: dict[int, tuple[Failure, bool]]

    @classmethod
    def empty(cls) -> Outcomes:
        return cls([], array("d"), array("d"), {})

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

    __slots__ = (
        "attempts",
        "closed",
        "indices",
        "items",
        "recalled",
        "resolved",
        "run",
        "seq",
        "unresolved",
    )

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
        self.recalled = False  # the dispatcher asked for its unstarted tasks back

    @classmethod
    def of(cls, run: Run, task: Task) -> Batch:
        return cls(run, [task.index], [task.item], [task.attempts])

    def part(self, start: int, stop: int) -> Batch:
        """A new batch of this one's positions ``start`` to ``stop``, none tried here."""
        attempts = None if self.attempts is None else self.attempts[start:stop]
        return Batch(self.run, self.indices[start:stop], self.items[start:stop], attempts)

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


_thread_state = threading.local()  # each worker thread's event loop, for async tasks


def release_worker_thread() -> None:
    """Close what a worker thread's tasks opened: its event loop, its HTTP session."""
    loop = getattr(_thread_state, "loop", None)
    if loop is not None:
        loop.close()
        _thread_state.loop = None
    http = sys.modules.get("cellpool.http")  # not imported: no session to close
    if http is not None:
        http.close()


def release_worker_process() -> None:
    """Close what a worker process's threads shared; call once they have all stopped."""
    http = sys.modules.get("cellpool.http")
    if http is not None:
        http.close_process_session()


def event_loop() -> Any:
    """This thread's event loop for async tasks: made on first use, closed by
    ``release_worker_thread``."""
    import asyncio  # here, not at the top: it is slow to import, and most tasks are not async

    loop = getattr(_thread_state, "loop", None)
    if loop is None:
        loop = _thread_state.loop = asyncio.new_event_loop()
    return loop


def call_async(
    fn: Any,
    star: bool,
    items: list[Any],
    retry_on: tuple[type[BaseException], ...],
    timeout: float | None,
    blocked: Callable[[Any], Failure | None],
    on_step: Callable[[int, float], None] = lambda position, started: None,
) -> Outcomes:
    """Run a batch of ``async def`` tasks together on this thread's event loop (a dask
    worker's; process and thread workers stream batches, see ``lanes.py``)."""
    import asyncio

    async def together() -> list[Result]:
        return await asyncio.gather(
            *(
                call_one_async(fn, star, item, retry_on, timeout, blocked, position, on_step)
                for position, item in enumerate(items)
            )
        )

    results = event_loop().run_until_complete(together())
    outcomes = Outcomes.empty()
    for result in results:
        outcomes.add(result)
    return outcomes


@types.coroutine
def _stepped(coro: Any, position: int, started: float, on_step: Callable[[int, float], None]):
    """Drive ``coro`` one step at a time, telling ``on_step`` while it holds the loop."""
    steps = coro.__await__()
    value: Any = None
    error: BaseException | None = None
    while True:
        on_step(position, started)
        try:
            yielded = steps.send(value) if error is None else steps.throw(error)
        except StopIteration as stop:
            return stop.value
        finally:
            on_step(-1, 0.0)
        try:
            value, error = (yield yielded), None
        except BaseException as exc:  # cancellation, thrown in by the loop: pass it on
            value, error = None, exc


async def _marked(
    coro: Any, position: int, started: float, on_step: Callable[[int, float], None]
) -> Any:
    return await _stepped(coro, position, started, on_step)  # a Task needs a coroutine


async def call_one_async(
    fn: Any,
    star: bool,
    item: Any,
    retry_on: tuple[type[BaseException], ...],
    timeout: float | None,
    blocked: Callable[[Any], Failure | None],
    position: int,
    on_step: Callable[[int, float], None],
) -> Result:
    """Run one ``async def`` task on the running loop; never raises (a cancellation
    too is the task's failure). ``blocked(item)`` names a reason it cannot run, if any.

    ``on_step(position, started)`` is called as the task's coroutine takes the loop
    (``started``: when the task began, on the monotonic clock) and ``on_step(-1, 0)``
    as it gives it back: a task that blocks the loop past its timeout is then seen, and
    stopped, as that one task.
    """
    import asyncio

    started = time.monotonic()
    reason = blocked(item)
    if reason is not None:
        return (None, reason, False, started, started)
    try:
        coro = fn(*item) if star else fn(item)
        value = await asyncio.wait_for(_marked(coro, position, started, on_step), timeout)
    except asyncio.TimeoutError:
        error = TaskTimeout(f"the task ran past its {timeout:g} s timeout")
        failure = Failure(type(error).__name__, str(error), None, error)
        return (None, failure, False, started, time.monotonic())
    except BaseException as exc:  # a task's SystemExit is its failure, not the worker's
        return (None, failure_of(exc), isinstance(exc, retry_on), started, time.monotonic())
    return (value, None, False, started, time.monotonic())


def initializer_failure(exc: BaseException) -> Failure:
    """What every task of a worker whose initializer raised ``exc`` records."""
    return Failure(
        "InitializerError", f"the worker's initializer failed: {type(exc).__name__}: {exc}"
    )


def failure_of(exc: BaseException) -> Failure:
    """Describe an exception raised by a task, its traceback starting in the task's code.

    The caller must be the function that called the task (its frame is dropped).
    """
    tb = exc.__traceback__
    tb = tb.tb_next if tb is not None else None
    try:
        message = str(exc)
    except Exception:
        message = f"<{type(exc).__name__} whose str() failed>"
    try:
        text = "".join(traceback.format_exception(type(exc), exc, tb))
    except Exception:  # a broken __str__, or CPython 3.11's ast used by two threads at once
        text = _plain_traceback(type(exc).__name__, message, tb)
    if tb is not None:
        traceback.clear_frames(tb)  # keep the exception, not every local of every frame
    return Failure(type(exc).__name__, message, text, exc)


def _plain_traceback(name: str, message: str, tb: Any) -> str:
    """A traceback formatted without the carets, whose computation may fail."""
    lines = ["Traceback (most recent call last):\n"]
    for frame in traceback.extract_tb(tb):
        lines.append(f'  File "{frame.filename}", line {frame.lineno}, in {frame.name}\n')
        if frame.line:
            lines.append(f"    {frame.line}\n")
    lines.append(f"{name}: {message}\n")
    return "".join(lines)


def call(fn: Any, item: Any, star: bool, retry_on: tuple[type[BaseException], ...]) -> Result:
    """Run one task, ``fn(*item)`` if ``star`` else ``fn(item)``; never raises. Its
    times are on the ``time.monotonic()`` clock."""
    started = time.monotonic()
    try:
        value = fn(*item) if star else fn(item)
    except BaseException as exc:  # a task's SystemExit is its failure, not the worker's
        return (None, failure_of(exc), isinstance(exc, retry_on), started, time.monotonic())
    return (value, None, False, started, time.monotonic())
