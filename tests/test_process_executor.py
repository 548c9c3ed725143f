"""The Executor on processes, with real faults: segfaults, exits, hangs, unpicklable values."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import BrokenExecutor

import psutil
import pytest

import cellpool
from cellpool import Executor

from .conftest import settle

if sys.version_info < (3, 11):
    from exceptiongroup import ExceptionGroup


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(params=["forkserver", "spawn"])
def start_method(request):
    return request.param


def add_one(x):
    return x + 1


def crash_on(x, bad):
    if x == bad:
        ctypes.string_at(0)  # a real segfault
    return x


def exit_on(x, bad):
    if x == bad:
        os._exit(3)
    return x


def hang_on(x, bad):
    if x == bad:
        time.sleep(3600)
    return x


class Unrebuildable(Exception):
    """Pickles fine, but unpickling calls __init__ with the wrong arguments."""

    def __init__(self, code, detail):
        super().__init__(f"code {code}: {detail}")


def raise_unrebuildable(x):
    raise Unrebuildable(x, "no way back")


def return_a_lock(x):
    return threading.Lock()


def worker_pid(x):
    return os.getpid()


_initialized = None


def remember(value):
    global _initialized
    _initialized = value


def initialized(x):
    return _initialized


def test_results_from_worker_processes(start_method):
    with Executor("process", 2, start_method=start_method, progress="none") as ex:
        results = ex.run(add_one, range(500))
        descendants = {p.pid for p in psutil.Process().children(recursive=True)}
    assert results.values == list(range(1, 501))
    assert {r.pid for r in results} <= descendants
    assert {r.worker for r in results} <= {"p1", "p2"}


def test_a_segfault_fails_one_task_and_the_rest_complete(start_method):
    with Executor("process", 2, start_method=start_method, progress="none") as ex:
        results = ex.run(crash_on, range(40), [7] * 40)
        again = ex.run(add_one, range(10))
    assert results[7].status == "crashed"
    assert results[7].error_type == "WorkerCrashed"
    assert "SIGSEGV" in results[7].error
    assert [r.status for r in results if r.index != 7] == ["ok"] * 39
    assert again.ok  # the pool is not broken


def test_os_exit_fails_one_task_and_the_worker_is_replaced(start_method):
    with Executor("process", 1, start_method=start_method, progress="none") as ex:
        results = ex.run(exit_on, range(10), [3] * 10)
        pids = [row["pid"] for row in ex.workers_info()]
    assert results[3].status == "crashed"
    assert "exited with code 3" in results[3].error
    assert results.values[:3] == [0, 1, 2] and results.values[4:] == list(range(4, 10))
    assert results[0].pid != results[9].pid  # a new process took the dead one's place
    assert (results[0].worker, results[9].worker) == ("p1", "p2")
    assert pids == [results[9].pid]


def test_a_crash_is_retried_when_retries_allow(tmp_path):
    marker = tmp_path / "crashed-once"

    def crash_first_time(x):
        if x == 2 and not marker.exists():
            marker.touch()
            os._exit(1)
        return x * 10

    with Executor("process", 2, retries=2, progress="none") as ex:
        results = ex.run(crash_first_time, range(5))
    assert results.values == [0, 10, 20, 30, 40]
    assert results[2].attempts == 2


def test_a_hung_task_times_out_and_the_run_goes_on(start_method):
    started = time.monotonic()
    with Executor("process", 2, timeout=2, start_method=start_method, progress="none") as ex:
        results = ex.run(hang_on, range(6), [1] * 6)
    assert time.monotonic() - started < 30  # not the hour the task asked for
    assert results[1].status == "timeout"
    assert results[1].error_type == "TaskTimeout"
    assert [r.status for r in results if r.index != 1] == ["ok"] * 5


def test_without_memfd_a_raw_array_carries_what_workers_do(monkeypatch):
    # Off Linux there is no memfd: the slot is a multiprocessing RawArray. Timeouts and
    # crash records read it, so they prove the parent sees what the worker writes.
    import cellpool.shared

    monkeypatch.setattr(cellpool.shared, "HAVE_MEMFD", False)
    with Executor("process", 2, timeout=2, progress="none") as ex:
        hung = ex.run(hang_on, range(6), [1] * 6)
        crashed = ex.run(crash_on, range(10), [4] * 10)
    assert hung[1].status == "timeout"
    assert [r.status for r in hung if r.index != 1] == ["ok"] * 5
    assert crashed[4].status == "crashed" and "SIGSEGV" in crashed[4].error
    assert [r.status for r in crashed if r.index != 4] == ["ok"] * 9


def test_a_result_that_cannot_be_pickled_is_an_error_record(start_method):
    with Executor("process", 2, start_method=start_method, progress="none") as ex:
        results = ex.run(return_a_lock, range(3))
        again = ex.run(add_one, range(3))
    assert {r.status for r in results} == {"error"}
    assert results[0].error_type == "PicklingError"
    assert "could not pickle the result" in results[0].error
    assert "lock" in results[0].error
    assert again.values == [1, 2, 3]


def test_an_argument_that_cannot_be_pickled_is_an_error_record():
    inputs = [1, threading.Lock(), 3]
    with Executor("process", 2, progress="none") as ex:
        results = ex.run(str, inputs)
    assert [r.status for r in results] == ["ok", "error", "ok"]
    assert "could not pickle the arguments" in results[1].error


def test_an_exception_that_cannot_be_rebuilt_keeps_its_name_and_message(start_method):
    with Executor("process", 2, start_method=start_method, progress="none") as ex:
        results = ex.run(raise_unrebuildable, range(3))
    record = results[1]
    assert record.status == "error"
    assert record.error_type == "Unrebuildable"
    assert record.error == "code 1: no way back"
    assert "raise_unrebuildable" in record.traceback
    with pytest.raises(ExceptionGroup) as group:
        results.raise_errors()
    assert isinstance(group.value.exceptions[0], cellpool.RemoteError)


def test_exceptions_that_travel_are_rebuilt():
    with Executor("process", 2, progress="none") as ex:
        future = ex.submit(int, "not a number")
        with pytest.raises(ValueError, match="invalid literal"):
            future.result()


def test_max_tasks_per_worker_recycles_workers():
    with Executor("process", 2, max_tasks_per_worker=3, progress="none") as ex:
        results = ex.run(worker_pid, range(12))
    assert results.ok
    pids = results.values
    assert len(set(pids)) >= 4
    assert max(pids.count(pid) for pid in set(pids)) <= 3


def test_initializer_runs_once_in_each_worker():
    with Executor("process", 2, initializer=remember, initargs=("ready",), progress="none") as ex:
        results = ex.run(initialized, range(6))
    assert results.values == ["ready"] * 6


def test_a_failing_initializer_breaks_the_pool_as_the_standard_library_does():
    with Executor("process", 1, initializer=int, initargs=("x",), progress="none") as ex:
        with pytest.raises(BrokenExecutor, match="initializer failed: ValueError"):
            ex.submit(add_one, 1).result(timeout=30)  # raised by submit, or by its future
        with pytest.raises(BrokenExecutor):
            ex.submit(add_one, 2)


def test_the_pool_stays_warm_across_runs():
    with Executor("process", 2, progress="none") as ex:
        first = {r.pid for r in ex.run(worker_pid, range(50))}
        second = {r.pid for r in ex.run(worker_pid, range(50))}
    assert second and second <= first  # the same processes (50 quick tasks may need one)


def test_what_a_task_prints_reaches_the_caller_prefixed_by_worker(capfd):
    def shout(x):
        print(f"hello from {x}")
        return x

    with Executor("process", 1, progress="none") as ex:
        ex.run(shout, range(3))
    out = capfd.readouterr().out
    for x in range(3):
        assert f"[p1] hello from {x}\n" in out


def test_cancel_kills_running_process_tasks():
    with Executor("process", 2, progress="none") as ex:
        job = ex.start(hang_on, range(20), [0] * 20)
        deadline = time.monotonic() + 10
        while not any(row["state"] == "busy" for row in ex.workers_info()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        busy_pid = next(row["pid"] for row in ex.workers_info() if row["task"] == 0)
        job.cancel()
        results = job.result(timeout=10)
        assert not settle(lambda: gone(busy_pid) is False)
    assert len(results) == 20
    assert results[0].status == "cancelled"


def test_workers_info_agrees_with_psutil():
    with Executor("process", 2, progress="none") as ex:
        ex.run(add_one, range(10))
        rows = ex.workers_info()
        children = {p.pid: p for p in psutil.Process().children(recursive=True)}
        assert len(rows) == 2
        for row in rows:
            assert row["pid"] in children
            assert row["state"] == "idle"
            rss = children[row["pid"]].memory_info().rss
            assert abs(row["rss"] - rss) < 0.2 * rss
            assert row["fds"] == children[row["pid"]].num_fds()


NOTEBOOK_STYLE = """
import os, sys, time
import cellpool

