"""Durable runs: every finished record kept in an embedded SQLite file, so a run resumes.

A journal is one SQLite file (``.cellpool/journal.db`` under the working directory by
default). It holds runs by name; each name has versions, a new one whenever the
function's code changes (``Journal.begin``). A version keeps one record per input key
(``stable_key(item)`` by default), the latest written winning, so running the same
journaled run again can skip the inputs whose stored record is ok.

Threads, and what each owns::

    opening thread    Journal           the Journal's connection: begin, runs, load
                                        and forget run on the thread that opened the
                                        Journal (sqlite3 checks it)
    any thread        JournalRun.stored a connection of its own, opened and closed in
                                        the call
    dispatcher        JournalRun.write  puts a tuple of the record's fields on the run's
                      (write_many)      queue (of a batch's records, one ``_Records``):
                                        never blocks, never pickles
    any thread        JournalRun.close  puts the stop mark; waits for the writer to write
                                        what is queued unless timeout=0 (then it never
                                        blocks)
    writer (per run)  _Writer           its own connection and the batch in hand; takes
                                        from the queue (and calls ``on_taken``), pickles
                                        items and values, writes each batch in one short
                                        transaction; sets ``written`` at the end

A JournalRun uses nothing of its Journal's: it goes on after ``Journal.close()``. The
queue is a ``SimpleQueue``: any thread puts, only the writer takes. ``_Writer.queued``
counts the records put, under its ``lock``; ``_Writer.taken``, those taken, and
``_Writer.failed`` are written by the writer thread alone; ``JournalRun._closed`` by
``close`` alone.

Several processes (kernels) may use one file at once: in WAL mode readers never wait
for the writer, and every write transaction begins IMMEDIATE, so it waits (up to
``BUSY_TIMEOUT``) for another's commit instead of failing on a stale snapshot.
Commits are ``synchronous=NORMAL``: a kernel that dies loses nothing committed; a
power cut may lose the last transactions, never the file.

Items and values are pickled (cloudpickle): open only journals you trust.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import io
import itertools
import math
import os
import pickle
import queue
import sqlite3
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Self

import cloudpickle

from .results import STATUSES, Results, TaskResult

SCHEMA_VERSION = 1
BUSY_TIMEOUT = 10.0  # seconds to wait for another connection's transaction
BATCH_SECONDS = 0.1  # a record waits at most this long to be written...
BATCH_RECORDS = 1000  # ...or until this many are waiting
EXIT_SECONDS = 5.0  # at interpreter exit, how long writers may take to write what is queued
# A new file's page size (SQLite's default is 4 KiB): a transaction's inserts at random
# keys dirty fewer pages, and the WAL, checkpointed every 1,000 pages, less often.
PAGE_SIZE = 16384

_SQLITE_HEADER = b"SQLite format 3\x00"
_META = "cellpool_meta"
_STOP = object()  # on a writer's queue: write what came before, then end

_SCHEMA = (
    f"CREATE TABLE {_META} (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE runs (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        function TEXT NOT NULL,
        code TEXT NOT NULL,
        started REAL NOT NULL,
        updated REAL NOT NULL,
        UNIQUE (name, version))""",
    """CREATE TABLE records (
        run INTEGER NOT NULL REFERENCES runs (id),
        key TEXT NOT NULL,
        idx INTEGER NOT NULL,  -- the input's index ("index" is an SQL keyword)
        item BLOB,
        status TEXT NOT NULL,
        value BLOB,
        error_type TEXT,
        error TEXT,
        traceback TEXT,
        worker TEXT,
        pid INTEGER,
        attempts INTEGER NOT NULL,
        started REAL,
        finished REAL,
        PRIMARY KEY (run, key))""",
)
_COLUMNS = "key, idx, item, status, value, error_type, error, traceback, worker, pid, attempts"
_SELECT = f"SELECT {_COLUMNS}, started, finished FROM records WHERE run = ?"


