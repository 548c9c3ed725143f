"""A journaled run: what was already done comes back from the journal, the rest runs.

The pieces, and which thread owns what::

    caller (run/start)   opens the journal run: its version, and what is stored
    feeder thread        JournaledInput: keys each input (user code: ``key=``), puts a
                         restored record straight into the sink, and hands the rest to
                         the dispatcher as (index, item), adding their keys to ``keys``;
                         owns ``restored`` and ``failed``
    dispatcher           JournalSink.put/put_many: each finished record goes to the
                         Results and is queued for the journal with the key it takes
                         from ``keys``, a batch's records as one entry
                         (``JournalRun.write``/``write_many`` never block and pickle
                         nothing on this thread); the journal's backlog counts against
                         the run's ``max_pending``, so the input waits for the disk
    journal writer       writes records in short transactions, pickled (store.py,
                         chunks.py), and wakes the dispatcher as it takes them (the
                         backlog shrank)
    delivery thread      flushes the journal, then completes the run's future

Indices stay the input's: a restored input keeps its place in the ``Results``, and a
fresh one carries its index through the dispatcher's batch.
"""

from __future__ import annotations

import hashlib
import marshal
import math
import os
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from .results import Failure
from .sinks import Finished, FinishedBatch, RecordSink, with_results

if TYPE_CHECKING:
    from .chunks import StoredRecord
    from .delivery import Deliveries
    from .runs import Run
    from .store import JournalRun

RERUN = ("errors", "none", "all")  # what runs again: failures (default), nothing, all
_FAILED = ("error", "timeout", "crashed")
_NO_FAILURE = (None, None, None)  # error type, error, traceback


def open_run(
    journal: Any, fn: Callable[..., Any], keep_code: bool
) -> tuple[JournalRun, dict[str, StoredRecord]]:
    """The run of ``fn`` in the journal ``journal`` names, and what it holds: a name
    (``"crawl"``) is a run in the default store; a path (``"runs/crawl.db"``) or a
    ``Journal`` holds runs named after their function."""
    name = getattr(fn, "__name__", type(fn).__name__)
    return open_named_run(journal, name, getattr(fn, "__qualname__", name), identity(fn), keep_code)


def open_named_run(
    journal: Any, name: str, function: str, code: str, keep_code: bool
) -> tuple[JournalRun, dict[str, StoredRecord]]:
    """The run in ``journal`` (see ``open_run``) of the work described by ``function``
    and ``code`` (its identity), named ``name`` unless ``journal`` names it. Read on
    the caller's thread; a store opened here is closed again (the run writes through
    its own connection)."""
    from .store import Journal

    if isinstance(journal, Journal):
        store = journal
    elif _is_path(journal):
        store = Journal(journal)
    else:
        store, name = Journal(), journal
    try:
        run = store.begin(name, function, code, keep_code)
        try:
            return run, run.stored()
        except BaseException:
            run.close()
            raise
    finally:
        if store is not journal:
            store.close()


def _is_path(journal: str | os.PathLike[str]) -> bool:
    text = os.fspath(journal)
    return os.sep in text or text.endswith((".db", ".sqlite", ".sqlite3"))


def identity(fn: Callable[..., Any]) -> str:
    """What makes a run's function the same one: its code and the names it uses (not
    where the code sits in its file), or, for a callable object, its type."""
    code = getattr(fn, "__code__", None)
    if code is None:
        kind = type(getattr(fn, "func", fn))
        return f"{kind.__module__}.{kind.__qualname__}"
    return hashlib.blake2b(marshal.dumps(_bare(code)), digest_size=16).hexdigest()


def _bare(code: types.CodeType) -> types.CodeType:
    """``code`` without its file name and line numbers, nested code included."""
    consts = tuple(_bare(c) if isinstance(c, types.CodeType) else c for c in code.co_consts)
    return code.replace(co_filename="", co_firstlineno=1, co_linetable=b"", co_consts=consts)


class Settles(Protocol):
    """Where a journaled input puts the records it makes without running anything (on
    the feeder thread, which may read on a little after the run ended: such records
    are not the run's, and are dropped)."""

    def restore(self, index: int, item: Any, record: StoredRecord) -> None: ...

    def unkeyed(self, index: int, item: Any, failure: Failure) -> None: ...


