"""Lifetimes, through the public API, with real faults: what an executor, its workers and
its futures keep, what dies with a worker, what happens at exit, and who waits for whom.

Each test carries the case number (12-25) it covers. Parts already covered elsewhere are
not repeated here:
- 13: one task finishing at exit, with and without ``shutdown(wait=False)``, and
  ``submit`` from ``atexit`` raising ``RuntimeError``: test_cpython_executor.py
  (test_interpreter_shutdown, test_hang_gh83386, test_submit_after_interpreter_shutdown).
- 14: map's iterator keeping no value it yielded (test_free_reference), a discarded
  future's callable (test_no_stale_references) and a process worker dropping the last
  task's arguments before any further task (test_ressources_gced_in_workers):
  test_cpython_executor.py.
- 19: a dropped, never iterated ``map`` running everything
  (test_map_submits_without_iteration) and ``chunksize`` 0 / negative raising
  ValueError (test_options.py::test_run_and_map_options_give_the_same_errors,
  test_cpython_executor.py::test_map_chunksize).
- 20: a failing initializer making futures raise BrokenExecutor: test_cpython_executor.py
  (test_failing_initializer, test_failing_initializer_breaks_executor) and
  test_process_executor.py.
- 22: tracebacks of notebook cells and of modules shipped by value:
  test_tracebacks.py. Added here: a plain script's ``__main__`` functions.
- 24: option checks in test_options.py; the fd_limit overshoot by prefetch in
  test_admission.py::test_no_task_starts_on_a_worker_at_its_fd_limit (it fails with
  prefetching under a limit).
"""

from __future__ import annotations

import bisect
import faulthandler
import gc
import itertools
import multiprocessing
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from pathlib import Path

import psutil
import pytest

import cellpool
from cellpool import Executor

from .conftest import cellpool_threads, settle, worker_processes
from .gates import GATE_LIMIT, open_gate, wait_gate

WAIT = 30  # the most a step that should be prompt may take before the test fails


# -- helpers that run in the workers (module level: they travel by reference) -----------


def mark_then_wait(mark, gate):
    Path(mark).touch()
    wait_gate(gate)
    return "released"


def start_sleep(pid_file, then_hang):
    """Start a ``sleep 1000`` that outlives this call, write its pid, maybe hang."""
    child = subprocess.Popen(["sleep", "1000"])
    Path(pid_file).write_text(str(child.pid))
    if then_hang:
        time.sleep(600)
    return child.pid


def deaf_to_sigterm(marks, i):
    """A long task that ignores SIGTERM, as a library with its own handler might."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path(marks, str(i)).touch()
    time.sleep(600)


def raise_value_error(x):
    raise ValueError(f"bad value {x}")


def return_a_lock(_):
    return threading.Lock()


def return_a_generator(_):
    return (i for i in range(3))


def put_pid_in_queue(queue, lock):
    with lock:
        queue.put(os.getpid())


def use_real_stdio(_):
    for stream in (sys.stdout, sys.stderr):
        for name in ("fileno", "buffer", "writelines", "errors", "close"):
            getattr(stream, name)
        assert isinstance(stream.errors, str)
    assert (sys.stdout.fileno(), sys.stderr.fileno()) == (1, 2)
    subprocess.run(["echo", "x"], stdout=sys.stdout, check=True)
    subprocess.run(["echo", "x"], stdout=sys.stdout.buffer, stderr=sys.stderr, check=True)
    faulthandler.enable()
    sys.stdout.buffer.write(b"from-buffer\n")
    sys.stdout.writelines(["from-writelines\n"])
    sys.stdout.flush()
    return "fine"


def nap(x, seconds):
    time.sleep(seconds)
    return x


def tiny_nap(x):
    time.sleep(0.001)
    return x


class Payload:
    """An argument whose lifetime a test follows with a weakref."""

    def __init__(self, size):
        self.data = bytes(size)


# -- test helpers ------------------------------------------------------------------------


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_if_alive(pid: int | None) -> None:
    """Clean up after a failing test: a ``sleep 1000`` must not outlive it."""
    if pid is not None and alive(pid):
        os.kill(pid, signal.SIGKILL)


def read_pid(path: Path) -> int:
    assert not settle(lambda: not path.exists() or not path.read_text(), WAIT), "no pid"
    return int(path.read_text())


def collected(ref, seconds=10.0) -> bool:
    def still_alive():
        gc.collect()
        return ref() is not None

    return not settle(still_alive, seconds)


def run_script(source: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``source`` as a script in a fresh interpreter (the environment, PYTHONPATH
    included, is this one's)."""
    script = cwd / "script.py"
    script.write_text(textwrap.dedent(source))
    return subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=45,
        cwd=cwd,
    )