def _upsert(values: str) -> str:
    return (
        f"INSERT INTO records (run, {_COLUMNS}, started, finished) VALUES ({values})"
        " ON CONFLICT (run, key) DO UPDATE SET"
        " idx = excluded.idx, item = excluded.item, status = excluded.status,"
        " value = excluded.value, error_type = excluded.error_type, error = excluded.error,"
        " traceback = excluded.traceback, worker = excluded.worker, pid = excluded.pid,"
        " attempts = excluded.attempts, started = excluded.started, finished = excluded.finished"
    )


_UPSERT = _upsert(", ".join(["?"] * 14))
# Records without an error: sqlite3 binds None (and bytes) only after looking for an
# adapter, a good part of a row's cost, so their NULLs are written in the statement.
_UPSERT_NO_ERROR = _upsert("?, ?, ?, ?, ?, ?, NULL, NULL, NULL, ?, ?, ?, ?, ?")

_COUNTS = ", ".join(f"coalesce(sum(records.status = '{s}'), 0)" for s in STATUSES)
_RUNS = (
    "SELECT runs.name, runs.version, runs.function, runs.started, runs.updated,"
    f" count(records.run), {_COUNTS}"
    " FROM runs LEFT JOIN records ON records.run = runs.id"
)


class JournalError(ValueError):
    """A file that cannot be used as a journal; its message is one line naming the path and why."""


# -- keys ------------------------------------------------------------------------------


# Types whose pickle holds no set and never fails, so it is their key's as it is
_PLAIN = frozenset({int, float, str, bytes, bool, type(None)})


class _SortedSets:
    """A pickler whose sets and frozensets are written with their elements sorted (by
    each element's own pickle), so the bytes do not depend on the process's hash seed."""

    def persistent_id(self, obj: Any) -> Any:
        if not isinstance(obj, (set, frozenset)):
            return None
        return (type(obj), tuple(sorted(obj, key=lambda e: _dumps_with(type(self), e))))


class _KeyPickler(_SortedSets, pickle.Pickler):
    pass


class _CloudKeyPickler(_SortedSets, cloudpickle.Pickler):
    pass


def _dumps_with(pickler: type[pickle.Pickler], obj: Any) -> bytes:
    buffer = io.BytesIO()
    pickler(buffer, protocol=5).dump(obj)
    return buffer.getvalue()


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _key_bytes(item: Any) -> bytes:
    kind = type(item)
    if kind in _PLAIN or (kind is tuple and all(type(part) in _PLAIN for part in item)):
        return pickle.dumps(item, protocol=5)  # the common case, in half the time
    try:
        data, pickler = pickle.dumps(item, protocol=5), _KeyPickler
    except Exception:
        try:
            data, pickler = cloudpickle.dumps(item, protocol=5), _CloudKeyPickler
        except Exception as error:
            raise TypeError(
                f"cellpool cannot make a key for a {type(item).__name__} item: {_one_line(error)}"
            ) from None
    # EMPTY_SET and FROZENSET: only then is the slower, set-sorting pickler needed. The
    # bytes may also occur in data, which costs time only: the choice is the same in
    # every process for a given item.
    if b"\x8f" in data or b"\x91" in data:
        return _dumps_with(pickler, item)
    return data


def stable_key(item: Any) -> str:
    """The default key of an input: a hex digest (blake2b, 16 bytes) of its pickle.

    Equal items have equal keys in every process: sets and frozensets are pickled with
    sorted elements, as their order follows the hash seed. A dict's order is its own
    (insertion order), so ``{"a": 1, "b": 2}`` and ``{"b": 2, "a": 1}`` differ; so do
    ``1``, ``1.0`` and ``True``. What pickle refuses (a lambda) is pickled with
    cloudpickle; a ``TypeError`` (one line) if neither can.
    """
    return hashlib.blake2b(_key_bytes(item), digest_size=16).hexdigest()


def default_path() -> Path:
    """``.cellpool/journal.db`` under the current working directory, as an absolute path."""
    return Path.cwd() / ".cellpool" / "journal.db"


