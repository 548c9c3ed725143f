"""The interface between the dispatcher and a kind of worker pool.

The dispatcher thread owns every scheduling decision and calls a pool's methods only
from that thread. A pool's workers (threads, or a reader thread for processes) report
back only by posting ``Completed`` and ``WorkerLost`` events.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..tasks import Batch, Outcomes


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
class WorkerLost:
    """A worker stopped with tasks unfinished.

    ``culprits`` are the (batch, position) of the tasks it was running that end with
    ``status``. The other tasks in ``unfinished`` (batch, first position not reported)
    never ran to completion and go to other workers without counting an attempt.
    """

    worker: str
    pid: int
    status: str
    reason: str
    culprits: list[tuple[Batch, int]] = field(default_factory=list)
    unfinished: list[tuple[Batch, int]] = field(default_factory=list)


@dataclass(slots=True)
class Running:
    """A task a worker is running now."""

    worker: str
    batch: Batch
    position: int
    started: float


Report = Callable[[Any], None]


class Pool(ABC):
    """Workers of one kind. Every method is called from the dispatcher thread.

    ``broken`` says why, once the pool can run nothing more (its workers cannot start);
    ``batch_seconds`` is the work a batch should hold, more where a batch costs more.
    """

    kind: str
    broken: str | None = None
    batch_seconds = 0.01  # tasks travel in batches of about this much measured work

    @abstractmethod
    def capacity(self) -> int:
        """How many more batches the pool takes now (queued plus prefetched)."""

    @abstractmethod
    def send(self, batch: Batch) -> None:
        """Hand a batch to a worker; outcomes come back as events."""

    @abstractmethod
    def settle(self, event: Completed | WorkerLost) -> None:
        """Update the pool's own bookkeeping for an event it posted."""

    @abstractmethod
    def running(self) -> list[Running]:
        """The tasks running now, for timeout checks."""

    @abstractmethod
    def stop(
        self, worker: str, status: str, reason: str, task: tuple[int, int] | None = None
    ) -> None:
        """Stop ``worker`` for the sake of ``task`` (batch seq, position), which ends
        with ``status`` (``None``: every task it runs does); a ``WorkerLost`` event
        follows if the worker can be stopped."""

    def batch_limit(self) -> int | None:
        """The most tasks the next batch may hold, if the pool has a limit."""
        return None

    def tick(self) -> None:  # noqa: B027 (most pools have nothing to do)
        """Called by the dispatcher about every 0.1 s while work runs."""

    @abstractmethod
    def pause_reasons(self) -> list[str]:
        """Why workers are paused now (empty if none is)."""

    @abstractmethod
    def workers_info(self) -> list[dict[str, Any]]:
        """A row per worker, with the fields of ``Executor.workers_info``."""

    @abstractmethod
    def shutdown(self, wait: bool) -> None:
        """Stop every worker; with ``wait``, return only once they are gone."""
