"""Pipelines: stages on their own pools, streaming through bounded handoffs, one record
per input. Real faults: a stage-2 process worker that segfaults, a task that hangs past
its timeout, a cancel in the middle, an input that raises."""

from __future__ import annotations

import ctypes
import os
import random
import re
import subprocess
import sys
import threading
import time

import pytest

import cellpool
from cellpool import hooks
from tests.conftest import settle, worker_processes

# -- stage functions (module level: process workers import them by reference) ----------


def jittery_double(x):
    time.sleep(random.random() * 0.004)
    return 2 * x


def jittery_inc(x):
    time.sleep(random.random() * 0.004)
    return x + 1


def square(x):
    return x * x


def fail_on_seven(x):
    if x == 7:
        raise ValueError("no sevens")
    return x


def crash_or_hang(x):
    if x == 3:
        ctypes.string_at(0)  # a real segfault
    if x == 5:
        time.sleep(60)
    return x


def nap(x):
    time.sleep(0.05)
    return x


# -- records ---------------------------------------------------------------------------


def test_every_input_gets_one_record_in_order_under_random_durations():
    pipe = cellpool.pipeline(
        cellpool.stage(jittery_double, kind="thread", workers=6),
        cellpool.stage(jittery_inc, kind="process", workers=2),
        cellpool.stage(square, kind="thread", workers=3, name="last"),
        buffer=16,
    )
    results = pipe.run(range(300), progress="none")
    assert [r.index for r in results] == list(range(300))
    assert [r.item for r in results] == list(range(300))
    assert results.values == [(2 * x + 1) ** 2 for x in range(300)]
    assert {r.stage for r in results} == {"last"}
    assert set(results.stages) == {"jittery_double", "jittery_inc", "last"}
    for name, records in results.stages.items():
        assert [r.index for r in records] == list(range(300)), name
        assert all(r.status == "ok" and r.duration is not None for r in records)
    assert all(r.worker.startswith("p") for r in results.stages["jittery_inc"])
    # a pipeline record spans every stage: from stage 1's start to the last one's end
    first, last = results.stages["jittery_double"], results.stages["last"]
    for record, begin, end in zip(results, first, last, strict=True):
        assert record.started == pytest.approx(begin.started)
        assert record.finished == pytest.approx(end.finished)


def test_an_input_failing_in_stage_one_never_reaches_stage_two():
    seen = []

    def record(x):
        seen.append(x)
        return x

    results = cellpool.pipeline(
        cellpool.stage(fail_on_seven, kind="thread", workers=4, retries=2),
        cellpool.stage(record, kind="thread", workers=2),
    ).run(range(20), progress="none")
    assert sorted(seen) == [x for x in range(20) if x != 7]
    failed = results[7]
    assert (failed.status, failed.stage, failed.error_type) == (
        "error",
        "fail_on_seven",
        "ValueError",
    )
    assert failed.attempts == 3  # its stage's retries
    assert "no sevens" in failed.traceback
    assert "fail_on_seven" in results.errors.__repr__()
    assert [r.index for r in results.stages["record"]] == [x for x in range(20) if x != 7]


def test_a_crash_and_a_timeout_in_stage_two_cost_those_inputs_only():
    results = cellpool.pipeline(
        cellpool.stage(fail_on_seven, kind="thread", workers=2),
        cellpool.stage(crash_or_hang, kind="process", workers=2, timeout=2, name="risky"),
    ).run(range(10), progress="none")
    statuses = {r.index: (r.status, r.stage) for r in results}
    assert statuses.pop(3) == ("crashed", "risky")
    assert statuses.pop(5) == ("timeout", "risky")
    assert statuses.pop(7) == ("error", "fail_on_seven")
    assert statuses == {x: ("ok", "risky") for x in range(10) if x not in (3, 5, 7)}
    assert results[3].worker.startswith("p") and results[3].pid is not None
    assert [r.value for r in results if r.status == "ok"] == [0, 1, 2, 4, 6, 8, 9]


