"""The terminal view: one line on stderr, redrawn in place."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

from .figures import figures_of, summary_line
from .kernel import no_events

if TYPE_CHECKING:
    from ..dispatch import Run

REFRESH = 0.1  # seconds between redraws: at most ten a second


class TextProgress:
    """Redraws the run's summary line on ``stream``."""

    refresh = REFRESH

    def __init__(self, run: Run, label: str, stream: TextIO) -> None:
        self._run = run
        self._label = label
        self._stream = stream
        self._width = 0

    def update(self, final: bool = False) -> None:
        line = summary_line(self._label, figures_of(self._run))
        self._stream.write("\r" + line.ljust(self._width) + ("\n" if final else ""))
        self._stream.flush()
        self._width = len(line)

    def finish(self) -> None:
        """Nothing more to show: the last line stays."""

    def events(self) -> contextlib.AbstractContextManager[Callable[[], None]]:
        return no_events()