# -- records ---------------------------------------------------------------------------


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


def _loads(blob: bytes | None) -> Any:
    return None if blob is None else pickle.loads(blob)


def _stored(row: tuple[Any, ...]) -> StoredRecord:
    """A row of ``_SELECT`` as a record, its item and value unpickled."""
    key, index, item, status, value, error_type, error, traceback, *rest = row
    try:
        item = _loads(item)
    except Exception as exc:
        item, value = None, None
        status, error_type, traceback = "error", "UnpicklingError", None
        error = f"the item could not be loaded from the journal: {_one_line(exc)}"
    else:
        try:
            value = _loads(value)
        except Exception as exc:
            value, status, error_type, traceback = None, "error", "UnpicklingError", None
            error = f"the value could not be loaded from the journal: {_one_line(exc)}"
    return StoredRecord(key, index, item, status, value, error_type, error, traceback, *rest)


def _dumps(obj: Any) -> bytes | None:
    """``obj`` pickled: by the standard pickle, a tenth of cloudpickle's cost per call,
    unless it cannot or names something of ``__main__``, which a later kernel may not
    have (cloudpickle keeps such things by value)."""
    if obj is None:
        return None
    try:
        data = pickle.dumps(obj, protocol=5)
    except Exception:
        return cloudpickle.dumps(obj, protocol=5)
    return cloudpickle.dumps(obj, protocol=5) if b"__main__" in data else data


def _pickled(
    what: str, obj: Any, dumps: Callable[[Any], bytes | None] = _dumps
) -> tuple[bytes | None, str | None]:
    """``obj`` pickled, or ``None`` and why it could not be."""
    try:
        return dumps(obj), None
    except Exception as exc:
        return None, f"the {what} could not be saved in the journal: {_one_line(exc)}"


def _row(run: int, record: tuple[Any, ...]) -> tuple[Any, ...]:
    """A record from ``JournalRun.write`` as a row of ``_UPSERT``, item and value pickled.

    An ok record whose value or item cannot be pickled is stored as an error; a failed
    one keeps its own error (its item stored as ``None``).
    """
    key, index, item, status, value, error_type, error, traceback, *rest = record
    value, value_failure = _pickled("value", value)
    item, item_failure = _pickled("item", item)
    row = (run, key, index, item, status, value, error_type, error, traceback, *rest)
    failure = value_failure or item_failure
    return _as_error(row, failure) if failure and status == "ok" else row


def _as_error(row: tuple[Any, ...], why: str) -> tuple[Any, ...]:
    """An ok row of ``_UPSERT`` whose item or value could not be pickled, as an error."""
    return (*row[:4], "error", row[5], "PicklingError", why, None, *row[9:])


class _Records(NamedTuple):
    """Records queued by ``JournalRun.write_many``, field by field."""

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
    offset: float


def _rows(run: int, records: _Records) -> tuple[str, list[tuple[Any, ...]]]:
    """Records from ``JournalRun.write_many`` as rows, items and values pickled, and the
    statement that writes them; pickling failures as in ``_row``."""
    count = len(records.keys)

    def each(value: Any) -> Iterable[Any]:
        return itertools.repeat(value, count)

    items, failures = _pickled_all("item", records.items)
    if records.values is None:
        values: Iterable[Any] = each(None)
    else:
        values, value_failures = _pickled_all("value", records.values)
        failures.update(value_failures)  # the value's reason wins, as in _row
    attempts = records.attempts
    head = (each(run), records.keys, records.indices, items, each(records.status), values)
    tail = (
        each(records.worker),
        each(records.pid),
        each(attempts) if isinstance(attempts, int) else attempts,
        _epoch(records.started, records.offset, count),
        _epoch(records.finished, records.offset, count),
    )
    if records.error_type is None and not failures:
        return _UPSERT_NO_ERROR, list(zip(*head, *tail, strict=True))
    error = map(each, (records.error_type, records.error, records.traceback))
    rows = list(zip(*head, *error, *tail, strict=True))
    if records.status == "ok":
        for position, why in failures.items():
            rows[position] = _as_error(rows[position], why)
    return _UPSERT, rows