def test_cancel_mid_run_records_the_rest_cancelled_and_leaves_nothing_running():
    def fetch(x):
        time.sleep(0.05)
        return x

    pipe = cellpool.pipeline(
        cellpool.stage(fetch, kind="thread", workers=4),
        cellpool.stage(nap, kind="process", workers=2),
        buffer=8,
    )
    job = pipe.start(range(400), progress="none")
    deadline = time.monotonic() + 60
    while len(job.partial()) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)  # some inputs have been through both stages
    assert job.cancel()
    results = job.result(timeout=60)
    assert [r.index for r in results] == list(range(400))
    counts = results.counts()
    assert counts["cancelled"] > 300 and counts.get("ok", 0) > 0
    assert set(counts) <= {"ok", "cancelled"}
    cancelled_at = {r.stage for r in results if r.status == "cancelled"}
    assert "fetch" in cancelled_at  # never read, or stopped in stage 1
    assert all(r.value is None for r in results if r.status == "cancelled")
    assert not job.cancel()  # already ended
    assert not worker_processes()


def test_a_slow_stage_holds_the_ones_before_it_back():
    """Back-pressure, counted: the input is read only as far as the buffer allows
    ahead of the slow second stage."""
    buffer, downstream_pending = 10, 2
    produced, consumed, ahead = [0], [0], []

    def inputs():
        for x in range(200):
            produced[0] += 1
            yield x

    def slow(x):
        ahead.append(produced[0] - consumed[0])
        consumed[0] += 1
        time.sleep(0.005)
        return x

    results = cellpool.pipeline(
        cellpool.stage(square, kind="thread", workers=4),
        cellpool.stage(slow, kind="thread", workers=1, max_pending=downstream_pending),
        buffer=buffer,
    ).run(inputs(), progress="none")
    assert results.values == [x * x for x in range(200)]
    # read by stage 1 - taken by stage 2 <= buffer, and stage 2 takes at most its
    # max_pending beyond what it has finished
    assert max(ahead) <= buffer + downstream_pending
    assert max(ahead) >= buffer // 2  # stage 1 did run ahead, up to the bound


def test_a_two_stage_generator_holds_no_more_than_the_buffers():
    """A long generator streams: at most the buffers' worth of inputs are ever read
    and not yet finished by the last stage."""
    produced, finished, most = [0], [0], [0]
    lock = threading.Lock()

    def inputs():
        for x in range(100_000):
            produced[0] += 1
            yield x

    def last(x):
        with lock:
            most[0] = max(most[0], produced[0] - finished[0])
            finished[0] += 1
        return x

    results = cellpool.pipeline(
        cellpool.stage(square, kind="thread", workers=2),
        cellpool.stage(last, kind="thread", workers=2),
        buffer=500,
    ).run(inputs(), progress="none")
    assert len(results) == 100_000 and results.ok
    # stage 1's buffer, the last stage's max_pending (the buffer too), one feeder chunk
    assert most[0] <= 2 * 500 + 512


def test_the_input_raising_ends_the_pipeline_with_the_records_so_far():
    def inputs():
        yield from range(5)
        raise OSError("the source went away")

    with pytest.raises(OSError, match="went away") as caught:
        cellpool.pipeline(square, jittery_inc).run(inputs(), progress="none")
    assert caught.value.results.values == [x * x + 1 for x in range(5)]


def test_async_stages_and_several_iterables():
    async def fetch(a, b):
        import asyncio

        await asyncio.sleep(0.01)
        return a + b

    results = cellpool.pipeline(
        cellpool.stage(fetch, kind="thread", workers=2, concurrency=8),
        cellpool.stage(square, kind="process", workers=2),
    ).run(range(50), range(50), progress="none")
    assert results.values == [(2 * x) ** 2 for x in range(50)]
    assert results[3].item == (3, 3)


def test_a_job_is_awaitable_and_its_pools_stop_when_it_ends():
    import asyncio

    job = cellpool.pipeline(square, jittery_inc).start(range(30), progress="none")
    results = asyncio.run(_wait(job))
    assert results.values == [x * x + 1 for x in range(30)]
    assert "done" in repr(job)


