"""How a journal keeps records: a *chunk* of records in a row, a column per field.

The journal's writer takes the records that came within its batch interval and writes
them as one row of the ``chunks`` table (more if they are large, see ``ROW_BYTES``), in
one short transaction (store.py). A row holds four blobs, each a pickle of lists whose
positions are the records':

    keys     (keys, statuses): all that listing runs and counting statuses reads
    fields   (indices, error types, errors, tracebacks, workers, pids, attempts,
             started, finished): ``int``, ``float``, exact ``str`` or ``None`` only,
             so the blob loads in any kernel (text of a ``str`` subclass is copied out);
             times are epoch seconds, NaN or ``None`` for none
    items    a column of the records' items
    values   a column of their values

A column of plain values (``PLAIN``) is pickled in one call: ``(True, values)``. Any
other column is pickled a value at a time, ``(False, [pickle or None])``, so that a
value that cannot be pickled now, or loaded later (its class is gone), costs its own
record only. An ok record whose item or value cannot be pickled is kept as an
``"error"`` (``PicklingError``; the value's reason if both fail, as it is the record's
result); one that cannot be loaded reads as an ``"error"`` (``UnpicklingError``; the
item's reason first, as a record without its item cannot be run again as it was), so
a resumed run runs it again. A failed record keeps its own error; its unpicklable item
is kept as ``None``.

Rows are read in the order they were written, and a key's latest record wins.
"""

from __future__ import annotations

import dataclasses
import itertools
import pickle
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import cloudpickle

from .errors import one_line
from .keys import PLAIN
from .results import TaskResult

# A row's items and values together at most (SQLite refuses a blob over 1 GB): records
# over this are split over more rows of the same transaction
ROW_BYTES = 64 * 2**20

Blobs = tuple[bytes, bytes, bytes, bytes]  # a row's keys, fields, items and values


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


def records_in(entry: Records | tuple[Any, ...]) -> int:
    """How many records a writer's queue entry holds: a ``Records``, or one record's
    fields in ``JournalRun.write``'s order."""
    return len(entry.keys) if isinstance(entry, Records) else 1


class _Fields(NamedTuple):
    """The plain columns of a chunk, in the order of a row's ``fields`` blob."""

    indices: list[int]
    error_types: list[str | None]
    errors: list[str | None]
    tracebacks: list[str | None]
    workers: list[str | None]
    pids: list[int | None]
    attempts: list[int]
    started: list[float | None]
    finished: list[float | None]


class Chunk:
    """Records gathered, field by field, to be written as a row (on the writer thread).

    ``pickled``: the records' items and values are pickles already (or ``None``), as a
    journal of schema version 1 kept them; they are kept as they are.
    """

    def __init__(self, pickled: bool = False) -> None:
        self._pickled = pickled
        self.keys: list[str] = []
        self.statuses: list[str] = []
        self.items: list[Any] = []
        self.values: list[Any] = []
        self.fields = _Fields(*([] for _ in _Fields._fields))

    def add(self, entry: Records | tuple[Any, ...]) -> None:
        """Add a ``Records``, or one record's fields in ``JournalRun.write``'s order."""
        if isinstance(entry, Records):
            self._add_many(entry)
            return
        key, index, item, status, value, error_type, error, traceback, worker, *rest = entry
        self.keys.append(_text(key))
        self.statuses.append(status)
        self.items.append(item)
        self.values.append(value)
        texts = map(_text, (error_type, error, traceback, worker))
        for column, field in zip(self.fields, (index, *texts, *rest), strict=True):
            column.append(field)

    def _add_many(self, records: Records) -> None:
        size = len(records.keys)

        def each(value: Any) -> Iterable[Any]:
            return itertools.repeat(value, size)

        keys, attempts = records.keys, records.attempts
        self.keys.extend(keys if set(map(type, keys)) <= {str} else map(_text, keys))
        self.statuses.extend(each(records.status))
        self.items.extend(records.items)
        self.values.extend(each(None) if records.values is None else records.values)
        texts = (records.error_type, records.error, records.traceback, records.worker)
        for column, field in zip(
            self.fields,
            (
                records.indices,
                *(each(_text(text)) for text in texts),
                each(records.pid),
                each(attempts) if isinstance(attempts, int) else attempts,
                _epoch(records.started, records.offset, size),
                _epoch(records.finished, records.offset, size),
            ),
            strict=True,
        ):
            column.extend(field)

    def rows(self) -> list[Blobs]:
        """The chunk as rows' blobs: one row, or more if its items and values pickle
        to over ``ROW_BYTES``."""
        if self._pickled:
            items, values = (_pickled_column(blobs) for blobs in (self.items, self.values))
        else:
            items, values = self._columns()
        if len(items) + len(values) > ROW_BYTES and len(self.keys) > 1:
            half = len(self.keys) // 2
            return [*self._part(0, half).rows(), *self._part(half, len(self.keys)).rows()]
        keys = pickle.dumps((self.keys, self.statuses), protocol=5)
        return [(keys, pickle.dumps(tuple(self.fields), protocol=5), items, values)]

    def _columns(self) -> tuple[bytes, bytes]:
        """The items and values columns; an ok record whose item or value could not be
        pickled becomes an error, here (see the module docstring)."""
        items, item_failures = _column("item", self.items)
        values, value_failures = _column("value", self.values)
        fields = self.fields
        for position, why in {**item_failures, **value_failures}.items():
            if self.statuses[position] == "ok":
                self.statuses[position] = "error"
                fields.error_types[position], fields.errors[position] = "PicklingError", why
                fields.tracebacks[position] = None
        return items, values

    def _part(self, start: int, stop: int) -> Chunk:
        part = Chunk(self._pickled)
        for whole, piece in (
            (self.keys, part.keys),
            (self.statuses, part.statuses),
            (self.items, part.items),
            (self.values, part.values),
            *zip(self.fields, part.fields, strict=True),
        ):
            piece.extend(whole[start:stop])
        return part


