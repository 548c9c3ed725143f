"""The figures every view shows, computed once from a run's counters."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..dispatch import Run


@dataclass(frozen=True)
class Figures:
    """Where a run stands. ``done`` counts tasks that finished (ok or failed), never the
    cancelled ones, which are counted apart, nor the records ``restored`` from a
    journal, which are not this run's work; ``total`` is ``None`` when the input has no
    length."""

    done: int
    total: int | None
    failed: int
    cancelled: int
    elapsed: float
    ended: bool
    restored: int = 0

    @property
    def work(self) -> int | None:
        """The tasks this run has to do: the total less what the journal restored."""
        return None if self.total is None else self.total - self.restored

    @property
    def rate(self) -> float:
        """Finished tasks per second."""
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        if self.work is None or self.ended or self.rate <= 0:
            return None
        return max(0, self.work - self.done - self.cancelled) / self.rate

    @property
    def count(self) -> str:
        if self.work is None:
            return f"{self.done:,}"
        percent = 100 * self.done / self.work if self.work else 100
        return f"{self.done:,}/{self.work:,} ({percent:.0f}%)"


def figures_of(run: Run) -> Figures:
    ended = run.finished.is_set()
    cancelled = run.cancelled_tasks
    elapsed = time.monotonic() - run.created
    restored = getattr(run.settled, "restored", 0)
    unkeyed = getattr(run.settled, "failed", 0)  # inputs whose journal key failed
    done, failed = run.done - cancelled + unkeyed, run.failed + unkeyed
    return Figures(done, run.total, failed, cancelled, elapsed, ended, restored)


def clock(seconds: float) -> str:
    """``75`` -> ``"1:15"``, ``3725`` -> ``"1:02:05"``."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def size(n: float | None) -> str:
    """Bytes for people: ``"512 B"``, ``"1.5 MiB"``, ``"2.0 GiB"``."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def summary_line(label: str, figures: Figures) -> str:
    """One line: ``label: 40/40 (100%) done, 2 errors, 512.0/s, 0:03 (eta 0:10)``."""
    parts = [f"{label} {figures.count}", f"{figures.failed:,} errors"]
    if figures.cancelled:
        parts.append(f"{figures.cancelled:,} cancelled")
    if figures.restored:
        parts.append(f"{figures.restored:,} restored from journal")
    parts += [f"{figures.rate:,.1f}/s", clock(figures.elapsed)]
    if figures.eta is not None:
        parts.append(f"eta {clock(figures.eta)}")
    return " | ".join(parts)