def in_thread(fn, seconds):
    """Call ``fn`` on a daemon thread; (returned in time, seconds taken)."""
    done = threading.Event()
    began = time.monotonic()
    thread = threading.Thread(target=lambda: (fn(), done.set()), daemon=True)
    thread.start()
    finished = done.wait(seconds)
    return finished, time.monotonic() - began


def wait_idle(ex: Executor, workers: int) -> None:
    deadline = time.monotonic() + WAIT
    while [row["state"] for row in ex.workers_info()] != ["idle"] * workers:
        assert time.monotonic() < deadline, ex.workers_info()
        time.sleep(0.02)


# -- 12: a dropped executor is collected ------------------------------------------------


@pytest.mark.parametrize("kind", ["process", "thread"])
def test_dropped_executors_are_collected_with_their_workers(kind):  # 12
    refs = []
    try:
        for n in range(5):
            ex = Executor(kind, 2, progress="none")
            assert ex.submit(abs, -n).result(timeout=WAIT) == n
            refs.append(weakref.ref(ex))
            del ex
        gc.collect()
        assert [ref() for ref in refs] == [None] * 5
        assert not settle(lambda: worker_processes() or cellpool_threads(), 10), (
            worker_processes(),
            cellpool_threads(),
        )
    finally:
        for ref in refs:
            leftover = ref()
            if leftover is not None:
                leftover.shutdown(wait=True)
            del leftover


# -- 13: at interpreter exit -----------------------------------------------------------

EXIT_SCRIPT = """
import time

import cellpool


def task(i):
    time.sleep(0.5)
    print(f"done {{i}}", flush=True)


if __name__ == "__main__":
    ex = cellpool.Executor({kind!r}, 2, progress="none")
    for i in range(5):  # 2 run at once: 3 are still queued when the script ends
        ex.submit(task, i)
    {last_line}
"""


@pytest.mark.parametrize("last_line", ["pass", "ex.shutdown(wait=False)"])
@pytest.mark.parametrize("kind", ["thread", "process"])
def test_queued_work_finishes_at_interpreter_exit(kind, last_line, tmp_path):  # 13
    done = run_script(EXIT_SCRIPT.format(kind=kind, last_line=last_line), tmp_path)
    assert done.returncode == 0, done.stderr
    # threads' prints may interleave: "done 2done 3\n\n"
    finished = sorted(re.findall(r"done (\d)", done.stdout))
    assert finished == ["0", "1", "2", "3", "4"], (done.stdout, done.stderr)


