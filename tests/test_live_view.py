"""The live view: widget state, message throttling, monitor figures, Cancel in a kernel."""

from __future__ import annotations

import os
import threading
import time
from xml.etree import ElementTree

import psutil
import pytest
from jupyter_client.manager import start_new_kernel

import cellpool
from cellpool import Executor

from .conftest import iopub_messages, settle


def test_the_widget_shows_the_final_state(recording_comm, capsys):
    def flaky(x):
        if x == 3:
            raise ValueError("three")
        return x

    with Executor("thread", 2) as ex:
        job = ex.start(flaky, range(20), progress="widget")
        results = job.result(timeout=30)
        view = job._view
    assert results.counts() == {"ok": 19, "error": 1}
    assert view._bar.value == view._bar.max == 20
    assert view._bar.bar_style == "warning"  # finished, with a failure
    assert view._button.disabled
    assert view._html.value == ""  # the table moved to the summary left below
    assert repr(view.widget) == "cellpool live view: flaky [thread x2]"
    summary = view._summary_now()
    assert repr(summary).startswith("flaky [thread x2] 20/20 (100%) | 1 errors")
    html = summary._repr_html_()
    assert "20/20 (100%) done" in html
    assert html.count("<tr>") == 4  # a header, the threads' process, a row per thread
    assert "2 workers: 2 idle" in html
    assert "machine CPU" in html
    assert "flaky [thread x2] 20/20 (100%) | 1 errors" in capsys.readouterr().out


def test_widget_updates_are_throttled_however_fast_tasks_finish(recording_comm):
    started = time.monotonic()
    with Executor("thread", 4) as ex:
        results = ex.run(lambda x: x + 1, range(50_000), progress="widget")
    elapsed = time.monotonic() - started
    assert results.ok
    updates = [t for t in recording_comm if t >= started]
    assert len(updates) <= 10 * elapsed + 10  # ten a second, plus the final state


def test_a_thread_run_moves_the_bar_while_it_runs(recording_comm):
    with Executor("thread", 2) as ex:
        job = ex.start(spin, [0.05] * 40, progress="widget")
        seen = set()
        deadline = time.monotonic() + 20
        while not job.done() and time.monotonic() < deadline:
            seen.add(job._view._bar.value)
            time.sleep(0.05)
        job.result()
    assert len(seen - {0, 40}) >= 2  # it moved through values between start and end


def test_per_worker_figures_agree_with_psutil():
    with Executor("process", 2, progress="none") as ex:
        job = ex.start(spin, [1.5, 0.0])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            rows = {row["task"]: row for row in ex.workers_info()}
            if 0 in rows and rows[0]["task_seconds"] > 0.8:
                break
            time.sleep(0.1)
        busy = rows[0]
        process = psutil.Process(busy["pid"])
        cpu = process.cpu_times()
        assert busy["state"] == "busy"
        # The row's CPU time is psutil's, sampled at most a few tenths of a second ago;
        # and the spinning worker shows a clear share of a core even on a loaded machine
        # (two other spinning processes on two cores still leave it a third of one).
        assert 0 <= cpu.user + cpu.system - busy["cpu_seconds"] < 0.6
        assert busy["cpu_percent"] > 10
        assert abs(busy["rss"] - process.memory_info().rss) < 0.2 * busy["rss"]
        assert busy["fds"] == process.num_fds()
        assert busy["threads"] == process.num_threads()
        job.result()