async def _wait(job):
    return await job


def test_ctrl_c_cancels_every_stage_and_raises():
    def interrupt_soon(x):
        if x == 20:
            import _thread

            _thread.interrupt_main()
        time.sleep(0.01)
        return x

    pipe = cellpool.pipeline(
        cellpool.stage(interrupt_soon, kind="thread", workers=2),
        cellpool.stage(nap, kind="process", workers=2),
    )
    with pytest.raises(KeyboardInterrupt):
        pipe.run(range(1000), progress="none")


# -- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: cellpool.pipeline(), ValueError, "at least one stage"),
        (lambda: cellpool.pipeline(square, square), ValueError, "two stages are named 'square'"),
        (lambda: cellpool.stage(square, colour="red"), TypeError, "unexpected option 'colour'"),
        (lambda: cellpool.stage(square, kind="gpu"), ValueError, "kind"),
        (lambda: cellpool.stage(42), TypeError, "callable"),
        (lambda: cellpool.pipeline(square, buffer=0), ValueError, "buffer"),
        (lambda: cellpool.stage(square, progress="none"), TypeError, "'progress'"),
    ],
)
def test_bad_pipelines_are_one_line_errors(make, error, message):
    with pytest.raises(error, match=message) as caught:
        make()
    assert "\n" not in str(caught.value)


def test_a_bad_stage_option_fails_before_anything_runs_and_leaks_nothing():
    ran = []
    pipe = cellpool.pipeline(
        cellpool.stage(ran.append, kind="process", workers=2, name="first"),
        cellpool.stage(square, kind="thread", workers=0),
    )
    with pytest.raises(ValueError, match="workers"):
        pipe.run(range(10), progress="none")
    assert ran == []


def test_a_stage_can_be_given_by_name_on_processes_with_a_notebook_function():
    # a function defined here, not importable by name in a worker: it travels by value
    def shout(word):
        return word.upper() + "!"

    results = cellpool.pipeline(
        cellpool.stage(str.strip, name="strip"),
        cellpool.stage(shout, kind="process", workers=1),
    ).run([" a ", "b "], progress="none")
    assert results.values == ["A!", "B!"]
    assert repr(cellpool.pipeline(square)) == "<cellpool.Pipeline square [thread]>"


# -- the view --------------------------------------------------------------------------


def test_the_view_shows_each_stage_what_waits_between_and_names_the_bottleneck(recording_comm):
    def slow(x):
        time.sleep(0.02)
        return x

    pipe = cellpool.pipeline(
        cellpool.stage(square, kind="thread", workers=2, name="quick"),
        cellpool.stage(slow, kind="thread", workers=1, name="slow"),
        buffer=20,
    )
    job = pipe.start(range(100), progress="widget")
    view = job._view
    waiting = re.compile(r"&darr; (\d+) waiting for slow")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        shown = waiting.search(view._stage_html[0].value)
        if shown and int(shown[1]) > 0:
            break
        time.sleep(0.02)
    assert shown and 0 < int(shown[1]) <= 20  # values pile up before the slow stage
    assert "quick [thread x2]" in view._stage_html[0].value
    assert "slow [thread x1]" in view._stage_html[1].value
    assert "1 worker: " in view._stage_html[1].value  # its states, as sampled
    results = job.result(timeout=60)
    assert results.ok
    assert view._bar.value == 100 and view._bar.bar_style == "success"
    assert [bar.value for bar in view._stage_bars] == [100, 100]
    summary = view._summary_now()
    assert repr(summary).endswith("| bottleneck: slow")
    assert "bottleneck: <b>slow</b>" in summary._repr_html_()
    assert len(recording_comm) > 0


