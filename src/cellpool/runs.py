"""A run: one stream of tasks (a ``run``, ``start`` or ``map`` call, or one ``submit``).

Ownership: every field is written by the dispatcher thread alone. Other threads read
the counters (``done``, ``failed``, ``cancelled_tasks``, ``in_flight``), ``state`` and
``finished``: each is a single reference or int, so a reader sees a recent value, never
a torn one. ``by_worker`` only gains keys and its lists only grow: a reader copies it
with ``dict()``, which holds the GIL throughout. The input is read by the run's
``Feeder`` thread (``feeder.py``).
"""

from __future__ import annotations

import enum
import inspect
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, Protocol

from .feeder import Feeder
from .tasks import Batch


class RunState(enum.Enum):
    ACTIVE = "active"  # reads its input and dispatches it
    FINISHING = "finishing"  # reads no more input; what was taken finishes and is recorded
    CANCELLED = "cancelled"  # stopped: what was taken and not finished is recorded cancelled
    DONE = "done"  # every input taken has its record and the sink is finished


class StopMode(enum.Enum):
    """What a cancel does to the run's tasks that are running."""

    KILL = "kill"  # stop them (a process is killed, a thread abandoned): "cancelled"
    DROP = "drop"  # record them "cancelled" now and ignore their outcome when it comes
    FINISH = "finish"  # let them finish and record their outcome; start nothing more


class Sink(Protocol):
    """Where a run's records go: a Results, an ordered value stream, or a Future."""

    def put(self, done: Any) -> None: ...

    def put_many(self, done: Any) -> None: ...

    def buffered(self) -> int: ...

    def finish(self, run: Run) -> None: ...


class RunInput(Protocol):
    """A run's input as the dispatcher takes it; ``take`` never blocks. A ``Feeder``
    (an iterator read on a thread of its own), a ``SequenceInput``, or a pipeline
    stage's ``HandoffInput``."""

    error: BaseException | None  # what reading the input raised, once it ended
    starved: bool  # it waits for a larger allowance (read by map's consumer)

    def take(self, count: int) -> list[Any]: ...

    def buffered(self) -> int: ...

    def ended(self) -> bool: ...

    def grant(self, allowance: int) -> None: ...

    def drain(self) -> None: ...

    def stop(self) -> None: ...


PLAIN_SEQUENCES = (list, tuple, range)  # exact types: slicing them runs no user code


class SequenceInput:
    """Inputs held in lists, tuples or ranges (several are zipped, up to the shortest).

    Slicing them runs no user code and never blocks, so the dispatcher takes from them
    directly, with no ``Feeder`` thread, within the same allowance a feeder keeps.
    Every field is the dispatcher's; ``starved`` is also read by ``map``'s consumer.
    """

    error = None

    def __init__(self, sequences: list[Any], allowance: int) -> None:
        self._sequences = sequences
        self._next = 0  # the first input not taken yet
        self._end = min(len(sequence) for sequence in sequences)  # what may be taken
        self._allowance = allowance  # how many may have been taken in all

    @property
    def starved(self) -> bool:
        return self._next >= self._allowance and self._next < self._end

    def take(self, count: int) -> list[Any]:
        start = self._next
        stop = min(start + count, self._allowance, self._end)
        if stop <= start:
            return []
        self._next = stop
        sequences = self._sequences
        if stop == self._end:
            self._sequences = []  # hold no input once every one is taken
        if len(sequences) > 1:
            return list(zip(*(sequence[start:stop] for sequence in sequences), strict=True))
        taken = sequences[0][start:stop]
        return taken if type(taken) is list else list(taken)

    def buffered(self) -> int:
        return max(0, min(self._allowance, self._end) - self._next)

    def ended(self) -> bool:
        return self._next >= self._end

    def grant(self, allowance: int) -> None:
        self._allowance = max(self._allowance, allowance)

    def drain(self) -> None:
        self._allowance = self._end  # a cancelled run: the rest is taken for its records

    def stop(self) -> None:
        # what is within the allowance counts as read, and is taken for its records
        self._end = min(self._end, max(self._next, self._allowance))
        if self._next == self._end:
            self._sequences = []


_run_serials = itertools.count(1)