def _pickled_all(what: str, objs: Sequence[Any]) -> tuple[list[bytearray | None], dict[int, str]]:
    """``objs`` pickled as ``_dumps`` pickles each, and why (by position) any could not be.

    As bytearrays: sqlite3 binds those at once, bytes only after looking for an adapter.
    """
    try:
        blobs = [None if obj is None else pickle.dumps(obj, protocol=5) for obj in objs]
    except Exception:  # one cannot be: each on its own
        pairs = [_pickled(what, obj) for obj in objs]
        blobs = [blob for blob, _ in pairs]
        failures = {k: why for k, (_, why) in enumerate(pairs) if why}
    else:
        failures = {}
        # One search of them all: a match across two pickles only costs a look at each.
        if b"__main__" in b"".join(filter(None, blobs)):
            for k, blob in enumerate(blobs):
                if blob is not None and b"__main__" in blob:
                    blobs[k], why = _pickled(what, objs[k], _by_value)
                    if why is not None:
                        failures[k] = why
    return [None if blob is None else bytearray(blob) for blob in blobs], failures


def _by_value(obj: Any) -> bytes:
    return cloudpickle.dumps(obj, protocol=5)


def _epoch(times: Sequence[float] | None, offset: float, count: int) -> Iterable[float | None]:
    """Times on a clock ``offset`` seconds behind the epoch as epoch seconds (NaN: none)."""
    if times is None:
        return itertools.repeat(None, count)
    return [None if math.isnan(seconds) else seconds + offset for seconds in times]


def _statements(run: int, taken: list[Any]) -> list[tuple[str, list[tuple[Any, ...]]]]:
    """What the writer took, in order, as statements and their rows: consecutive rows
    of one statement go together, so single records cost one ``executemany``."""
    statements: list[tuple[str, list[tuple[Any, ...]]]] = []
    for entry in taken:
        if isinstance(entry, _Records):
            statement, rows = _rows(run, entry)
        else:
            statement, rows = _UPSERT, [_row(run, entry)]
        if statements and statements[-1][0] == statement:
            statements[-1][1].extend(rows)
        else:
            statements.append((statement, rows))
    return statements


# -- the file --------------------------------------------------------------------------


def _connect(path: Path, create: bool) -> sqlite3.Connection:
    """A connection to ``path``; it makes the file only if ``create``."""
    mode = "rwc" if create else "rw"
    uri = f"{path.as_uri()}?mode={mode}"
    return sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT, isolation_level=None)


def _configure(connection: sqlite3.Connection) -> None:
    """The settings every connection to a journal has (they are not kept in the file)."""
    connection.execute("PRAGMA synchronous = NORMAL")
    connection.execute("PRAGMA foreign_keys = ON")


@contextlib.contextmanager
def _transaction(connection: sqlite3.Connection, kind: str = "IMMEDIATE") -> Iterator[None]:
    """A transaction, committed at the end of the block or rolled back if it raises.

    IMMEDIATE takes the write lock first: in WAL mode a read that becomes a write fails
    at once if another connection committed meanwhile, without waiting.
    """
    connection.execute(f"BEGIN {kind}")
    try:
        yield
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
        raise


def _absolute(path: str | os.PathLike[str]) -> Path:
    """Absolute, so that the writer thread opens the same file after a ``chdir``."""
    return Path(os.path.abspath(os.path.expanduser(path)))


def _identity(path: Path) -> tuple[int, int]:
    status = os.stat(path)
    return status.st_dev, status.st_ino


def _tables(connection: sqlite3.Connection) -> set[str]:
    rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    return {name for (name,) in rows}


