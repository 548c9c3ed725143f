"""Journaled runs: every record is written as it finishes, and the same run started
again restores what was done and runs the rest."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

import cellpool
from cellpool import Executor, Journal

from .conftest import settle


@pytest.fixture
def journal_file(tmp_path):
    return tmp_path / "runs.db"


def square_unless_seven(x):
    if x == 7:
        raise ValueError("seven")
    return x * x


def test_a_run_started_again_restores_what_was_ok_and_runs_the_failures(journal_file):
    first = cellpool.run(square_unless_seven, range(20), journal=journal_file, progress="none")
    assert first.counts() == {"ok": 19, "error": 1}
    assert not any(record.restored for record in first)
    ran = []

    def square(x):
        ran.append(x)
        return x * x

    square.__name__ = "square_unless_seven"  # the same run in the file, a changed function
    second = cellpool.run(
        square, range(20), journal=journal_file, journal_keep_code=True, progress="none"
    )
    assert ran == [7]  # only the failure ran again
    assert second.values == [x * x for x in range(20)]
    assert [record.index for record in second if not record.restored] == [7]
    assert "19 restored from a journal" in second.summary()


def test_rerun_none_restores_everything_and_all_runs_everything(journal_file):
    cellpool.run(square_unless_seven, range(10), journal=journal_file, progress="none")
    kept = cellpool.run(
        square_unless_seven, range(10), journal=journal_file, rerun="none", progress="none"
    )
    assert all(record.restored for record in kept)
    assert kept.counts() == {"ok": 9, "error": 1}
    assert kept[7].error == "seven"
    again = cellpool.run(
        square_unless_seven, range(10), journal=journal_file, rerun="all", progress="none"
    )
    assert not any(record.restored for record in again)


def counted_work(x, count):
    """5 ms of work that counts its executions in the file ``count``, a byte each."""
    with open(count, "ab") as file:
        file.write(b".")
    time.sleep(0.005)
    return x * 3


def executions(path):
    return path.stat().st_size if path.exists() else 0


def test_cancelled_inputs_are_not_journaled_and_run_on_resume(journal_file, tmp_path):
    count = str(tmp_path / "count")
    with Executor("process", 2, journal=journal_file) as ex:
        job = ex.start(counted_work, range(400), [count] * 400, progress="none")
        settle(lambda: len(job.partial()) < 100, 30)
        job.cancel()
        partial = job.result(timeout=30)
        done = partial.counts()["ok"]
        assert partial.counts()["cancelled"] > 0
        ran_before = executions(tmp_path / "count")
        resumed = ex.run(counted_work, range(400), [count] * 400, progress="none")
    restored = [record.index for record in resumed if record.restored]
    assert len(restored) == done
    assert resumed.values == [x * 3 for x in range(400)]
    with Journal(journal_file) as journal:
        assert journal.runs()[0]["ok"] == 400
    # what ran twice: only the tasks running when Cancel killed them
    assert executions(tmp_path / "count") - 400 == ran_before - done <= 8


def triple(x):
    return x * 3


def test_a_resumed_run_puts_each_fresh_record_between_the_restored_ones(journal_file):
    done = [*range(0, 3000, 3), *range(5000, 6000)]  # gaps of two, then one of 2000
    first = cellpool.run(triple, done, kind="process", journal=journal_file, progress="none")
    assert first.values == [x * 3 for x in done]
    resumed = cellpool.run(
        triple, range(8000), kind="process", journal=journal_file, progress="none"
    )
    assert resumed.values == [x * 3 for x in range(8000)]
    assert [record.index for record in resumed] == list(range(8000))
    assert [x for x in range(8000) if resumed[x].restored] == sorted(done)
    assert all(record.worker is not None for record in resumed)
    with Journal(journal_file) as journal:
        (row,) = journal.runs()
        assert (row["total"], row["ok"]) == (8000, 8000)
        assert sorted(journal.load("triple").values) == [x * 3 for x in range(8000)]


def test_a_journal_that_holds_the_input_back_lets_it_go_as_soon_as_it_has_written(
    journal_file,
):
    started = time.monotonic()
    results = cellpool.run(
        abs, range(30_000), journal=journal_file, max_pending=1000, progress="none"
    )
    # the backlog fills max_pending about 30 times: the dispatcher hears of each write at
    # once, not at its next tick (0.1 s, 3 s in all)
    assert time.monotonic() - started < 1.5
    assert results.counts() == {"ok": 30_000}


def test_keys_come_from_key_and_a_key_that_fails_costs_one_record(journal_file):
    pages = [{"url": f"u{i}", "seen": time.time()} for i in range(6)] + [{"no url": 1}]
    first = cellpool.run(
        len, pages, journal=journal_file, key=lambda page: page["url"], progress="none"
    )
    assert first.counts() == {"ok": 6, "error": 1}
    assert first[6].error_type == "KeyError"
    assert "journal key" in first[6].error
    fresh = [{"url": f"u{i}", "seen": time.time()} for i in range(6)]  # other times, same keys
    second = cellpool.run(
        len, fresh, journal=journal_file, key=lambda page: page["url"], progress="none"
    )
    assert all(record.restored for record in second)


def test_a_changed_function_starts_a_new_version_with_a_warning(journal_file):
    cellpool.run(square_unless_seven, range(3), journal=journal_file, progress="none")

    def negate(x):  # other code under the same name
        return -x

    negate.__name__ = "square_unless_seven"
    with pytest.warns(UserWarning, match="changed"):
        changed = cellpool.run(negate, range(3), journal=journal_file, progress="none")
    assert changed.values == [0, -1, -2]
    assert not any(record.restored for record in changed)
    with Journal(journal_file) as journal:
        versions = [row["version"] for row in journal.runs("square_unless_seven")]
    assert sorted(versions) == [1, 2]


def give_a_lock(x):
    return threading.Lock() if x == 1 else x


def test_a_value_that_cannot_be_saved_is_journaled_as_an_error_and_runs_again(journal_file):
    first = cellpool.run(give_a_lock, range(3), journal=journal_file, progress="none")
    assert first.counts() == {"ok": 3}  # in memory, the run had its value
    with Journal(journal_file) as journal:
        stored = journal.load("give_a_lock")
    assert stored[1].status == "error" and stored[1].error_type == "PicklingError"
    second = cellpool.run(give_a_lock, range(3), journal=journal_file, progress="none")
    assert [record.restored for record in second] == [True, False, True]


def test_a_file_that_is_not_a_journal_is_a_one_line_error_and_nothing_runs(tmp_path):
    path = tmp_path / "notes.db"
    path.write_text("these are my notes\n")
    ran = []
    with pytest.raises(ValueError) as raised:
        cellpool.run(ran.append, range(3), journal=path, progress="none")
    assert "\n" not in str(raised.value) and str(path) in str(raised.value)
    assert ran == []
    assert path.read_text() == "these are my notes\n"


def test_a_name_is_a_run_in_the_default_store_beside_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cellpool.run(abs, [-1, -2], journal="crawl", progress="none")
    assert (tmp_path / ".cellpool" / "journal.db").exists()
    with cellpool.journal() as journal:
        rows = journal.runs()
        assert [(row["name"], row["ok"]) for row in rows] == [("crawl", 2)]
        assert journal.load("crawl").values == [1, 2]
        assert journal.forget("crawl") == 2
        assert journal.runs() == []


def test_the_text_line_counts_restored_records_apart(journal_file, capsys):
    cellpool.run(abs, range(30), journal=journal_file, progress="none")
    cellpool.run(abs, range(40), journal=journal_file, progress="text")
    last = capsys.readouterr().err.strip().split("\r")[-1]
    assert "10/10 (100%)" in last  # the work of this run: the 10 new inputs
    assert "30 restored from journal" in last


KILLED_MIDWAY = """
import os, time, sys
import cellpool

