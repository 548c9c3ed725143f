"""The live view in a real JupyterLab, in Debian's Chromium driven by playwright."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import pytest

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
JOB = """\
import time
import cellpool

def work(x):
    end = time.time() + 0.3
    while time.time() < end:
        pass
    return x

results = cellpool.run(work, range(24), kind="process", workers=2)
results
"""
WATCH_JS = """() => {
  const bar = document.querySelector('.widget-hprogress .progress-bar');
  const rows = [...document.querySelectorAll('table.cellpool-workers tr')].slice(1)
    .map(row => [...row.cells].map(cell => cell.innerText.trim()));
  return {
    prompt: document.querySelector('.jp-CodeCell .jp-InputPrompt')?.innerText.trim(),
    bar: bar ? parseFloat(bar.style.width) : null,
    rows: rows,
    summary: document.querySelector('.cellpool-summary')?.innerText ?? null,
  };
}"""

SCALE_CELLS = [
    """\
import os
import time
import cellpool

def nap(x):
    time.sleep(0.25)
    return x

threads = cellpool.run(nap, range(480), workers=32, label="naps")
""",
    """\
held = []  # this run's function, and so this list, is one per worker process

def work(x):
    if x == 0:  # this worker holds 82 more files: past 90% of fd_limit, it is paused
        held.extend(os.open(os.devnull, os.O_RDONLY) for _ in range(82))
    end = time.time() + 0.3
    while time.time() < end:
        pass
    return x

procs = cellpool.run(work, range(96), kind="process", workers=8, fd_limit=100, label="spins")
""",
]
# What a user sees of the cell that runs: its output's height, where the bar is, the
# worker rows' visible text and the kernel's status in the notebook's toolbar.
VIEW_JS = """() => {
  const cell = document.querySelector('.jp-CodeCell.jp-mod-active') ??
    [...document.querySelectorAll('.jp-CodeCell')].find(c =>
      c.querySelector('.jp-InputPrompt')?.innerText.trim() === '[*]:');
  const running = [...document.querySelectorAll('.jp-CodeCell')].find(c =>
      c.querySelector('.jp-InputPrompt')?.innerText.trim() === '[*]:');
  // the view: the outputs but the timeline's picture (bounded on its own)
  const items = running ? [...running.querySelectorAll('.jp-OutputArea-child')] : [];
  const picture = (item) => item.querySelector('svg, img') !== null;
  const viewHeight = items.filter(item => !picture(item))
    .reduce((sum, item) => sum + item.getBoundingClientRect().height, 0);
  const bar = running?.querySelector('.widget-hprogress');
  const box = bar?.getBoundingClientRect();
  const rows = running ? [...running.querySelectorAll('table.cellpool-workers tr')].slice(1)
    .map(row => [...row.cells].map(cell => cell.innerText.trim())) : [];
  const rowHeights = (scope) => [...scope.querySelectorAll('table.cellpool-workers tr')]
    .slice(1).map(row => row.getBoundingClientRect().height);
  return {
    running: running !== undefined,
    height: items.length ? viewHeight : null,
    barVisible: box ? box.top >= 0 && box.bottom <= window.innerHeight && box.height > 0 : null,
    rows: rows,
    rowHeights: running ? rowHeights(running) : [],
    summaryRowHeights: [...document.querySelectorAll('.cellpool-summary')]
      .flatMap(rowHeights),
    status: document.querySelector('.jp-Notebook-ExecutionIndicator')
      ?.getAttribute('data-status') ?? null,
    summaries: [...document.querySelectorAll('.cellpool-summary')].map(s => ({
      text: s.innerText,
      height: s.closest('.jp-OutputArea-child').getBoundingClientRect().height,
    })),
    pictures: [...document.querySelectorAll('.jp-OutputArea-child')]
      .filter(item => item.querySelector('svg, img') !== null)
      .map(item => item.getBoundingClientRect().height),
  };
}"""
VIEW_BOUND = 250  # px: the whole view, for any number of workers

# A quick stage feeding a slow one, which holds it back: values wait between them.
PIPELINE_CELL = """
import time
import cellpool

def fetch(x):
    time.sleep(0.01)
    return x

def slow(x):
    time.sleep(0.05)
    return x

