"""Which workers a run's view shows, for 2 workers or 200.

The pools' rows (``workers_info``) are lifetime figures of the workers alive now. A view
wants the run's own figures and every worker the run used, so ``WorkerBoard`` takes
each worker's counts from the run (``Run.by_worker``) and keeps a row for a worker that
has gone (dead, or retired after its task limit), so the rows add up to the run's. From those
rows, ``compact`` picks what fits in a few lines: one row per process for thread
workers, a count per state, and the handful of rows worth a look.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

NOTEWORTHY_ROWS = 5  # at most this many rows under the summary, unless all are asked for

# How much a state asks for a look, most first; busy rows are ordered by how long their
# task has run, so the stuck ones come first.
_STATE_RANK = {"dead": 0, "abandoned": 1, "paused": 2, "recycling": 3, "retired": 4, "gone": 5}
_ORDER = ("busy", "starting", "idle", "paused", "recycling", "abandoned", "retired", "dead", "gone")
_PROCESS_FIGURES = ("rss", "fds", "threads")  # a thread row repeats its process's


class WorkerBoard:
    """The rows of one run's view: the run's own counts, and gone workers kept.

    Owned by the thread that updates the view; the cell's thread uses it only once
    that thread has ended.
    """

    def __init__(
        self,
        tally: Callable[[], dict[str, list[int]]],
        departures: Callable[[], dict[str, tuple[str, str]]],
    ) -> None:
        self._tally = tally  # worker -> [finished, failed] in this run (Run.by_worker)
        self._departures = departures  # worker -> (state, reason) as it left
        self._seen: dict[str, dict[str, Any]] = {}  # worker -> its last row in this run
        self._paused: dict[str, tuple[float, str]] = {}  # worker -> since (epoch), reason
        self._pauses: list[tuple[str, float, float, str]] = []  # ended pauses

    def rows(self, sampled: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``sampled`` with the run's own done and errors, plus the workers the run
        used that have gone since."""
        tally, departures = self._tally(), self._departures()
        current: dict[str, dict[str, Any]] = {}
        for row in sampled:
            done, errors = tally.get(row["worker"], (0, 0))
            current[row["worker"]] = {**row, "done": done, "errors": errors}
        for worker, (done, errors) in tally.items():
            if worker not in current:
                last = self._seen.get(worker) or _unseen(worker)
                gone = _gone(last, departures.get(worker))
                current[worker] = {**gone, "done": done, "errors": errors}
        self._note_pauses(current)
        self._seen = current
        return list(current.values())

    def _note_pauses(self, rows: dict[str, dict[str, Any]]) -> None:
        now = time.time()  # the timeline's clock: records' times are epoch seconds
        for worker, row in rows.items():
            if row["state"] == "paused" and worker not in self._paused:
                self._paused[worker] = (now, row.get("reason") or "paused")
            elif row["state"] != "paused" and worker in self._paused:
                since, reason = self._paused.pop(worker)
                self._pauses.append((worker, since, now, reason))

    def pauses(self) -> list[tuple[str, float, float | None, str]]:
        """The pauses seen, as ``(worker, start, end, reason)``; ``end`` is ``None`` for
        a pause still going on."""
        going_on = [(worker, since, None, why) for worker, (since, why) in self._paused.items()]
        return [*self._pauses, *going_on]


def _unseen(worker: str) -> dict[str, Any]:
    """A worker that did work in this run and left before the view saw it."""
    return {"worker": worker, "pid": None, "state": "gone", "task": None, "reason": None}


def _gone(last: dict[str, Any], departure: tuple[str, str] | None) -> dict[str, Any]:
    """The row left by a worker no longer in the pool: how it left, if the dispatcher
    has said, else as last seen."""
    if departure is not None:
        state, reason = departure
    elif last["state"] in ("dead", "retired", "gone"):
        return last
    else:
        state, reason = "gone", None
    return {
        **last,
        "state": state,
        "reason": reason,
        "task": None,
        "task_seconds": None,
        "cpu_percent": None,
    }


@dataclass
class Compact:
    """What the view shows of the workers: ``counts`` per state, the first ``reasons``
    given for each state that has one, the ``rows`` to list, and how many workers are
    not listed on a row of their own (``hidden``)."""

    counts: dict[str, int]
    reasons: dict[str, str]
    rows: list[dict[str, Any]]
    hidden: int


def compact(rows: list[dict[str, Any]], show_all: bool = False) -> Compact:
    """The per-state summary and the rows worth a look (every row with ``show_all``).

    Thread workers of one process become one process row summing their work; their own
    rows appear only when worth a look (stuck, abandoned, paused).
    """
    counts = Counter(row["state"] for row in rows)
    reasons: dict[str, str] = {}
    for row in rows:
        if row.get("reason") and row["state"] not in reasons:
            reasons[row["state"]] = row["reason"]
    ordered = {state: counts[state] for state in _ORDER if counts[state]}
    ordered.update({state: n for state, n in counts.items() if state not in ordered})
    threads = [row for row in rows if row.get("native_id") is not None]
    processes = _process_rows(threads)
    others = [row for row in rows if row.get("native_id") is None]
    everyone = others + [_thread_row(row) for row in threads]
    if show_all or len(everyone) <= NOTEWORTHY_ROWS:
        picked = everyone  # few enough to list them all, in the pool's order
    else:
        candidates = others + [_thread_row(row) for row in threads if _worth_a_look(row)]
        picked = sorted(candidates, key=_interest)[: max(0, NOTEWORTHY_ROWS - len(processes))]
    return Compact(ordered, reasons, processes + picked, len(rows) - len(picked))


def _worth_a_look(row: dict[str, Any]) -> bool:
    return row["state"] in _STATE_RANK or row.get("task_seconds") is not None


def _interest(row: dict[str, Any]) -> tuple[int, float, float, float]:
    """Sort key: troubled states first, then the longest-running task, then memory and
    CPU."""
    return (
        _STATE_RANK.get(row["state"], len(_STATE_RANK)),
        -(row.get("task_seconds") or 0.0),
        -(row.get("rss") or 0),
        -(row.get("cpu_percent") or 0.0),
    )


def _thread_row(row: dict[str, Any]) -> dict[str, Any]:
    """A thread's own row: its process's memory, fds and threads are on the process row."""
    return {**row, **dict.fromkeys(_PROCESS_FIGURES)}


def _process_rows(threads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per process of thread workers: its threads' states counted, their work
    summed, the longest-running task shown, and the process's own memory and fds."""
    by_pid: dict[Any, list[dict[str, Any]]] = {}
    for row in threads:
        by_pid.setdefault(row["pid"], []).append(row)
    rows = []
    for pid, members in by_pid.items():
        states = Counter(row["state"] for row in members)
        longest = max(members, key=lambda row: row.get("task_seconds") or -1.0)
        cpu = [row["cpu_percent"] for row in members if row.get("cpu_percent") is not None]
        first = members[0]
        rows.append(
            {
                "worker": f"{len(members)} threads",
                "pid": pid,
                "state": " · ".join(
                    f"{states[state]} {state}" for state in _ORDER if states[state]
                ),
                "task": longest["task"],
                "task_seconds": longest.get("task_seconds"),
                "done": sum(row["done"] for row in members),
                "errors": sum(row["errors"] for row in members),
                "cpu_percent": sum(cpu) if cpu else None,
                "cpu_seconds": None,
                "native_id": None,
                "reason": None,
                **{name: first.get(name) for name in _PROCESS_FIGURES},
            }
        )
    return rows
