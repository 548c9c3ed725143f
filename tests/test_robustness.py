"""Regressions: ways a run could hang, lose a record or kill the dispatcher."""

from __future__ import annotations

import threading
import time
from concurrent.futures import BrokenExecutor

import pytest

import cellpool
from cellpool import Executor


def brief(x):
    time.sleep(0.002)
    return x


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_shutdown_cancelling_pending_work_records_each_input_once(kind):
    ex = Executor(kind, 2, progress="none")
    job = ex.start(brief, range(5000))
    time.sleep(0.5)
    ex.shutdown(wait=True, cancel_futures=True)
    results = job.result(timeout=10)
    assert [r.index for r in results] == list(range(5000))
    assert {r.status for r in results} <= {"ok", "cancelled"}
    assert results.counts()["ok"] > 0 and results.counts()["cancelled"] > 0


def test_an_input_raising_system_exit_ends_the_run_not_the_executor():
    def exits():
        yield 1
        raise SystemExit("bye")

    with Executor("thread", 2, progress="none") as ex:
        with pytest.raises(SystemExit):
            ex.run(brief, exits())
        assert ex.submit(abs, -2).result(timeout=10) == 2


class Unrebuildable:
    def __reduce__(self):
        return (_refuse, ())


def _refuse():
    raise ValueError("cannot rebuild here")


def test_an_argument_the_worker_cannot_unpickle_is_an_error_record():
    with Executor("process", 2, progress="none") as ex:
        results = ex.run(str, [1, Unrebuildable(), 3])
    assert [r.status for r in results] == ["ok", "error", "ok"]
    assert results[1].error_type == "UnpicklingError"
    assert "cannot rebuild here" in results[1].error


def test_a_failing_initializer_on_threads_breaks_the_pool():
    def broken_init():
        raise RuntimeError("init failed")

    with (
        Executor("thread", 2, initializer=broken_init, progress="none") as ex,
        pytest.raises(BrokenExecutor, match="init failed"),  # from submit, or its future
    ):
        ex.submit(abs, -1).result(timeout=30)


def test_a_map_iterator_dropped_unread_does_not_hold_up_shutdown():
    ex = Executor("thread", 2, max_pending=8, progress="none")
    values = ex.map(brief, range(1000))
    del values
    done = threading.Event()
    threading.Thread(target=lambda: (ex.shutdown(), done.set())).start()
    assert done.wait(10)


def test_shutdown_from_a_futures_callback_does_not_deadlock():
    ex = Executor("thread", 1, progress="none")
    future = ex.submit(abs, -1)
    future.add_done_callback(lambda _: ex.shutdown(wait=False))
    assert future.result(timeout=10) == 1
    done = threading.Event()
    threading.Thread(target=lambda: (ex.shutdown(), done.set())).start()
    assert done.wait(10)


def test_a_total_hint_smaller_than_the_input_then_cancel():
    with Executor("thread", 2, progress="none") as ex:
        job = ex.start(brief, iter(range(100)), total=3)
        time.sleep(0.2)
        job.cancel()
        job.result(timeout=10)
        assert cellpool.run(abs, [-5], progress="none").values == [5]
        assert ex.submit(abs, -4).result(timeout=10) == 4  # the dispatcher is alive


class UnprintableError(Exception):
    def __str__(self):
        raise RuntimeError("no text for this one")


def raise_unprintable(x):
    raise UnprintableError()


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_an_exception_that_cannot_be_printed_is_still_one_error_record(kind):
    with Executor(kind, 2, progress="none") as ex:
        results = ex.run(raise_unprintable, range(3))
        assert ex.submit(abs, -3).result(timeout=30) == 3
    assert [r.status for r in results] == ["error"] * 3
    assert {r.error_type for r in results} == {"UnprintableError"}
    assert "raise_unprintable" in results[0].traceback


def refuse_to_start():
    time.sleep(0.5)  # the run has been added by now: it breaks under it
    raise RuntimeError("no such model")


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_a_pool_that_breaks_gives_every_input_of_a_list_a_record(kind):
    """Every input gets one record even when no worker can start: the inputs not yet
    read are recorded crashed, as a cancel records them cancelled."""
    results = cellpool.run(
        abs, range(100), kind=kind, workers=1, initializer=refuse_to_start, max_pending=8,
        progress="none",
    )  # fmt: skip
    assert len(results) == 100
    assert results.counts() == {"crashed": 100}
    assert "initializer failed: RuntimeError: no such model" in results[99].error
