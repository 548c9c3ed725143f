"""What users see while work runs: a widget in a notebook, a text line in a terminal.

A view has ``refresh`` (seconds between updates), ``update(final=False)`` (called by the
job's view thread), ``finish()`` (leave a summary) and ``events()`` (a context manager
giving a function that lets UI events through while a cell blocks).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .figures import figures_of, summary_line
from .kernel import current_kernel, no_events
from .text import TextProgress, is_terminal, prompt_is_interactive
from .workers import WorkerBoard

if TYPE_CHECKING:
    from ..dispatch import Run
    from ..monitor import Monitor
    from ..results import Results

PROGRESS_MODES = ("auto", "widget", "text", "none")
__all__ = [
    "PROGRESS_MODES",
    "View",
    "ViewSource",
    "WorkerBoard",
    "make_view",
    "no_events",
    "normalize_progress",
    "run_view",
]


class View(Protocol):
    refresh: float

    def update(self, final: bool = False) -> None: ...

    def finish(self) -> None: ...

    def events(self) -> contextlib.AbstractContextManager[Callable[[], None]]: ...


def normalize_progress(progress: str | bool | None) -> str:
    """``True``/``False`` mean ``"auto"``/``"none"``; anything unknown is a ``ValueError``."""
    if progress is True:
        return "auto"
    if progress is False or progress is None:
        return "none"
    if progress not in PROGRESS_MODES:
        raise ValueError(f"progress must be one of {PROGRESS_MODES}; got {progress!r}")
    return progress


@dataclass(frozen=True)
class ViewSource:
    """What a run's view reads and may do: the run, its label, the executor's monitor,
    why dispatch is held (``note``), how to cancel, the board of its workers, the
    ``Results`` once the run has ended, and dask's dashboard link."""

    run: Run
    label: str
    monitor: Monitor
    note: Callable[[], str | None]
    cancel: Callable[[], Any]
    board: WorkerBoard
    results: Callable[[], Results]
    dashboard: str | None = None


def make_view(
    progress: str,
    background: bool,
    widget: Callable[[], View],
    line: Callable[[], str],
) -> View | None:
    """The view ``progress`` asks for here, or ``None`` for no display: ``widget()``,
    or a text line redrawn from ``line()``.

    ``"auto"`` is the widget inside a kernel, the text line when stderr is a terminal,
    and nothing otherwise. The text line of a background job started at an interactive
    prompt is not redrawn over the prompt: it appears once, when the job ends.
    """
    if progress == "auto":
        if current_kernel() is not None:
            progress = "widget"
        elif sys.stderr is not None and sys.stderr.isatty():
            progress = "text"
        else:
            return None
    if progress == "widget":
        return widget()
    if progress == "text":
        stream = sys.stderr
        quiet = background and is_terminal(stream) and prompt_is_interactive()
        return TextProgress(line, stream, quiet)
    return None


def run_view(progress: str, source: ViewSource, background: bool) -> View | None:
    """The view of one run (see ``make_view``)."""

    def widget() -> View:
        from .widget import WidgetProgress  # ipywidgets: only where a widget is shown

        return WidgetProgress(source, background)

    return make_view(
        progress, background, widget, lambda: summary_line(source.label, figures_of(source.run))
    )
