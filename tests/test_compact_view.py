"""The live view stays a few lines for any number of workers and its figures are true:
finished tasks only, this run's counts, gone workers kept, reasons shown.

What the browser would get is read from the widgets' comm messages (a recording comm,
as ipywidgets' own tests do) and from the summary a run leaves in the output.
"""

from __future__ import annotations

import os
import threading
import time
from html.parser import HTMLParser

import comm
import psutil
import pytest

from cellpool import Executor
from cellpool.monitor import MachineSampler
from cellpool.view.workers import NOTEWORTHY_ROWS


class StateComm:
    """A comm that keeps the state every widget sends, by comm id."""

    states: dict[str, dict] = {}

    def __init__(self, *args, **kwargs):
        self.comm_id = f"comm-{id(self)}"
        self.kernel = "present"
        StateComm.states[self.comm_id] = dict(kwargs.get("data", {}).get("state", {}))

    def open(self, *args, **kwargs):
        pass

    def on_msg(self, *args, **kwargs):
        pass

    def send(self, data=None, *args, **kwargs):
        if data and data.get("method") == "update":
            StateComm.states[self.comm_id].update(data["state"])

    def close(self, *args, **kwargs):
        pass


@pytest.fixture
def browser_state(monkeypatch):
    """What the frontend would hold: the last state sent for each widget."""
    StateComm.states = {}
    monkeypatch.setattr(comm, "create_comm", StateComm)
    return StateComm.states


def live_html(states: dict[str, dict]) -> str:
    """The live view's HTML as last sent (the one HTML widget whose value has lines)."""
    values = [s["value"] for s in states.values() if s.get("_model_name") == "HTMLModel"]
    return next((v for v in values if "cellpool-status" in v), "")