def _check_header(path: Path) -> None:
    """Refuse a file that is not SQLite before SQLite opens it (and might write to it)."""
    try:
        with open(path, "rb") as file:
            header = file.read(len(_SQLITE_HEADER))
    except FileNotFoundError:
        return
    except OSError as exc:
        raise JournalError(f"{path}: cannot be read ({_one_line(exc)})") from None
    if header and header != _SQLITE_HEADER:
        raise JournalError(f"{path}: not a cellpool journal (not an SQLite database)")


def _create(connection: sqlite3.Connection) -> None:
    """Make the schema, unless another connection made it since this one looked."""
    connection.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # a made file keeps its own
    with _transaction(connection):
        if not _tables(connection):
            for statement in _SCHEMA:
                connection.execute(statement)
            connection.execute(
                f"INSERT INTO {_META} (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )


def _check_schema(connection: sqlite3.Connection, path: Path) -> None:
    if _META not in _tables(connection):
        raise JournalError(
            f"{path}: not a cellpool journal (an SQLite database without a {_META} table)"
        )
    row = connection.execute(f"SELECT value FROM {_META} WHERE key = 'schema_version'").fetchone()
    found = row[0] if row is not None else "unknown"
    if found != str(SCHEMA_VERSION):
        raise JournalError(
            f"{path}: a cellpool journal of schema version {found}; "
            f"this cellpool reads version {SCHEMA_VERSION}"
        )


def _use_wal(connection: sqlite3.Connection) -> None:
    """WAL mode (kept in the file): readers and the writer do not wait for each other.

    A connection that first read the file in rollback mode, while another process was
    making it, is refused the switch at once (no busy handler): it tries again.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        try:
            (mode,) = connection.execute("PRAGMA journal_mode = WAL").fetchone()
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    if mode.lower() != "wal":
        raise sqlite3.OperationalError(f"the file stays in {mode} mode, not WAL")


def _open(path: Path) -> sqlite3.Connection:
    """A connection to the journal at ``path``, which is made if new; nothing is written
    to a file that is not a journal of this ``SCHEMA_VERSION``."""
    _check_header(path)
    try:
        connection = _connect(path, create=True)
    except sqlite3.Error as exc:
        raise JournalError(f"{path}: cannot be opened ({_one_line(exc)})") from None
    try:
        if not _tables(connection):
            _create(connection)
        _check_schema(connection, path)
        _use_wal(connection)
        _configure(connection)
    except sqlite3.Error as exc:
        connection.close()
        raise JournalError(f"{path}: cannot be used as a journal ({_one_line(exc)})") from None
    except BaseException:
        connection.close()
        raise
    return connection


# -- writing ---------------------------------------------------------------------------


class _Unwritable(Exception):
    """The journal can take no more records of this run."""


class _Writer:
    """A run's writer thread and its queue (see the module docstring)."""

    def __init__(self, path: Path, identity: tuple[int, int], label: str, run: int) -> None:
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.failed = False  # it writes nothing more
        self.queued = 0  # records put on the queue (under ``lock``, by any thread)
        self.taken = 0  # records taken from it (by the writer thread)
        self.lock = threading.Lock()
        self.on_taken: Callable[[], None] = lambda: None
        # set once the records are written: what is left is closing the connection,
        # whose checkpoint (the last connection's) waits for the disk
        self.written = threading.Event()
        self._path = path
        self._identity = identity  # the file the Journal opened
        self._label = label
        self._run = run
        self.thread = threading.Thread(target=self._serve, name="cellpool-journal", daemon=True)

    def put(self, entry: tuple[Any, ...], count: int) -> None:
        """Queue a record, or ``count`` records (``_Records``), for the thread (never blocks)."""
        with self.lock:
            self.queued += count
        self.queue.put(entry)

    def stop(self) -> None:
        """Have the thread write what is queued, then end (never blocks)."""
        self.queue.put(_STOP)

    def _serve(self) -> None:
        connection = None
        try:
            connection = _connect(self._path, create=False)
            _configure(connection)
        except sqlite3.Error as exc:
            self._fail(exc)
        try:
            while True:
                taken, stop = self._take()
                if taken:
                    self.on_taken()
                if taken and not self.failed:
                    self._save(connection, taken)
                del taken  # hold no user object while waiting
                if stop:
                    return
        finally:
            self.written.set()
            if connection is not None:
                connection.close()

    def _take(self) -> tuple[list[Any], bool]:
        """The next records to write (tuples of one record's fields, and ``_Records``):
        what comes within ``BATCH_SECONDS`` of the first, until ``BATCH_RECORDS`` are
        taken; and whether the stop mark came."""
        first = self.queue.get()
        if first is _STOP:
            return [], True
        taken, count = [first], _count(first)
        deadline = time.monotonic() + BATCH_SECONDS
        stop = False
        while count < BATCH_RECORDS:
            try:
                entry = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if entry is _STOP:
                stop = True
                break
            taken.append(entry)
            count += _count(entry)
        self.taken += count
        return taken, stop

    def _save(self, connection: sqlite3.Connection, taken: list[Any]) -> None:
        try:
            statements = _statements(self._run, taken)  # before taking the lock
            self._check_file()
            with _transaction(connection):
                updated = connection.execute(
                    "UPDATE runs SET updated = ? WHERE id = ?", (time.time(), self._run)
                )
                if updated.rowcount == 0:
                    raise _Unwritable("the run was forgotten")
                for statement, rows in statements:
                    connection.executemany(statement, rows)
        except Exception as exc:
            self._fail(exc)

    def _check_file(self) -> None:
        """SQLite goes on writing to a file that was deleted: it must not, silently."""
        try:
            same = _identity(self._path) == self._identity
        except FileNotFoundError:
            same = False
        if not same:
            raise _Unwritable("the file was removed or replaced")

    def _fail(self, error: BaseException) -> None:
        self.failed = True
        warnings.warn(
            f"cellpool: the journal {self._path} could not be written ({_one_line(error)}); "
            f"{self._label} is no longer journaled",
            RuntimeWarning,
            stacklevel=1,
        )


def _count(entry: Any) -> int:
    return len(entry.keys) if isinstance(entry, _Records) else 1


_writers: weakref.WeakSet[_Writer] = weakref.WeakSet()


def _at_exit() -> None:
    """Write what the writers hold before the interpreter ends their threads.

    ``atexit`` runs after the dispatchers' exit hook (``threading``'s), which finishes
    their runs, and before daemon threads stop.
    """
    writers = [writer for writer in list(_writers) if writer.thread.is_alive()]
    for writer in writers:
        writer.stop()
    deadline = time.monotonic() + EXIT_SECONDS
    for writer in writers:
        writer.thread.join(max(0.0, deadline - time.monotonic()))


atexit.register(_at_exit)


# -- the public side -------------------------------------------------------------------


class _Closes:
    """``with``: the subclass's ``close()`` at the end."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()  # type: ignore[attr-defined]


class JournalRun(_Closes):
    """One version of a named run: what is stored for it, and a writer for its records.

    Any thread may call its methods, and it outlives the Journal that began it.
    """

    def __init__(self, journal: Journal, name: str, version: int, run: int) -> None:
        self.name = name
        self.version = version
        self.path = journal.path
        self._run = run
        self._closed = False
        self._writer = _Writer(journal.path, journal._identity, f"run {name!r} v{version}", run)
        # A run dropped without close() still has its records written.
        self._finalizer = weakref.finalize(self, self._writer.stop)
        _writers.add(self._writer)
        self._writer.thread.start()

    def __repr__(self) -> str:
        return f"JournalRun({self.name!r}, version={self.version}, path={str(self.path)!r})"

    def pending(self) -> int:
        """Records queued and not yet taken to be written (approximate: another thread
        may be adding or writing)."""
        return self._writer.queued - self._writer.taken

    def on_taken(self, callback: Callable[[], None]) -> None:
        """Have the writer thread call ``callback`` (which must not block) whenever it
        takes records off the queue, so ``pending()`` dropped."""
        self._writer.on_taken = callback

    def stored(self) -> dict[str, StoredRecord]:
        """Input key -> record, as the file holds them now (records still queued are not
        there yet). Reads through a connection of its own, closed before it returns."""
        try:
            connection = _connect(self.path, create=False)
        except sqlite3.Error as exc:
            raise JournalError(f"{self.path}: cannot be read ({_one_line(exc)})") from None
        with contextlib.closing(connection):
            rows = connection.execute(_SELECT, (self._run,)).fetchall()
        return {row[0]: _stored(row) for row in rows}

    def write(
        self,
        key: str,
        index: int,
        item: Any,
        status: str,
        value: Any,
        error_type: str | None,
        error: str | None,
        traceback: str | None,
        worker: str | None,
        pid: int | None,
        attempts: int,
        started: float | None,
        finished: float | None,
    ) -> None:
        """Queue one finished record (times in epoch seconds); the latest of a key wins.

        Never blocks, pickles nothing and never raises: the writer thread pickles the
        item and value and writes batches. An ok record whose value or item cannot be
        pickled is stored as an error (``"PicklingError"``). If the file cannot be
        written, a ``RuntimeWarning`` says so once and the run's records are dropped.
        A record written after ``close`` is dropped.
        """
        if not self._closed:
            record = (key, index, item, status, value, error_type, error, traceback)
            self._writer.put((*record, worker, pid, attempts, started, finished), 1)

    def write_many(
        self,
        keys: Sequence[str],
        indices: Sequence[int],
        items: Sequence[Any],
        status: str,
        values: Sequence[Any] | None,
        error_type: str | None,
        error: str | None,
        traceback: str | None,
        worker: str | None,
        pid: int | None,
        attempts: int | Sequence[int],
        started: Sequence[float] | None,
        finished: Sequence[float] | None,
        offset: float = 0.0,
    ) -> None:
        """Queue records of one status and failure, as ``write`` queues one, in one step.

        ``keys``, ``indices`` and ``items`` hold a field of each record, and so do
        ``values``, ``started`` and ``finished``, or are ``None`` for none; ``attempts``
        too, or is one count for all. Times are on a clock ``offset`` seconds behind the
        epoch; a NaN time is none. The sequences must not change once queued.
        """
        if not self._closed:
            records = _Records(
                keys, indices, items, status, values, error_type, error, traceback,
                worker, pid, attempts, started, finished, offset,
            )  # fmt: skip
            self._writer.put(records, len(keys))

    def close(self, timeout: float | None = None) -> None:
        """Write what is queued, then stop the writer thread and close its connection.

        Waits at most ``timeout`` seconds for the records to be written; the thread
        finishes the writing after that, and closes its connection on its own.
        ``close(timeout=0)`` never blocks (the dispatcher may call it when a run ends).
        """
        self._closed = True
        self._finalizer()  # the stop mark, put once
        self._writer.written.wait(timeout)


_RUN_COLUMNS = ("name", "version", "function", "started", "updated", "total", *STATUSES)


class Journal(_Closes):
    """An SQLite file of runs' records, to resume runs (see the module docstring).

    Its methods run on the thread that opened it; the ``JournalRun``s it begins, on any.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        """Open or create the journal at ``path`` (``default_path()`` if ``None``).

        Missing directories are made. A file that is not SQLite, an SQLite file that is
        not a cellpool journal, or a journal of another ``SCHEMA_VERSION`` raises
        ``JournalError``, and the file is left as it was.
        """
        self.path = default_path() if path is None else _absolute(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise JournalError(
                f"{self.path}: its folder cannot be made ({_one_line(exc)})"
            ) from None
        self._connection = _open(self.path)
        self._identity = _identity(self.path)

    def __repr__(self) -> str:
        return f"Journal({str(self.path)!r})"

    def begin(self, name: str, function: str, code: str, keep_code: bool = False) -> JournalRun:
        """Continue run ``name``, or start its next version if the function changed.

        ``code`` identifies the function (the caller computes it): the latest version
        goes on if its code is ``code``, or with ``keep_code`` (the version then takes
        ``code`` as its own). Otherwise a ``UserWarning`` says the function changed and
        version + 1 starts. A new name starts version 1. ``function`` is a display name.
        """
        now = time.time()
        with _transaction(self._connection):
            latest = self._connection.execute(
                "SELECT id, version, code FROM runs WHERE name = ? ORDER BY version DESC LIMIT 1",
                (name,),
            ).fetchone()
            if latest is not None and (latest[2] == code or keep_code):
                run, version = latest[0], latest[1]
                self._connection.execute(
                    "UPDATE runs SET function = ?, code = ?, updated = ? WHERE id = ?",
                    (function, code, now, run),
                )
            else:
                version = 1 if latest is None else latest[1] + 1
                run = self._connection.execute(
                    "INSERT INTO runs (name, version, function, code, started, updated)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (name, version, function, code, now, now),
                ).lastrowid
        if latest is not None and version != latest[1]:
            warnings.warn(
                f"cellpool: run {name!r}: the function changed; starting version {version} "
                f"(journal_keep_code=True continues version {latest[1]})",
                UserWarning,
                stacklevel=2,
            )
        return JournalRun(self, name, version, run)

    def runs(self, name: str | None = None) -> list[dict[str, Any]]:
        """One row per run version (all runs, or those named ``name``), ready for
        ``pandas.DataFrame``: name, version, function, started, updated (epoch seconds),
        total, and a count per status (ok, error, timeout, crashed, cancelled)."""
        where, parameters = ("", ()) if name is None else (" WHERE runs.name = ?", (name,))
        rows = self._connection.execute(
            f"{_RUNS}{where} GROUP BY runs.id ORDER BY runs.name, runs.version", parameters
        )
        return [dict(zip(_RUN_COLUMNS, row, strict=True)) for row in rows]

    def load(self, name: str, version: int | None = None) -> Results:
        """The records of run ``name`` (its latest version by default) in index order,
        items and values unpickled: every key the version holds, not only the last
        call's. An unknown name or version raises ``KeyError``."""
        with _transaction(self._connection, "DEFERRED"):  # one snapshot for both reads
            run = self._find(name, version)
            rows = self._connection.execute(f"{_SELECT} ORDER BY idx, rowid", (run,)).fetchall()
        return Results(_stored(row).task_result() for row in rows)

    def forget(self, name: str, version: int | None = None) -> int:
        """Delete run ``name`` (every version if ``version`` is ``None``); how many
        records were deleted. The file does not shrink: later records reuse its space."""
        where = "name = ?" if version is None else "name = ? AND version = ?"
        parameters = (name,) if version is None else (name, version)
        deleted = 0
        with _transaction(self._connection):
            runs = self._connection.execute(f"SELECT id FROM runs WHERE {where}", parameters)
            for (run,) in runs.fetchall():
                deleted += self._connection.execute(
                    "DELETE FROM records WHERE run = ?", (run,)
                ).rowcount
                self._connection.execute("DELETE FROM runs WHERE id = ?", (run,))
        return deleted

    def close(self) -> None:
        """Close the Journal's connection; the runs it began go on until they are closed."""
        self._connection.close()

    def _find(self, name: str, version: int | None) -> int:
        if version is None:
            row = self._connection.execute(
                "SELECT id FROM runs WHERE name = ? ORDER BY version DESC LIMIT 1", (name,)
            ).fetchone()
        else:
            row = self._connection.execute(
                "SELECT id FROM runs WHERE name = ? AND version = ?", (name, version)
            ).fetchone()
        if row is None:
            which = f"run {name!r}" + ("" if version is None else f" version {version}")
            raise KeyError(f"no {which} in the journal {self.path}")
        return row[0]
