"""Task records: one ``TaskResult`` per input, held in a compact ``Results`` sequence.

A million records as separate objects cost about 300 MB; ``Results`` keeps them as
columns (arrays of numbers, lists of values) and builds each ``TaskResult`` when it is
read, so a run over a huge input stays small after it ends as well as while it runs.
"""

from __future__ import annotations

import dataclasses
import html
import math
import os
import pickle
import re
import sys
import sysconfig
import time
from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, overload

from .errors import RemoteError, RemoteTraceback, TaskCancelled, TaskTimeout, WorkerCrashed

if TYPE_CHECKING:
    from .view.timeline import Timeline

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

STATUSES = ("ok", "error", "timeout", "crashed", "cancelled")
_PLURALS = {"error": "errors", "timeout": "timeouts"}
_CODE = {status: code for code, status in enumerate(STATUSES)}
_UNFILLED = 255
_NAN = math.nan
_FAILURE_ROWS = 20


@dataclasses.dataclass(frozen=True, slots=True)
class TaskResult:
    """What happened to one input.

    ``status`` is one of ``"ok"``, ``"error"``, ``"timeout"``, ``"crashed"`` (the worker
    died) or ``"cancelled"``. ``value`` is set only when ok; ``error_type``, ``error`` and
    ``traceback`` only when not. Times are epoch seconds. ``restored`` marks a record
    taken from a journal (an earlier run's), not made by this run. In a pipeline's
    results, ``stage`` names the stage the record comes from: the one where the input
    failed or was cancelled, or the last one; ``worker``, ``pid`` and ``attempts`` are
    that stage's, and ``started``/``finished`` span the whole pipeline.
    """

    index: int
    item: Any
    status: str
    value: Any = None
    error_type: str | None = None
    error: str | None = None
    traceback: str | None = None
    worker: str | None = None
    pid: int | None = None
    attempts: int = 0
    started: float | None = None
    finished: float | None = None
    duration: float | None = None
    restored: bool = False
    stage: str | None = None


FIELDS = tuple(field.name for field in dataclasses.fields(TaskResult))


class Failure(NamedTuple):
    """Why a task did not succeed; ``exception`` is the live object when one exists here."""

    error_type: str | None
    error: str | None
    traceback: str | None = None
    exception: BaseException | None = None


_STATUS_EXCEPTIONS = {"timeout": TaskTimeout, "crashed": WorkerCrashed, "cancelled": TaskCancelled}


def exception_of(status: str, failure: Failure) -> BaseException:
    """The exception a failed record stands for: the task's own when it is here.

    One rebuilt from another process has the worker's traceback text as its
    ``__cause__`` (a ``RemoteTraceback``), as the standard library's process pool does.
    """
    exception = failure.exception
    if exception is not None:
        if exception.__traceback__ is None and failure.traceback and exception.__cause__ is None:
            exception.__cause__ = RemoteTraceback(failure.traceback)
        return exception
    if status in _STATUS_EXCEPTIONS:
        return _STATUS_EXCEPTIONS[status](failure.error)
    if failure.error_type in ("PicklingError", "UnpicklingError"):
        return getattr(pickle, failure.error_type)(failure.error)
    return RemoteError(failure.error_type, failure.error, failure.traceback)


