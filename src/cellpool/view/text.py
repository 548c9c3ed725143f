"""The terminal view: one line on stderr, redrawn in place."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from ..dispatch import Run


def clock(seconds: float) -> str:
    """``75`` -> ``"1:15"``, ``3725`` -> ``"1:02:05"``."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_line(run: Run, label: str, final: bool = False) -> str:
    """done/total, errors, rate, elapsed and ETA of ``run`` in one line."""
    done, total = run.done, run.total
    elapsed = time.monotonic() - run.created
    rate = done / elapsed if elapsed > 0 else 0.0
    count = f"{done:,}/{total:,} ({100 * done / total:.0f}%)" if total else f"{done:,}"
    parts = [f"{label} {count}", f"{run.failed:,} errors", f"{rate:,.1f}/s", clock(elapsed)]
    if total and not final and rate > 0:
        parts.append(f"eta {clock((total - done) / rate)}")
    return " | ".join(parts)


class TextProgress:
    """Redraws ``progress_line`` on ``stream``; the caller paces the updates."""

    def __init__(self, run: Run, label: str, stream: TextIO) -> None:
        self._run = run
        self._label = label
        self._stream = stream
        self._width = 0

    def update(self, final: bool = False) -> None:
        line = progress_line(self._run, self._label, final)
        self._stream.write("\r" + line.ljust(self._width) + ("\n" if final else ""))
        self._stream.flush()
        self._width = len(line)
