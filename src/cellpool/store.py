"""Durable runs: every finished record kept in an embedded SQLite file, so a run resumes.

A journal is one SQLite file (``.cellpool/journal.db`` under the working directory by
default). It holds runs by name; each name has versions, a new one whenever the
function's code changes (``Journal.begin``). A version keeps the records written for it
by input key (``keys.stable_key(item)`` by default), the latest of a key winning, so running
the same journaled run again can skip the inputs whose stored record is ok. Records are
written in chunks, one row per write transaction (chunks.py): a thousand records cost
about as much as one.

Threads, and what each owns::

    opening thread    Journal           the Journal's connection: begin, runs, load
                                        and forget run on the thread that opened the
                                        Journal (sqlite3 checks it)
    any thread        JournalRun.stored a connection of its own, opened and closed in
                                        the call
    dispatcher        JournalRun.write  puts a tuple of the record's fields on the run's
                      (write_many)      queue (of a batch's records, one ``Records``):
                                        never blocks, never pickles
    any thread        JournalRun.close  puts the stop mark; waits for the writer to write
                                        what is queued unless timeout=0 (then it never
                                        blocks)
    writer (per run)  _Writer           its own connection and the batch in hand; takes
                                        from the queue (and calls ``on_taken``), writes
                                        what it took as one chunk, pickled, in one short
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
import collections
import contextlib
import itertools
import operator
import os
import queue
import sqlite3
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from .chunks import (
    Chunk,
    Records,
    StoredRecord,
    latest_statuses,
    records_in,
    row_kept,
    row_keys,
    row_records,
)
from .errors import one_line
from .results import STATUSES, Results

SCHEMA_VERSION = 2  # 2: records kept in chunks (chunks.py); 1 had a row per record
BUSY_TIMEOUT = 10.0  # seconds to wait for another connection's transaction
BATCH_SECONDS = 0.1  # a record waits at most this long to be written...
BATCH_RECORDS = 1000  # ...or until this many are waiting
COMPACT_AT = 10_000  # replaced records a run keeps before Journal.begin drops them
EXIT_SECONDS = 5.0  # at interpreter exit, how long writers may take to write what is queued
# A new file's page size (SQLite's default is 4 KiB): a chunk's blobs, tens of KiB,
# span fewer overflow pages, and the WAL, checkpointed every 1,000 pages, less often.
PAGE_SIZE = 16384

_SQLITE_HEADER = b"SQLite format 3\x00"
_META = "cellpool_meta"
_STOP = object()  # on a writer's queue: write what came before, then end

_CHUNKS = (
    """CREATE TABLE chunks (
        id INTEGER PRIMARY KEY,  -- the order rows were written in: a key's latest wins
        run INTEGER NOT NULL REFERENCES runs (id),
        keys BLOB NOT NULL,  -- the records' fields, pickled by column (chunks.py)
        fields BLOB NOT NULL,
        items BLOB NOT NULL,
        "values" BLOB NOT NULL)""",
    "CREATE INDEX chunks_of_run ON chunks (run, id)",
)
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
    *_CHUNKS,
)
_INSERT = 'INSERT INTO chunks (run, keys, fields, items, "values") VALUES (?, ?, ?, ?, ?)'
_READ = 'SELECT id, keys, fields, items, "values" FROM chunks WHERE run = ? ORDER BY id'
_READ_KEYS = "SELECT id, keys FROM chunks WHERE run = ? ORDER BY id"
_READ_ROW = 'SELECT keys, fields, items, "values" FROM chunks WHERE id = ?'
_REWRITE = 'UPDATE chunks SET keys = ?, fields = ?, items = ?, "values" = ? WHERE id = ?'


class JournalError(ValueError):
    """A file that cannot be used as a journal; its message is one line naming the path and why."""


def default_path() -> Path:
    """``.cellpool/journal.db`` under the current working directory, as an absolute path."""
    return Path.cwd() / ".cellpool" / "journal.db"


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
        raise JournalError(f"{path}: cannot be read ({one_line(exc)})") from None
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


def _check_schema(connection: sqlite3.Connection, path: Path) -> str:
    """The file's schema version: this one, or one this cellpool upgrades."""
    if _META not in _tables(connection):
        raise JournalError(
            f"{path}: not a cellpool journal (an SQLite database without a {_META} table)"
        )
    found = _schema_version(connection)
    if found not in (str(SCHEMA_VERSION), _UPGRADABLE):
        raise JournalError(
            f"{path}: a cellpool journal of schema version {found}; "
            f"this cellpool reads version {SCHEMA_VERSION} (and upgrades version {_UPGRADABLE})"
        )
    return found


