"""Regression tests for the hangs and lost records of the project's issue, one per case.

Every fault is real (segfaults, ``os._exit``, hangs) and every wait is bounded far below
pytest-timeout's 120 s, so a regression fails with a message rather than hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import (
    BrokenExecutor,
    ThreadPoolExecutor,
    as_completed,
    wait,
)
from typing import Any

import psutil
import pytest

import cellpool
from cellpool import Executor

from .conftest import settle, worker_processes

BIG = 16 * 1024 * 1024  # far more than a pipe holds (64 KiB on Linux)


# -- helpers ---------------------------------------------------------------------------


def within(seconds: float, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on a helper thread: its value or exception, or an AssertionError if
    it has not returned within ``seconds`` (the thread is then left behind, daemon)."""
    outcome: list[Any] = []

    def call() -> None:
        try:
            outcome.append((True, fn(*args)))
        except BaseException as exc:
            outcome.append((False, exc))

    helper = threading.Thread(target=call, name="test-within", daemon=True)
    helper.start()
    helper.join(seconds)
    if helper.is_alive():
        raise AssertionError(f"{getattr(fn, '__name__', fn)} did not return within {seconds} s")
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def shut_down(ex: Executor, seconds: float = 30) -> None:
    """``ex.shutdown(wait=True)``, failing the test if it does not return in time."""
    try:
        within(seconds, ex.shutdown)
    except AssertionError:
        ex.shutdown(wait=False, cancel_futures=True)
        raise


@contextlib.contextmanager
def executor(kind: str, workers: int, **options: Any) -> Iterator[Executor]:
    """An Executor whose shutdown at the end is bounded too."""
    ex = Executor(kind, workers, progress="none", **options)
    try:
        yield ex
    finally:
        shut_down(ex)


def wait_for(check: Callable[[], Any], seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while not (found := check()):
        assert time.monotonic() < deadline, f"no {what} within {seconds} s"
        time.sleep(0.05)
    return found


def statuses(job: cellpool.Job) -> dict[int, str]:
    return {record.index: record.status for record in job.partial()}


def busy_workers(ex: Executor) -> int:
    return sum(row["state"] == "busy" for row in ex.workers_info())


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- tasks (module level: process workers import them) ---------------------------------


def add_one(x):
    return x + 1


def hang_or_size(x):
    if isinstance(x, bytes):
        return len(x)
    time.sleep(3600)


def hang_on(x, bad):
    if x == bad:
        time.sleep(3600)
    return x


def crash_on(x, bad):
    if x == bad:
        ctypes.string_at(0)  # a real segfault
    return x


def crash_always(x):
    os._exit(5)


def identity(x):
    return x


def die(how: str) -> None:
    if how == "segfault":
        ctypes.string_at(0)
    os._exit(7)


def _load_in(parent: int, how: str) -> str:
    """Unpickling an ``ExitsWhenLoaded``: fine in the parent, fatal in a worker."""
    if os.getpid() != parent:
        die(how)
    return "loaded in the parent"


class ExitsWhenLoaded:
    """An argument whose unpickling kills the worker process."""

    def __init__(self, how: str) -> None:
        self.parent = os.getpid()
        self.how = how

    def __reduce__(self):
        return _load_in, (self.parent, self.how)


class ExitsWhenPickled:
    """A result whose pickling (in the worker) kills the worker process."""

    def __init__(self, how: str) -> None:
        self.how = how

    def __reduce__(self):
        die(self.how)
        return str, ("unreachable",)


def exits_when_pickled(how: str) -> ExitsWhenPickled:
    return ExitsWhenPickled(how)


def _raise_system_exit_in(parent: int) -> str:
    if os.getpid() == parent:
        raise SystemExit(3)
    return "loaded in a worker"


class RaisesWhenLoadedInParent:
    def __init__(self, parent: int) -> None:
        self.parent = parent

    def __reduce__(self):
        return _raise_system_exit_in, (self.parent,)


def raises_when_loaded_in_parent(parent: int) -> RaisesWhenLoadedInParent:
    return RaisesWhenLoadedInParent(parent)


def hang_while(path: str) -> None:
    """An initializer that hangs (for up to ten minutes) while ``path`` exists."""
    deadline = time.monotonic() + 600
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)


