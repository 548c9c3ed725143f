"""The journal: records kept in SQLite by a writer thread, read back, shared by processes."""

from __future__ import annotations

import datetime
import gc
import json
import os
import pickle
import random
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

from cellpool import store as journal_module
from cellpool.keys import stable_key
from cellpool.results import Results, TaskResult
from cellpool.store import (
    SCHEMA_VERSION,
    Journal,
    JournalError,
    StoredRecord,
    default_path,
)

from .conftest import settle

SRC = str(Path(__file__).resolve().parents[1] / "src")


def subprocess_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC, **extra}


def record(index: int, status: str = "ok", **fields) -> TaskResult:
    started = fields.pop("started", 1_700_000_000.0 + index)
    finished = fields.pop("finished", None if started is None else started + 0.25)
    failure = {}
    if status != "ok":
        failure = {"error_type": "ValueError", "error": f"bad {index}", "traceback": "Tb\n"}
    fields = {
        "item": ("item", index),
        "value": {"square": index * index} if status == "ok" else None,
        "worker": f"w{index % 3}",
        "pid": 4000 + index % 3,
        "attempts": 1,
        **failure,
        **fields,
    }
    duration = None if started is None or finished is None else finished - started
    return TaskResult(
        index, status=status, started=started, finished=finished, duration=duration, **fields
    )


def write(run, result: TaskResult, key: str | None = None) -> None:
    run.write(
        stable_key(result.item) if key is None else key,
        result.index,
        result.item,
        result.status,
        result.value,
        result.error_type,
        result.error,
        result.traceback,
        result.worker,
        result.pid,
        result.attempts,
        result.started,
        result.finished,
    )


@pytest.fixture
def path(tmp_path):
    return tmp_path / "journal.db"


@pytest.fixture
def journal(path):
    with Journal(path) as journal:
        yield journal


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text, text
    return text


# -- keys ------------------------------------------------------------------------------

ITEMS = """[
    0, 1, -7, 10**30, 1.5, -0.0, "a", "", "naïve", b"\\x00\\x8f", None, True,
    (1, "a"), [1, [2, 3]], {"b": 1, "a": [2]}, range(3),
    {"x", "y", "z", "w", "v"}, frozenset({"p", "q", ("r", "s")}), {"k": {"m", "n", "o"}},
    pathlib.PurePosixPath("/data/file.csv"), decimal.Decimal("1.10"),
    cellpool.results.TaskResult(1, "item", "ok", value=frozenset({"v", "w"})),
]"""