class _Table(HTMLParser):
    """The worker table's rows as dicts, by column name."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def table(html: str) -> list[dict[str, str]]:
    parser = _Table()
    parser.feed(html)
    if not parser.rows:
        return []
    head, *rows = parser.rows
    return [dict(zip(head, row, strict=True)) for row in rows]


def wait_for(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def nap(seconds):
    time.sleep(seconds)
    return seconds


def test_32_thread_workers_show_as_one_process_row_and_a_few_threads(browser_state):
    with Executor("thread", 32) as ex:
        job = ex.start(nap, [0.3] * 64 + [1.5], progress="widget")
        html = wait_for(lambda: "32 busy" in live_html(browser_state) and live_html(browser_state))
        rows = table(html)
        assert len(rows) <= NOTEWORTHY_ROWS
        process = rows[0]
        assert process["worker"] == "32 threads"
        assert process["pid"] == str(os.getpid())
        assert process["state"] == "32 busy"
        assert all(row["pid"] == str(os.getpid()) for row in rows)
        assert "32 workers: 32 busy" in html
        assert "not listed" in html
        toggle = next(s for s in browser_state.values() if s.get("description") == "All workers")
        layout = browser_state[toggle["layout"].removeprefix("IPY_MODEL_")]
        assert layout["display"] == "inline-flex"  # shown, since workers are left out
        job._view._all.value = True  # what the frontend's click sets
        wait_for(lambda: len(table(live_html(browser_state))) == 33)  # the process + 32
        job.result(timeout=30)


def test_a_cancelled_run_counts_finished_tasks_only(browser_state):
    with Executor("process", 2) as ex:
        job = ex.start(nap, [0.05] * 200, progress="widget")
        wait_for(lambda: len(job.partial()) >= 6)
        job.cancel()
        results = job.result(timeout=30)
        view = job._view
        summary = view._summary_now()
    counts = results.counts()
    finished = counts.get("ok", 0)
    assert counts["cancelled"] > 100
    assert view._bar.value == finished  # the bar is not full
    assert view._bar.bar_style == "danger"
    assert repr(summary).startswith(f"nap [process x2] {finished:,}/200 (")
    assert f"{counts['cancelled']:,} cancelled" in repr(summary)
    elapsed = results.wall_time()
    rate = float(repr(summary).split(" | ")[-2].rstrip("/s").replace(",", ""))
    assert rate < 2 * finished / elapsed + 5  # finished tasks per second, not 200 per run


def test_the_text_line_of_a_cancelled_run_counts_finished_tasks_only(capsys):
    with Executor("process", 2) as ex:
        job = ex.start(nap, [0.5] * 40, progress="text")
        job.cancel()
        results = job.result(timeout=30)
    finished = results.counts().get("ok", 0)
    last = capsys.readouterr().err.strip().split("\r")[-1]
    assert f" {finished}/40 (" in last
    assert f"{results.counts()['cancelled']} cancelled" in last


def test_a_reused_executor_shows_this_runs_counts(browser_state):
    with Executor("process", 2) as ex:
        ex.run(abs, range(100), progress="none")
        job = ex.start(abs, range(10), progress="widget")
        job.result(timeout=30)
        rows = table(job._view._summary_now()._repr_html_())
    assert sum(int(row["done"]) for row in rows) == 10


def exit_on_three(x):
    if x == 3:
        os._exit(1)
    time.sleep(0.02)
    return x


def test_a_dead_workers_row_stays_so_the_rows_add_up(browser_state):
    with Executor("process", 2) as ex:
        job = ex.start(exit_on_three, range(40), progress="widget")
        results = job.result(timeout=60)
        summary = job._view._summary_now()._repr_html_()
    rows = table(summary)
    assert results.counts() == {"ok": 39, "crashed": 1}
    dead = [row for row in rows if row["state"].startswith("dead")]
    assert len(dead) == 1
    assert len(rows) == 3  # the two workers now, and the one that died
    assert sum(int(row["done"]) for row in rows) == 40  # finished here, the crash too
    assert dead[0]["errors"] == "1"
    assert "1 dead" in summary


def test_a_paused_workers_reason_is_visible_text(browser_state):
    available = psutil.virtual_memory().available
    floor = available + 2**30  # more than the machine has free: dispatch holds
    with Executor("thread", 2, min_available_memory=floor) as ex:
        job = ex.start(nap, [0.01] * 10, progress="widget")

        def paused_rows():
            rows = table(live_html(browser_state))
            return [row for row in rows if row["state"].startswith("paused")]

        paused = wait_for(paused_rows)  # the note comes first, the rows with the next sample
        html = live_html(browser_state)
        job.cancel()
        job.result(timeout=30)
    assert all("min_available_memory" in row["state"] for row in paused)  # not a tooltip
    assert "2 paused (" in html  # and the summary line names it too


def burn(seconds):
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_the_machines_cpu_is_unknown_before_a_window_and_measured_after():
    sampler = MachineSampler()
    assert sampler.sample().cpu_percent is None  # not psutil's first-call 0%
    burner = threading.Thread(target=burn, args=(0.3,))
    burner.start()
    burner.join()
    assert sampler.sample().cpu_percent > 0


def test_workers_replaced_after_their_task_limit_show_as_retired(browser_state):
    with Executor("process", 1, max_tasks_per_worker=5) as ex:
        job = ex.start(abs, range(12), progress="widget")
        job.result(timeout=60)
        rows = table(job._view._summary_now()._repr_html_())
    retired = [row for row in rows if row["state"].startswith("retired")]
    assert [row["done"] for row in retired] == ["5", "5"]
    assert all("max_tasks_per_worker=5" in row["state"] for row in retired)
    assert sum(int(row["done"]) for row in rows) == 12


def test_a_dask_run_links_its_dashboard_and_names_workers_short(browser_state):
    with Executor("dask", 2) as ex:
        job = ex.start(nap, [0.2] * 20, progress="widget")
        html = wait_for(lambda: "busy" in live_html(browser_state) and live_html(browser_state))
        job.result(timeout=60)
        link = ex.dashboard_link
    assert link.startswith("http://127.0.0.1:")
    assert f'href="{link}"' in html
    assert {row["worker"] for row in table(html)} <= {"d0", "d1"}