def _schema_version(connection: sqlite3.Connection) -> str:
    row = connection.execute(f"SELECT value FROM {_META} WHERE key = 'schema_version'").fetchone()
    return row[0] if row is not None else "unknown"


_UPGRADABLE = "1"
_VERSION_1_RECORDS = (
    "SELECT key, idx, item, status, value, error_type, error, traceback, worker, pid,"
    " attempts, started, finished FROM records WHERE run = ? ORDER BY rowid"
)


def _upgrade(connection: sqlite3.Connection) -> None:
    """Rewrite a version 1 file, a row per record, as chunks; items and values keep
    their pickles, so nothing is unpickled or lost."""
    with _transaction(connection):
        if _schema_version(connection) != _UPGRADABLE:
            return  # another connection upgraded it meanwhile
        for statement in _CHUNKS:
            connection.execute(statement)
        for (run,) in connection.execute("SELECT id FROM runs").fetchall():
            rows = connection.execute(_VERSION_1_RECORDS, (run,))
            while part := rows.fetchmany(BATCH_RECORDS):
                chunk = Chunk(pickled=True)
                for row in part:
                    chunk.add(row)
                connection.executemany(_INSERT, [(run, *blobs) for blobs in chunk.rows()])
        connection.execute("DROP TABLE records")
        connection.execute(
            f"UPDATE {_META} SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),)
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
    """A connection to the journal at ``path``, which is made if new, or upgraded from
    an earlier schema; nothing is written to a file that is not a cellpool journal."""
    _check_header(path)
    try:
        connection = _connect(path, create=True)
    except sqlite3.Error as exc:
        raise JournalError(f"{path}: cannot be opened ({one_line(exc)})") from None
    try:
        if not _tables(connection):
            _create(connection)
        version = _check_schema(connection, path)
        _use_wal(connection)
        _configure(connection)
        if version == _UPGRADABLE:
            _upgrade(connection)
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the old rows' WAL
    except sqlite3.Error as exc:
        connection.close()
        raise JournalError(f"{path}: cannot be used as a journal ({one_line(exc)})") from None
    except BaseException:
        connection.close()
        raise
    return connection


# -- writing ---------------------------------------------------------------------------


class _Unwritable(Exception):
    """The journal can take no more records of this run."""


class _Writer:
    """A run's writer thread and its queue (see the module docstring)."""

    def __init__(
        self, path: Path, identity: tuple[int, int], label: str, run: tuple[int, float]
    ) -> None:
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
        self._run = run  # (row id, started): a forgotten run's id may be used again
        self.thread = threading.Thread(target=self._serve, name="cellpool-journal", daemon=True)

    def put(self, entry: Records | tuple[Any, ...]) -> None:
        """Queue a record's fields, or ``Records``, for the thread (never blocks)."""
        with self.lock:
            self.queued += records_in(entry)
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
        """The next records to write (tuples of one record's fields, and ``Records``):
        what comes within ``BATCH_SECONDS`` of the first, until ``BATCH_RECORDS`` are
        taken; and whether the stop mark came."""
        first = self.queue.get()
        if first is _STOP:
            return [], True
        taken, size = [first], records_in(first)
        deadline = time.monotonic() + BATCH_SECONDS
        stop = False
        while size < BATCH_RECORDS:
            try:
                entry = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if entry is _STOP:
                stop = True
                break
            taken.append(entry)
            size += records_in(entry)
        self.taken += size
        return taken, stop

    def _save(self, connection: sqlite3.Connection, taken: list[Any]) -> None:
        try:
            chunk = Chunk()
            for entry in taken:
                chunk.add(entry)
            rows = [(self._run[0], *blobs) for blobs in chunk.rows()]  # before taking the lock
            self._check_file()
            with _transaction(connection):
                # a run forgotten, and its id taken by a run begun since, is not this one
                updated = connection.execute(
                    "UPDATE runs SET updated = ? WHERE id = ? AND started = ?",
                    (time.time(), *self._run),
                )
                if updated.rowcount == 0:
                    raise _Unwritable("the run was forgotten")
                connection.executemany(_INSERT, rows)
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
            f"cellpool: the journal {self._path} could not be written ({one_line(error)}); "
            f"{self._label} is no longer journaled",
            RuntimeWarning,
            stacklevel=1,
        )


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

    def __init__(self, journal: Journal, name: str, version: int, run: tuple[int, float]) -> None:
        """``run``: the run's row id, and when it started (ids of forgotten runs are
        used again)."""
        self.name = name
        self.version = version
        self.path = journal.path
        self._run = run[0]
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
            raise JournalError(f"{self.path}: cannot be read ({one_line(exc)})") from None
        with contextlib.closing(connection):
            return _latest(connection, self._run)

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
            self._writer.put((*record, worker, pid, attempts, started, finished))

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
            records = Records(
                keys, indices, items, status, values, error_type, error, traceback,
                worker, pid, attempts, started, finished, offset,
            )  # fmt: skip
            self._writer.put(records)

    def close(self, timeout: float | None = None) -> None:
        """Write what is queued, then stop the writer thread and close its connection.

        Waits at most ``timeout`` seconds for the records to be written; the thread
        finishes the writing after that, and closes its connection on its own.
        ``close(timeout=0)`` never blocks (the dispatcher may call it when a run ends).
        """
        self._closed = True
        self._finalizer()  # the stop mark, put once
        self._writer.written.wait(timeout)