pipe = cellpool.pipeline(
    cellpool.stage(fetch, kind="thread", workers=8),
    cellpool.stage(slow, kind="process", workers=1),
    buffer=20,
)
results = pipe.run(range(100))
"""

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs Debian's chromium: apt-get install chromium"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=2) as response:
        return json.load(response)


def _write_notebook(path: Path, cells: list[str]) -> None:
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3"}
    nbformat.write(notebook, path)


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on 127.0.0.1 whose root holds the test notebooks."""
    _write_notebook(tmp_path / "live.ipynb", [JOB])
    _write_notebook(tmp_path / "scale.ipynb", SCALE_CELLS)
    _write_notebook(tmp_path / "pipeline.ipynb", [PIPELINE_CELL])
    state = tmp_path / "state"
    settings = state / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    env = dict(
        os.environ,
        JUPYTER_CONFIG_DIR=str(state / "config"),
        JUPYTER_RUNTIME_DIR=str(state / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(state / "settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(state / "workspaces"),
    )
    port = _free_port()
    jupyter = shutil.which("jupyter", path=str(Path(sys.executable).parent))
    server = subprocess.Popen(
        [
            jupyter,
            "lab",
            "--no-browser",
            "--ServerApp.token=",
            "--ServerApp.password=",
            "--ServerApp.disable_check_xsrf=True",  # so the test may DELETE its kernel
            f"--port={port}",
            "--port-retries=0",
            "--ip=127.0.0.1",
            "--allow-root",
            f"--ServerApp.root_dir={tmp_path}",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                _get(f"{base}/api/status")
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "lab did not start"
                time.sleep(0.5)
        yield base
    finally:
        for kernel in _get(f"{base}/api/kernels"):
            request = urllib.request.Request(f"{base}/api/kernels/{kernel['id']}", method="DELETE")
            urllib.request.urlopen(request, timeout=30).close()
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@contextlib.contextmanager
def _notebook(lab: str, name: str):
    """A page in Chromium with notebook ``name`` open, its kernel ready and its first
    cell selected."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = _open(browser, lab, name)
            page.locator(".jp-CodeCell .jp-InputArea-editor").first.click()
            page.keyboard.press("Escape")
            yield page
        finally:
            browser.close()


def _open(browser, lab: str, name: str):
    """A page with notebook ``name`` open and its kernel ready."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{lab}/lab/tree/{name}", wait_until="domcontentloaded")
    page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=90_000)
    # The toolbar says idle before the kernel's websocket is up: ask the server.
    deadline = time.monotonic() + 90
    while not _kernel_ready(lab):
        assert time.monotonic() < deadline, "the kernel never became ready"
        page.wait_for_timeout(250)
    return page


def _kernel_ready(lab: str) -> bool:
    """True once a kernel is idle with a websocket. While kernels start on a loaded
    machine the server may answer 500 or not in time: not ready yet."""
    try:
        kernels = _get(f"{lab}/api/kernels")
    except urllib.error.HTTPError as error:
        error.close()
        return False
    except (urllib.error.URLError, TimeoutError):
        return False
    return any(k["connections"] > 0 and k["execution_state"] == "idle" for k in kernels)


def test_the_live_view_moves_in_jupyterlab_and_leaves_a_summary(lab):
    with _notebook(lab, "live.ipynb") as page:
        page.keyboard.press("Shift+Enter")

        bars, tables = [], []
        deadline = time.monotonic() + 120
        while True:
            page.wait_for_timeout(150)
            seen = page.evaluate(WATCH_JS)
            if seen["prompt"] == "[*]:":
                if seen["bar"] is not None:
                    bars.append(seen["bar"])
                if seen["rows"]:
                    tables.append(seen["rows"])
            elif seen["summary"] is not None:
                break
            assert time.monotonic() < deadline, "the cell did not finish"

    moving = [value for value in bars if 0 < value < 100]
    assert len(set(moving)) >= 2, f"the bar did not advance while running: {bars}"
    assert moving == sorted(moving)
    busy = [rows for rows in tables if len(rows) == 2]
    assert busy, f"no worker table with a row per worker: {tables}"
    for worker, pid, _state, *_, memory, _fds, threads in busy[-1]:
        assert worker in {"p1", "p2"}
        assert pid.isdigit()
        assert re.fullmatch(r"\d+\.\d MiB", memory)
        assert threads.isdigit()
    assert "24/24 (100%) done" in seen["summary"]
    assert "0 errors" in seen["summary"]


def _watch_cell(page, shots: Path, name: str, worth_a_shot) -> list[dict]:
    """Run the selected cell and sample what the user sees until it has finished;
    screenshot its output the first time ``worth_a_shot(rows)`` holds."""
    page.keyboard.press("Shift+Enter")
    seen, shot = [], False
    deadline = time.monotonic() + 120
    while True:
        page.wait_for_timeout(150)
        view = page.evaluate(VIEW_JS)
        if view["running"]:
            seen.append(view)
            if not shot and worth_a_shot(view["rows"]):
                running = page.locator(".jp-CodeCell", has=page.locator("text=[*]:"))
                running.locator(".jp-OutputArea").first.screenshot(path=shots / f"{name}.png")
                shot = True
        elif seen:
            return seen
        assert time.monotonic() < deadline, f"the {name} cell did not finish"


def test_the_view_stays_small_for_many_workers_and_shows_why_one_is_paused(lab, tmp_path):
    shots = Path(os.environ.get("CELLPOOL_SHOTS", tmp_path))
    with _notebook(lab, "scale.ipynb") as page:
        threads = _watch_cell(page, shots, "threads", lambda rows: len(rows) >= 5)
        processes = _watch_cell(
            page, shots, "processes", lambda rows: any("fd_limit" in row[2] for row in rows)
        )
        page.wait_for_timeout(500)
        final = page.evaluate(VIEW_JS)
        page.locator(".jp-Notebook").screenshot(path=shots / "notebook.png")

    for name, seen in (("threads", threads), ("processes", processes)):
        live = [view for view in seen if view["height"]]
        assert live, f"no view seen for {name}"
        tallest = max(view["height"] for view in live)
        assert tallest < VIEW_BOUND, f"{name}: the view grew to {tallest} px"
        assert all(view["barVisible"] for view in live if view["barVisible"] is not None)
        busy = [view["status"] for view in seen if view["status"] is not None]
        assert busy and set(busy) == {"busy"}, f"{name}: the kernel read {set(busy)}"
    rows = [row for view in threads for row in view["rows"]]
    assert any(row[0] == "32 threads" for row in rows)
    paused = {row[2] for view in processes for row in view["rows"] if row[2].startswith("paused")}
    assert any("fd" in state for state in paused), f"no paused reason seen: {paused}"
    assert len(final["summaries"]) == 2
    for summary in final["summaries"]:
        assert summary["height"] < VIEW_BOUND
    assert len(final["pictures"]) == 2  # a timeline under each summary
    # rows keep their height when the run ends: the output does not jump
    live_rows = {round(h) for view in threads + processes for h in view["rowHeights"]}
    assert live_rows == {round(h) for h in final["summaryRowHeights"]}, live_rows
    assert all(0 < height < 420 for height in final["pictures"])
    assert "480/480 (100%) done" in final["summaries"][0]["text"]
    assert "96/96 (100%) done" in final["summaries"][1]["text"]


def test_a_pipelines_view_shows_each_stage_what_waits_and_then_the_bottleneck(lab, tmp_path):
    shots = Path(os.environ.get("CELLPOOL_SHOTS", tmp_path))
    with _notebook(lab, "pipeline.ipynb") as page:
        page.keyboard.press("Shift+Enter")
        output = page.locator(".jp-OutputArea").first
        page.get_by_text(re.compile(r"[1-9]\d* waiting for slow")).first.wait_for(timeout=90_000)
        live = output.inner_text()
        height = output.bounding_box()["height"]
        output.screenshot(path=shots / "pipeline.png")
        page.get_by_text("bottleneck: slow").first.wait_for(timeout=120_000)
        final = output.inner_text()
    assert height < VIEW_BOUND, f"the pipeline's view is {height} px tall"
    assert "fetch [thread x8]" in live and "slow [process x1]" in live
    assert re.search(r"fetch -> slow · \d+/100 \(\d+%\) done", live), live
    assert "100/100 (100%) done" in final
    assert re.search(r"slow \[process x1\]: 100 done, 0 errors, \d+% busy", final), final
