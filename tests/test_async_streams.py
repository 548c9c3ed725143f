"""``async def`` tasks stream on each worker thread: up to ``concurrency`` coroutines in
flight across batches, and still exactly one record per input, in order, through
timeouts, retries, recalls, crashes and cancels. Real sleeps, a real segfault; every
wait is bounded, so a regression fails rather than hangs."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import os
import threading
import time

import pytest

from cellpool import Executor, hooks

CONCURRENCY = 4
KINDS = ["thread", "process"]


def mean_in_flight(results) -> dict[str, float]:
    """Per worker, the tasks in flight on average (time-weighted, from the records'
    times) between its first task's start and its last task's start: while work waited
    for it."""
    spans = collections.defaultdict(list)
    for record in results:
        spans[record.worker].append((record.started, record.finished))
    means = {}
    for worker, own in spans.items():
        begin, end = min(s for s, _ in own), max(s for s, _ in own)
        steps = sorted([(s, 1) for s, _ in own] + [(f, -1) for _, f in own])
        area, level, last = 0.0, 0, begin
        for when, step in steps:
            when = min(max(when, begin), end)
            area += level * (when - last)
            level, last = level + step, when
        means[worker] = area / (end - begin)
    return means


def assert_one_record_each(results, count: int) -> None:
    assert [r.index for r in results] == list(range(count))
    assert [r.item for r in results] == list(range(count))
    for record in results:
        if record.status == "ok":
            assert record.value == record.item, record


async def one_slow_in_four(i):
    # run a batch at a time, three tasks of four wait for the slow one to end
    await asyncio.sleep(0.1 if i % CONCURRENCY == 0 else 0.02)
    return i


@pytest.mark.parametrize(
    ("kind", "threads"), [("thread", 1), ("process", 1), ("process", 2)], ids=str
)
def test_each_worker_thread_keeps_concurrency_tasks_in_flight_across_batches(kind, threads):
    options = {"threads_per_worker": threads} if threads > 1 else {}
    with Executor(kind, 2, concurrency=CONCURRENCY, progress="none", **options) as ex:
        results = ex.run(one_slow_in_four, range(240))
    assert results.ok
    assert_one_record_each(results, 240)
    means = mean_in_flight(results)
    assert len(means) == 2, means
    # batch by batch it was 1.6 (a quarter of the time 4, the rest 1); streaming, ~4
    assert min(means.values()) >= 0.75 * CONCURRENCY * threads, means


async def late_or_blocking(i):
    if i == 13:
        time.sleep(3)  # holds the event loop past the timeout: its worker is stopped
    elif i % 10 == 7:
        await asyncio.sleep(3)  # past the timeout, awaiting: cancelled on its loop
    await asyncio.sleep(0.02)
    return i


@pytest.mark.parametrize("kind", KINDS)
def test_timeouts_in_a_stream_give_each_input_one_record(kind):
    # 13 is the second task of its batch: the tasks before it in flight get records too
    with Executor(kind, 2, timeout=1, concurrency=CONCURRENCY, progress="none") as ex:
        job = ex.start(late_or_blocking, range(40))
        try:
            results = job.result(timeout=30)
        finally:
            job.cancel()
    assert_one_record_each(results, 40)
    timed_out = [r.index for r in results if r.status == "timeout"]
    assert timed_out == [7, 13, 17, 27, 37], [(r.index, r.status) for r in results]
    assert all(r.status == "ok" for r in results if r.index not in timed_out)
    assert {r.attempts for r in results} == {1}


async def fails_first_time(i, marks):
    mark = os.path.join(marks, str(i))
    if i % 5 == 2 and not os.path.exists(mark):
        open(mark, "w").close()
        raise ConnectionError("first try")
    await asyncio.sleep(0.02)
    return i


@pytest.mark.parametrize("kind", KINDS)
def test_retries_in_a_stream_give_each_input_one_record(kind, tmp_path):
    with Executor(kind, 2, retries=1, concurrency=CONCURRENCY, progress="none") as ex:
        results = ex.run(fails_first_time, range(60), [str(tmp_path)] * 60)
    assert results.ok
    assert [r.index for r in results] == list(range(60))
    assert results.values == list(range(60))
    assert [r.attempts for r in results] == [2 if i % 5 == 2 else 1 for i in range(60)]


async def crash_on_21(i):
    await asyncio.sleep(0.02)
    if i == 21:
        ctypes.string_at(0)  # a real segfault, with other tasks of the worker in flight
    await asyncio.sleep(0.02)
    return i


def test_a_worker_crashing_mid_stream_costs_only_the_task_that_crashed():
    with Executor("process", 2, concurrency=CONCURRENCY, progress="none") as ex:
        results = ex.start(crash_on_21, range(60)).result(timeout=30)
    assert_one_record_each(results, 60)
    assert [r.index for r in results if r.status != "ok"] == [21]
    assert results[21].status == "crashed"
    assert {r.attempts for r in results} == {1}


async def nap(i):
    await asyncio.sleep(0.05)
    return i


@pytest.mark.parametrize("kind", KINDS)
def test_cancelling_a_stream_gives_each_input_one_record(kind):
    with Executor(kind, 2, concurrency=CONCURRENCY, progress="none") as ex:
        job = ex.start(nap, range(400))
        deadline = time.monotonic() + 20
        while len(job.partial()) < 40 and time.monotonic() < deadline:
            time.sleep(0.01)
        job.cancel()
        results = job.result(timeout=30)
    assert_one_record_each(results, 400)
    statuses = collections.Counter(r.status for r in results)
    assert set(statuses) == {"ok", "cancelled"} and statuses["ok"] >= 40, statuses


def role(claims: str) -> str:
    """``"slow"`` in the first worker process that asks, ``"fast"`` in any other."""
    with contextlib.suppress(FileExistsError):
        os.symlink(str(os.getpid()), claims)  # atomic: one process wins
    return "slow" if os.readlink(claims) == str(os.getpid()) else "fast"


async def slow_on_one_worker(i, claims):
    # the slow ones end a little apart: the next batch finds room for one task at a time
    await asyncio.sleep(0.4 + 0.05 * (i % CONCURRENCY) if role(claims) == "slow" else 0.02)
    return i


class Recalls:
    """Counts the dispatcher's recalls; once there was one, each batch sent after waits
    (at most ``HOLD`` seconds) for the next, so that it reaches its worker recalled."""

    HOLD = 3.0

    def __init__(self) -> None:
        self.count = 0
        self.changed = threading.Condition()

    def recalled(self) -> None:
        with self.changed:
            self.count += 1
            self.changed.notify_all()

    def hold_until_the_next(self) -> None:
        with self.changed:
            seen = self.count
            if seen:
                self.changed.wait_for(lambda: self.count > seen, self.HOLD)


def test_a_recalled_stream_gives_back_what_waits_and_runs_what_arrives_recalled(tmp_path):
    # One worker's tasks take about 0.5 s, the other's 0.02 s: the fast one runs out of work
    # while the slow one holds batches it has not started, which the dispatcher
    # recalls. What the slow worker gives back is sent to the fast one and recalled
    # again before it arrives (the slow one idles then): a lane with room runs what
    # arrives. Before, such a batch went back and forth between the workers forever.
    recalls = Recalls()
    claims = str(tmp_path / "slow")
    with (
        hooks.installed("dispatch.recalled", recalls.recalled),
        hooks.installed("process.batch-sending", recalls.hold_until_the_next),
        Executor("process", 2, concurrency=CONCURRENCY, progress="none") as ex,
    ):
        job = ex.start(slow_on_one_worker, range(40), [claims] * 40)
        try:
            results = job.result(timeout=30)
        finally:
            job.cancel()
    assert results.ok
    assert [r.index for r in results] == list(range(40))
    assert results.values == list(range(40))
    assert {r.attempts for r in results} == {1}
    assert recalls.count >= 2, recalls.count


async def long_then_short(item):
    i, started_dir = item
    open(os.path.join(started_dir, str(i)), "w").close()
    await asyncio.sleep(3 if i == 0 else 0.01)
    return i


def gated_input(started_dir: str, count: int):
    """Item 0, then the rest only once task 0 runs: they arrive while it runs."""
    yield 0, started_dir
    deadline = time.monotonic() + 20
    while not os.path.exists(os.path.join(started_dir, "0")) and time.monotonic() < deadline:
        time.sleep(0.01)
    for i in range(1, count):
        yield i, started_dir


@pytest.mark.parametrize("kind", KINDS)
def test_a_batch_arriving_while_tasks_run_starts_at_once(kind, tmp_path):
    # The lane waits on its pipe or queue from its event loop: a batch that arrives
    # while it has room starts then, not when a task of the lane next ends.
    with Executor(kind, 1, concurrency=CONCURRENCY, progress="none") as ex:
        results = ex.start(long_then_short, gated_input(str(tmp_path), 4)).result(timeout=30)
    assert results.ok and results.values == [0, 1, 2, 3]
    assert max(r.finished for r in results[1:]) < results[0].finished - 2, [
        (r.index, r.started, r.finished) for r in results
    ]
