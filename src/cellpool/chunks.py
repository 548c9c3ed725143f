"""How a journal keeps records: a *chunk* of records in one row, a column per field.

The journal's writer takes the records that came within its batch interval and writes
them as one row of the ``chunks`` table, in one short transaction (store.py). A row
holds four blobs, each a pickle of one or more lists whose positions are the records':

    keys     (keys, statuses): all that listing runs and counting statuses reads
    fields   (indices, error types, errors, tracebacks, workers, pids, attempts,
             started, finished): plain values, times in epoch seconds or ``None``
    items    a ``Column`` of the records' items
    values   a ``Column`` of their values

A column of plain values (``int``, ``str``...: nothing a later kernel could lack) is
pickled in one call. Any other column is pickled a value at a time, so that a value
that cannot be pickled now, or loaded later (its class is gone), costs its own record
only: an ok record whose item or value cannot be pickled is kept as an ``"error"``
(``PicklingError``); one that cannot be loaded reads as an ``"error"``
(``UnpicklingError``), so a resumed run runs it again. A failed record keeps its own
error; its unpicklable item is kept as ``None``.

Rows are read in the order they were written, and a key's latest record wins.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import pickle
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import cloudpickle

from .results import TaskResult

# Types whose pickle names no class, module or function: it loads in any kernel
PLAIN = frozenset({int, float, str, bytes, bool, type(None)})


def one_line(error: BaseException) -> str:
    """The first line of ``error``'s message, or its type's name."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


@dataclasses.dataclass(frozen=True, slots=True)
class StoredRecord:
    """One input's record as the journal holds it; times are epoch seconds.

    A record whose item or value cannot be unpickled now (its class is gone) reads as
    ``"error"`` with ``error_type`` ``"UnpicklingError"``, so a resumed run runs it again.
    """

    key: str
    index: int
    item: Any
    status: str
    value: Any
    error_type: str | None
    error: str | None
    traceback: str | None
    worker: str | None
    pid: int | None
    attempts: int
    started: float | None
    finished: float | None

    def task_result(self) -> TaskResult:
        """This record as a ``TaskResult``."""
        timed = self.started is not None and self.finished is not None
        return TaskResult(
            index=self.index,
            item=self.item,
            status=self.status,
            value=self.value,
            error_type=self.error_type,
            error=self.error,
            traceback=self.traceback,
            worker=self.worker,
            pid=self.pid,
            attempts=self.attempts,
            started=self.started,
            finished=self.finished,
            duration=self.finished - self.started if timed else None,  # type: ignore[operator]
        )


class Records(NamedTuple):
    """Records of one status and failure (``JournalRun.write_many``), field by field."""

    keys: Sequence[str]
    indices: Sequence[int]
    items: Sequence[Any]
    status: str
    values: Sequence[Any] | None
    error_type: str | None
    error: str | None
    traceback: str | None
    worker: str | None
    pid: int | None
    attempts: int | Sequence[int]
    started: Sequence[float] | None
    finished: Sequence[float] | None
    offset: float  # seconds from the times' clock to the epoch


def count(entry: Records | tuple[Any, ...]) -> int:
    """How many records a queue entry holds: a ``Records``, or one record's fields."""
    return len(entry.keys) if isinstance(entry, Records) else 1


class Chunk:
    """Records gathered, field by field, to be written as one row (on the writer thread).

    ``pickled``: the records' items and values are pickles already (or ``None``), as a
    journal of schema version 1 kept them; they are kept as they are.
    """

    def __init__(self, pickled: bool = False) -> None:
        self._pickled = pickled
        self.keys: list[str] = []
        self.statuses: list[str] = []
        self.items: list[Any] = []
        self.values: list[Any] = []
        # indices, error types, errors, tracebacks, workers, pids, attempts, started, finished
        self.fields: tuple[list[Any], ...] = tuple([] for _ in range(9))

    def add(self, entry: Records | tuple[Any, ...]) -> None:
        """Add a ``Records``, or one record's fields in ``JournalRun.write``'s order."""
        if isinstance(entry, Records):
            self._add_many(entry)
            return
        key, index, item, status, value, *fields = entry
        self.keys.append(key)
        self.statuses.append(status)
        self.items.append(item)
        self.values.append(value)
        for column, field in zip(self.fields, (index, *fields), strict=True):
            column.append(field)

    def _add_many(self, records: Records) -> None:
        size = len(records.keys)

        def each(value: Any) -> Iterable[Any]:
            return itertools.repeat(value, size)

        attempts = records.attempts
        self.keys.extend(records.keys)
        self.statuses.extend(each(records.status))
        self.items.extend(records.items)
        self.values.extend(each(None) if records.values is None else records.values)
        for column, field in zip(
            self.fields,
            (
                records.indices,
                each(records.error_type),
                each(records.error),
                each(records.traceback),
                each(records.worker),
                each(records.pid),
                each(attempts) if isinstance(attempts, int) else attempts,
                _epoch(records.started, records.offset, size),
                _epoch(records.finished, records.offset, size),
            ),
            strict=True,
        ):
            column.extend(field)

    def blobs(self) -> tuple[bytes, bytes, bytes, bytes]:
        """The row's keys, fields, items and values, pickled (see the module docstring)."""
        if self._pickled:
            items, values = (
                pickle.dumps((False, blobs), protocol=5) for blobs in (self.items, self.values)
            )
            item_failures = value_failures = {}
        else:
            items, item_failures = _column("item", self.items)
            values, value_failures = _column("value", self.values)
        statuses, errors = self.statuses, self.fields[1:4]
        failures = {**item_failures, **value_failures}  # the value's reason wins
        for position, why in failures.items():
            if statuses[position] == "ok":
                statuses[position] = "error"
                for column, field in zip(errors, ("PicklingError", why, None), strict=True):
                    column[position] = field
        return (
            pickle.dumps((self.keys, statuses), protocol=5),
            pickle.dumps(self.fields, protocol=5),
            items,
            values,
        )