def slow_items(count: int, pause: float) -> Iterator[int]:
    for i in range(count):
        time.sleep(pause)
        yield i


async def block_the_loop(x):
    if x == 0:
        time.sleep(3)  # holds the event loop, not just this coroutine
    elif x == 1:
        while True:
            pass
    await asyncio.sleep(0.01)
    return x


async def sleep_in_the_loop(x):
    if x == 0:
        time.sleep(3)
    await asyncio.sleep(0.01)
    return x


# -- 1 ---------------------------------------------------------------------------------


def test_a_big_argument_for_a_busy_worker_does_not_hold_up_timeouts_or_cancel():
    # case 1
    big = bytes(BIG)
    with executor("process", 2, timeout=1) as ex:
        job = ex.start(hang_or_size, ["hang", "hang", big, big])
        results = job.result(timeout=20)
        assert [r.status for r in results] == ["timeout", "timeout", "ok", "ok"]
        assert results.values[2:] == [BIG, BIG]

        # However the batches are spread, the worker that takes the first task, which
        # hangs, gets a big argument next (two batches per worker, fewest tasks first).
        job = ex.start(hang_or_size, ["hang", big, big, big, big, "hang"], timeout=None)
        try:
            wait_for(lambda: statuses(job).get(0) is None and busy_workers(ex), 20, "busy worker")
            time.sleep(1.0)  # a big argument is on its way to the busy worker
            assert job.cancel()
            results = job.result(timeout=20)
        finally:
            job.cancel()  # a hung task must not hold up the executor's shutdown
        assert len(results) == 6
        assert results[0].status == "cancelled"
        assert {r.status for r in results} <= {"ok", "cancelled"}
        assert ex.submit(len, big).result(timeout=20) == BIG


# -- 2 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["segfault", "exit"])
@pytest.mark.parametrize("phase", ["loading its arguments", "pickling its result"])
def test_a_worker_dying_outside_its_task_costs_that_task_only(phase, how):
    # case 2
    if phase == "loading its arguments":
        fn, arg = identity, ExitsWhenLoaded(how)
    else:
        fn, arg = exits_when_pickled, how
    with executor("process", 2) as ex:
        error = within(20, ex.submit(fn, arg).exception, 20)
        assert isinstance(error, cellpool.WorkerCrashed), repr(error)
        results = ex.start(fn, [arg]).result(timeout=20)
        assert results[0].status in ("crashed", "error")
        assert ex.submit(add_one, 1).result(timeout=20) == 2


def test_a_result_raising_system_exit_when_unpickled_is_an_error():
    # case 2
    with executor("process", 2) as ex:
        future = ex.submit(raises_when_loaded_in_parent, os.getpid())
        error = within(20, future.exception, 20)
        assert error is not None and not isinstance(error, SystemExit), repr(error)
        results = ex.start(raises_when_loaded_in_parent, [os.getpid()]).result(timeout=20)
        assert results[0].status in ("crashed", "error")
        assert ex.submit(add_one, 1).result(timeout=20) == 2


def test_an_initializer_that_kills_the_worker_breaks_the_pool_without_a_respawn_loop():
    # case 2
    seen: set[int] = set()

    def first_result():
        future = ex.submit(add_one, 1)
        while not future.done():
            seen.update(p.pid for p in worker_processes())
            time.sleep(0.05)
        return future.result()

    with executor("process", 2, initializer=os._exit, initargs=(3,)) as ex:
        with pytest.raises(BrokenExecutor):
            within(30, first_result)
        for _ in range(30):  # three seconds after the break
            seen.update(p.pid for p in worker_processes())
            time.sleep(0.1)
        with pytest.raises(BrokenExecutor):
            ex.submit(add_one, 2).result(timeout=20)
    assert len(seen) < 10, f"{len(seen)} worker processes were started"


