"""Scheduling when task durations change: batches sized on quick tasks must not keep
slow ones from idle workers. Sleeping tasks, so the tests hold on a loaded machine."""

from __future__ import annotations

import collections
import threading
import time

import pytest

from cellpool import Executor

SLOW = 0.05  # seconds a slow task sleeps


def quick_then_slow(cheap: int, slow: int):
    """A generator (no length to plan by): ``cheap`` instant tasks, then ``slow`` ones."""
    yield from [0.0] * cheap
    yield from [SLOW] * slow


def nap(seconds):
    if seconds:
        time.sleep(seconds)
    return seconds


def slow_tasks_per_worker(results) -> list[int]:
    counts = collections.Counter(r.worker for r in results if r.value == SLOW)
    return sorted(counts.values())


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_slow_tasks_after_quick_ones_spread_over_every_worker(kind):
    # The quick tasks make batches of thousands; the slow tasks that follow land in
    # such batches. Without recalling them, one worker ran nearly all the slow tasks.
    with Executor(kind, 2, progress="none") as ex:
        results = ex.run(nap, quick_then_slow(3000, 80))
    assert results.ok and len(results) == 3080
    per_worker = slow_tasks_per_worker(results)
    assert len(per_worker) == 2 and per_worker[0] >= 20, per_worker  # 40 each is ideal


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_slow_tasks_before_quick_ones_spread_over_every_worker(kind):
    with Executor(kind, 2, progress="none") as ex:
        results = ex.run(nap, [SLOW] * 80 + [0.0] * 3000)
    assert results.ok
    per_worker = slow_tasks_per_worker(results)
    assert len(per_worker) == 2 and per_worker[0] >= 20, per_worker


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_a_recall_that_meets_the_end_of_a_batch_loses_and_repeats_nothing(kind, tmp_path):
    # The last task of the input runs long while the other worker idles, so the
    # dispatcher recalls its batch; it is then held until that task, the batch's last,
    # has ended. The worker must report the batch whole, once, with nothing given back.
    from cellpool import hooks

    ended = tmp_path / "last-task-ended"
    recalled = threading.Event()

    def hold_until_the_last_task_ended():
        recalled.set()
        deadline = time.monotonic() + 10
        while not ended.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # and the worker is past the point where it looks at the recall

    with (
        hooks.installed("dispatch.recalled", hold_until_the_last_task_ended),
        Executor(kind, 2, progress="none") as ex,
    ):
        results = ex.run(nap_then_mark, [0.0] * 5000 + [0.5], [str(ended)] * 5001)
    assert recalled.is_set(), "the batch was not recalled"
    assert results.ok and len(results) == 5001
    assert [r.index for r in results] == list(range(5001))
    assert [r.attempts for r in results] == [1] * 5001


def nap_then_mark(seconds, marker):
    nap(seconds)
    if seconds:
        open(marker, "w").close()
    return seconds


def first_batch_sizes(ex, monkeypatch) -> dict[str, int]:
    """Run name -> how many tasks the first batch sent for it held (a spy on the pool)."""
    pool = ex._dispatcher.pool
    send, sizes = pool.send, {}

    def spy(batch):
        sizes.setdefault(batch.run.fn.__name__, len(batch.items))
        send(batch)

    monkeypatch.setattr(pool, "send", spy)
    return sizes


def inc(x):
    return x + 1


def dec(x):
    return x - 1


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_a_warm_executor_sizes_a_rerun_from_the_last_run_of_its_function(kind, monkeypatch):
    with Executor(kind, 2, progress="none") as ex:
        assert ex.run(inc, range(2000)).ok  # measures inc's tasks
        sizes = first_batch_sizes(ex, monkeypatch)
        assert ex.run(inc, range(2000)).values == list(range(1, 2001))
        assert ex.run(dec, range(2000)).ok
    # a function never run here is measured on one task first; inc needs no measuring
    assert sizes["dec"] == 1 and sizes["inc"] > 10, sizes


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_a_rerun_whose_tasks_got_slow_still_spreads_over_every_worker(kind):
    # The estimate the rerun starts from is the quick run's: its first batch takes many
    # slow tasks, and recalling them is what spreads them out.
    with Executor(kind, 2, progress="none") as ex:
        assert ex.run(nap, [0.0] * 3000).ok
        results = ex.run(nap, [SLOW] * 80)
    assert results.ok
    per_worker = slow_tasks_per_worker(results)
    assert len(per_worker) == 2 and per_worker[0] >= 20, per_worker