def slow(x):
    time.sleep(0.02)
    return x * 10

def after(fut):
    pass

if __name__ == "__main__":
    job = cellpool.Executor("process", 2).start(slow, range(400), journal=sys.argv[1],
                                                  progress="none")
    while len(job.partial()) < 100:
        time.sleep(0.05)
    time.sleep(0.3)  # the journal writes every 100 ms
    os._exit(1)  # the kernel dies: no shutdown, no flush
"""


def test_a_run_whose_process_died_resumes_from_what_was_journaled(journal_file, tmp_path):
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(KILLED_MIDWAY))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, str(script), str(journal_file)], env=env, timeout=120)
    with Journal(journal_file) as journal:
        (row,) = journal.runs()
    assert 100 <= row["ok"] < 400

    def slow(x):
        return x * 10

    resumed = cellpool.run(
        slow, range(400), journal=journal_file, journal_keep_code=True, progress="none"
    )
    assert resumed.values == [x * 10 for x in range(400)]
    assert sum(record.restored for record in resumed) == row["ok"]


def test_a_dask_run_is_journaled_by_its_caller_and_resumed_on_threads(journal_file):
    first = cellpool.run(
        square_unless_seven,
        range(12),
        kind="dask",
        workers=2,
        journal=journal_file,
        progress="none",
    )
    assert first.counts() == {"ok": 11, "error": 1}
    resumed = cellpool.run(square_unless_seven, range(12), journal=journal_file, progress="none")
    assert [record.index for record in resumed if not record.restored] == [7]
    assert {record.worker for record in resumed if record.restored} <= {"d0", "d1"}


# -- real crashes: the kernel killed, the workers killed -------------------------------

TASKS = 2_000
# The most inputs that can run twice across a crash: those running at the kill (2
# workers x 2 batches of about 10 ms of 5 ms tasks = 8) and those finished but not yet
# committed (the writer commits every 100 ms: 2 workers finish about 40 in that time;
# twice that for a commit under way), with room for a slow machine's larger batches.
RAN_TWICE_BOUND = 150

CRAWL_CELL = """
import time
import cellpool