def spin(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return seconds


def burn_cpu(seconds):
    """Busy until this thread has used ``seconds`` of CPU, however loaded the machine."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass
    return seconds


def test_thread_workers_report_their_own_cpu_time():
    with Executor("thread", 2, progress="none") as ex:
        ex.run(burn_cpu, [0.4, 0.0])
        rows = ex.workers_info()
    assert max(row["cpu_seconds"] for row in rows) > 0.3
    assert min(row["cpu_seconds"] for row in rows) < 0.2
    assert {row["pid"] for row in rows} == {os.getpid()}


def test_auto_progress_outside_a_kernel_shows_no_widget(recording_comm):
    cellpool.run(lambda x: x, range(10), progress="auto")
    assert recording_comm == []


CANCEL_CELL = """
import time
import cellpool
ex = cellpool.Executor("process", 2)
def slow(x):
    time.sleep(0.5)
    return x
res = ex.run(slow, range(40))
"""


def _await_reply(client, msg_id, timeout=60):
    while True:
        reply = client.get_shell_msg(timeout=timeout)
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply


def test_cancel_clicked_during_a_blocking_run_in_a_kernel(kernel_session):
    _manager, client = kernel_session
    msg_id = client.execute(CANCEL_CELL)
    button = None
    for msg in iopub_messages(client):
        if msg["msg_type"] == "comm_open":
            state = msg["content"]["data"].get("state", {})
            if state.get("_model_name") == "ButtonModel":
                button = msg["content"]["comm_id"]
                break
    assert button is not None
    time.sleep(1.5)  # a few tasks finish, most are still pending
    click = {"method": "custom", "content": {"event": "click"}}
    client.shell_channel.send(client.session.msg("comm_msg", {"comm_id": button, "data": click}))
    clicked = time.monotonic()
    reply = _await_reply(client, msg_id)
    assert reply["content"]["status"] == "ok"
    assert time.monotonic() - clicked < 10  # not the 10 s the run needs
    check = client.execute("c = res.counts(); ex.shutdown(); c")
    _await_reply(client, check)
    counts = None
    while counts is None:
        msg = client.get_iopub_msg(timeout=10)
        if msg["msg_type"] == "execute_result" and msg["parent_header"]["msg_id"] == check:
            counts = eval(msg["content"]["data"]["text/plain"])
    assert counts.get("cancelled", 0) > 10
    assert sum(counts.values()) == 40


@pytest.fixture
def kernel_session(kernel_clients):
    manager, client = start_new_kernel(kernel_name="python3")
    yield manager, client
    client.stop_channels()
    manager.shutdown_kernel(now=True)
    settle(lambda: manager.is_alive())


TIMELINE_CELL = """
import time
import cellpool

def nap(x):
    time.sleep(0.05)
    if x == 5:
        raise ValueError("five")
    return x

res = cellpool.run(nap, range(40), workers=2, progress="widget", label="naps")
"""


def test_a_finished_run_leaves_its_summary_and_timeline_in_the_output(kernel_session):
    _manager, client = kernel_session
    msg_id = client.execute(TIMELINE_CELL)
    shown = []
    while True:
        msg = client.get_iopub_msg(timeout=60)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "display_data":
            shown.append(msg["content"]["data"])
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    summary, picture = shown[-2:]
    assert summary["text/plain"].startswith("naps [thread x2] 40/40 (100%) | 1 errors")
    assert "cellpool-summary" in summary["text/html"]
    svg = picture["image/svg+xml"]
    root = ElementTree.fromstring(svg)  # a whole SVG document, kept when saved
    assert root.tag.endswith("svg")
    assert ">t1<" in svg and ">t2<" in svg  # a lane per worker
    assert "error 1" in svg  # the failure is counted in the legend


BACKGROUND_CELL = """
import time
import cellpool

def nap(x):
    time.sleep(0.3)
    return x

job = cellpool.Executor("thread", 2).start(nap, range(6), label="naps")
"""


def test_a_background_job_fills_in_its_summary_and_timeline_where_its_cell_left_room(
    kernel_session,
):
    _manager, client = kernel_session
    started = client.execute(BACKGROUND_CELL)
    waited = None
    slots, updates = {}, {}
    for msg in iopub_messages(client):
        content, kind = msg["content"], msg["msg_type"]
        display_id = content.get("transient", {}).get("display_id")
        if kind == "display_data" and display_id:
            slots[display_id] = content["data"]["text/plain"]  # made in the job's cell
        elif kind == "update_display_data":
            updates[display_id] = content["data"]  # the frontend updates by display id
        parent = msg["parent_header"].get("msg_id")
        if kind == "status" and content["execution_state"] == "idle":
            if parent == started and waited is None:
                waited = client.execute("job.result(timeout=30).values")
            elif parent == waited:
                break
    summary, picture = (updates[display_id] for display_id in slots)
    assert list(slots.values()) == ["naps [thread x2]", ""]  # room left, in order
    assert summary["text/plain"].startswith("naps [thread x2] 6/6 (100%)")
    assert "image/svg+xml" in picture and picture["text/plain"] == "<cellpool timeline of 6 tasks>"


@pytest.fixture(params=["before", "after"])
def ctrl_c_as_the_view_starts(request, monkeypatch, recording_comm):
    """A Ctrl-C that lands inside ``Thread.start()`` of the view's thread, before the
    thread exists or once it has begun (while start() waits for it), with a view due:
    a kernel is there for ``progress="auto"``."""
    start = threading.Thread.start

    def interrupted_start(thread):
        if thread.name != "cellpool-progress":
            return start(thread)
        if request.param == "after":
            start(thread)
        raise KeyboardInterrupt

    monkeypatch.setattr(threading.Thread, "start", interrupted_start)
    monkeypatch.setattr(cellpool.view, "current_kernel", lambda: object())


@pytest.mark.filterwarnings("ignore:cellpool. 2 threads still run")  # they wait on the gate
@pytest.mark.parametrize("progress", ["auto", "widget"])
def test_ctrl_c_as_the_view_starts_cancels_the_run_and_raises_it(
    ctrl_c_as_the_view_starts, progress
):
    gate, ran = threading.Event(), []

    def wait(x):
        ran.append(x)
        return gate.wait(5)

    with Executor("thread", 2) as ex:
        with pytest.raises(KeyboardInterrupt):
            ex.run(wait, range(6), progress=progress)
        gate.set()
        later = ex.run(abs, range(3), progress="none")
    assert later.values == [0, 1, 2]
    # Cancelled before the gate opened: what ran is what the two threads held (a batch
    # running and one waiting each; a cancelled run's waiting task may still start), not
    # the six the run had.
    assert len(ran) <= 4
