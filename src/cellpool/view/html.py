"""HTML for the live view and the static summary left after a run.

Colours come from JupyterLab's theme variables (with plain fallbacks elsewhere), so
the view reads well in the light and the dark theme alike.
"""

from __future__ import annotations

import html
from typing import Any

from ..monitor import Machine, Sample
from .figures import Figures, clock, size

_STATE_COLOURS = {
    "busy": "var(--jp-success-color1, #388e3c)",
    "idle": "var(--jp-ui-font-color2, #757575)",
    "paused": "var(--jp-warn-color1, #f57c00)",
    "recycling": "var(--jp-warn-color1, #f57c00)",
    "dead": "var(--jp-error-color1, #d32f2f)",
    "abandoned": "var(--jp-error-color1, #d32f2f)",
}
_TABLE = (
    "border-collapse:collapse;font-size:var(--jp-ui-font-size1, 12px);"
    "font-variant-numeric:tabular-nums;color:var(--jp-ui-font-color1, inherit)"
)
_CELL = "padding:1px 8px;text-align:right;border-bottom:1px solid var(--jp-border-color2, #ddd)"
_COLUMNS = (
    "worker",
    "pid",
    "state",
    "task",
    "for",
    "done",
    "errors",
    "CPU",
    "memory",
    "fds",
    "threads",
)


def status_html(label: str, figures: Figures) -> str:
    """The run's figures on one line."""
    parts = [
        f"<b>{html.escape(label)}</b>",
        figures.count + " done",
        f"{figures.failed:,} errors",
        *([f"{figures.cancelled:,} cancelled"] if figures.cancelled else []),
        f"{figures.rate:,.1f} tasks/s",
        f"elapsed {clock(figures.elapsed)}",
    ]
    if figures.eta is not None:
        parts.append(f"ETA {clock(figures.eta)}")
    return '<div class="cellpool-status">' + " &middot; ".join(parts) + "</div>"


def _row(worker: dict[str, Any]) -> str:
    state = worker["state"]
    colour = _STATE_COLOURS.get(state, "inherit")
    seconds = worker.get("task_seconds")
    cpu = worker.get("cpu_percent")
    cpu_text = "-" if cpu is None else f"{cpu:.0f}%"
    if worker.get("native_id") is not None and worker.get("cpu_seconds") is not None:
        cpu_text += f" ({worker['cpu_seconds']:.1f} s)"  # a thread: its own CPU time
    cells = [
        html.escape(str(worker["worker"])),
        str(worker["pid"]),
        f'<span style="color:{colour}" title="{html.escape(worker.get("reason") or "")}">'
        f"{state}</span>",
        "-" if worker["task"] is None else str(worker["task"]),
        "-" if seconds is None else f"{seconds:.1f} s",
        f"{worker['done']:,}",
        f"{worker['errors']:,}",
        cpu_text,
        size(worker.get("rss")),
        "-" if worker.get("fds") is None else str(worker["fds"]),
        "-" if worker.get("threads") is None else str(worker["threads"]),
    ]
    return "<tr>" + "".join(f'<td style="{_CELL}">{cell}</td>' for cell in cells) + "</tr>"


def workers_html(workers: list[dict[str, Any]]) -> str:
    """A table with one row per worker."""
    head = "".join(f'<th style="{_CELL}">{name}</th>' for name in _COLUMNS)
    rows = "".join(_row(worker) for worker in workers)
    return f'<table class="cellpool-workers" style="{_TABLE}"><tr>{head}</tr>{rows}</table>'


def machine_html(machine: Machine, note: str | None = None) -> str:
    """The machine's CPU and memory on one line, and why dispatch is held, if it is."""
    line = (
        '<div class="cellpool-machine" style="color:var(--jp-ui-font-color2, #757575)">'
        f"machine: CPU {machine.cpu_percent:.0f}% &middot; memory "
        f"{size(machine.memory_available)} available of {size(machine.memory_total)}</div>"
    )
    if note:
        line += (
            '<div class="cellpool-note" style="color:var(--jp-warn-color1, #f57c00)">'
            f"{html.escape(note)}</div>"
        )
    return line


def live_html(label: str, figures: Figures, sample: Sample, note: str | None = None) -> str:
    """Everything but the progress bar: status line, worker table, machine line."""
    return (
        status_html(label, figures)
        + workers_html(sample.workers)
        + machine_html(sample.machine, note)
    )
