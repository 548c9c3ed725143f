"""The view of a pipeline: one bar for the whole, and per stage a bar, its figures and
its workers' states on one line, with the values waiting between stages, so the stage
that holds the rest back shows. The summary left at the end names it.

The bottleneck is the stage whose workers were busiest: the seconds its tasks ran over
the seconds its worker slots existed. Stages before it wait for room in the handoff
(their values pile up to the buffer), stages after it wait for input.
"""

from __future__ import annotations

import contextlib
import html
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .figures import clock, figures_of, summary_line
from .html import machine_text, note_html, states_text, status_html
from .kernel import keep_busy_until_the_cell_ends, no_events, pumped_events, route_to_subshell
from .workers import WorkerBoard, compact

if TYPE_CHECKING:
    from ..executor import Executor
    from ..flow import Flow
    from ..monitor import Monitor
    from ..runs import Run

_LINE = "line-height:18px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis"
_MUTED = "color:var(--jp-ui-font-color2, #757575)"


@dataclass(frozen=True)
class StageSource:
    """What the view reads of one stage: its run, its executor's monitor, the board of
    its workers, why its dispatch is held, and its worker slots."""

    name: str
    label: str
    run: Run
    monitor: Monitor
    board: WorkerBoard
    note: Callable[[], str | None]
    slots: int


@dataclass(frozen=True)
class PipelineSource:
    """What a pipeline's view reads and may do."""

    flow: Flow
    label: str
    stages: list[StageSource]
    cancel: Callable[[], Any]


def pipeline_source(
    flow: Flow, executors: list[Executor], label: str, cancel: Callable[[], Any]
) -> PipelineSource:
    stages = []
    for name, run, executor in zip(flow.names, flow.runs, executors, strict=True):
        dispatcher = executor._dispatcher
        board = WorkerBoard(lambda run=run: dict(run.by_worker), lambda d=dispatcher: d.departures)
        slots = executor.workers * executor.threads_per_worker
        if run.is_async:
            slots *= executor.concurrency
        stages.append(
            StageSource(
                name,
                f"{name} [{executor.kind} x{executor.workers}]",
                run,
                executor._monitor,
                board,
                executor._admission.note,
                slots,
            )
        )
    return PipelineSource(flow, label, stages, cancel)


def busy_shares(source: PipelineSource) -> list[float]:
    """Per stage, the share of its worker slots' time spent running tasks so far."""
    elapsed = max(time.monotonic() - source.flow.created, 1e-9)
    return [
        min(1.0, busy / (stage.slots * elapsed))
        for busy, stage in zip(source.flow.busy_seconds(), source.stages, strict=True)
    ]


def bottleneck(source: PipelineSource) -> str | None:
    """The stage whose workers were busiest, or ``None`` before any task ran."""
    shares = busy_shares(source)
    if not any(shares):
        return None
    return source.stages[shares.index(max(shares))].name


def pipeline_line(source: PipelineSource) -> str:
    """The terminal line, most important first (``fit`` drops parts from the end):
    ``fetch -> parse 40/100 (40%) | 1 errors | fetch 52 > 12 > parse 40 | bottleneck:
    parse (97% busy) | 12.5/s | 0:03 | eta 0:05``."""
    flow = source.flow
    figures = figures_of(flow)
    parts = [f"{source.label} {figures.count}", f"{figures.failed:,} errors"]
    if figures.cancelled:
        parts.append(f"{figures.cancelled:,} cancelled")
    steps = []
    for position, stage in enumerate(source.stages):
        steps.append(f"{stage.name} {_finished(stage.run):,}")
        if position < len(flow.handoffs):
            steps.append(f"{len(flow.handoffs[position]):,}")
    parts.append(" > ".join(steps))
    shares = busy_shares(source)
    neck = bottleneck(source)
    if neck is not None:
        parts.append(f"bottleneck: {neck} ({max(shares):.0%} busy)")
    parts += [f"{figures.rate:,.1f}/s", clock(figures.elapsed)]
    if figures.eta is not None:
        parts.append(f"eta {clock(figures.eta)}")
    return " | ".join(parts)


def _finished(run: Run) -> int:
    return run.done - run.cancelled_tasks