def read(keys: bytes, fields: bytes, items: bytes, values: bytes) -> Iterator[StoredRecord]:
    """The records of a row, items and values unpickled."""
    keys_, statuses = pickle.loads(keys)
    indices, error_types, errors, tracebacks, *rest = pickle.loads(fields)
    items_, item_failures = _loaded("item", items)
    values_, value_failures = _loaded("value", values)
    for position, why in {**value_failures, **item_failures}.items():  # the item's wins
        if position in item_failures:
            items_[position] = None
        values_[position], statuses[position] = None, "error"
        error_types[position], errors[position], tracebacks[position] = "UnpicklingError", why, None
    return map(
        StoredRecord,
        keys_, indices, items_, statuses, values_, error_types, errors, tracebacks, *rest,
    )  # fmt: skip


def latest_statuses(rows: Iterable[tuple[bytes]]) -> dict[str, str]:
    """Key -> status of each key's latest record, from rows' ``keys`` blobs in order."""
    latest: dict[str, str] = {}
    for (keys,) in rows:
        latest.update(zip(*pickle.loads(keys), strict=True))
    return latest


# -- columns ---------------------------------------------------------------------------


def _column(what: str, objs: list[Any]) -> tuple[bytes, dict[int, str]]:
    """A column of items or values pickled: ``(True, objs)`` for plain values, else
    ``(False, [each one's pickle or None])``; and why (by position) any could not be."""
    if set(map(type, objs)) <= PLAIN:
        return pickle.dumps((True, objs), protocol=5), {}
    blobs, failures = _pickled_each(what, objs)
    return pickle.dumps((False, blobs), protocol=5), failures


def _loaded(what: str, column: bytes) -> tuple[list[Any], dict[int, str]]:
    """A ``_column`` unpickled, and why (by position) any value could not be."""
    plain, objs = pickle.loads(column)
    if plain:
        return objs, {}
    loaded, failures = [], {}
    for position, blob in enumerate(objs):
        try:
            loaded.append(None if blob is None else pickle.loads(blob))
        except Exception as exc:
            loaded.append(None)
            failures[position] = f"the {what} could not be loaded from the journal: {one_line(exc)}"
    return loaded, failures


def _pickled_each(what: str, objs: list[Any]) -> tuple[list[bytes | None], dict[int, str]]:
    """Each of ``objs`` pickled (``None`` stays ``None``), and why (by position) any
    could not be."""
    blobs: list[bytes | None] = []
    failures = {}
    for position, obj in enumerate(objs):
        try:
            blobs.append(None if obj is None else _dumps(obj))
        except Exception as exc:
            blobs.append(None)
            failures[position] = f"the {what} could not be saved in the journal: {one_line(exc)}"
    return blobs, failures


def _dumps(obj: Any) -> bytes:
    """``obj`` pickled: by the standard pickle, a tenth of cloudpickle's cost per call,
    unless it cannot or names something of ``__main__``, which a later kernel may not
    have (cloudpickle keeps such things by value)."""
    try:
        data = pickle.dumps(obj, protocol=5)
    except Exception:
        return cloudpickle.dumps(obj, protocol=5)
    return cloudpickle.dumps(obj, protocol=5) if b"__main__" in data else data


def _epoch(times: Sequence[float] | None, offset: float, size: int) -> Iterable[float | None]:
    """Times on a clock ``offset`` seconds behind the epoch as epoch seconds (NaN: none)."""
    if times is None:
        return itertools.repeat(None, size)
    return [None if math.isnan(seconds) else seconds + offset for seconds in times]