ATEXIT_SCRIPT = """
import atexit

import cellpool

ex = None


@atexit.register
def late():
    try:
        ex.submit(abs, -1)
    except RuntimeError as error:
        print(f"refused: {{error}}", flush=True)
    else:
        print("accepted", flush=True)


if __name__ == "__main__":
    ex = cellpool.Executor({kind!r}, 1, progress="none")
    assert ex.submit(abs, -2).result(timeout=30) == 2
"""


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_submit_from_atexit_names_interpreter_shutdown(kind, tmp_path):  # 13
    done = run_script(ATEXIT_SCRIPT.format(kind=kind), tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("refused: "), (done.stdout, done.stderr)
    assert "interpreter shutdown" in done.stdout


# -- 14: what a finished future's run keeps --------------------------------------------


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_a_done_future_keeps_neither_its_callable_nor_its_arguments(kind):  # 14
    # test_no_stale_references drops the future; here it is kept, done, and must hold
    # only its result.
    with Executor(kind, 1, progress="none") as ex:

        def measure(payload):  # a fresh function object, shipped by value to processes
            return len(payload.data)

        payload = Payload(1000)
        fn_ref, payload_ref = weakref.ref(measure), weakref.ref(payload)
        future = ex.submit(measure, payload)
        assert future.result(timeout=WAIT) == 1000
        del measure, payload
        assert collected(fn_ref), "the callable is kept"
        assert collected(payload_ref), "the argument is kept"
        assert future.result() == 1000


# -- 15: processes a task started die with its worker ------------------------------------


def test_a_timed_out_tasks_child_process_dies_with_the_worker(tmp_path):  # 15
    pid_file = tmp_path / "pid"
    sleep_pid = None
    try:
        with Executor("process", 1, timeout=1, progress="none") as ex:
            results = ex.run(start_sleep, [str(pid_file)], [True])
            sleep_pid = read_pid(pid_file)
            assert results[0].status == "timeout"
            assert not settle(lambda: alive(sleep_pid), 10), "the task's sleep survived"
    finally:
        kill_if_alive(sleep_pid)


def test_a_cancelled_tasks_child_process_dies_with_the_worker(tmp_path):  # 15
    pid_file = tmp_path / "pid"
    sleep_pid = None
    try:
        with Executor("process", 1, progress="none") as ex:
            job = ex.start(start_sleep, [str(pid_file)], [True])
            sleep_pid = read_pid(pid_file)
            assert job.cancel()
            assert job.result(timeout=WAIT)[0].status == "cancelled"
            assert not settle(lambda: alive(sleep_pid), 10), "the task's sleep survived"
    finally:
        kill_if_alive(sleep_pid)


def test_a_child_process_left_behind_by_a_task_dies_at_shutdown(tmp_path):  # 15
    pid_file = tmp_path / "pid"
    sleep_pid = None
    try:
        ex = Executor("process", 1, progress="none")
        try:
            results = ex.run(start_sleep, [str(pid_file)], [False])
            sleep_pid = read_pid(pid_file)
            assert results.values == [sleep_pid]
            assert alive(sleep_pid)  # the task returned and left it running
        finally:
            ex.shutdown()
        assert not settle(lambda: alive(sleep_pid), 10), "the task's sleep survived"
    finally:
        kill_if_alive(sleep_pid)


# -- 16: what cannot be killed, and shutting down killed workers -----------------------------


def test_hung_threads_warn_and_abandoned_threads_are_capped():  # 16
    # ThreadPool keeps at most max(32, 4 * workers) abandoned threads (pool/thread.py):
    # with 4 workers, 4 + 32, plus the dispatcher, monitor, feeder and delivery threads.
    bound = 4 + 32 + 10
    gate = threading.Event()
    peak = 0
    with Executor("thread", 4, timeout=0.2, progress="none") as ex:
        try:
            with pytest.warns(RuntimeWarning, match="cannot be killed"):
                job = ex.start(gate.wait, [GATE_LIMIT] * 300)
                watch_until = time.monotonic() + 8  # time for ~100 threads, were there no cap
                while time.monotonic() < watch_until and not job.done():
                    peak = max(peak, len(cellpool_threads()))
                    time.sleep(0.01)
        finally:
            gate.set()
        results = job.result(timeout=WAIT)
    assert peak <= bound, f"{peak} cellpool threads at once"
    assert results.counts()["timeout"] >= 4
    assert sum(results.counts().values()) == 300


@pytest.mark.parametrize("wait", [True, False])
def test_shutdown_after_cancelling_tasks_that_ignore_sigterm_is_prompt(wait, tmp_path):  # 16
    # The killed workers are waited for together: the old core gave each its own 5 s
    # grace before SIGKILL, one after the other (15 s).
    marks = tmp_path / "marks"
    marks.mkdir()
    ex = Executor("process", 3, progress="none")
    try:
        wait_idle(ex, 3)  # so each worker takes one task
        job = ex.start(deaf_to_sigterm, [str(marks)] * 3, range(3))
        assert not settle(lambda: len(list(marks.iterdir())) < 3, WAIT)
        assert job.cancel()
        if not wait:
            began = time.monotonic()
            ex.shutdown(wait=False)
            assert time.monotonic() - began < 1
        returned, took = in_thread(ex.shutdown, 60)
        assert returned and took < 8, f"shutdown took {took:.1f} s"
        assert job.result(timeout=WAIT).counts() == {"cancelled": 3}
    finally:
        for process in worker_processes():  # only if it failed: SIGTERM is ignored
            process.kill()
        ex.shutdown()


# -- 17: submit() futures enter RUNNING ---------------------------------------------------


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_a_running_future_is_not_cancellable_and_a_queued_one_is(kind, tmp_path):  # 17
    gate = str(tmp_path / "gate")
    first_mark, second_mark = tmp_path / "first", tmp_path / "second"
    with Executor(kind, 1, progress="none") as ex:
        try:
            first = ex.submit(mark_then_wait, str(first_mark), gate)
            assert not settle(lambda: not first_mark.exists(), WAIT)
            assert first.running()
            assert not first.cancel()
            second = ex.submit(mark_then_wait, str(second_mark), gate)
            time.sleep(0.3)  # time to (wrongly) send it to the busy worker
            assert not second.running()
            assert second.cancel()
            assert second.cancelled()
        finally:
            open_gate(gate)
        assert first.result(timeout=WAIT) == "released"
    assert not second_mark.exists()


# -- 18: what future.result() raises ------------------------------------------------------


def test_a_process_tasks_exception_carries_the_workers_traceback():  # 18
    with Executor("process", 1, progress="none") as ex:
        future = ex.submit(raise_value_error, 7)
        with pytest.raises(ValueError, match="bad value 7") as caught:
            future.result(timeout=WAIT)
    cause = caught.value.__cause__
    assert cause is not None
    assert "raise_value_error" in str(cause)
    assert 'raise ValueError(f"bad value {x}")' in str(cause)


@pytest.mark.parametrize("make", [return_a_lock, return_a_generator])
def test_a_result_that_cannot_be_pickled_raises_a_pickling_error(make):  # 18
    # A lambda is no such result: cloudpickle carries it by value.
    with Executor("process", 1, progress="none") as ex:
        future = ex.submit(make, 0)
        with pytest.raises((pickle.PickleError, TypeError)) as caught:
            future.result(timeout=WAIT)
        assert ex.submit(abs, -1).result(timeout=WAIT) == 1  # the worker is fine
    assert not isinstance(caught.value, cellpool.RemoteError)
    assert "pickle" in str(caught.value)


# -- 19: map ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_map_stops_at_the_shortest_input(kind):  # 19
    with Executor(kind, 2, progress="none") as ex:
        assert list(ex.map(pow, range(10), [2, 2, 2])) == [0, 1, 4]
        assert list(ex.map(pow, [2, 2, 2], range(10))) == [1, 2, 4]
        assert list(ex.map(pow, (i for i in range(10)), iter([3, 3]))) == [0, 1]
        assert list(ex.map(pow, itertools.count(), [2] * 5)) == [0, 1, 4, 9, 16]
        assert list(ex.map(pow, [], itertools.count())) == []


# -- 20: initargs may hold what only process creation can pass ----------------------------


def test_initargs_carry_a_multiprocessing_queue_and_lock():  # 20
    context = multiprocessing.get_context("forkserver")
    queue, lock = context.Queue(), context.Lock()
    ex = Executor(
        "process",
        2,
        initializer=put_pid_in_queue,
        initargs=(queue, lock),
        start_method="forkserver",
        progress="none",
    )
    try:
        pids = {queue.get(timeout=WAIT), queue.get(timeout=WAIT)}
        assert ex.submit(os.getpid).result(timeout=WAIT) in pids
    finally:
        ex.shutdown()
        del ex  # it holds the initargs, so the queue's pipe, while it lives
        queue.close()
        queue.join_thread()
        del queue, lock
        gc.collect()


# -- 21: a process worker's stdout and stderr ------------------------------------------------


def test_process_tasks_get_streams_with_fileno_and_buffer(capfd):  # 21
    with Executor("process", 1, progress="none") as ex:
        results = ex.run(use_real_stdio, [0])
    assert results[0].status == "ok", results[0].traceback
    assert results.values == ["fine"]
    out = capfd.readouterr().out
    assert "[p1] from-buffer\n" in out
    assert "[p1] from-writelines\n" in out


# -- 22: tracebacks name the real file and line ------------------------------------------------

TRACEBACK_SCRIPT = """
import traceback

import cellpool


def compute(x):
    y = x - 2
    return 10 // (y - 1)


if __name__ == "__main__":
    with cellpool.Executor("process", 1, progress="none") as ex:
        record = ex.run(compute, [3])[0]
        print(record.status)
        print(record.traceback)
        print("=====")
        try:
            ex.submit(compute, 3).result(timeout=30)
        except ZeroDivisionError as exc:
            print("".join(traceback.format_exception(exc)))
"""


def test_tracebacks_of_a_scripts_functions_name_its_file_and_lines(tmp_path):  # 22
    # test_tracebacks.py covers cells and modules shipped by value; a plain script's
    # __main__ functions travel by value too.
    done = run_script(TRACEBACK_SCRIPT, tmp_path)
    assert done.returncode == 0, done.stderr
    record_part, _, future_part = done.stdout.partition("=====")
    frame = f'File "{tmp_path / "script.py"}", line 9, in compute\n    return 10 // (y - 1)\n'
    assert done.stdout.startswith("error\n"), done.stdout
    assert frame in record_part, done.stdout
    assert frame in future_part, done.stdout  # the future's exception, through __cause__
    assert "<dynamic-code>" not in done.stdout


# -- 23: looking at a running executor ------------------------------------------------------


@pytest.mark.filterwarnings("ignore:cellpool.*threads still run:RuntimeWarning")  # expected
@pytest.mark.parametrize("kind", ["thread", "process"])
def test_workers_info_in_a_tight_loop_never_raises(kind):  # 23
    # Workers are replaced as their tasks time out, then the executor shuts down, while
    # another thread calls workers_info() non-stop; several executors in a row, and
    # frequent thread switches, make the races likelier. The old core raised
    # StopIteration (a thread pool between dropping a worker and starting the next) and
    # ValueError (a process worker's shared memory read after it was closed), but only
    # when a call fell in the window.
    workers, tasks, seconds, timeout = (1, 12, 0.3, 0.05) if kind == "thread" else (2, 4, 600, 0.3)
    errors: list[BaseException] = []
    calls = 0
    current: list[Executor] = []
    stop = threading.Event()

    def poll():
        nonlocal calls
        while not stop.is_set():
            for ex in current[-1:]:
                try:
                    ex.workers_info()
                except BaseException as error:  # StopIteration too
                    errors.append(error)
                calls += 1

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    poller = threading.Thread(target=poll)
    poller.start()
    try:
        for _ in range(4):
            ex = Executor(kind, workers, timeout=timeout, progress="none")
            current.append(ex)
            try:
                results = ex.run(nap, range(tasks), [seconds] * tasks)
                ex.shutdown()
                time.sleep(0.1)  # and after it
            finally:
                ex.shutdown()
            assert len(results) == tasks
            assert results.counts().get("timeout", 0) >= tasks // 2
    finally:
        stop.set()
        poller.join()
        sys.setswitchinterval(switch)
        current.clear()
    assert errors == [], f"{len(errors)} of {calls} calls raised: {errors[:3]!r}"


@pytest.mark.filterwarnings("ignore:cellpool.*threads still run:RuntimeWarning")  # expected
@pytest.mark.parametrize(
    ("kind", "point"),
    [("thread", "thread.worker-abandoned"), ("process", "process.worker-closed")],
)
def test_workers_info_while_the_dispatcher_is_held_where_a_worker_goes(kind, point):  # 23
    # The dispatcher is held where the old core raised: a thread pool between dropping
    # a timed-out worker and starting the next (StopIteration), a process pool right
    # after closing a dead worker's shared memory (ValueError: mmap closed). Another
    # thread asks for workers_info() there; it must answer from the last published rows.
    from cellpool import hooks

    answers: list[object] = []
    held = threading.Event()

    def ask_from_another_thread():
        if held.is_set():
            return
        held.set()

        def ask():
            for _ in range(20):
                try:
                    answers.append(ex.workers_info())
                except BaseException as error:  # StopIteration too
                    answers.append(error)

        asker = threading.Thread(target=ask)
        asker.start()
        asker.join(10)

    with (
        hooks.installed(point, ask_from_another_thread),
        Executor(kind, 1, timeout=0.3, progress="none") as ex,
    ):
        results = ex.run(nap, range(3), [0, 3, 0])
    assert held.is_set(), f"no worker went past {point}"
    assert [r.status for r in results] == ["ok", "timeout", "ok"]
    assert len(answers) == 20, "workers_info() waited on the held dispatcher"
    for answer in answers:  # the one worker, as last published, never a half-made pool
        assert isinstance(answer, list) and len(answer) == 1, answer
        assert {"worker", "state", "pid"} <= set(answer[0]), answer


def test_partial_on_a_million_tasks_is_quick_and_does_not_stall_the_run():  # 23
    # While partial() turns the records into a Results, the run goes on: tasks finish
    # during each call. The old core held the sink's lock for the whole call, so the
    # dispatcher could record nothing and the workers ran dry.
    window = 0.025
    calls = []
    with Executor("thread", 2, progress="none") as ex:
        job = ex.start(abs, range(1_000_000))
        deadline = time.monotonic() + 90
        while not job.done():
            began, began_wall = time.monotonic(), time.time()
            job.partial()
            calls.append((began_wall, time.time(), time.monotonic() - began))
            assert time.monotonic() < deadline, "the run did not end"
            time.sleep(0.01)
        results = job.result(timeout=WAIT)
    assert len(results) == 1_000_000
    slowest = max(took for _, _, took in calls)
    assert slowest < 2, f"partial() took {slowest:.2f} s"
    finished = sorted(record.finished for record in results)
    windows = idle = 0
    for began, ended, _ in calls:
        start = began
        while start + window <= ended:
            windows += 1
            first = bisect.bisect_left(finished, start)
            idle += not (first < len(finished) and finished[first] < start + window)
            start += window
    assert windows >= 4, "no partial() call was long enough to look inside"
    assert idle / windows < 0.5, f"no task finished in {idle} of {windows} windows"


@pytest.mark.filterwarnings("ignore:cellpool.*threads still run:RuntimeWarning")  # expected
def test_cancelling_a_generator_run_given_a_total_reads_no_further():  # 23
    read = 0

    def numbers():
        nonlocal read
        for i in range(10_000_000):
            read += 1
            yield i

    with Executor("thread", 2, progress="none") as ex:
        job = ex.start(tiny_nap, numbers(), total=1_000_000)
        assert not settle(lambda: read < 1000, WAIT)
        job.cancel()
        read_at_cancel = read
        results = job.result(timeout=WAIT)
        time.sleep(0.5)  # a feeder still reading would go on meanwhile
    assert read - read_at_cancel <= 5000, f"{read - read_at_cancel} more items read"
    assert len(results) == read
    assert results.counts().get("cancelled", 0) > 0


# -- 25: deadlines are on the monotonic clock ------------------------------------------------


def test_a_wall_clock_jump_does_not_time_a_task_out(monkeypatch):  # 25
    real_time = time.time
    offset = [0.0]
    monkeypatch.setattr(time, "time", lambda: real_time() + offset[0])

    def leap_then_work(_):
        offset[0] = 1000.0  # the wall clock jumps 1000 s forward as the task starts
        time.sleep(0.2)
        return "ok"

    with Executor("thread", 1, timeout=5, progress="none") as ex:
        results = ex.run(leap_then_work, [0])
    assert results[0].status == "ok", results[0].error
    assert results.values == ["ok"]