def keys_in_subprocess(hash_seed: str) -> list[str]:
    script = (
        "import decimal, json, pathlib, cellpool.results\n"
        "from cellpool.keys import stable_key\n"
        f"print(json.dumps([stable_key(item) for item in {ITEMS}]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=subprocess_env(PYTHONHASHSEED=hash_seed),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return json.loads(out)


def test_stable_key_is_the_same_in_every_process_whatever_the_hash_seed():
    import decimal
    import pathlib

    import cellpool.results

    namespace = {"decimal": decimal, "pathlib": pathlib, "cellpool": cellpool}
    here = [stable_key(item) for item in eval(ITEMS, namespace)]
    assert all(len(key) == 32 and int(key, 16) >= 0 for key in here)
    assert keys_in_subprocess("1") == here
    assert keys_in_subprocess("2") == here


def test_stable_key_differs_for_different_items():
    items = [1, 1.0, True, "1", b"1", (1,), [1], [1, 2], [2, 1], {"a": 1}, {"a": 2}]
    items += [{1, 2}, {1, 3}, frozenset({1, 2}), None, 0, -0.0, 0.0, ("a", "b"), ("ab",)]
    keys = [stable_key(item) for item in items]
    assert len(set(keys)) == len(items)
    assert stable_key([1, {2, 3}]) == stable_key([1, {3, 2}])


def test_stable_key_of_plain_values_is_the_key_earlier_versions_made():
    # journals written before plain values took a shorter way must resume
    assert [stable_key(item) for item in (0, 143, -5, 1.5, "é\x8f", b"\x91", None)] == [
        "ac375f362546dc23dce573cc871c9d61",
        "f555e67dcb942b6280d81c4536f891cf",  # 143 pickles to a byte of a set's opcode
        "af003631ead2945cf7ba7a09fa160022",
        "8734d508543f564f241e21dd48f44802",
        "8164fdbc49fa3a53099b359ea64e7b87",
        "2271eb5074b21b58f171a4f6a5fe7f6a",
        "a0b0f31e42c9d3ebbfba5c1dc80c98aa",
    ]
    assert stable_key(True) == "d0403fbf3e3a7574f9bd6d6ec1b6bedd"
    assert stable_key((1, "a", 2.0)) == "000ddd2e1a4b198d6a5e41703a402c5a"
    assert stable_key(("x", (1, 2))) == "e7e145c4b0acb2165617bd44b3e9bcc7"


def test_stable_key_pickles_what_pickle_refuses_with_cloudpickle():
    square = lambda x: x * x  # noqa: E731
    assert stable_key(square) == stable_key(square)
    assert stable_key((square, {"s", "t"})) == stable_key((square, {"t", "s"}))


def test_stable_key_of_an_unpicklable_item_is_a_one_line_type_error():
    with pytest.raises(TypeError) as caught:
        stable_key({"lock": threading.Lock()})
    assert "dict" in one_line(caught.value)
    assert "lock" in str(caught.value)


# -- opening ---------------------------------------------------------------------------


def test_default_path_is_under_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_path() == tmp_path / ".cellpool" / "journal.db"
    assert default_path().is_absolute()
    with Journal() as journal:
        assert journal.path == default_path()
    assert default_path().is_file()


def test_a_new_journal_is_made_with_its_folders_in_wal_mode(tmp_path):
    path = tmp_path / "a" / "b" / "journal.db"
    with Journal(str(path)) as journal:
        assert journal.path == path
        assert journal.runs() == []
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert connection.execute("PRAGMA page_size").fetchone() == (16384,)
        meta = dict(connection.execute("SELECT key, value FROM cellpool_meta"))
    connection.close()
    assert meta == {"schema_version": str(SCHEMA_VERSION)}


def assert_refused(path: Path, *reasons: str) -> None:
    before = path.read_bytes()
    with pytest.raises(JournalError) as caught:
        Journal(path)
    message = one_line(caught.value)
    assert str(path) in message
    for reason in reasons:
        assert reason in message
    assert isinstance(caught.value, ValueError)
    assert path.read_bytes() == before


def test_a_file_that_is_not_sqlite_is_refused_and_left_as_it_was(path):
    path.write_bytes(b"name,value\n" * 500)
    assert_refused(path, "not an SQLite database")


def test_an_sqlite_file_of_another_application_is_refused_and_left_as_it_was(path):
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE meta (key TEXT, value TEXT)")
    connection.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    connection.commit()
    connection.close()
    assert_refused(path, "not a cellpool journal")


def test_a_journal_of_another_schema_version_is_refused_and_left_as_it_was(path):
    with Journal(path) as journal, journal.begin("r", "f", "code") as run:
        write(run, record(0))
    connection = sqlite3.connect(path)
    later = str(SCHEMA_VERSION + 1)
    connection.execute("UPDATE cellpool_meta SET value = ? WHERE key = 'schema_version'", (later,))
    connection.commit()
    connection.close()
    assert_refused(path, f"schema version {later}", f"reads version {SCHEMA_VERSION}")


VERSION_1 = (  # what a journal of schema version 1 held: a row per record
    "CREATE TABLE cellpool_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "INSERT INTO cellpool_meta VALUES ('schema_version', '1')",
    """CREATE TABLE runs (id INTEGER PRIMARY KEY, name TEXT NOT NULL, version INTEGER NOT NULL,
        function TEXT NOT NULL, code TEXT NOT NULL, started REAL NOT NULL, updated REAL NOT NULL,
        UNIQUE (name, version))""",
    """CREATE TABLE records (run INTEGER NOT NULL REFERENCES runs (id), key TEXT NOT NULL,
        idx INTEGER NOT NULL, item BLOB, status TEXT NOT NULL, value BLOB, error_type TEXT,
        error TEXT, traceback TEXT, worker TEXT, pid INTEGER, attempts INTEGER NOT NULL,
        started REAL, finished REAL, PRIMARY KEY (run, key))""",
    "INSERT INTO runs VALUES (1, 'crawl', 1, 'fetch', 'c1', 1.0, 2.0)",
    "INSERT INTO runs VALUES (2, 'other', 3, 'parse', 'c2', 3.0, 4.0)",
)


def test_a_journal_of_schema_version_1_is_upgraded_and_keeps_every_record(path):
    connection = sqlite3.connect(path)
    for statement in VERSION_1:
        connection.execute(statement)
    rows = [
        ("k0", 0, ("item", 0), "ok", {"square": 0}, None, None, None, "w0", 11, 1, 5.0, 6.0),
        ("k1", 1, ("item", 1), "error", None, "ValueError", "bad", "Tb\n", "w1", 12, 3, 7.0, 8.0),
        (
            "k2",
            2,
            ("item", 2),
            "ok",
            datetime.date(2020, 1, 2),
            None,
            None,
            None,
            "w0",
            11,
            1,
            None,
            None,
        ),
    ]
    for key, index, item, status, value, *rest in rows:
        blobs = [None if obj is None else pickle.dumps(obj) for obj in (item, value)]
        connection.execute(
            "INSERT INTO records VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (1 + index % 2, key, index, blobs[0], status, blobs[1], *rest),
        )
    connection.commit()
    connection.close()
    with Journal(path) as journal:
        listed = {row["name"]: row for row in journal.runs()}
        assert (listed["crawl"]["version"], listed["crawl"]["function"]) == (1, "fetch")
        assert (listed["crawl"]["total"], listed["crawl"]["ok"]) == (2, 2)
        assert (listed["other"]["total"], listed["other"]["error"]) == (1, 1)
        assert [r.value for r in journal.load("crawl")] == [
            {"square": 0},
            datetime.date(2020, 1, 2),
        ]
        (failed,) = journal.load("other")
        assert (failed.index, failed.item, failed.error, failed.traceback) == (
            1,
            ("item", 1),
            "bad",
            "Tb\n",
        )
        assert (failed.worker, failed.pid, failed.attempts, failed.started) == ("w1", 12, 3, 7.0)
        with journal.begin("crawl", "fetch", "c1") as run:  # goes on, in the new shape
            assert set(run.stored()) == {"k0", "k2"}
            write(run, record(5), key="k5")
        assert journal.runs("crawl")[0]["total"] == 3
    with sqlite3.connect(path) as connection:
        tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master")}
        meta = dict(connection.execute("SELECT key, value FROM cellpool_meta"))
    connection.close()
    assert "records" not in tables and meta == {"schema_version": str(SCHEMA_VERSION)}


def test_a_folder_is_refused(tmp_path):
    with pytest.raises(JournalError) as caught:
        Journal(tmp_path)
    assert str(tmp_path) in one_line(caught.value)


# -- runs and versions -----------------------------------------------------------------


def test_runs_of_different_names_in_one_file_stay_apart(journal):
    first = journal.begin("first", "f", "code")
    second = journal.begin("second", "g", "code")
    for i in range(5):
        write(first, record(i))
    for i in range(3):
        write(second, record(i, "error"), key=f"k{i}")
    first.close()
    second.close()
    assert set(first.stored()) == {stable_key(("item", i)) for i in range(5)}
    assert set(second.stored()) == {"k0", "k1", "k2"}
    assert {r.status for r in second.stored().values()} == {"error"}
    assert [(r["name"], r["version"], r["total"]) for r in journal.runs()] == [
        ("first", 1, 5),
        ("second", 1, 3),
    ]
    assert len(journal.load("first")) == 5
    assert len(journal.load("second")) == 3


def test_the_same_code_continues_the_latest_version_even_from_another_journal(path):
    with Journal(path) as journal, journal.begin("r", "f", "code-1") as run:
        write(run, record(0))
    with Journal(path) as journal, warnings.catch_warnings():
        warnings.simplefilter("error")
        with journal.begin("r", "f", "code-1") as run:
            assert run.version == 1
            assert [r.status for r in run.stored().values()] == ["ok"]


def test_changed_code_starts_the_next_version_with_a_warning(journal):
    run = journal.begin("r", "f", "code-1")
    write(run, record(0))
    run.close()
    with pytest.warns(UserWarning) as caught:
        changed = journal.begin("r", "f", "code-2")
    changed.close()
    assert changed.version == 2
    assert changed.stored() == {}
    (warning,) = caught
    message = one_line(warning.message)
    assert "'r'" in message and "function changed" in message and "version 2" in message
    assert [(r["version"], r["total"]) for r in journal.runs("r")] == [(1, 1), (2, 0)]
    with journal.begin("r", "f", "code-2") as again:
        assert again.version == 2


def test_keep_code_continues_the_version_and_takes_the_new_code(journal):
    run = journal.begin("r", "f", "code-1")
    write(run, record(0))
    run.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with journal.begin("r", "f-renamed", "code-2", keep_code=True) as kept:
            assert kept.version == 1
            assert len(kept.stored()) == 1
        with journal.begin("r", "f", "code-2") as again:
            assert again.version == 1
    assert journal.runs()[0]["function"] == "f"


def test_runs_counts_every_status_and_times(journal):
    before = time.time()
    run = journal.begin("r", "my_function", "code")
    statuses = ["ok"] * 4 + ["error"] * 3 + ["timeout"] * 2 + ["crashed", "cancelled"]
    for i, status in enumerate(statuses):
        write(run, record(i, status))
    run.close()
    (row,) = journal.runs()
    assert before <= row.pop("started") <= row.pop("updated") <= time.time()
    assert row == {
        "name": "r",
        "version": 1,
        "function": "my_function",
        "total": 11,
        "ok": 4,
        "error": 3,
        "timeout": 2,
        "crashed": 1,
        "cancelled": 1,
    }
    assert journal.runs("other") == []


# -- writing and reading ---------------------------------------------------------------


def test_load_gives_back_every_field_written_in_index_order(path):
    records = [
        record(0),
        record(1, value=[1, 2, {"nested": (3.5, None)}], item={"path": "/x", "n": {1, 2}}),
        record(2, "error"),
        record(3, "timeout", worker=None, pid=None, attempts=3),
        record(4, "crashed", traceback=None),
        record(5, "cancelled", started=None, finished=None, worker=None, pid=None, attempts=0),
        record(9, value=None),
        record(7, value=lambda x: x + 1),
    ]
    shuffled = random.sample(records, len(records))
    with Journal(path) as journal, journal.begin("r", "f", "code") as run:
        for r in shuffled:
            write(run, r, key=f"key-{r.index}")
    with Journal(path) as journal, journal.begin("r", "f", "code") as run:
        loaded = journal.load("r")
        stored = run.stored()
    assert isinstance(loaded, Results)
    expected = sorted(records, key=lambda r: r.index)
    function = expected[-2].value
    assert loaded[-2].value(1) == 2
    expected[-2] = record(7, value=loaded[-2].value)  # a function is equal to itself only
    assert loaded == expected
    assert function is not loaded[-2].value
    assert stored["key-2"] == StoredRecord(
        "key-2",
        2,
        ("item", 2),
        "error",
        None,
        "ValueError",
        "bad 2",
        "Tb\n",
        "w2",
        4002,
        1,
        records[2].started,
        records[2].finished,
    )
    assert stored["key-2"].task_result() == records[2]


def test_the_latest_record_of_a_key_wins(journal):
    run = journal.begin("r", "f", "code")
    write(run, record(0, "error"), key="k")
    write(run, record(0, "timeout"), key="k")
    run.close()
    run = journal.begin("r", "f", "code")
    write(run, record(0, attempts=2), key="k")
    run.close()
    (stored,) = run.stored().values()
    assert (stored.status, stored.value, stored.attempts) == ("ok", {"square": 0}, 2)
    assert journal.load("r") == [record(0, attempts=2)]


def test_load_of_an_unknown_run_is_a_one_line_key_error(journal):
    with pytest.raises(KeyError) as caught:
        journal.load("nothing")
    assert "'nothing'" in one_line(caught.value) and str(journal.path) in str(caught.value)
    journal.begin("r", "f", "code").close()
    with pytest.raises(KeyError) as caught:
        journal.load("r", version=2)
    assert "version 2" in one_line(caught.value)


def test_an_unpicklable_value_is_stored_as_a_pickling_error_and_the_rest_as_ok(journal):
    run = journal.begin("r", "f", "code")
    for i in range(10):
        value = threading.Lock() if i == 4 else i
        write(run, record(i, value=value))
    write(run, record(10, item=threading.Lock()), key="lock-item")
    write(run, record(11, "timeout", item=threading.Lock()), key="failed-lock-item")
    run.close()
    stored = run.stored()
    bad = stored[stable_key(("item", 4))]
    assert (bad.status, bad.value, bad.error_type) == ("error", None, "PicklingError")
    assert bad.error == (
        "the value could not be saved in the journal: cannot pickle '_thread.lock' object"
    )
    assert bad.item == ("item", 4) and bad.worker == "w1" and bad.started is not None
    assert stored["lock-item"].error.startswith("the item could not be saved in the journal")
    assert stored["failed-lock-item"].status == "timeout"  # keeps its own failure
    assert stored["failed-lock-item"].error == "bad 11"
    assert journal.runs()[0]["ok"] == 9
    assert journal.load("r")[4].error_type == "PicklingError"


def test_a_record_that_cannot_be_unpickled_reads_as_an_error(journal, tmp_path, monkeypatch):
    (tmp_path / "no_such_module.py").write_text("class Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import no_such_module

    run = journal.begin("r", "f", "code")
    write(run, record(0), key="good")
    write(run, record(1, value=no_such_module.Thing()), key="bad")
    write(run, record(2, value=[3]), key="also-good")
    run.close()
    del sys.modules["no_such_module"]  # the class is gone, as in a later kernel
    monkeypatch.undo()
    stored = run.stored()
    assert stored["also-good"].value == [3]
    assert stored["good"].status == "ok"
    bad = stored["bad"]
    assert (bad.status, bad.error_type, bad.value) == ("error", "UnpicklingError", None)
    assert bad.error == (
        "the value could not be loaded from the journal: No module named 'no_such_module'"
    )
    assert journal.load("r").exceptions()[0].__class__ is pickle.UnpicklingError


class Local:
    """A class a notebook defines: pickle names it in ``__main__``."""

    def __init__(self, n):
        self.n = n


def test_write_many_writes_a_batch_of_records_with_their_own_fields(journal, monkeypatch):
    monkeypatch.setattr(Local, "__module__", "__main__")
    monkeypatch.setattr(sys.modules["__main__"], "Local", Local, raising=False)
    run = journal.begin("r", "f", "code")
    nan = float("nan")
    run.write_many(
        ["a", "b", "c"], range(3), [10, 11, 12], "ok", [0, Local(2), None], None, None, None,
        "p1", 7, [1, 2, 1], [1.0, nan, 3.0], [1.5, nan, 3.5], 100.0,
    )  # fmt: skip
    run.write_many(
        ["d", "e"], [4, 6], [14, 16], "ok", [threading.Lock(), 5], None, None, None,
        "p1", 7, 1, None, None,
    )  # fmt: skip
    run.write_many(
        ["f"], [8], [18], "timeout", None, "TaskTimeout", "too long", None, "p2", 8, 2,
        None, None,
    )  # fmt: skip
    run.close()
    monkeypatch.delattr(sys.modules["__main__"], "Local")  # a later kernel has none
    stored = run.stored()
    assert stored["a"] == StoredRecord(
        "a", 0, 10, "ok", 0, None, None, None, "p1", 7, 1, 101.0, 101.5
    )
    assert stored["b"].value.n == 2  # pickled by value
    assert (stored["b"].attempts, stored["b"].started, stored["b"].finished) == (2, None, None)
    assert stored["c"].value is None and stored["c"].status == "ok"
    bad = stored["d"]
    assert (bad.status, bad.error_type, bad.index) == ("error", "PicklingError", 4)
    assert bad.error.startswith("the value could not be saved in the journal")
    assert stored["e"].value == 5
    assert stored["f"] == StoredRecord(
        "f", 8, 18, "timeout", None, "TaskTimeout", "too long", None, "p2", 8, 2, None, None
    )
    assert journal.runs()[0]["ok"] == 4


def test_records_written_one_by_one_and_in_batches_keep_their_order(journal):
    run = journal.begin("r", "f", "code")
    write(run, record(0, "error"), key="k")
    run.write_many(
        ["k", "j"], [0, 1], [0, 1], "ok", [5, 6], None, None, None, "p", 1, 1, None, None
    )
    write(run, record(1, "timeout"), key="j")
    run.close()
    stored = run.stored()
    assert (stored["k"].status, stored["k"].value) == ("ok", 5)
    assert stored["j"].status == "timeout"


def test_the_writer_says_when_it_takes_records_and_close_waits_for_them(journal):
    run = journal.begin("r", "f", "code")
    called = []
    run.on_taken(lambda: called.append((threading.current_thread().name, run.pending())))
    run.write_many(
        ["a", "b"], [0, 1], [0, 1], "ok", [0, 1], None, None, None, "p", 1, 1, None, None
    )
    run.close()
    assert called == [("cellpool-journal", 0)]
    assert len(run.stored()) == 2  # written when close returns


class Spy:
    """Notes the thread that pickles it."""

    threads: list[str] = []

    def __reduce__(self):
        Spy.threads.append(threading.current_thread().name)
        return Spy, ()


def test_items_and_values_are_pickled_on_the_writer_thread(journal):
    Spy.threads.clear()
    run = journal.begin("r", "f", "code")
    write(run, record(0, item=Spy(), value=Spy()), key="k")
    run.close()
    assert Spy.threads == ["cellpool-journal", "cellpool-journal"]
    assert isinstance(run.stored()["k"].value, Spy)


def test_records_are_written_within_a_batch_interval_while_the_run_goes_on(journal):
    run = journal.begin("r", "f", "code")
    write(run, record(0))
    assert not settle(lambda: not run.stored(), seconds=2)
    write(run, record(1))
    assert not settle(lambda: len(run.stored()) < 2, seconds=2)
    run.close()


def test_write_never_blocks_the_caller_and_close_writes_everything(journal):
    run = journal.begin("r", "f", "code")
    count = 200_000
    keys = [f"k{i}" for i in range(count)]
    now = time.time()
    started = time.perf_counter()
    for i, key in enumerate(keys):
        run.write(key, i, i, "ok", i * 2, None, None, None, "w0", 17, 1, now, now)
    spent = time.perf_counter() - started
    run.close()
    assert spent < 1.0, f"the caller spent {spent:.2f} s queueing {count} records"
    assert (journal.runs()[0]["total"], journal.runs()[0]["ok"]) == (count, count)


def test_a_run_dropped_without_close_still_writes_its_records(journal):
    run = journal.begin("r", "f", "code")
    write(run, record(0))
    del run
    gc.collect()
    assert not settle(lambda: [t for t in threading.enumerate() if t.name == "cellpool-journal"])
    assert journal.runs()[0]["total"] == 1


def test_a_run_goes_on_after_its_journal_is_closed_and_serves_any_thread(path):
    with Journal(path) as journal:
        run = journal.begin("r", "f", "code")

    def on_another_thread():
        for i in range(3000):
            write(run, record(i), key=str(i))
        run.close(timeout=0)  # never blocks
        run.close()
        assert len(run.stored()) == 3000

    thread = threading.Thread(target=on_another_thread)
    thread.start()
    thread.join()
    with Journal(path) as journal:
        assert journal.runs()[0]["total"] == 3000


EXITING = """
import sys
from cellpool.store import Journal

journal = Journal(sys.argv[1])
run = journal.begin("r", "f", "code")
for i in range(10):
    run.write(str(i), i, i, "ok", i, None, None, None, "w", 1, 1, 0.0, 1.0)
"""


def test_records_queued_at_interpreter_exit_are_written(path):
    subprocess.run(
        [sys.executable, "-c", EXITING, str(path)], env=subprocess_env(), check=True, timeout=60
    )
    with Journal(path) as journal:
        assert journal.runs()[0]["total"] == 10


# -- failing writes --------------------------------------------------------------------


@pytest.fixture
def limited_writer(monkeypatch):
    """The next writer's connection gets ``pragma`` (``{pages}``: the file's page count
    and a few more)."""

    def limit(pragma: str) -> None:
        connect = journal_module._connect
        pending = [pragma]

        def limited(path, create):
            connection = connect(path, create)
            if threading.current_thread().name == "cellpool-journal" and pending:
                (pages,) = connection.execute("PRAGMA page_count").fetchone()
                connection.execute(pending.pop().format(pages=pages + 5))
            return connection

        monkeypatch.setattr(journal_module, "_connect", limited)

    return limit


def written_with_warnings(journal, run, first: int, then: int, value_size: int) -> list:
    """Write ``first`` small records, wait until they are in the file, then ``then``
    records of ``value_size`` bytes each, in several batches; the warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(first):
            write(run, record(i))
        assert not settle(lambda: len(run.stored()) < first, seconds=5)
        for i in range(first, first + then):
            write(run, record(i, value=os.urandom(value_size)))
            if i % 10 == 0:
                time.sleep(0.03)  # so that several batches come
        run.close()
    return [w for w in caught if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize(
    ("pragma", "reason"),
    [
        ("PRAGMA max_page_count = {pages}", "database or disk is full"),
        ("PRAGMA query_only = 1", "attempt to write a readonly database"),
    ],
    ids=["disk-full", "read-only"],
)
def test_a_failing_write_warns_once_and_the_caller_goes_on(journal, limited_writer, pragma, reason):
    limited_writer(pragma)
    run = journal.begin("r", "f", "code")
    first = 0 if "query_only" in pragma else 5
    (warning,) = written_with_warnings(journal, run, first, 100, 4096)
    message = one_line(warning.message)
    assert str(journal.path) in message and reason in message and "'r'" in message
    assert len(run.stored()) == first
    # the file is still whole, and other runs can use it
    other = journal.begin("other", "f", "code")
    write(other, record(0))
    other.close()
    assert journal.runs("other")[0]["total"] == 1


def test_a_removed_file_warns_once_and_the_caller_goes_on(journal, path):
    run = journal.begin("r", "f", "code")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write(run, record(0))
        assert not settle(lambda: not run.stored(), seconds=5)
        path.unlink()
        for i in range(1, 50):
            write(run, record(i))
            time.sleep(0.005)
        run.close()
    (warning,) = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert "removed or replaced" in one_line(warning.message)


def test_a_forgotten_run_stops_being_written_with_a_warning(journal):
    run = journal.begin("r", "f", "code")
    write(run, record(0))
    assert not settle(lambda: not run.stored(), seconds=5)
    journal.forget("r")
    with pytest.warns(RuntimeWarning, match="the run was forgotten"):
        write(run, record(1))
        run.close()
    assert journal.runs() == []


# -- forget ----------------------------------------------------------------------------


def test_forget_deletes_a_version_or_every_version(journal):
    run = journal.begin("r", "f", "code-1")
    for i in range(4):
        write(run, record(i))
    run.close()
    with pytest.warns(UserWarning):
        run = journal.begin("r", "f", "code-2")
    for i in range(3):
        write(run, record(i))
    run.close()
    kept = journal.begin("kept", "f", "code")
    write(kept, record(0))
    kept.close()
    assert journal.forget("r", version=1) == 4
    assert [row["version"] for row in journal.runs("r")] == [2]
    assert journal.forget("r", version=1) == 0
    assert journal.forget("r") == 3
    assert journal.runs("r") == []
    with pytest.raises(KeyError):
        journal.load("r")
    assert journal.forget("never") == 0
    assert journal.runs()[0]["name"] == "kept"
    with journal.begin("r", "f", "code-3") as run:
        assert run.version == 1


# -- two processes ---------------------------------------------------------------------

WRITER = """
import sys, time
from pathlib import Path
from cellpool.store import Journal

path, name, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
(path.parent / f"ready-{name}").touch()
while len(list(path.parent.glob("ready-*"))) < 2:
    time.sleep(0.001)
with Journal(path) as journal, journal.begin(name, "f", "code") as run:
    for i in range(count):
        now = time.time()
        run.write(f"{name}-{i}", i, i, "ok", [name, i], None, None, None, "w", 1, 1, now, now)
        if i % 100 == 0:
            time.sleep(0.01)  # spread over about half a second, so the two overlap
"""


def test_two_processes_write_one_file_at_once(tmp_path):
    path = tmp_path / "shared" / "journal.db"
    path.parent.mkdir()
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), name, "5000"],
            env=subprocess_env(),
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("left", "right")
    ]
    errors = [process.communicate(timeout=60)[1] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], errors
    assert errors == ["", ""]
    with Journal(path) as journal:
        rows = journal.runs()
        assert [(r["name"], r["total"], r["ok"]) for r in rows] == [
            ("left", 5000, 5000),
            ("right", 5000, 5000),
        ]
        left, right = journal.load("left"), journal.load("right")
    assert left.values == [["left", i] for i in range(5000)]
    assert right.values == [["right", i] for i in range(5000)]
    spans = [(min(r.finished for r in run), max(r.finished for r in run)) for run in (left, right)]
    assert max(start for start, _ in spans) < min(end for _, end in spans), "no overlap"
    connection = sqlite3.connect(path)
    assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    connection.close()


# -- chunks: what a row holds ----------------------------------------------------------


def records_in_rows(path) -> int:
    """How many records the file's rows hold, replaced ones included."""
    with sqlite3.connect(path) as connection:
        blobs = connection.execute("SELECT keys FROM chunks").fetchall()
    connection.close()
    return sum(len(pickle.loads(keys)[0]) for (keys,) in blobs)


class Key(str):
    """A key of a ``str`` subclass, as ``numpy.str_`` is."""


def test_text_of_str_subclasses_is_kept_as_plain_text(journal, path):
    class Message(str):  # defined here: it cannot be pickled at all
        pass

    run = journal.begin("r", "f", "code")
    write(run, record(0), key=Key("first"))
    failed = record(1, "error", error=Message("bad 1"), worker=Message("w1"))
    write(run, failed, key=Message("second"))
    run.close()
    stored = run.stored()
    assert set(stored) == {"first", "second"}
    assert all(type(key) is str for key in stored)
    second = stored["second"]
    assert (second.error, second.worker) == ("bad 1", "w1")
    assert type(second.error) is str and type(second.worker) is str
    assert [r.status for r in journal.load("r")] == ["ok", "error"]


@pytest.mark.parametrize("page", [bytes, lambda data: {"page": data}], ids=["plain", "pickled"])
def test_records_too_large_for_one_row_are_split_over_several(journal, path, monkeypatch, page):
    from cellpool import chunks

    monkeypatch.setattr(chunks, "ROW_BYTES", 10_000)
    values = [page(i.to_bytes(2, "big") * 500) for i in range(100)]
    run = journal.begin("r", "f", "code")
    run.write_many(
        [f"k{i}" for i in range(100)], range(100), list(range(100)), "ok", values,
        None, None, None, "w0", 1, 1, None, None,
    )  # fmt: skip
    run.close()
    with sqlite3.connect(path) as connection:
        (rows,) = connection.execute("SELECT count(*) FROM chunks").fetchone()
    connection.close()
    assert rows >= 10
    loaded = journal.load("r")
    assert [r.index for r in loaded] == list(range(100))
    assert [r.value for r in loaded] == values and loaded.ok


def test_replaced_records_are_dropped_once_they_outnumber_the_rest(journal, path, monkeypatch):
    monkeypatch.setattr(journal_module, "COMPACT_AT", 1000)
    for round_ in range(5):  # 20 inputs, run five times over (rerun="all")
        with journal.begin("r", "f", "code") as run:
            for i in range(20):
                write(run, record(i, value=(round_, i)), key=f"k{i}")
            if round_ == 2:
                write(run, record(99, "timeout"), key="k99")  # an input of one round only
    assert records_in_rows(path) == 101
    monkeypatch.setattr(journal_module, "COMPACT_AT", 10)
    with journal.begin("r", "f", "code"):
        pass
    assert records_in_rows(path) == 21
    assert [r.value for r in journal.load("r")] == [(4, i) for i in range(20)] + [None]
    assert journal.runs()[0]["total"] == 21 and journal.runs()[0]["timeout"] == 1


def test_a_forgotten_run_whose_id_a_new_run_takes_writes_nothing_into_it(journal):
    forgotten = journal.begin("old", "f", "code")
    write(forgotten, record(0))
    assert not settle(lambda: not forgotten.stored(), seconds=5)
    journal.forget("old")
    with journal.begin("new", "f", "code") as new:  # the same row id, now free
        write(new, record(1), key="new-key")
    with pytest.warns(RuntimeWarning, match="the run was forgotten"):
        write(forgotten, record(2), key="old-key")
        forgotten.close()
    assert [r.index for r in journal.load("new")] == [1]