def test_the_cancel_button_stops_every_stage(recording_comm):
    pipe = cellpool.pipeline(
        cellpool.stage(nap, kind="thread", workers=2),
        cellpool.stage(nap, kind="process", workers=1, name="again"),
    )
    job = pipe.start(range(200), progress="widget")
    deadline = time.monotonic() + 60
    while len(job.partial()) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    job._view._button.click()
    results = job.result(timeout=60)
    assert results.counts()["cancelled"] > 150
    assert job._view._bar.bar_style == "danger"


def test_the_text_line_names_each_stage_and_the_bottleneck(capsys):
    quick, slow = cellpool.stage(square, name="a"), cellpool.stage(nap, name="b")
    cellpool.pipeline(quick, slow).run(range(20), progress="text")
    last = capsys.readouterr().err.strip().split("\r")[-1]
    assert re.fullmatch(
        r"a -> b 20/20 \(100%\) \| 0 errors \| a 20 > 0 > b 20 \| bottleneck: b \(\d+% busy\).*",
        last,
    ), last


# -- machine memory pressure -----------------------------------------------------------


def test_under_memory_pressure_the_first_stage_pauses_while_the_next_drains(monkeypatch):
    """Available memory between the stages' floors (7%: under the first stage's 10%,
    over the second's 5%): no new input enters, what is waiting is finished."""
    from cellpool.monitor import Machine, MachineSampler

    pressure = threading.Event()
    measure = MachineSampler.sample

    def sample(self):
        machine = measure(self)
        if not pressure.is_set():
            return machine
        return Machine(machine.cpu_percent, machine.memory_total * 7 // 100, machine.memory_total)

    monkeypatch.setattr(MachineSampler, "sample", sample)
    entered, drained, gate = [], [], threading.Event()

    def first(x):
        entered.append(x)
        return x

    def second(x):
        gate.wait(30)
        drained.append(x)
        return x

    job = cellpool.pipeline(
        cellpool.stage(first, kind="thread", workers=2),
        cellpool.stage(second, kind="thread", workers=1),
        buffer=10,
    ).start(range(40), progress="none")
    deadline = time.monotonic() + 30
    while len(entered) < 10 and time.monotonic() < deadline:
        time.sleep(0.01)  # the first stage has run up to the buffer
    pressure.set()
    time.sleep(1.0)  # the monitors have seen it
    before = len(entered)
    gate.set()
    while len(drained) < before and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)
    assert len(drained) >= before  # the second stage drained what was waiting
    assert len(entered) == before  # while nothing new entered the first
    pressure.clear()
    assert job.result(timeout=60).values == list(range(40))


def fail_to_start():
    raise RuntimeError("no such model")


def test_a_stage_whose_pool_breaks_stops_the_pipeline_and_says_why():
    results = cellpool.pipeline(
        cellpool.stage(jittery_inc, kind="thread", workers=2),
        cellpool.stage(square, kind="process", workers=1, initializer=fail_to_start),
        buffer=8,
    ).run(range(100), progress="none")
    assert len(results) == 100
    crashed = [r for r in results if r.status == "crashed"]
    assert crashed and all(r.stage == "square" for r in crashed)
    assert "initializer failed: RuntimeError: no such model" in crashed[0].error
    rest = [r for r in results if r.status != "crashed"]
    assert {r.status for r in rest} == {"cancelled"}
    waited = [r for r in rest if r.stage == "square"]  # finished stage 1, never entered 2
    assert waited and all("stage 'square' ended early" in r.error for r in waited)


# -- journaled pipelines ---------------------------------------------------------------