_FRAME = re.compile(r'  File "(?P<file>.*)", line (?P<line>\d+), in (?P<function>.*)')
# Code that is not the user's: installed packages, the standard library, cellpool.
_LIBRARY_DIRS = tuple(
    {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    | {sysconfig.get_paths()[name] for name in ("stdlib", "platstdlib", "purelib", "platlib")}
)


def where_it_failed(traceback: str | None) -> str:
    """Where the user's code failed: the innermost frame of a formatted traceback that
    is not in an installed package, the standard library or cellpool (the innermost
    frame if all are), as ``file.py:12 in function``. A ``requests`` error raised by
    ``raise_for_status`` points at the user's line that called it."""
    if not traceback:
        return ""
    frames = [m for m in map(_FRAME.fullmatch, traceback.splitlines()) if m]
    if not frames:
        return ""
    own = [m for m in frames if not os.path.abspath(m["file"]).startswith(_LIBRARY_DIRS)]
    frame = (own or frames)[-1]
    return f"{_file_name(frame['file'])}:{frame['line']} in {frame['function']}"


def _file_name(path: str) -> str:
    """A notebook cell's code as IPython names it (``In[3]``), else the file's name."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    named = shell.compile.format_code_name(path) if shell is not None else None
    return named[1] if named else os.path.basename(path)


_TABLE = "border-collapse:collapse;font-variant-numeric:tabular-nums;table-layout:auto"
# One line per failure: long text is cut with an ellipsis (whole in the cell's tooltip),
# never wrapped, and text reads from the left.
_CELL = (
    "padding:0 8px;height:18px;line-height:18px;white-space:nowrap;overflow:hidden;"
    "text-overflow:ellipsis;max-width:32em;"
)
_FAILURE_COLUMNS = (
    ("index", "text-align:right"),
    ("item", "text-align:left"),
    ("status", "text-align:left"),
    ("error", "text-align:left"),
    ("where", "text-align:left"),
    ("worker", "text-align:left"),
    ("attempts", "text-align:right"),
)


def _status_at(record: TaskResult) -> str:
    """``"error"``, or in a pipeline's results ``"error in parse"``."""
    return record.status if record.stage is None else f"{record.status} in {record.stage}"


_NOWRAP_CODE = '<code style="white-space:nowrap">{}</code>'  # a notebook's code may wrap


def _plain(cell: str) -> str:
    """A cell's text without its markup (for the tooltip)."""
    return html.unescape(re.sub(r"<[^>]+>", "", cell))


def _doubles(times: Sequence[float]) -> array[float]:
    """``times`` as an array of doubles, copied only if they are not one already."""
    return times if isinstance(times, array) else array("d", times)


class Results(Sequence[TaskResult]):
    """The records of a run, one per input, in input order.

    A read-only sequence of ``TaskResult``: index it, slice it, iterate it, compare it
    with a list, or pass it to ``pandas.DataFrame``.
    """

    __slots__ = (
        "_attempts",
        "_clock",
        "_duration",
        "_failure",
        "_finished",
        "_index",
        "_item",
        "_restored",
        "_stage",
        "_stage_names",
        "_stages",
        "_started",
        "_status",
        "_value",
        "_worker",
        "_worker_codes",
        "_workers",
    )

    def __init__(self, records: Iterable[TaskResult] = ()) -> None:
        self._index: array[int] | None = None  # None while every index equals its position
        self._item: list[Any] = []
        self._status = bytearray()
        self._value: list[Any] = []
        self._failure: dict[int, Failure] = {}
        self._duration: dict[int, float | None] = {}  # given durations unlike finished - started
        self._restored: set[int] = set()  # positions of records taken from a journal
        # a pipeline's: per record, 1 + the position of its stage in _stage_names (0:
        # none); and each stage's own records (see the ``stages`` property)
        self._stage = bytearray()
        self._stage_names: tuple[str, ...] = ()
        self._stages: dict[str, Results] = {}
        self._worker = array("I")
        self._workers: list[tuple[str | None, int | None]] = [(None, None)]
        self._worker_codes: dict[tuple[str | None, int | None], int] = {(None, None): 0}
        self._attempts = array("I")
        # A run's times are kept on the time.monotonic() clock, as workers measure them,
        # and turned into epoch seconds (this offset added) only when read. Records
        # given here carry epoch seconds already.
        self._clock = time.time() - time.monotonic() if records == () else 0.0
        self._started = array("d")
        self._finished = array("d")
        for record in records:
            position = len(self._status)
            self._put_record(position, record.index, record.item, record)
            if record.duration != self._record(position).duration:
                self._duration[position] = record.duration
            if record.restored:
                self._restored.add(position)
            if record.stage is not None:
                self._set_stage(position, record.stage)

    # -- filling (the executor's side) ---------------------------------------------

    def _put_record(
        self, position: int, index: int, item: Any, record: Any, offset: float = 0.0
    ) -> None:
        """Write ``record`` (a ``TaskResult``, or a journal's ``StoredRecord``: its
        fields by name) at ``position``, its epoch times moved by ``offset``."""
        failure = None
        if record.status != "ok":
            failure = Failure(record.error_type, record.error, record.traceback)
        started, finished = record.started, record.finished
        self._put(
            position,
            index,
            item,
            record.status,
            record.value,
            failure,
            record.worker,
            record.pid,
            record.attempts,
            None if started is None else started + offset,
            None if finished is None else finished + offset,
        )

    def _put(
        self,
        position: int,
        index: int,
        item: Any,
        status: str,
        value: Any,
        failure: Failure | None,
        worker: str | None,
        pid: int | None,
        attempts: int,
        started: float | None,
        finished: float | None,
    ) -> None:
        if position >= len(self._status):
            self._grow(position + 1)
        code = self._worker_code(worker, pid)
        if self._index is None and index != position:
            self._index = array("q", range(len(self._status)))
        if self._index is not None:
            self._index[position] = index
        self._item[position] = item
        self._status[position] = _CODE[status]
        self._value[position] = value
        if failure is not None:
            self._failure[position] = failure
        self._worker[position] = code
        self._attempts[position] = attempts
        self._started[position] = _NAN if started is None else started
        self._finished[position] = _NAN if finished is None else finished

    def _put_many(
        self,
        indices: Sequence[int],
        items: list[Any],
        status: str,
        values: list[Any] | None,
        failure: Failure | None,
        attempts: int | list[int],
        started: Sequence[float] | None,
        finished: Sequence[float] | None,
        worker: str | None,
        pid: int | None,
    ) -> None:
        """Write records whose positions are their ``indices``, one status for all.

        ``values``, ``started`` and ``finished`` are per record or ``None`` for none;
        ``attempts`` is per record or one count for all. Consecutive indices are
        written with slice assignments, so a batch costs a few C-level copies.
        """
        count = len(items)
        if not (isinstance(indices, range) and indices.step == 1 and count):
            for k, index in enumerate(indices):
                self._put(
                    index,
                    index,
                    items[k],
                    status,
                    None if values is None else values[k],
                    failure,
                    worker,
                    pid,
                    attempts if isinstance(attempts, int) else attempts[k],
                    None if started is None else started[k],
                    None if finished is None else finished[k],
                )
            return
        lo, hi = indices.start, indices.stop
        if hi > len(self._status):
            self._grow(hi)
        no_times = array("d", [_NAN]) * count
        if self._index is not None:
            self._index[lo:hi] = array("q", indices)
        self._item[lo:hi] = items
        self._status[lo:hi] = bytes([_CODE[status]]) * count
        self._value[lo:hi] = [None] * count if values is None else values
        self._worker[lo:hi] = array("I", [self._worker_code(worker, pid)]) * count
        per_record = [attempts] * count if isinstance(attempts, int) else attempts
        self._attempts[lo:hi] = array("I", per_record)
        self._started[lo:hi] = no_times if started is None else _doubles(started)
        self._finished[lo:hi] = no_times if finished is None else _doubles(finished)
        if failure is not None:
            self._failure.update(dict.fromkeys(indices, failure))

    def _set_stage(self, position: int, stage: str) -> None:
        if stage not in self._stage_names:
            self._stage_names += (stage,)
        self._stage[position] = 1 + self._stage_names.index(stage)

    def _worker_code(self, worker: str | None, pid: int | None) -> int:
        key = (worker, pid)
        code = self._worker_codes.get(key)
        if code is None:
            code = self._worker_codes[key] = len(self._workers)
            self._workers.append(key)
        return code

    def _grow(self, size: int) -> None:
        extra = size - len(self._status)
        if self._index is not None:
            self._index.extend(range(len(self._status), size))
        self._item.extend([None] * extra)
        self._status.extend(bytes([_UNFILLED]) * extra)
        self._stage.extend(bytes(extra))
        self._value.extend([None] * extra)
        zeros = array("I", bytes(4 * extra))
        self._worker.extend(zeros)
        self._attempts.extend(zeros)
        self._started.extend(array("d", [_NAN]) * extra)
        self._finished.extend(array("d", [_NAN]) * extra)

    def _reserve(self, position: int) -> None:
        """Make room for ``position`` ahead of time, doubling: growing every column by
        one per record costs more than writing the record. ``_truncate`` ends it."""
        size = len(self._status)
        if position >= size:
            self._grow(max(position + 1, 2 * size, 1024))

    def _truncate(self, size: int) -> None:
        """Drop the positions from ``size`` on (room reserved and never written)."""
        for column in (self._item, self._status, self._stage, self._value, self._worker):
            del column[size:]
        for column in (self._attempts, self._started, self._finished):
            del column[size:]
        if self._index is not None:
            del self._index[size:]
        for positions in (self._failure, self._duration):
            for position in [p for p in positions if p >= size]:
                del positions[position]
        self._restored = {p for p in self._restored if p < size}

    def _copy(self) -> Results:
        """A copy of every column: C-level copies, quick enough to take under a lock."""
        out = Results()
        out._index = None if self._index is None else self._index[:]
        out._item = self._item[:]
        out._status = self._status[:]
        out._value = self._value[:]
        out._failure = dict(self._failure)
        out._duration = dict(self._duration)
        out._restored = set(self._restored)
        out._stage = self._stage[:]
        out._stage_names = self._stage_names
        out._stages = self._stages
        out._worker = self._worker[:]
        out._workers = self._workers[:]
        out._worker_codes = dict(self._worker_codes)
        out._attempts = self._attempts[:]
        out._clock = self._clock
        out._started = self._started[:]
        out._finished = self._finished[:]
        return out

    def _filled(self) -> Results:
        """The records written so far (a run in progress has gaps)."""
        status = self._status
        return self._select([p for p in range(len(status)) if status[p] != _UNFILLED])

    def _select(self, positions: Iterable[int]) -> Results:
        out = Results()
        out._clock = self._clock
        out._index = array("q")
        out._workers = list(self._workers)
        out._worker_codes = dict(self._worker_codes)
        out._stage_names = self._stage_names
        out._stages = self._stages
        for position in positions:
            out._index.append(self._index_at(position))
            out._item.append(self._item[position])
            out._status.append(self._status[position])
            out._stage.append(self._stage[position])
            out._value.append(self._value[position])
            failure = self._failure.get(position)
            if failure is not None:
                out._failure[len(out._status) - 1] = failure
            if position in self._duration:
                out._duration[len(out._status) - 1] = self._duration[position]
            if position in self._restored:
                out._restored.add(len(out._status) - 1)
            out._worker.append(self._worker[position])
            out._attempts.append(self._attempts[position])
            out._started.append(self._started[position])
            out._finished.append(self._finished[position])
        return out

    # -- reading -------------------------------------------------------------------

    def _index_at(self, position: int) -> int:
        return position if self._index is None else self._index[position]

    def _record(self, position: int) -> TaskResult:
        failure = self._failure.get(position)
        worker, pid = self._workers[self._worker[position]]
        started, finished = self._started[position], self._finished[position]
        timed = not (math.isnan(started) or math.isnan(finished))
        duration = finished - started if timed else None
        return TaskResult(
            index=self._index_at(position),
            item=self._item[position],
            status=STATUSES[self._status[position]],
            value=self._value[position],
            error_type=failure.error_type if failure else None,
            error=failure.error if failure else None,
            traceback=failure.traceback if failure else None,
            worker=worker,
            pid=pid,
            attempts=self._attempts[position],
            started=None if math.isnan(started) else started + self._clock,
            finished=None if math.isnan(finished) else finished + self._clock,
            duration=self._duration.get(position, duration),
            restored=position in self._restored,
            stage=self._stage_name(self._stage[position]),
        )

    def _stage_name(self, code: int) -> str | None:
        return self._stage_names[code - 1] if code else None

    def __len__(self) -> int:
        return len(self._status)

    @overload
    def __getitem__(self, key: int) -> TaskResult: ...
    @overload
    def __getitem__(self, key: slice) -> Results: ...
    def __getitem__(self, key: int | slice) -> TaskResult | Results:
        if isinstance(key, slice):
            return self._select(range(len(self))[key])
        size = len(self)
        if not -size <= key < size:
            raise IndexError("Results index out of range")
        return self._record(key % size)

    def __iter__(self) -> Iterator[TaskResult]:
        for position in range(len(self)):
            yield self._record(position)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    @property
    def values(self) -> list[Any]:
        """Every task's value, in input order; ``None`` where a task failed."""
        return list(self._value)

    @property
    def stages(self) -> dict[str, Results]:
        """A pipeline's records per stage, by stage name: for every input that entered
        the stage, its status there, worker, attempts and times (``index`` is the
        input's; items and values are not kept). Empty for a plain run."""
        return dict(self._stages)

    @property
    def errors(self) -> Results:
        """The records whose status is not ``"ok"``."""
        ok = _CODE["ok"]
        status = self._status
        return self._select([p for p in range(len(status)) if status[p] != ok])

    @property
    def ok(self) -> bool:
        """True when every task succeeded."""
        return self._status.count(_CODE["ok"]) == len(self._status)

    def counts(self) -> dict[str, int]:
        """How many records have each status (only the statuses present)."""
        counts = {status: self._status.count(code) for status, code in _CODE.items()}
        return {status: n for status, n in counts.items() if n}

    def wall_time(self) -> float | None:
        """Seconds from the first task's start to the last one's finish (of this run's
        tasks: restored records are an earlier run's)."""
        started, finished = self._started, self._finished
        if self._restored:
            ran = [p for p in range(len(self)) if p not in self._restored]
            started, finished = map(started.__getitem__, ran), map(finished.__getitem__, ran)
        started = [t for t in started if not math.isnan(t)]
        finished = [t for t in finished if not math.isnan(t)]
        if not started or not finished:
            return None
        return max(finished) - min(started)

    def to_records(self) -> list[dict[str, Any]]:
        """Plain dicts, one per record, with the ``TaskResult`` field names as keys."""
        return [{name: getattr(record, name) for name in FIELDS} for record in self]

    def to_dataframe(self) -> Any:
        """A ``pandas.DataFrame`` with one row per record (needs pandas)."""
        try:
            import pandas
        except ImportError:
            raise ImportError(
                'to_dataframe() needs pandas: pip install "cellpool[pandas]"'
            ) from None
        failures = [self._failure.get(p) for p in range(len(self))]
        workers = [self._workers[code] for code in self._worker]
        clock = self._clock
        started = [None if math.isnan(t) else t + clock for t in self._started]
        finished = [None if math.isnan(t) else t + clock for t in self._finished]
        columns = {
            "index": list(range(len(self))) if self._index is None else list(self._index),
            "item": list(self._item),
            "status": [STATUSES[code] for code in self._status],
            "value": list(self._value),
            "error_type": [f.error_type if f else None for f in failures],
            "error": [f.error if f else None for f in failures],
            "traceback": [f.traceback if f else None for f in failures],
            "worker": [worker for worker, _ in workers],
            "pid": pandas.array([pid for _, pid in workers], dtype="Int64"),
            "attempts": list(self._attempts),
            "started": started,
            "finished": finished,
            "duration": [
                self._duration.get(p, None if s is None or f is None else f - s)
                for p, (s, f) in enumerate(zip(started, finished, strict=True))
            ],
            "restored": [p in self._restored for p in range(len(self))],
            "stage": [self._stage_name(code) for code in self._stage],
        }
        return pandas.DataFrame(columns, columns=list(FIELDS))

    def exceptions(self) -> list[BaseException]:
        """One exception per failed record: the task's own when it could travel here."""
        return [
            exception_of(STATUSES[self._status[p]], failure)
            for p, failure in sorted(self._failure.items())
        ]

    def raise_errors(self) -> None:
        """Raise an ``ExceptionGroup`` of every failure; do nothing when all succeeded."""
        failures = self.exceptions()
        if failures:
            raise BaseExceptionGroup(f"{len(failures)} of {len(self)} tasks failed", failures)

    # -- display -------------------------------------------------------------------

    def summary(self) -> str:
        """One line: how many tasks, how many of each status, and the wall time."""
        counts = ", ".join(
            f"{n} {status if n == 1 else _PLURALS.get(status, status)}"
            for status, n in self.counts().items()
        )
        line = f"{len(self)} tasks" + (f": {counts}" if counts else "")
        per_stage = self._failures_per_stage() if self._stage_names else ""
        if per_stage:
            line += f" ({per_stage})"
        if self._restored:
            line += f" ({len(self._restored)} restored from a journal)"
        wall = self.wall_time()
        return line + (f" in {wall:.2f} s" if wall is not None else "")

    def _failures_per_stage(self) -> str:
        """``"failed in fetch: 2, parse: 1"``: a pipeline's failures by stage (``""``
        when none failed; cancelled records are not failures)."""
        cancelled = _CODE["cancelled"]
        per_stage = [0] * (len(self._stage_names) + 1)
        for position in self._failure:
            if self._status[position] != cancelled:
                per_stage[self._stage[position]] += 1
        names = ("", *self._stage_names)
        counts = [f"{name}: {n}" for name, n in zip(names, per_stage, strict=True) if n and name]
        return "failed in " + ", ".join(counts) if counts else ""

    def _failure_rows(self) -> list[TaskResult]:
        return [self._record(p) for p in sorted(self._failure)[:_FAILURE_ROWS]]

    def __repr__(self) -> str:
        lines = [f"Results({self.summary()})"]
        for record in self._failure_rows()[:5]:
            where = where_it_failed(record.traceback)
            lines.append(
                f"  [{record.index}] {_status_at(record)}: {record.error_type}: {record.error}"
                + (f"  ({where})" if where else "")
            )
        hidden = len(self._failure) - min(len(self._failure), 5)
        if hidden:
            lines.append(f"  ... and {hidden} more; see results.errors")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        escape = html.escape
        parts = [
            '<div class="cellpool-results">',
            f"<p><b>cellpool</b> {escape(self.summary())}</p>",
        ]
        rows = self._failure_rows()
        if rows:
            head = "".join(
                f'<th style="{_CELL}{align}">{name}</th>' for name, align in _FAILURE_COLUMNS
            )
            parts.append(f'<table style="{_TABLE}"><thead><tr>{head}</tr></thead><tbody>')
            for r in rows:
                item = repr(r.item)
                cells = (
                    str(r.index),
                    escape(item if len(item) <= 200 else item[:199] + "…"),
                    escape(_status_at(r)),
                    escape(f"{r.error_type}: {r.error}"),
                    _NOWRAP_CODE.format(escape(where_it_failed(r.traceback))),
                    escape(str(r.worker or "")),
                    str(r.attempts),
                )
                tds = "".join(
                    f'<td style="{_CELL}{align}" title="{escape(_plain(cell))}">{cell}</td>'
                    for cell, (_name, align) in zip(cells, _FAILURE_COLUMNS, strict=True)
                )
                parts.append(f"<tr>{tds}</tr>")
            parts.append("</tbody></table>")
            hidden = len(self._failure) - len(rows)
            if hidden:
                parts.append(f"<p>... and {hidden} more failures; see <code>.errors</code></p>")
        parts.append("</div>")
        return "".join(parts)

    def timeline(self) -> Timeline:
        """A picture of the run: one lane per worker, a bar per task, failures in red.

        Shown as SVG in Jupyter and kept in a saved notebook; ``.svg`` is the text and
        ``.save(path)`` writes it. Past one task per pixel, tasks merge into busy spans,
        so the picture stays small for a million records.
        """
        from .view.timeline import timeline

        return timeline(self)