# -- 3 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_an_initializer_that_hangs_breaks_the_pool(kind, tmp_path):
    # case 3
    # Hangs for ten minutes, or until the test lets go at its end (a thread cannot be
    # killed; and the hang must not outlive the test if the pool fails to break).
    release = threading.Event()
    holding = tmp_path / "initializers-hang"
    holding.touch()
    hang, initargs = (release.wait, (600,)) if kind == "thread" else (hang_while, (str(holding),))
    ex = Executor(kind, 2, timeout=2, initializer=hang, initargs=initargs, progress="none")
    try:
        started = time.monotonic()
        with pytest.raises(BrokenExecutor):
            within(60, lambda: ex.submit(add_one, 1).result(timeout=55))
        with pytest.raises(BrokenExecutor):
            within(60 - (time.monotonic() - started), ex.run, add_one, range(3))
        shut_down(ex)  # while the initializers still hang
    finally:
        release.set()
        holding.unlink()
        ex.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(AssertionError):  # the test has failed already
            shut_down(ex)


# -- 4 ---------------------------------------------------------------------------------


def test_a_timeout_racing_the_end_of_a_thread_batch_gives_each_input_one_record():
    # case 4
    from cellpool import hooks

    held = threading.Event()
    calls = itertools.count()

    def hold_the_first_batch():
        if next(calls) == 0:
            held.set()
            time.sleep(2.5)  # past the 1 s timeout of the task that just ran

    def square(x):
        if x == 150:
            time.sleep(3)  # a real timeout elsewhere in the same run
        else:
            time.sleep(0.001)
        return x * x

    count = 300
    with (
        hooks.installed("thread.batch-ran", hold_the_first_batch),
        executor("thread", 3, timeout=1) as ex,
    ):
        job = ex.start(square, range(count))
        results = job.result(timeout=30)
        assert held.is_set()
        assert f"{count}/{count} done" in repr(job), repr(job)  # none counted twice
        again = ex.start(square, range(20)).result(timeout=20)
    assert len(results) == count
    assert [r.index for r in results] == list(range(count))
    assert [r.item for r in results] == list(range(count))
    assert results[150].status == "timeout"
    for record in results:
        assert record.status in ("ok", "timeout"), record
        if record.status == "ok":
            assert record.value == record.item**2, record
    assert again.values == [x * x for x in range(20)]


# -- 5 ---------------------------------------------------------------------------------


def _callback_waiting_on_a_sibling(pool: Any) -> list[Any]:
    """Submit two gated tasks; the first's done-callback waits for the second."""
    first_gate, second_gate = threading.Event(), threading.Event()
    in_callback, callback_done = threading.Event(), threading.Event()
    got: list[Any] = []
    first = pool.submit(first_gate.wait, 20)
    second = pool.submit(second_gate.wait, 20)

    def on_first_done(_):
        in_callback.set()
        try:
            got.append(second.result(timeout=15))
        except BaseException as exc:
            got.append(exc)
        callback_done.set()

    first.add_done_callback(on_first_done)
    first_gate.set()
    assert in_callback.wait(10), "the done-callback did not run"
    second_gate.set()
    assert callback_done.wait(20), "the done-callback is still waiting"
    assert first.result(timeout=5) is True
    return got


def test_a_done_callback_waiting_on_another_future_does_not_deadlock():
    # case 5
    with ThreadPoolExecutor(4) as pool:  # what the standard library does
        assert _callback_waiting_on_a_sibling(pool) == [True]
    with executor("thread", 4) as ex:
        assert _callback_waiting_on_a_sibling(ex) == [True]


def test_shutdown_while_a_done_callback_submits_does_not_block():
    # case 5
    gate, in_callback = threading.Event(), threading.Event()
    shutting_down, callback_done = threading.Event(), threading.Event()
    outcome: list[Any] = []
    ex = Executor("thread", 2, progress="none")
    try:
        future = ex.submit(gate.wait, 20)

        def submit_more(_):
            in_callback.set()
            shutting_down.wait(10)
            time.sleep(0.3)  # shutdown is under way
            try:
                outcome.append(ex.submit(abs, -2))
            except RuntimeError as exc:
                outcome.append(exc)
            callback_done.set()

        future.add_done_callback(submit_more)
        gate.set()
        assert in_callback.wait(10), "the done-callback did not run"
        shutting_down.set()
        within(20, ex.shutdown)  # no cleanup if it blocks: it may hold the executor's lock
        assert callback_done.wait(10), "the done-callback's submit() blocked"
        [got] = outcome
        if not isinstance(got, RuntimeError):
            assert got.result(timeout=10) == 2
    finally:
        gate.set()
        shutting_down.set()