def test_a_journaled_pipeline_cancelled_half_way_runs_only_what_is_left(tmp_path):
    journal = tmp_path / "crawl.db"
    calls = {"fetch": [], "parse": []}

    def fetch(x):
        calls["fetch"].append(x)
        time.sleep(0.005)
        return x * 2

    def parse(x):
        calls["parse"].append(x)
        if x == 14:
            raise ValueError("fourteen")
        return x + 1

    pipe = cellpool.pipeline(
        cellpool.stage(fetch, workers=4), cellpool.stage(parse, workers=2), buffer=8
    )
    job = pipe.start(range(300), journal=journal, progress="none")
    deadline = time.monotonic() + 30
    while len(job.partial()) < 60 and time.monotonic() < deadline:
        time.sleep(0.005)
    job.cancel()
    first = job.result(timeout=60)
    done_before = {r.index for r in first if r.status == "ok"}
    assert 0 < len(done_before) < 300 and first.counts()["cancelled"] > 0
    assert first[7].status == "error" and first[7].stage == "parse"

    calls["fetch"].clear()
    second = pipe.run(range(300), journal=journal, progress="none")
    assert sorted(calls["fetch"]) == [x for x in range(300) if x not in done_before]
    assert {r.index for r in second if r.restored} == done_before
    assert [r.value for r in second if r.index != 7] == [2 * x + 1 for x in range(300) if x != 7]
    assert second[7].status == "error" and not second[7].restored  # failures run again
    assert "restored from a journal" in second.summary()
    with cellpool.Journal(journal) as store:
        (row,) = store.runs()
    assert row["name"] == "fetch -> parse" and row["ok"] == 299 and row["error"] == 1


def test_a_changed_stage_starts_a_new_version_of_a_journaled_pipeline(tmp_path):
    journal = tmp_path / "crawl.db"
    cellpool.pipeline(square, jittery_inc).run(range(5), journal=journal, progress="none")

    def changed(x):
        return x - 1

    changed.__name__ = "jittery_inc"  # same stage name, other code
    with pytest.warns(UserWarning, match="function changed; starting version 2"):
        again = cellpool.pipeline(square, changed).run(range(5), journal=journal, progress="none")
    assert again.values == [x * x - 1 for x in range(5)]
    assert not any(r.restored for r in again)


KILLED_PIPELINE = """
import os, sys, time
import cellpool

def fetch(x):
    time.sleep(0.01)
    return x * 2

def parse(x):
    with open(sys.argv[2], "ab") as count:  # one byte per execution, outside the journal
        count.write(b".")
    return x + 1

if __name__ == "__main__":
    pipe = cellpool.pipeline(
        cellpool.stage(fetch, kind="thread", workers=4),
        cellpool.stage(parse, kind="process", workers=2),
    )
    job = pipe.start(range(600), journal=sys.argv[1], progress="none")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until some records are committed
        with cellpool.Journal(sys.argv[1]) as journal:
            if sum(row["ok"] for row in journal.runs()) >= 50:
                break
        time.sleep(0.01)
    os._exit(1)  # the kernel dies: no shutdown, no flush
"""