def _latest(connection: sqlite3.Connection, run: int) -> dict[str, StoredRecord]:
    """Key -> the latest record of that key in run ``run``, in the order of those
    records' writes; records that later ones replaced are not unpickled."""
    live, _ = _live(connection, run)
    latest: dict[str, StoredRecord] = {}
    for row, *blobs in connection.execute(_READ, (run,)):
        if row in live:
            for record in row_records(*blobs, live[row]):
                latest[record.key] = record
    return latest


def _live(
    connection: sqlite3.Connection, run: int
) -> tuple[dict[int, list[int] | None], dict[int, int]]:
    """Where the latest record of each key of run ``run`` is: row -> its positions
    (``None``: all of them), rows holding none left out; and row -> its record count."""
    where: dict[str, tuple[int, int]] = {}
    sizes: dict[int, int] = {}
    for row, blob in connection.execute(_READ_KEYS, (run,)):
        keys, _ = row_keys(blob)
        sizes[row] = len(keys)
        where.update(zip(keys, zip(itertools.repeat(row), range(len(keys))), strict=True))
    by_row: dict[int, list[int]] = collections.defaultdict(list)
    for row, position in where.values():
        by_row[row].append(position)
    live = {
        row: None if len(spots) == sizes[row] else sorted(spots) for row, spots in by_row.items()
    }
    return live, sizes


def _compact(connection: sqlite3.Connection, run: int) -> None:
    """Drop the records of run ``run`` that later records of their keys replaced, once
    they outnumber the rest and ``COMPACT_AT``: a run written again and again (reruns,
    repeated keys) keeps a file, and reads, the size of its latest records. Items and
    values keep their pickles. Call it inside a write transaction."""
    live, sizes = _live(connection, run)
    kept = sum(
        sizes[row] if positions is None else len(positions) for row, positions in live.items()
    )
    if sum(sizes.values()) - kept <= max(kept, COMPACT_AT):
        return
    for row in sizes:
        if row not in live:
            connection.execute("DELETE FROM chunks WHERE id = ?", (row,))
        elif (positions := live[row]) is not None:
            blobs = connection.execute(_READ_ROW, (row,)).fetchone()
            connection.execute(_REWRITE, (*row_kept(*blobs, positions), row))