def test_shutdown_wait_from_a_thread_task_raises_cannot_join_current_thread():
    # case 5
    with executor("thread", 2) as ex:
        future = ex.submit(lambda: ex.shutdown(wait=True))
        error = within(20, future.exception, 20)
    assert isinstance(error, RuntimeError), repr(error)
    assert "cannot join current thread" in str(error)


# -- 6 ---------------------------------------------------------------------------------


def test_a_worker_dying_in_its_initializer_leaves_the_run_going(tmp_path):
    # case 6
    marker = str(tmp_path / "first-worker-died")

    def exit_if_first(marker: str) -> None:
        # Defined here, so that it travels by value: the worker imports no test module
        # and dies within milliseconds, while the Executor may still be starting.
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os._exit(4)

    with executor("process", 6, initializer=exit_if_first, initargs=(marker,)) as ex:
        results = ex.start(add_one, range(20)).result(timeout=30)
        assert os.path.exists(marker)
        assert results.values == list(range(1, 21))
        assert ex.start(add_one, range(5)).result(timeout=20).values == [1, 2, 3, 4, 5]


def test_a_worker_crashing_on_its_first_task_leaves_the_run_going():
    # case 6
    def crash_first(x):  # travels by value: the worker loads it at once
        if x == 0:
            ctypes.string_at(0)
        return x

    with executor("process", 2) as ex:
        results = ex.start(crash_first, range(10)).result(timeout=30)
        assert results[0].status == "crashed"
        assert [r.status for r in results[1:]] == ["ok"] * 9
        assert ex.start(add_one, range(5)).result(timeout=20).values == [1, 2, 3, 4, 5]


def test_workers_dying_while_a_slow_input_is_read_leave_the_executor_working():
    # case 6
    with executor("process", 1) as ex:
        results = ex.start(crash_always, slow_items(8, 0.2)).result(timeout=40)
        assert len(results) == 8
        assert {r.status for r in results} == {"crashed"}
        assert ex.submit(add_one, 1).result(timeout=20) == 2
        assert ex.submit(add_one, 2).result(timeout=20) == 3


# -- 7 ---------------------------------------------------------------------------------


def test_a_blocking_input_does_not_hold_up_timeouts_cancel_or_other_jobs():
    # case 7
    release = threading.Event()

    def stalls_after_three():
        yield from range(3)
        release.wait(30)  # a network stream gone quiet
        yield from range(3, 6)

    with executor("process", 2, timeout=1) as ex:
        try:
            started = time.monotonic()
            job = ex.start(hang_on, stalls_after_three(), [0] * 6)
            wait_for(lambda: statuses(job).get(0) == "timeout", 15, "timeout record")
            assert time.monotonic() - started < 15
            quick = time.monotonic()
            assert ex.start(abs, range(-10, 0)).result(timeout=10).values == list(range(10, 0, -1))
            assert time.monotonic() - quick < 10
            job.cancel()
            results = within(5, job.result, 5)
            assert [r.status for r in results[:3]] == ["timeout", "ok", "ok"]
        finally:
            release.set()


# -- 8 ---------------------------------------------------------------------------------

INTERRUPTED_THREADS = """
import time
import cellpool

def slow(x):
    if x == 0:
        print("running", flush=True)
    time.sleep(30)
    return x

if __name__ == "__main__":
    try:
        cellpool.run(slow, range(8), kind="thread", workers=4, progress="none")
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        raise
"""


def _read_line(stream: Any, seconds: float) -> str:
    ready, _, _ = select.select([stream], [], [], seconds)
    return stream.readline() if ready else ""


def test_ctrl_c_during_a_thread_run_raises_keyboard_interrupt_at_once(tmp_path):
    # case 8
    script = tmp_path / "interrupted_threads.py"
    script.write_text(INTERRUPTED_THREADS)
    child = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert _read_line(child.stdout, 30).strip() == "running"
        time.sleep(0.5)
        child.send_signal(signal.SIGINT)
        sent = time.monotonic()
        line = _read_line(child.stdout, 20).strip()
        elapsed = time.monotonic() - sent
        child.wait(timeout=40)
    finally:
        child.kill()
        child.wait()
    stderr = child.stderr.read()
    child.stdout.close()
    child.stderr.close()
    assert line == "interrupted", stderr
    assert elapsed < 5
    assert "KeyboardInterrupt" in stderr


