"""The interface between the dispatcher and a kind of worker pool.

Ownership: the dispatcher thread calls every ``Pool`` method, and only it does. A
pool's own threads (its worker threads, the process pool's reader and senders, dask's
client thread) never decide anything about a task: they post *facts* to the
dispatcher (``Completed``, ``WorkerReady``, ``WorkerGone``, ``PoolBroken``) through the
``Report`` callable, which never blocks. The dispatcher alone turns facts into records.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..tasks import Batch, Outcomes


class Phase(enum.IntEnum):
    """What a worker was doing, as it wrote down itself (process workers: shared memory)."""

    IDLE = 0  # waiting for work
    INITIALIZING = 1  # running the executor's initializer
    LOADING_FUNCTION = 2  # unpickling a run's function
    LOADING_ARGUMENTS = 3  # unpickling a batch's inputs
    RUNNING = 4  # running a task (which one is in its lane)
    SENDING = 5  # pickling and sending outcomes


@dataclass(slots=True)
class Completed:
    """Outcomes of ``batch`` positions ``start``, ``start + 1``, ...; ``final`` when none remain."""

    batch: Batch
    start: int
    outcomes: Outcomes
    worker: str
    pid: int
    final: bool = True


@dataclass(slots=True)
class Returned:
    """A worker gave back ``batch`` positions ``first``... unstarted (see ``give_back``);
    unless ``final``, the outcomes of the positions before follow (a worker streaming
    async tasks gives back what waits while what it started still runs)."""

    batch: Batch
    first: int
    final: bool = True


@dataclass(slots=True)
class WorkerReady:
    """A worker has started and run the initializer: it may now be given work."""

    worker: str


@dataclass(slots=True)
class WorkerGone:
    """A worker stopped, by itself or because the dispatcher had it stopped.

    ``running`` are the (batch, position) of the tasks it was running; ``batch_phase``
    says, when it died outside a task, which batch it was loading or sending and how
    (``(batch, Phase)``); ``unreported`` are (batch, first position not reported) of
    every batch it held. ``ready`` says whether it had finished starting; ``retired``
    that it left as the pool asked (a task limit, a resource limit), and ``reason`` why.
    """

    worker: str
    pid: int
    reason: str
    ready: bool
    running: list[tuple[Batch, int]] = field(default_factory=list)
    batch_phase: tuple[Batch, Phase] | None = None
    unreported: list[tuple[Batch, int]] = field(default_factory=list)
    retired: bool = False


@dataclass(slots=True)
class PoolBroken:
    """The pool can run nothing more (its initializer failed, or workers cannot start)."""

    reason: str


@dataclass(slots=True)
class Changed:
    """One of the pool's threads ended (or the like): the dispatcher should look again,
    say at whether the pool has closed."""


@dataclass(slots=True)
class Running:
    """A task a worker is running now; ``started`` is on the ``time.monotonic()`` clock."""

    worker: str
    batch: Batch
    position: int
    started: float


Report = Callable[[Any], None]


class Pool(ABC):
    """Workers of one kind. Every method is called from the dispatcher thread.

    ``batch_seconds`` is the work a batch should hold, more where a batch costs more.
    """

    kind: str
    batch_seconds = 0.01  # tasks travel in batches of about this much measured work

    @abstractmethod
    def capacity(self, prefetch: bool = True, stream: bool = False) -> int:
        """How many more batches the pool takes now; without ``prefetch``, only as many
        as there are workers (or worker threads) idle, so a batch starts at once. With
        ``stream`` (a run of ``async def`` tasks), one more per worker thread where
        threads stream them (``lanes.py``): a thread starts the next batch's tasks while
        the last ones of the batch before still run, and has the one after at hand."""

    @abstractmethod
    def send(self, batch: Batch) -> None:
        """Hand a batch to a worker; never blocks. Outcomes come back as facts."""

    @abstractmethod
    def settle(self, event: Completed | WorkerGone | Returned) -> None:
        """Update the pool's own bookkeeping for a fact it posted."""

    @abstractmethod
    def running(self) -> list[Running]:
        """The tasks running now, for timeout checks."""

    @abstractmethod
    def stop(self, worker: str, why: str, task: tuple[int, int] | None = None) -> bool:
        """Stop ``worker`` now (kill a process; abandon a thread), for the sake of
        ``task`` (batch seq, position) if given. True if a ``WorkerGone`` will follow;
        False if there was nothing to stop (the task ended meanwhile)."""

    def handle(self, event: Any) -> list[Any]:
        """Turn an event of the pool's own threads into facts (dispatcher thread)."""
        raise TypeError(f"unexpected event {event!r}")

    def owns(self, thread: Any) -> bool:
        """True for the pool's own worker threads (safe from any thread)."""
        return False

    def starting(self) -> list[tuple[str, float]]:
        """Workers not ready yet, with when they started initializing (monotonic)."""
        return []

    def give_back(self, batch: Batch) -> bool:
        """Ask the worker holding ``batch`` to return the tasks it has not started, of
        it and of every batch it was sent before; a ``Returned`` follows for each that
        had some. False if this pool cannot (then nothing follows)."""
        return False

    def batch_limit(self) -> int | None:
        """The most tasks the next batch may hold, if the pool has a limit."""
        return None

    def tick(self) -> None:  # noqa: B027 (most pools have nothing to do)
        """Called by the dispatcher about every 0.1 s while it has work."""

    def pause_reasons(self) -> list[str]:
        """Why workers are paused now (empty if none is)."""
        return []

    @abstractmethod
    def workers_info(self) -> list[dict[str, Any]]:
        """A row per worker, with the fields of ``Executor.workers_info``."""

    @abstractmethod
    def close(self, cancel_running: bool) -> None:
        """Begin stopping every worker: idle ones exit; with ``cancel_running``, busy
        ones are stopped too. Never blocks; ``closed()`` says when all are gone."""

    @abstractmethod
    def closed(self) -> bool:
        """True once every worker is gone and the pool holds no resource."""

    def abandon(self) -> None:  # noqa: B027
        """Give up waiting for workers (interpreter exit, collected executor): kill
        what can be killed now."""