def row_keys(keys: bytes) -> tuple[list[str], list[str]]:
    """A row's keys and statuses."""
    return pickle.loads(keys)


def row_records(
    keys: bytes, fields: bytes, items: bytes, values: bytes, positions: Sequence[int] | None = None
) -> Iterator[StoredRecord]:
    """The records of a row (those at ``positions`` only, if given), items and values
    unpickled."""
    keys_, statuses = row_keys(keys)
    indices, error_types, errors, tracebacks, workers, pids, attempts, *times = pickle.loads(fields)
    rest = (workers, pids, attempts, *map(_times, times))
    items_, item_failures = _unpickled("item", items, positions)
    values_, value_failures = _unpickled("value", values, positions)
    for position, why in {**value_failures, **item_failures}.items():
        if position in item_failures:
            items_[position] = None
        values_[position], statuses[position] = None, "error"
        error_types[position], errors[position], tracebacks[position] = "UnpicklingError", why, None
    columns = (keys_, indices, items_, statuses, values_, error_types, errors, tracebacks, *rest)
    if positions is not None:
        columns = tuple([column[p] for p in positions] for column in columns)
    return map(StoredRecord, *columns)


def row_kept(
    keys: bytes, fields: bytes, items: bytes, values: bytes, positions: Sequence[int]
) -> Blobs:
    """A row's blobs with only the records at ``positions``; items and values keep
    their pickles (nothing is unpickled but plain values)."""

    def pick(column: Sequence[Any]) -> list[Any]:
        return [column[p] for p in positions]

    kept_keys = tuple(map(pick, row_keys(keys)))
    kept_fields = tuple(map(pick, pickle.loads(fields)))
    columns = []
    for column in (items, values):
        plain, objs = pickle.loads(column)
        columns.append(pickle.dumps((plain, pick(objs)), protocol=5))
    return (
        pickle.dumps(kept_keys, protocol=5),
        pickle.dumps(kept_fields, protocol=5),
        *columns,
    )  # type: ignore[return-value]


def latest_statuses(rows: Iterable[tuple[int, bytes]]) -> dict[str, str]:
    """Key -> status of each key's latest record, from rows' ids and ``keys`` blobs, in
    the order they were written."""
    latest: dict[str, str] = {}
    for _, keys in rows:
        latest.update(zip(*row_keys(keys), strict=True))
    return latest


# -- columns ---------------------------------------------------------------------------


def _text(value: Any) -> str | None:
    """``value`` as an exact ``str``: a subclass would pickle naming its class."""
    if value is None or type(value) is str:
        return value
    return str.__str__(value) if isinstance(value, str) else str(value)


def _column(what: str, objs: list[Any]) -> tuple[bytes, dict[int, str]]:
    """A column of items or values pickled, and why (by position) any could not be."""
    if set(map(type, objs)) <= PLAIN:
        return pickle.dumps((True, objs), protocol=5), {}
    blobs: list[bytes | None] = []
    failures = {}
    for position, obj in enumerate(objs):
        try:
            blobs.append(None if obj is None else _dumps(obj))
        except Exception as exc:
            blobs.append(None)
            failures[position] = f"the {what} could not be saved in the journal: {one_line(exc)}"
    return _pickled_column(blobs), failures


def _pickled_column(blobs: list[bytes | None]) -> bytes:
    return pickle.dumps((False, blobs), protocol=5)


def _dumps(obj: Any) -> bytes:
    """``obj`` pickled: by the standard pickle, a tenth of cloudpickle's cost per call,
    unless it cannot or names something of ``__main__``, which a later kernel may not
    have (cloudpickle keeps such things by value)."""
    try:
        data = pickle.dumps(obj, protocol=5)
    except Exception:
        return cloudpickle.dumps(obj, protocol=5)
    return cloudpickle.dumps(obj, protocol=5) if b"__main__" in data else data


def _unpickled(
    what: str, column: bytes, positions: Sequence[int] | None
) -> tuple[list[Any], dict[int, str]]:
    """A ``_column`` unpickled (its values at ``positions`` only, if given; the others
    read as ``None``), and why (by position) any could not be."""
    plain, objs = pickle.loads(column)
    if plain:
        return objs, {}
    loaded: list[Any] = [None] * len(objs)
    failures = {}
    for position in range(len(objs)) if positions is None else positions:
        blob = objs[position]
        try:
            loaded[position] = None if blob is None else pickle.loads(blob)
        except Exception as exc:
            failures[position] = f"the {what} could not be loaded from the journal: {one_line(exc)}"
    return loaded, failures


def _epoch(times: Sequence[float] | None, offset: float, size: int) -> Iterable[float | None]:
    """Times on a clock ``offset`` seconds behind the epoch as epoch seconds; NaN (no
    time) stays NaN, and reads as ``None`` (``_times``)."""
    if times is None:
        return itertools.repeat(None, size)
    return map(offset.__add__, times)


def _times(column: list[float | None]) -> list[float | None]:
    """A column of times as read: NaN, none, as ``None``."""
    return [None if seconds != seconds else seconds for seconds in column]  # NaN != NaN
