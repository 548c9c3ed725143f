"""The Executor on threads: records, laziness, retries, timeouts, cancellation, bad input."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import threading
import time
from concurrent.futures import CancelledError

import pytest

import cellpool
from cellpool import Executor


def add_one(x):
    return x + 1


class Counted:
    """An iterable that records how far it has been consumed."""

    def __init__(self, limit: int | None = None) -> None:
        self.taken = 0
        self.limit = limit

    def __iter__(self):
        for i in itertools.count() if self.limit is None else range(self.limit):
            self.taken += 1
            yield i


def test_run_gives_one_record_per_input_in_input_order():
    def jittery(x):
        time.sleep(random.random() / 200)
        return x * 2

    with Executor(workers=6, progress="none") as ex:
        results = ex.run(jittery, range(300))
    assert [r.index for r in results] == list(range(300))
    assert [r.item for r in results] == list(range(300))
    assert results.values == [2 * x for x in range(300)]
    assert results.ok
    first = results[0]
    assert first.status == "ok"
    assert first.worker.startswith("t")
    assert first.pid == os.getpid()
    assert first.attempts == 1
    assert first.started <= first.finished
    assert first.duration == pytest.approx(first.finished - first.started, abs=1e-6)
    assert len({r.worker for r in results}) > 1


def test_errors_become_records_and_the_rest_go_on():
    def sometimes(x):
        if x % 10 == 3:
            raise ValueError(f"bad input {x}")
        return x

    results = cellpool.run(sometimes, range(50), workers=4, progress="none")
    assert len(results) == 50
    failed = results.errors
    assert [r.index for r in failed] == [3, 13, 23, 33, 43]
    assert {r.status for r in failed} == {"error"}
    assert failed[0].error_type == "ValueError"
    assert failed[0].error == "bad input 3"
    assert "in sometimes" in failed[0].traceback
    assert "cellpool" not in failed[0].traceback.split("\n", 1)[1]
    assert results.values[3] is None and results.values[4] == 4


def test_several_iterables_give_tuple_items():
    results = cellpool.run(pow, [2, 3, 4], [3, 2, 1], progress="none")
    assert results.values == [8, 9, 4]
    assert results[1].item == (3, 2)


def test_run_reads_input_lazily_and_keeps_max_pending_in_flight():
    release = threading.Event()
    source = Counted(limit=1000)
    with Executor(workers=2, max_pending=10, progress="none") as ex:
        job = ex.start(lambda x: release.wait(10) and x, source)
        time.sleep(0.5)
        assert source.taken <= 10
        release.set()
        results = job.result(timeout=30)
    assert source.taken == 1000
    assert results.values == list(range(1000))


def test_map_over_an_endless_input_yields_results_as_they_come():
    source = Counted()
    with Executor(workers=4, max_pending=64, progress="none") as ex:
        values = ex.map(add_one, source)
        assert list(itertools.islice(values, 500)) == list(range(1, 501))
        assert source.taken <= 500 + 64
        values.close()


def test_map_raises_the_first_error_when_it_is_reached():
    def fail_at_five(x):
        if x == 5:
            raise KeyError(x)
        return x

    with Executor(workers=3, progress="none") as ex:
        values = ex.map(fail_at_five, range(20))
        assert [next(values) for _ in range(5)] == [0, 1, 2, 3, 4]
        with pytest.raises(KeyError):
            next(values)


def test_map_timeout_is_a_deadline_for_the_whole_iteration():
    release = threading.Event()
    with Executor(workers=1, progress="none") as ex:
        values = ex.map(lambda x: release.wait(10), range(3), timeout=0.3)
        with pytest.raises(TimeoutError):
            list(values)
        release.set()


def test_submit_returns_standard_futures():
    with Executor(workers=2, progress="none") as ex:
        assert ex.submit(pow, 2, 10).result() == 1024
        assert ex.submit(int, "ff", base=16).result() == 255
        with pytest.raises(ZeroDivisionError):
            ex.submit(lambda: 1 / 0).result()


def test_retries_count_attempts():
    tries: dict[int, int] = {}
    lock = threading.Lock()

    def flaky(x):
        with lock:
            tries[x] = tries.get(x, 0) + 1
            if tries[x] < 3:
                raise ConnectionError("try again")
        return x

    with Executor(workers=4, retries=3, progress="none") as ex:
        results = ex.run(flaky, range(20))
    assert results.ok
    assert {r.attempts for r in results} == {3}

    tries.clear()
    results = cellpool.run(flaky, range(5), retries=1, progress="none")
    assert {r.status for r in results} == {"error"}
    assert {r.attempts for r in results} == {2}


def test_retry_on_limits_what_is_retried():
    def broken(x):
        raise KeyError(x)

    results = cellpool.run(broken, range(4), retries=3, retry_on=ValueError, progress="none")
    assert {r.attempts for r in results} == {1}
    assert {r.error_type for r in results} == {"KeyError"}


def test_a_task_past_its_timeout_is_recorded_and_its_thread_replaced():
    release = threading.Event()

    def hang_on_zero(x):
        if x == 0:
            release.wait(30)
        return x

    ex = Executor(workers=1, timeout=0.5, progress="none")
    try:
        results = ex.run(hang_on_zero, range(5))
        assert results[0].status == "timeout"
        assert results[0].error_type == "TaskTimeout"
        assert "timeout" in results[0].error
        assert results.values[1:] == [1, 2, 3, 4]
        states = {row["worker"]: row["state"] for row in ex.workers_info()}
        assert "abandoned" in states.values()
        assert "idle" in states.values()
    finally:
        release.set()
        for thread in ex._pool.abandoned_threads():
            thread.join(10)
        ex.shutdown()


def test_job_cancel_returns_the_records_so_far():
    release = threading.Event()

    def slow(x):
        if x >= 4:
            release.wait(30)
        return x

    with Executor(workers=2, progress="none") as ex:
        job = ex.start(slow, range(100))
        deadline = time.monotonic() + 10
        while len(job.partial()) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert job.cancel()
        results = job.result(timeout=5)
        release.set()
    assert len(results) == 100
    assert results.values[:4] == [0, 1, 2, 3]
    assert {r.status for r in results[4:]} == {"cancelled"}
    assert not job.cancel()


def test_shutdown_cancel_futures_cancels_what_has_not_started():
    release = threading.Event()
    ex = Executor(workers=1, progress="none")
    running = ex.submit(release.wait, 30)
    queued = [ex.submit(add_one, i) for i in range(20)]
    time.sleep(0.2)
    ex.shutdown(wait=False, cancel_futures=True)
    release.set()
    ex.shutdown(wait=True)
    assert running.result() is True
    assert all(f.cancelled() for f in queued[5:])
    with pytest.raises(CancelledError):
        queued[-1].result()
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(add_one, 1)


def test_a_job_can_be_awaited():
    async def main():
        with Executor(workers=2, progress="none") as ex:
            return await ex.start(add_one, range(10))

    assert asyncio.run(main()).values == list(range(1, 11))


def test_a_failing_input_raises_after_recording_what_it_gave():
    def broken_input():
        yield from range(5)
        raise OSError("input went away")

    with pytest.raises(OSError, match="input went away") as caught:
        cellpool.run(add_one, broken_input(), progress="none")
    assert caught.value.results.values == [1, 2, 3, 4, 5]


def test_mismatched_unsized_iterables_are_an_error():
    with pytest.raises(ValueError, match="zip"):
        cellpool.run(pow, iter([1, 2, 3]), iter([1, 2]), progress="none")


def test_interrupt_stops_the_run_and_propagates():
    release = threading.Event()
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    with Executor(workers=2, progress="none") as ex:
        timer.start()
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            ex.run(lambda x: release.wait(30), range(10))
        assert time.monotonic() - started < 5
        release.set()


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda: Executor(workers=0), ValueError, "workers must be an integer >= 1"),
        (lambda: Executor("gpu"), ValueError, "kind must be one of"),
        (lambda: Executor(retries=-1), ValueError, "retries"),
        (lambda: Executor(timeout=0), ValueError, "timeout"),
        (lambda: Executor(retry_on=42), TypeError, "retry_on"),
        (lambda: Executor(progress="loud"), ValueError, "progress"),
        (lambda: cellpool.run(42, [1]), TypeError, "needs a callable"),
        (lambda: cellpool.run(add_one, 42), TypeError, "must be iterable; got int"),
        (lambda: cellpool.run(pow, [1, 2], [1]), ValueError, "different lengths"),
        (lambda: cellpool.run(add_one), TypeError, "at least one iterable"),
    ],
)
def test_bad_input_is_a_one_line_error(call, error, words):
    with pytest.raises(error) as caught:
        call()
    message = str(caught.value)
    assert words in message
    assert "\n" not in message


def test_unknown_run_option_is_named():
    with Executor(workers=1) as ex, pytest.raises(TypeError, match="'colour'"):
        ex.run(add_one, [1], colour="red")


def test_text_progress_draws_one_line_at_most_ten_times_a_second(capsys):
    def tick(x):
        time.sleep(0.01)
        if x == 7:
            raise ValueError
        return x

    started = time.monotonic()
    cellpool.run(tick, range(60), workers=2, progress="text")
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    assert "60/60 (100%)" in err
    assert "1 errors" in err
    assert "/s" in err
    assert err.endswith("\n") and err.count("\n") == 1
    assert 2 <= err.count("\r") <= elapsed * 10 + 2


def test_auto_progress_is_silent_when_stderr_is_not_a_terminal(capsys):
    cellpool.run(add_one, range(10), progress="auto")
    assert capsys.readouterr().err == ""


def test_workers_info_describes_each_thread():
    release = threading.Event()
    with Executor(workers=3, progress="none") as ex:
        job = ex.start(lambda x: release.wait(10), range(3))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            rows = ex.workers_info()
            if sum(row["state"] == "busy" for row in rows) == 3:
                break
            time.sleep(0.02)
        assert len(rows) == 3
        assert {row["state"] for row in rows} == {"busy"}
        assert sorted(row["task"] for row in rows) == [0, 1, 2]
        for row in rows:
            assert row["pid"] == os.getpid()
            assert row["rss"] > 0 and row["fds"] > 0 and row["threads"] >= 3
            assert row["task_seconds"] >= 0
        release.set()
        job.result()
        assert sum(row["done"] for row in ex.workers_info()) == 3


def test_shutdown_leaves_no_thread():
    ex = Executor(workers=5, progress="none")
    ex.run(add_one, range(100))
    ex.shutdown()
    assert not [t for t in threading.enumerate() if t.name.startswith("cellpool-")]