class PipelineWidget:
    """The live view of a pipeline in a notebook (see ``view.widget`` for the pattern:
    a thread updates it, ``finish`` leaves a static summary)."""

    refresh = 0.2

    def __init__(self, source: PipelineSource, background: bool) -> None:
        import ipywidgets as widgets
        from IPython.display import display

        from .widget import LiveView, Summary, bar_and_cancel

        keep_busy_until_the_cell_ends()
        self._source = source
        total = source.flow.total
        self._bar, self._button = bar_and_cancel(
            total,
            source.cancel,
            "Cancel every stage: pending inputs dropped, running process tasks killed",
        )
        self._live_without_pumping = route_to_subshell(self._button)
        self._html = widgets.HTML()
        self._stage_bars = []
        self._stage_html = []
        rows: list[Any] = [widgets.HBox([self._bar, self._button]), self._html]
        for _stage in source.stages:
            bar = widgets.IntProgress(value=0, min=0, max=max(total or 1, 1))
            text = widgets.HTML()
            self._stage_bars.append(bar)
            self._stage_html.append(text)
            rows.append(widgets.HBox([bar, text]))
        self.widget = LiveView(source.label, rows)
        display(self.widget)
        self._summary = None
        if background:
            self._summary = display(Summary(source.label, ""), display_id=True)

    def update(self, final: bool = False) -> None:
        source, flow = self._source, self._source.flow
        figures = figures_of(flow)
        with self._bar.hold_sync():
            self._bar.value = figures.done
            if final:
                self._bar.bar_style = _style(flow.cancelled_tasks, figures.failed)
        shares = busy_shares(source)
        for position, stage in enumerate(source.stages):
            run, bar = stage.run, self._stage_bars[position]
            with bar.hold_sync():
                bar.value = _finished(run)
                if final:
                    bar.bar_style = _style(run.cancelled_tasks, run.failed)
            # at the end each bar keeps its stage's name; the figures move to the summary
            text = (
                f"<b>{html.escape(stage.label)}</b>"
                if final
                else self._stage_text(position, shares[position])
            )
            if text != self._stage_html[position].value:
                self._stage_html[position].value = text
        if final:
            self._button.disabled = True
        text = "" if final else self._status_html()
        if text != self._html.value:
            self._html.value = text

    def _status_html(self) -> str:
        """The pipeline's figures, the machine, and why a stage's dispatch is held."""
        source = self._source
        machine = source.stages[0].monitor.latest.machine
        return (
            status_html(source.label, figures_of(source.flow))
            + f'<div style="{_LINE};{_MUTED}">{html.escape(machine_text(machine))}</div>'
            + "".join(note_html(stage.note()) for stage in source.stages)
        )

    def _stage_text(self, position: int, share: float) -> str:
        """The stage's figures and its workers' states on one line, then the values
        waiting for the next stage."""
        source = self._source
        stage, flow = source.stages[position], source.flow
        run = stage.run
        states = compact(stage.board.rows(stage.monitor.latest.workers))
        parts = [
            f"<b>{html.escape(stage.label)}</b>",
            f"{_finished(run):,} done",
            f"{run.failed:,} errors",
            f"{share:.0%} busy",
            html.escape(states_text(states)),
        ]
        text = f'<div style="{_LINE}">' + " &middot; ".join(parts) + "</div>"
        if position < len(flow.handoffs):
            waiting = len(flow.handoffs[position])
            text += (
                f'<div style="{_LINE};{_MUTED}">&darr; {waiting:,} waiting for '
                f"{html.escape(flow.names[position + 1])}</div>"
            )
        return text

    def _summary_now(self) -> Any:
        from .widget import Summary

        source, flow = self._source, self._source.flow
        figures = figures_of(flow)
        shares = busy_shares(source)
        neck = bottleneck(source)
        lines = [status_html(source.label, figures)]
        for stage, share in zip(source.stages, shares, strict=True):
            run = stage.run
            lines.append(
                f'<div style="{_LINE}">{html.escape(stage.label)}: '
                f"{_finished(run):,} done, {run.failed:,} errors, {share:.0%} busy</div>"
            )
        if neck is not None:
            lines.append(
                f'<div style="{_LINE};{_MUTED}">bottleneck: <b>{html.escape(neck)}</b> '
                "(its workers were the busiest; the stages before it waited for room)</div>"
            )
        text = summary_line(source.label, figures) + (f" | bottleneck: {neck}" if neck else "")
        return Summary(text, "".join(lines))

    def finish(self) -> None:
        from IPython.display import display

        summary = self._summary_now()
        if self._summary is not None:
            self._summary.update(summary)
        else:
            display(summary)

    def events(self) -> contextlib.AbstractContextManager[Callable[[], None]]:
        return no_events() if self._live_without_pumping else pumped_events()


def _style(cancelled: int, failed: int) -> str:
    return "danger" if cancelled else "warning" if failed else "success"