class JournaledInput:
    """The run's input as the dispatcher sees it: ``(index, item)`` for the inputs to
    run. The others are recorded here, on the feeder thread: restored from the journal,
    or an error when their key cannot be made."""

    def __init__(
        self,
        items: Iterable[Any],
        key: Callable[[Any], Any] | None,
        stored: dict[str, StoredRecord],
        rerun: str,
        sink: Settles,
    ) -> None:
        from .keys import stable_key

        self._items = items
        self._key = key or stable_key
        self._stored = stored
        self._rerun = rerun
        self._sink = sink
        # index -> key of the inputs handed on to run, until their record is journaled
        # (added by the feeder thread, taken by the dispatcher: single dict operations)
        self.keys: dict[int, str] = {}
        self.restored = 0  # records taken from the journal
        self.failed = 0  # inputs whose key could not be made

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        key_of, stored, keys = self._key_of, self._stored, self.keys  # per item: kept lean
        for index, item in enumerate(self._items):
            key = key_of(index, item)
            if key is None:
                continue
            if stored:
                record = stored.get(key)
                if record is not None and self._restores(record.status):
                    self._sink.restore(index, item, record)
                    self.restored += 1
                    continue
            keys[index] = key
            yield index, item

    def _key_of(self, index: int, item: Any) -> str | None:
        try:
            key = self._key(item)
            if not isinstance(key, str):
                key = hashlib.blake2b(repr(hash(key)).encode(), digest_size=16).hexdigest()
            return key
        except Exception as error:
            failure = Failure(
                type(error).__name__,
                f"the journal key of this input could not be made: {error}",
                None,
                error,
            )
            self._sink.unkeyed(index, item, failure)
            self.failed += 1
            return None

    def _restores(self, status: str) -> bool:
        if self._rerun == "all":
            return False
        return status == "ok" or (self._rerun == "none" and status in _FAILED)


class JournalSink(RecordSink):
    """A ``RecordSink`` that also queues each finished record for the journal; the
    journal is flushed before the run's future completes."""

    def __init__(self, deliveries: Deliveries, run: JournalRun, wake: Callable[[], None]) -> None:
        super().__init__(deliveries)
        self.journal_run = run
        self.input: JournaledInput | None = None  # set before the run starts
        self._ended = False  # guarded by _lock: the run has ended
        # the dispatcher grants more input once the journal's backlog shrinks
        run.on_taken(wake)

    def restore(self, index: int, item: Any, record: StoredRecord) -> None:
        """Put a record from the journal in its input's place (feeder thread)."""
        with self._lock:
            if self._ended:
                return
            self.results._put_record(index, index, item, record, -self.results._clock)
            self.results._restored.add(index)

    def unkeyed(self, index: int, item: Any, failure: Failure) -> None:
        """The error record of an input whose key could not be made (feeder thread)."""
        with self._lock:
            if self._ended:
                return
            self.results._put(index, index, item, "error", None, failure, None, None, 0, None, None)

    def put(self, done: Finished) -> None:
        super().put(done)
        self._write(done)

    def put_many(self, done: FinishedBatch) -> None:
        done = done._replace(indices=as_range(done.indices))
        super().put_many(done)
        if self.input is None:
            return
        pop = self.input.keys.pop
        keys = [pop(index, None) for index in done.indices]
        if done.status == "cancelled":
            return  # not done: it runs again next time
        error = _NO_FAILURE if done.failure is None else done.failure[:3]
        self.journal_run.write_many(
            keys, done.indices, done.items, done.status, done.values, *error,
            done.worker, done.pid, done.attempts, done.started, done.finished,
            self.results._clock,
        )  # fmt: skip

    def _write(self, done: Finished) -> None:
        task = done.task
        key = self.input.keys.pop(task.index, None) if self.input is not None else None
        if key is not None:
            write_record(
                self.journal_run, key, task.index, task.item, done.status, done.value,
                done.failure, done.worker, done.pid, task.attempts, done.started,
                done.finished, self.results._clock,
            )  # fmt: skip

    def buffered(self) -> int:
        """Records the journal has yet to write: they hold back the input's reading,
        so a journal slower than the tasks keeps memory bounded."""
        return self.journal_run.pending()

    def close_journal(self) -> None:
        """Write what is queued and stop the journal's writer (the run will not
        start, or has ended)."""
        self.journal_run.close()

    def finish(self, run: Run) -> None:
        # One delivery does both, in order: the journal is flushed (on a delivery
        # thread: the dispatcher never waits on disk), then the future completes.
        error = run.input_error
        with self._lock:
            self._ended = True  # the feeder records nothing more

        def flush_then_complete() -> None:
            self.close_journal()
            if error is not None:
                self.future.set_exception(with_results(error, self.results))
            else:
                self.future.set_result(self.results)

        self._deliveries.put(flush_then_complete)


def write_record(
    journal_run: JournalRun,
    key: str,
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
    clock: float,
) -> None:
    """Queue a record for the journal (never blocks), unless it is cancelled: that
    input runs next time. Times are on the monotonic clock, ``clock`` apart from epoch
    seconds."""
    if status == "cancelled":
        return
    error = _NO_FAILURE if failure is None else failure[:3]
    times = (_on_clock(started, clock), _on_clock(finished, clock))
    journal_run.write(key, index, item, status, value, *error, worker, pid, attempts, *times)


def as_range(indices: Sequence[int]) -> Sequence[int]:
    """A batch's increasing indices (a list: restored inputs leave gaps), as a range if
    they are consecutive, whose records ``Results`` takes in slices, not one by one."""
    if isinstance(indices, range) or not indices or indices[-1] - indices[0] >= len(indices):
        return indices
    return range(indices[0], indices[-1] + 1)


def _on_clock(seconds: float | None, offset: float) -> float | None:
    return None if seconds is None or math.isnan(seconds) else seconds + offset