def test_a_journaled_pipeline_whose_process_died_resumes_from_what_was_journaled(tmp_path):
    script, journal, count = tmp_path / "killed.py", tmp_path / "crawl.db", tmp_path / "count"
    script.write_text(KILLED_PIPELINE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run(
        [sys.executable, str(script), str(journal), str(count)], env=env, timeout=120, check=False
    )
    with cellpool.Journal(journal) as store:
        (row,) = store.runs()
    ran_before = count.stat().st_size
    assert 0 < row["ok"] < 600
    # what ran and was not committed runs again: a commit is due every 100 ms
    assert ran_before - row["ok"] <= 150

    def fetch(x):
        return x * 2

    def parse(x):
        return x + 1

    resumed = cellpool.pipeline(fetch, parse).run(
        range(600), journal=journal, journal_keep_code=True, progress="none"
    )
    assert resumed.values == [2 * x + 1 for x in range(600)]
    assert sum(r.restored for r in resumed) == row["ok"]


def test_a_journaled_pipeline_keeps_its_journal_on_the_callers_side_of_a_bad_file(tmp_path):
    bad = tmp_path / "notes.db"
    bad.write_text("not a database")
    with pytest.raises(ValueError, match="not a cellpool journal"):
        cellpool.pipeline(square).run(range(3), journal=bad, progress="none")
    assert bad.read_text() == "not a database"


# -- forced interleavings (tests.hooks points, or user code that blocks) ---------------


def test_a_fully_restored_journaled_pipeline_returns_every_record(tmp_path):
    journal = tmp_path / "crawl.db"
    pipe = cellpool.pipeline(square, jittery_inc)
    first = pipe.run(range(10), journal=journal, progress="none")
    again = pipe.run(range(10), journal=journal, progress="none")  # nothing left to run
    assert again.values == first.values and all(r.restored for r in again)
    key_fails_last = pipe.run(range(11), journal=journal, key=lambda x: 1 // (10 - x))
    assert len(key_fails_last) == 11 and key_fails_last[10].status == "error"


def test_records_the_input_makes_after_the_pipeline_ended_are_not_added(tmp_path):
    """A journaled input's feeder reads on until its part ends: what it restores after
    the pipeline ended must not change the Results already returned."""
    journal = tmp_path / "crawl.db"
    hold, blocked, release = threading.Event(), threading.Event(), threading.Event()

    def key(x):  # user code on the feeder thread, held at input 20 once ``hold`` is set
        if x == 20 and hold.is_set():
            blocked.set()
            release.wait(30)
        return str(x)

    pipe = cellpool.pipeline(square, jittery_inc)
    pipe.run(range(100), journal=journal, key=key, progress="none")
    hold.set()
    # a generator: a cancel stops reading it (a sized input is read to its end, for
    # the records of every item)
    job = pipe.start(iter(range(100)), journal=journal, key=key, progress="none")
    assert blocked.wait(30)
    job.cancel()
    results = job.result(timeout=30)
    assert len(results) == 20 and all(r.restored for r in results)
    release.set()
    time.sleep(0.5)  # the feeder restores the rest of its part, to no one
    assert len(results) == 20 and len(list(results)) == 20


def test_every_record_survives_stages_that_end_before_the_next_one_starts():
    with hooks.installed("pipeline.stage-started", lambda: time.sleep(0.3)):
        results = cellpool.pipeline(square, jittery_inc).run(range(3), progress="none")
    assert results.values == [1, 2, 5]


def test_a_background_pipeline_that_ends_as_its_job_is_made_still_stops_its_pools():
    with hooks.installed("pipeline.job-made", lambda: time.sleep(0.5)):
        job = cellpool.pipeline(square, jittery_inc).start(range(3), progress="none")
    import asyncio

    assert asyncio.run(_wait(job)).values == [1, 2, 5]  # awaited: result() never called
    dispatchers = lambda: [t for t in threading.enumerate() if "dispatcher" in t.name]  # noqa: E731
    assert not settle(dispatchers)  # while the job is still held


def test_ctrl_c_while_a_stage_is_slow_to_end_still_flushes_the_journal(tmp_path):
    """The last stage's pool is shut down before the first stage ends: the pipeline
    still completes, and its journal's writer ends (the fixture checks no thread is
    left)."""
    import _thread

    journal = tmp_path / "crawl.db"
    ended = []

    def first_one_slow() -> None:
        ended.append(1)
        if len(ended) == 1:
            time.sleep(3)

    threading.Timer(0.5, _thread.interrupt_main).start()
    with hooks.installed("pipeline.stage-ended", first_one_slow), pytest.raises(KeyboardInterrupt):
        cellpool.pipeline(nap, cellpool.stage(square, name="b")).run(
            range(200), journal=journal, progress="none"
        )
    assert not settle(lambda: len(ended) < 2, 10)


def test_a_stage_that_breaks_after_the_one_before_finished_says_why():
    results = cellpool.pipeline(
        cellpool.stage(square, kind="thread", workers=2),
        cellpool.stage(square, kind="process", workers=1, initializer=slow_fail, name="b"),
    ).run(range(5), progress="none")
    assert len(results) == 5
    assert {r.status for r in results} <= {"crashed", "cancelled"}
    for record in results:
        assert record.stage == "b" and record.error
        if record.status == "cancelled":
            assert "stage 'b' ended early" in record.error


def slow_fail():
    time.sleep(0.5)  # the stage before has finished by now
    raise RuntimeError("no such model")