def test_after_cancelling_long_thread_tasks_the_next_run_starts_at_once():
    # case 8
    release = threading.Event()
    try:
        with executor("thread", 2) as ex:
            assert ex.run(abs, range(-4, 0)).values == [4, 3, 2, 1]  # warm
            job = ex.start(lambda x: release.wait(30), range(4))
            wait_for(lambda: busy_workers(ex) == 2, 10, "two busy workers")
            job.cancel()
            job.result(timeout=10)
            started = time.monotonic()
            results = ex.start(abs, range(-10, 0)).result(timeout=20)
            assert time.monotonic() - started < 5
            assert results.values == list(range(10, 0, -1))
    finally:
        release.set()


# -- 9 ---------------------------------------------------------------------------------


def test_async_tasks_blocking_their_loop_time_out_alone_on_processes():
    # case 9
    with executor("process", 2, timeout=1) as ex:
        started = time.monotonic()
        results = ex.start(block_the_loop, range(8)).result(timeout=30)
        assert time.monotonic() - started < 30
    assert [r.status for r in results] == ["timeout", "timeout"] + ["ok"] * 6
    assert results.values[2:] == list(range(2, 8))


def test_an_async_task_blocking_its_loop_times_out_alone_on_threads():
    # case 9
    with executor("thread", 2, timeout=1) as ex:
        results = ex.start(sleep_in_the_loop, range(8)).result(timeout=30)
    assert [r.status for r in results] == ["timeout"] + ["ok"] * 7
    assert results.values[1:] == list(range(1, 8))


# -- 10 --------------------------------------------------------------------------------

LEFT_RUNNING = """
import time
import cellpool

def square(x):
    return x * x

if __name__ == "__main__":
    ex = cellpool.Executor("process", 2, progress="none")
    deadline = time.monotonic() + 10
    while None in (pids := [row["pid"] for row in ex.workers_info()]):  # still starting
        assert time.monotonic() < deadline
        time.sleep(0.05)
    print("pids", *pids, flush=True)
    future = ex.submit(square, 7)
    # a slow done-callback: exit waits for it, as it waits for the standard library's
    future.add_done_callback(lambda f: (time.sleep(0.5), print("result", f.result(), flush=True)))
"""


def test_exiting_with_a_process_executor_alive_finishes_its_work_and_its_workers(tmp_path):
    # case 10
    script = tmp_path / "left_running.py"
    script.write_text(LEFT_RUNNING)
    for _ in range(5):
        child = subprocess.Popen(
            [sys.executable, str(script)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            stdout, stderr = child.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            raise AssertionError("the script did not exit within 20 s") from None
        assert child.returncode == 0, stderr
        assert "process object is closed" not in stderr
        assert "Traceback" not in stderr, stderr
        lines = stdout.splitlines()
        assert "result 49" in lines, stdout
        pids = [int(pid) for pid in lines[0].split()[1:]]
        assert len(pids) == 2
        assert not settle(lambda pids=pids: [pid for pid in pids if not gone(pid)])


# -- 11 --------------------------------------------------------------------------------


def _gated(started: threading.Event, gate: threading.Event) -> bool:
    started.set()
    return gate.wait(20)


def test_cancelled_submit_futures_count_as_done_for_wait_and_as_completed():
    # case 11
    with executor("thread", 1) as ex:
        started, gate = threading.Event(), threading.Event()
        busy = ex.submit(_gated, started, gate)
        assert started.wait(10)
        pending = ex.submit(abs, -2)
        assert pending.cancel()
        before = time.monotonic()
        done, _ = wait([pending], timeout=10)
        assert pending in done
        assert time.monotonic() - before < 5

        later = ex.submit(abs, -3)
        opener = threading.Timer(0.5, gate.set)
        opener.start()
        done, not_done = wait([busy, pending, later], timeout=20)
        opener.join()
        assert not not_done
        assert later.result() == 3

        started, gate = threading.Event(), threading.Event()
        busy = ex.submit(_gated, started, gate)
        assert started.wait(10)
        pending = ex.submit(abs, -4)
        assert pending.cancel()
        yielded = []
        try:
            for future in as_completed([busy, pending], timeout=20):
                yielded.append(future)
                gate.set()
        finally:
            gate.set()
        assert yielded == [pending, busy]
