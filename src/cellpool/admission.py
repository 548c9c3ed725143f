"""Who may take new work: per-worker memory and fd limits, and the machine's memory.

Decisions read the monitor's latest sample (a few times a second), never psutil itself:
a worker at ``memory_pause`` of its ``memory_limit`` (or ``fd_pause`` of its
``fd_limit``) gets no new task; one over its memory limit is recycled after its tasks,
one far past it (``KILL_FACTOR``) is killed at once; one that stays paused while idle
holds the memory or files itself and is recycled after ``IDLE_GRACE`` seconds. While
the machine's available memory is under ``min_available_memory``, nothing is dispatched.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .view.figures import size

if TYPE_CHECKING:
    from .monitor import Monitor

KILL_FACTOR = 1.5  # a worker this far past memory_limit is killed with its task
IDLE_GRACE = 2.0  # seconds a paused worker may sit idle before it is recycled
STALL_SECONDS = 30.0  # nothing could be dispatched this long: say so


@dataclass(frozen=True)
class Limits:
    """The resource limits of an executor (``None``: no limit)."""

    memory_limit: int | None = None
    fd_limit: int | None = None
    min_available_memory: float | int = 0.10  # a fraction of total, or bytes
    memory_pause: float = 0.80
    fd_pause: float = 0.90


class Admission:
    """Applies ``Limits`` to the monitor's samples; the pools ask it before dispatching."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.monitor: Monitor | None = None  # set once the pool exists to be watched
        self._idle_paused_since: dict[str, float] = {}
        self._blocked_since: float | None = None
        self.stalled: str | None = None  # why nothing could run for STALL_SECONDS

    def rows(self) -> list[dict[str, Any]]:
        """The latest sample's worker rows (none before the monitor starts)."""
        return [] if self.monitor is None else self.monitor.latest.workers

    def _row(self, worker: str) -> dict[str, Any] | None:
        return next((row for row in self.rows() if row["worker"] == worker), None)

    def machine_pause(self) -> str | None:
        """Why no work may start anywhere now, or ``None``."""
        if self.monitor is None:
            return None
        machine = self.monitor.latest.machine
        floor = self.limits.min_available_memory
        if isinstance(floor, float) and floor < 1:
            floor = floor * machine.memory_total
        if machine.memory_available < floor:
            return (
                f"available memory {size(machine.memory_available)} is under "
                f"min_available_memory {size(floor)}"
            )
        return None

    def pause(self, rss: int | None, fds: int | None) -> str | None:
        """Why a worker (or, for threads, the process) with these figures may take no work."""
        memory, files = self.limits.memory_limit, self.limits.fd_limit
        if memory is not None and rss is not None and rss >= self.limits.memory_pause * memory:
            return f"memory {size(rss)} is {rss / memory:.0%} of memory_limit {size(memory)}"
        if files is not None and fds is not None and fds >= self.limits.fd_pause * files:
            return f"{fds} open files are {fds / files:.0%} of fd_limit {files}"
        return None

    def worker_pause(self, worker: str) -> str | None:
        limited = self.limits.memory_limit is not None or self.limits.fd_limit is not None
        row = self._row(worker)
        if row is None or row.get("rss") is None:  # not measured yet (it is starting)
            return "not measured yet" if limited else None
        return self.pause(row.get("rss"), row.get("fds"))

    def worker_action(self, worker: str, busy: bool) -> tuple[str, str] | None:
        """``("kill" | "recycle", reason)`` for a worker that must go, else ``None``."""
        row = self._row(worker)
        limit = self.limits.memory_limit
        if row is None or not (busy or row["done"]):
            return None  # a fresh worker already over a limit: a new one would be no better
        rss = row.get("rss")
        if limit is not None and rss is not None and rss > limit:
            reason = f"memory_limit: memory {size(rss)} is over {size(limit)}"
            return ("kill" if rss > KILL_FACTOR * limit else "recycle"), reason
        paused = self.pause(rss, row.get("fds"))
        if paused is None or busy:
            self._idle_paused_since.pop(worker, None)
            return None
        since = self._idle_paused_since.setdefault(worker, time.monotonic())
        if time.monotonic() - since > IDLE_GRACE:
            del self._idle_paused_since[worker]
            return "recycle", f"idle and still paused: {paused}"
        return None

    def blocked(self, reasons: list[str], work_waiting: bool) -> None:
        """Note whether waiting work can go nowhere; warn once it has been so a while."""
        if not (reasons and work_waiting):
            self._blocked_since = None
            self.stalled = None
            return
        if self._blocked_since is None:
            self._blocked_since = time.monotonic()
        elif self.stalled is None and time.monotonic() - self._blocked_since > STALL_SECONDS:
            self.stalled = "no worker can take work: " + "; ".join(reasons)
            warnings.warn(f"cellpool: {self.stalled}", RuntimeWarning, stacklevel=1)

    def note(self) -> str | None:
        """What the view's machine line should say about dispatch, if anything."""
        paused = self.machine_pause()
        if paused is not None:
            return f"dispatch paused: {paused}"
        return self.stalled
