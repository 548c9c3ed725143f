"""HTML for the live view and the static summary left after a run.

Colours come from JupyterLab's theme variables (with plain fallbacks elsewhere), so
the view reads well in the light and the dark theme alike.
"""

from __future__ import annotations

import html
from typing import Any

from ..monitor import Machine
from .figures import Figures, clock, size
from .workers import Compact

_STATE_COLOURS = {
    "busy": "var(--jp-success-color1, #388e3c)",
    "idle": "var(--jp-ui-font-color2, #757575)",
    "paused": "var(--jp-warn-color1, #f57c00)",
    "recycling": "var(--jp-warn-color1, #f57c00)",
    "dead": "var(--jp-error-color1, #d32f2f)",
    "abandoned": "var(--jp-error-color1, #d32f2f)",
    "retired": "var(--jp-ui-font-color2, #757575)",
}
_TABLE = (
    "border-collapse:collapse;font-size:var(--jp-ui-font-size1, 12px);"
    "font-variant-numeric:tabular-nums;color:var(--jp-ui-font-color1, inherit);"
    "margin:2px 0;table-layout:auto"
)
# The same fixed line box live and in the saved summary, whatever the page's own table
# styles: rows never change height when the run ends, and long text never wraps.
_CELL = (
    "padding:0 8px;height:18px;line-height:18px;white-space:nowrap;overflow:hidden;"
    "text-overflow:ellipsis;max-width:24em;border:none;"
    "border-bottom:1px solid var(--jp-border-color2, #ddd);text-align:{align}"
)
_LINE = "line-height:18px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis"
_MUTED = "color:var(--jp-ui-font-color2, #757575)"
_COLUMNS = (
    ("worker", "left"),
    ("pid", "right"),
    ("state", "left"),
    ("task", "right"),
    ("for", "right"),
    ("done", "right"),
    ("errors", "right"),
    ("CPU", "right"),
    ("memory", "right"),
    ("fds", "right"),
    ("threads", "right"),
)


def status_html(label: str, figures: Figures) -> str:
    """The run's figures on one line: finished tasks only, cancelled ones apart."""
    parts = [
        f"<b>{html.escape(label)}</b>",
        figures.count + " done",
        f"{figures.failed:,} errors",
        *([f"{figures.cancelled:,} cancelled"] if figures.cancelled else []),
        *([f"{figures.restored:,} restored from journal"] if figures.restored else []),
        f"{figures.rate:,.1f} tasks/s",
        f"elapsed {clock(figures.elapsed)}",
    ]
    if figures.eta is not None:
        parts.append(f"ETA {clock(figures.eta)}")
    return f'<div class="cellpool-status" style="{_LINE}">' + " &middot; ".join(parts) + "</div>"


def _state_html(worker: dict[str, Any]) -> str:
    """The state, coloured, with its reason as visible text."""
    state = worker["state"]
    colour = _STATE_COLOURS.get(state, "inherit")
    reason = worker.get("reason")
    text = html.escape(f"{state}: {reason}" if reason else state)
    title = f' title="{html.escape(reason)}"' if reason else ""
    return f'<span style="color:{colour}"{title}>{text}</span>'


def _row(worker: dict[str, Any]) -> str:
    seconds = worker.get("task_seconds")
    cpu = worker.get("cpu_percent")
    cpu_text = "-" if cpu is None else f"{cpu:.0f}%"
    if worker.get("native_id") is not None and worker.get("cpu_seconds") is not None:
        cpu_text += f" ({worker['cpu_seconds']:.1f} s)"  # a thread: its own CPU time
    cells = [
        html.escape(str(worker["worker"])),
        "-" if worker.get("pid") is None else str(worker["pid"]),
        _state_html(worker),
        "-" if worker["task"] is None else str(worker["task"]),
        "-" if seconds is None else f"{seconds:.1f} s",
        f"{worker['done']:,}",
        f"{worker['errors']:,}",
        cpu_text,
        size(worker.get("rss")),
        "-" if worker.get("fds") is None else str(worker["fds"]),
        "-" if worker.get("threads") is None else str(worker["threads"]),
    ]
    return (
        "<tr>"
        + "".join(
            f'<td style="{_CELL.format(align=align)}">{cell}</td>'
            for cell, (_name, align) in zip(cells, _COLUMNS, strict=True)
        )
        + "</tr>"
    )


def workers_html(rows: list[dict[str, Any]]) -> str:
    """A table of the given worker rows (empty when there are none)."""
    if not rows:
        return ""
    head = "".join(
        f'<th style="{_CELL.format(align=align)}">{name}</th>' for name, align in _COLUMNS
    )
    body = "".join(_row(worker) for worker in rows)
    return f'<table class="cellpool-workers" style="{_TABLE}"><tr>{head}</tr>{body}</table>'


def states_text(view: Compact) -> str:
    """``"32 workers: 30 busy · 1 paused (memory 83% of 300 MiB) · 1 dead"``."""
    total = sum(view.counts.values())
    parts = []
    for state, count in view.counts.items():
        reason = view.reasons.get(state)
        shown = reason if reason and state in ("paused", "recycling") else None
        parts.append(f"{count} {state}" + (f" ({shown})" if shown else ""))
    noun = "worker" if total == 1 else "workers"
    return f"{total} {noun}: " + " · ".join(parts) if parts else "no workers yet"


def machine_text(machine: Machine) -> str:
    cpu = "-" if machine.cpu_percent is None else f"{machine.cpu_percent:.0f}%"
    return (
        f"machine CPU {cpu}, {size(machine.memory_available)} free of {size(machine.memory_total)}"
    )


def workers_line_html(view: Compact, machine: Machine, dashboard: str | None = None) -> str:
    """The workers' states and the machine on one line, and dask's dashboard link."""
    parts = [html.escape(states_text(view)), html.escape(machine_text(machine))]
    if dashboard:
        link = html.escape(dashboard, quote=True)
        parts.append(
            f'<a href="{link}" target="_blank" style="text-decoration:underline">dashboard</a>'
        )
    return (
        f'<div class="cellpool-workers-line" style="{_LINE};{_MUTED}">'
        + " &middot; ".join(parts)
        + "</div>"
    )


def note_html(note: str | None) -> str:
    """Why dispatch is held, if it is."""
    if not note:
        return ""
    return (
        f'<div class="cellpool-note" style="{_LINE};color:var(--jp-warn-color1, #f57c00)">'
        f"{html.escape(note)}</div>"
    )


def hidden_html(view: Compact, toggle: str | None) -> str:
    """While the run is live: how many workers have no row of their own, and how to
    see them (``toggle``)."""
    if not view.hidden or not toggle:
        return ""
    return (
        f'<div class="cellpool-hidden" style="{_LINE};{_MUTED}">'
        f"{view.hidden:,} more workers not listed ({html.escape(toggle)})</div>"
    )


def live_html(
    label: str,
    figures: Figures,
    view: Compact,
    machine: Machine,
    note: str | None = None,
    dashboard: str | None = None,
    toggle: str | None = None,
) -> str:
    """Everything but the progress bar: the status line, the workers' states and the
    machine, why dispatch is held, and the rows worth a look."""
    return (
        status_html(label, figures)
        + workers_line_html(view, machine, dashboard)
        + note_html(note)
        + workers_html(view.rows)
        + hidden_html(view, toggle)
    )