_RUN_COLUMNS = ("name", "version", "function", "started", "updated", "total", *STATUSES)


class Journal(_Closes):
    """An SQLite file of runs' records, to resume runs (see the module docstring).

    Its methods run on the thread that opened it; the ``JournalRun``s it begins, on any.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        """Open or create the journal at ``path`` (``default_path()`` if ``None``).

        Missing directories are made. A file that is not SQLite, an SQLite file that is
        not a cellpool journal, or a journal of a later ``SCHEMA_VERSION`` raises
        ``JournalError``, and the file is left as it was. A journal of schema version 1
        is upgraded in place.
        """
        self.path = default_path() if path is None else _absolute(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise JournalError(
                f"{self.path}: its folder cannot be made ({one_line(exc)})"
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
                "SELECT id, version, code, started FROM runs WHERE name = ?"
                " ORDER BY version DESC LIMIT 1",
                (name,),
            ).fetchone()
            if latest is not None and (latest[2] == code or keep_code):
                run, version, _, started = latest
                self._connection.execute(
                    "UPDATE runs SET function = ?, code = ?, updated = ? WHERE id = ?",
                    (function, code, now, run),
                )
                _compact(self._connection, run)
            else:
                version, started = (1 if latest is None else latest[1] + 1), now
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
        return JournalRun(self, name, version, (run, started))

    def runs(self, name: str | None = None) -> list[dict[str, Any]]:
        """One row per run version (all runs, or those named ``name``), ready for
        ``pandas.DataFrame``: name, version, function, started, updated (epoch seconds),
        total, and a count per status (ok, error, timeout, crashed, cancelled)."""
        where, parameters = ("", ()) if name is None else (" WHERE name = ?", (name,))
        listed = []
        with _transaction(self._connection, "DEFERRED"):  # one snapshot for every read
            runs = self._connection.execute(
                "SELECT id, name, version, function, started, updated FROM runs"
                f"{where} ORDER BY name, version",
                parameters,
            )
            for run, *described in runs.fetchall():
                statuses = latest_statuses(self._connection.execute(_READ_KEYS, (run,)))
                tally = collections.Counter(statuses.values())
                counts = (len(statuses), *(tally[status] for status in STATUSES))
                listed.append(dict(zip(_RUN_COLUMNS, (*described, *counts), strict=True)))
        return listed

    def load(self, name: str, version: int | None = None) -> Results:
        """The records of run ``name`` (its latest version by default) in index order,
        items and values unpickled: every key the version holds, not only the last
        call's. An unknown name or version raises ``KeyError``."""
        with _transaction(self._connection, "DEFERRED"):  # one snapshot for both reads
            run = self._find(name, version)
            records = _latest(self._connection, run).values()
        # sorted is stable: records of one index keep the order their keys came in
        return Results(
            record.task_result() for record in sorted(records, key=operator.attrgetter("index"))
        )

    def forget(self, name: str, version: int | None = None) -> int:
        """Delete run ``name`` (every version if ``version`` is ``None``); how many
        records (inputs' latest) it held. The file does not shrink: later records reuse
        its space."""
        where = "name = ?" if version is None else "name = ? AND version = ?"
        parameters = (name,) if version is None else (name, version)
        deleted = 0
        with _transaction(self._connection):
            runs = self._connection.execute(f"SELECT id FROM runs WHERE {where}", parameters)
            for (run,) in runs.fetchall():
                deleted += len(latest_statuses(self._connection.execute(_READ_KEYS, (run,))))
                self._connection.execute("DELETE FROM chunks WHERE run = ?", (run,))
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