def work(x):
    with open({count!r}, "ab") as count:  # one byte per execution, outside the journal
        count.write(b".")
    time.sleep(0.005)
    return x * 3

res = cellpool.run(work, range({tasks}), kind="process", workers=2, journal={journal!r},
                   progress="none")
res.counts()
"""


def committed_ok(journal_file):
    with Journal(journal_file) as journal:
        return sum(row["ok"] for row in journal.runs())


def test_a_kernel_killed_mid_run_resumes_in_a_new_kernel(journal_file, tmp_path, kernel_clients):
    from jupyter_client.manager import start_new_kernel

    count = tmp_path / "count"
    cell = CRAWL_CELL.format(count=str(count), tasks=TASKS, journal=str(journal_file))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    manager, client = start_new_kernel(kernel_name="python3", env=env)
    try:
        client.execute(cell)
        settle(lambda: executions(count) < 600, 60)
        kernel = psutil.Process(manager.provisioner.process.pid)
        left = kernel.children(recursive=True)  # the forkserver and the workers
        kernel.kill()  # SIGKILL: no shutdown, no flush
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    # what the kernel started sees its pipes close and ends by itself
    assert not settle(lambda: [p for p in left if p.is_running() and p.status() != "zombie"], 20)
    before, kept = executions(count), committed_ok(journal_file)
    assert 0 < kept < TASKS
    assert before - kept <= RAN_TWICE_BOUND

    manager, client = start_new_kernel(kernel_name="python3", env=env)
    try:
        reply = client.execute_interactive(cell, timeout=120)
        assert reply["content"]["status"] == "ok"
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    with Journal(journal_file) as journal:
        (row,) = journal.runs()
        results = journal.load(row["name"])
    assert row["ok"] == TASKS and row["total"] == TASKS
    assert results.values == [x * 3 for x in range(TASKS)]
    assert executions(count) <= TASKS + RAN_TWICE_BOUND


def test_workers_killed_mid_run_cost_their_tasks_which_the_next_run_completes(
    journal_file, tmp_path
):
    count = str(tmp_path / "count")
    with Executor("process", 2, journal=journal_file, progress="none") as ex:
        job = ex.start(counted_work, range(TASKS), [count] * TASKS)
        settle(lambda: executions(tmp_path / "count") < 500, 60)
        for row in ex.workers_info():
            os.kill(row["pid"], 9)
        first = job.result(timeout=120)
        crashed = first.counts().get("crashed", 0)
        assert 1 <= crashed <= 8  # what the two workers were running
        second = ex.run(counted_work, range(TASKS), [count] * TASKS)
    assert second.values == [x * 3 for x in range(TASKS)]
    assert sum(not record.restored for record in second) == crashed
    assert executions(tmp_path / "count") == TASKS + crashed  # the crashed ones ran twice