class Scaler:
    def __init__(self, k):
        self.k = k
    def __call__(self, x):
        return self.k * x

def helper(x):
    return x + 1

offset = 100
scale = Scaler(3)
work = lambda x: scale(helper(x)) + offset

if __name__ == "__main__":
    method = sys.argv[1]
    with cellpool.Executor("process", 2, start_method=method, progress="none") as ex:
        results = ex.run(work, range(5))
        print(results.values, sorted({r.pid for r in results} - {os.getpid()}) != [])
"""


def test_functions_classes_and_globals_defined_in_main_just_work(tmp_path, start_method):
    script = tmp_path / "notebook_like.py"
    script.write_text(NOTEBOOK_STYLE)
    done = subprocess.run(
        [sys.executable, str(script), start_method], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[103, 106, 109, 112, 115] True"


INTERRUPTED = """
import os, sys, time
import cellpool

def slow(x):
    time.sleep(60)
    return x

if __name__ == "__main__":
    with cellpool.Executor("process", 2, start_method=sys.argv[1], progress="none") as ex:
        while None in (pids := [row["pid"] for row in ex.workers_info()]):
            time.sleep(0.01)  # workers start in the background
        print("pids", *pids, flush=True)
        ex.run(slow, range(10))
"""


def test_sigint_during_run_stops_workers_and_raises_keyboard_interrupt(tmp_path, start_method):
    script = tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED)
    child = subprocess.Popen(
        [sys.executable, str(script), start_method],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        pids = [int(p) for p in child.stdout.readline().split()[1:]]
        assert len(pids) == 2
        time.sleep(1.0)  # the tasks are running now
        child.send_signal(signal.SIGINT)
        sent = time.monotonic()
        child.wait(timeout=20)
        elapsed = time.monotonic() - sent
    finally:
        child.kill()
    stderr = child.stderr.read()
    assert "KeyboardInterrupt" in stderr
    assert elapsed < 5
    for pid in pids:
        assert gone(pid)


def test_bad_process_options_are_one_line_errors():
    with pytest.raises(ValueError, match="start_method must be one of"):
        Executor("process", 1, start_method="teleport")
    with pytest.raises(ValueError, match="applies to kind='process' only"):
        Executor("thread", 1, max_tasks_per_worker=3)


@pytest.fixture
def workers_that_cannot_start(tmp_path):
    """A python executable for spawned workers that dies during start-up."""
    import multiprocessing
    from multiprocessing import spawn

    fake = tmp_path / "python-that-dies"
    fake.write_text("#!/bin/sh\nsleep 0.3\nexit 7\n")
    fake.chmod(0o755)
    real = spawn.get_executable()
    multiprocessing.get_context("spawn").set_executable(str(fake))
    yield
    multiprocessing.get_context("spawn").set_executable(real)


def test_workers_that_cannot_start_break_the_pool_instead_of_looping(workers_that_cannot_start):
    ex = Executor("process", 2, start_method="spawn", progress="none")
    try:
        job = ex.start(add_one, range(5))
        results = job.result(timeout=30)
        assert {r.status for r in results} == {"crashed"}
        assert "failed to start" in results[0].error
        assert "exited with code 7" in results[0].error
        with pytest.raises(RuntimeError, match="broken"):
            ex.run(add_one, range(3))
    finally:
        ex.shutdown()


def sixteen_mebibytes(x):
    return bytes([x]) * (16 * 2**20)


def test_arguments_and_results_bigger_than_a_pipe_buffer_travel_both_ways():
    with Executor("process", 2, timeout=30, progress="none") as ex:
        results = ex.run(len, [b"\x01" * (16 * 2**20)] * 3)
        big = ex.submit(sixteen_mebibytes, 7).result(timeout=60)
    assert results.values == [16 * 2**20] * 3
    assert len(big) == 16 * 2**20 and big[:1] == b"\x07"


def die_in_the_first_worker(marker):
    """An initializer: the first worker to run it dies, the others start normally."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return
    os._exit(3)


def test_a_worker_dying_before_the_executor_is_made_is_replaced(tmp_path):
    # Held between making the pool and starting the dispatcher until a worker has died,
    # so its death is reported before anything can handle it.
    from cellpool import hooks

    marker = tmp_path / "died"

    def until_a_worker_died():
        deadline = time.monotonic() + 20
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # and until its exit reached the reader

    with hooks.installed("executor.pool-made", until_a_worker_died):
        ex = Executor(
            "process",
            2,
            initializer=die_in_the_first_worker,
            initargs=(str(marker),),
            progress="none",
        )
    with ex:
        assert ex.run(abs, range(-5, 0)).values == [5, 4, 3, 2, 1]
    assert marker.exists()