class Run:
    """One stream of tasks and its counters; see the module docstring for ownership.

    ``star`` means each item is a tuple of arguments (several iterables, or ``submit``).
    ``sized`` means ``total`` is the input's own length: a cancelled run then reads the
    rest of the input to give every item a ``"cancelled"`` record. ``indexed`` means the
    input yields ``(index, item)``: a journaled run's, whose other inputs were recorded
    without running (``journaled.py``).
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        items: Iterator[Any] | RunInput,
        star: bool,
        total: int | None,
        sized: bool,
        sink: Sink,
        *,
        timeout: float | None,
        retries: int,
        retry_on: tuple[type[BaseException], ...],
        max_pending: int,
        concurrency: int = 1,
        future: Future[Any] | None = None,
        on_input: Callable[[], None] = lambda: None,
        indexed: bool = False,
    ) -> None:
        self.serial = next(_run_serials)
        # async def tasks stream on each worker thread's event loop, up to concurrency
        # in flight across batches (lanes.py); a batch holds that many
        self.is_async = inspect.iscoroutinefunction(fn)
        self.concurrency = concurrency
        self.fn = fn
        self.star = star
        self.total = total
        self.sized = sized
        self.sink = sink
        self.timeout = timeout
        self.retries = retries
        self.retry_on = retry_on
        self.max_pending = max_pending
        self.future = future  # a submit's: it enters RUNNING when its batch is sent
        self.input: RunInput = (
            Feeder(items, on_input, f"cellpool-feeder-{self.serial}")
            if isinstance(items, Iterator)
            else items
        )
        self.input.grant(max_pending)
        self.state = RunState.ACTIVE
        self.leftover: tuple[str, Any] | None = None  # once stopped: (status, Failure) for
        # the inputs read and never dispatched
        self.indexed = indexed
        # what recorded inputs without running them (a journaled run's input, with its
        # ``restored`` and ``failed`` counts, written by the feeder thread); for views
        self.settled: Any = None
        self.next_index = 0
        self.in_flight = 0  # taken from the input and not yet recorded
        self.input_error: BaseException | None = None
        self.done = 0
        self.failed = 0  # recorded as error, timeout or crashed
        self.cancelled_tasks = 0
        # worker -> [tasks finished, of which failed] in this run, for the views; a
        # worker that has left keeps its entry
        self.by_worker: dict[str, list[int]] = {}
        self.item_seconds: float | None = None
        self.created = time.monotonic()
        self.finished = threading.Event()

    @property
    def state(self) -> RunState:
        return self._state

    @state.setter
    def state(self, state: RunState) -> None:
        self._state = state
        # read by worker threads before each task: a plain attribute is the cheapest read
        self.stopped = state in (RunState.CANCELLED, RunState.DONE)

    @property
    def cancelled(self) -> bool:
        return self.state is RunState.CANCELLED

    def accepts_retries(self) -> bool:
        return self.state is RunState.ACTIVE

    def count(self, status: str, n: int, worker: str | None = None) -> None:
        """Add ``n`` records of ``status`` (made on ``worker``, if any ran them) to the
        counters the views show."""
        self.in_flight -= n
        self.done += n
        if status == "cancelled":
            self.cancelled_tasks += n
        elif status != "ok":
            self.failed += n
        if worker is not None:
            tally = self.by_worker.get(worker)
            if tally is None:
                tally = self.by_worker[worker] = [0, 0]
            tally[0] += n
            if status != "ok":
                tally[1] += n

    def grant(self) -> None:
        """Let the feeder read so that taken-and-unrecorded tasks, items it holds and
        results waiting to be consumed stay within ``max_pending``."""
        self.input.grant(self.done - self.sink.buffered() + self.max_pending)

    def observe(self, started: float, finished: float, count: int) -> None:
        """Fold the measured time per task into a moving average. A much slower task
        outweighs the rest at once: after 5 µs tasks, one of 20 ms makes it 4 ms."""
        self.observe_task((finished - started) / count)

    def observe_task(self, seconds: float) -> None:
        if self.item_seconds is None:
            self.item_seconds = seconds
        else:
            self.item_seconds = 0.8 * self.item_seconds + 0.2 * seconds

    def batch_size(self, workers: int, target_seconds: float) -> int:
        if self.future is not None:
            return 1
        if self.is_async:
            return max(1, min(self.concurrency, self.max_pending // (2 * workers)))
        if self.item_seconds is None:
            return 1  # measure before batching
        # A batch holds about target_seconds of work; one that turns out to hold more
        # is recalled when a worker idles (Dispatcher._rebalance).
        size = int(target_seconds / max(self.item_seconds, 1e-7))
        return max(1, min(size, self.max_pending // (2 * workers)))

    def take(self, count: int) -> Batch | None:
        """A fresh batch of up to ``count`` inputs read so far, or ``None`` if none are."""
        items = self.input.take(count)
        if not items:
            return None
        self.in_flight += len(items)
        if self.indexed:
            indices = [index for index, _ in items]
            self.next_index = indices[-1] + 1
            return Batch(self, indices, [item for _, item in items])
        first = self.next_index
        self.next_index += len(items)
        return Batch(self, range(first, self.next_index), items)

    def input_ended(self) -> bool:
        """True once no input is left to take (it ran out, raised, or was stopped)."""
        if not self.input.ended():
            return False
        if self.input.error is not None and self.input_error is None:
            self.input_error = self.input.error
        return True
