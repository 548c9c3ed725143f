"""The notebook view: a progress bar with Cancel and "all workers" buttons, a line of
totals, the workers' states and the machine, and the few worker rows worth a look.

A thread updates it (``update``) at most ``REFRESH`` apart: two comm messages each time
at most (the bar, the HTML), so however fast tasks finish the kernel sends no more than
ten a second. The view keeps the same few lines for 2 workers or 200 (see
``view.workers``). When the run ends, ``finish`` leaves a static HTML summary in the
output, which a saved notebook keeps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets
from IPython.display import display

from ..results import Results
from .figures import figures_of, summary_line
from .html import live_html
from .kernel import (
    keep_busy_until_the_cell_ends,
    no_events,
    pumped_events,
    route_to_subshell,
)
from .timeline import Timeline, timeline
from .workers import compact

if TYPE_CHECKING:
    from . import ViewSource

REFRESH = 0.2


def bar_and_cancel(
    total: int | None, cancel: Callable[[], Any], tooltip: str
) -> tuple[widgets.IntProgress, widgets.Button]:
    """A progress bar up to ``total`` and a Cancel button that calls ``cancel``."""
    bar = widgets.IntProgress(value=0, min=0, max=max(total or 1, 1))
    bar.bar_style = "info"
    button = widgets.Button(description="Cancel", icon="stop", tooltip=tooltip)
    button.on_click(lambda _button: cancel())
    return bar, button


class LiveView(widgets.VBox):
    """The widget itself; its text form stays the same while it changes, so a saved
    notebook's plain-text output does not depend on when it was saved."""

    def __init__(self, label: str, children: list[widgets.Widget]) -> None:
        super().__init__(children)
        self._label = label

    def __repr__(self) -> str:
        return f"cellpool live view: {self._label}"


class Summary:
    """What is left in the output when a run has ended."""

    def __init__(self, text: str, html: str) -> None:
        self._text = text
        self._html = html

    def __repr__(self) -> str:
        return self._text

    def _repr_html_(self) -> str:
        return f'<div class="cellpool-summary">{self._html}</div>'


class WidgetProgress:
    """The live view of one run in a notebook."""

    refresh = REFRESH

    def __init__(self, source: ViewSource, background: bool) -> None:
        # The first widget of a kernel has JupyterLab ask for a subshell, whose idle
        # would make the kernel look idle while the cell runs (see view.kernel).
        keep_busy_until_the_cell_ends()
        run = self._run = source.run
        self._label = source.label
        self._monitor = source.monitor
        self._note = source.note
        self._board = source.board
        self._results = source.results
        self._dashboard = source.dashboard
        self._bar, self._button = bar_and_cancel(
            run.total,
            source.cancel,
            "Cancel: pending tasks are dropped, running process tasks killed",
        )
        self._all = widgets.ToggleButton(
            description="All workers",
            tooltip="List every worker, not only the few worth a look",
            layout=widgets.Layout(display="none"),  # shown once some worker is not listed
        )
        self._live_without_pumping = route_to_subshell(self._button)
        if self._live_without_pumping:
            route_to_subshell(self._all)
        self._html = widgets.HTML()
        row = widgets.HBox([self._bar, self._button, self._all])
        self.widget = LiveView(self._label, [row, self._html])
        display(self.widget)
        # A background job ends after its cell: its summary and picture go where the cell
        # left room for them.
        self._summary = self._picture = None
        if background:
            self._summary = display(Summary(self._label, ""), display_id=True)
            self._picture = display(Summary("", ""), display_id=True)

    def _html_now(self, sample: Any, show_all: bool, live: bool) -> tuple[str, int]:
        """The view's HTML from ``sample``, and how many workers it leaves unlisted.
        Called by the view's thread, or by the cell's once that thread has ended: the
        board has one user at a time."""
        figures = figures_of(self._run)
        workers = compact(self._board.rows(sample.workers), show_all)
        toggle = 'press "All workers" to list them' if live and not show_all else None
        text = live_html(
            self._label, figures, workers, sample.machine, self._note(), self._dashboard, toggle
        )
        return text, workers.hidden

    def update(self, final: bool = False) -> None:
        run = self._run
        figures = figures_of(run)
        with self._bar.hold_sync():
            self._bar.max = max(figures.work or run.done + run.in_flight, 1)
            self._bar.value = figures.done
            if final:
                self._bar.bar_style = (
                    "danger"
                    if run.cancelled or figures.cancelled
                    else "warning"
                    if figures.failed
                    else "success"
                )
        if final:
            # The lines move to the static summary: the widget keeps its bar.
            html, hidden = "", 0
            self._button.disabled = True
        else:
            # the button's value is read here, by this thread: its click handler (on
            # the kernel's thread) never touches the view's state
            html, hidden = self._html_now(self._monitor.latest, self._all.value, live=True)
        if html != self._html.value:
            self._html.value = html
        shown = "inline-flex" if (hidden or self._all.value) and not final else "none"
        if self._all.layout.display != shown:
            self._all.layout.display = shown

    def _summary_now(self) -> Summary:
        """The run's figures and the workers as they are now."""
        html, _hidden = self._html_now(self._monitor.sample(), show_all=False, live=False)
        return Summary(summary_line(self._label, figures_of(self._run)), html)

    def _timeline(self) -> Timeline:
        """The run's picture, with the pauses the view saw."""
        try:
            results = self._results()
        except BaseException as error:  # the input raised: its records so far
            results = getattr(error, "results", None) or Results()
        return timeline(results, self._board.pauses())

    def finish(self) -> None:
        """Leave the static summary and the run's timeline."""
        summary, picture = self._summary_now(), self._timeline()
        if self._summary is not None and self._picture is not None:
            self._summary.update(summary)
            self._picture.update(picture)
        else:
            display(summary)
            display(picture)

    def events(self) -> contextlib.AbstractContextManager[Callable[[], None]]:
        """While a cell blocks on the run, the Cancel click must get through (see
        ``view.kernel``): on a subshell it does by itself, else the wait pumps events."""
        return no_events() if self._live_without_pumping else pumped_events()
