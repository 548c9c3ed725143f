"""The live view in a real JupyterLab, in Debian's Chromium driven by playwright."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
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

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs Debian's chromium: apt-get install chromium"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str):
    return json.load(urllib.request.urlopen(url, timeout=2))


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on 127.0.0.1 whose root holds the test notebook."""
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(JOB)])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3"}
    nbformat.write(notebook, tmp_path / "live.ipynb")
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
            urllib.request.urlopen(request, timeout=30)
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_the_live_view_moves_in_jupyterlab_and_leaves_a_summary(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{lab}/lab/tree/live.ipynb", wait_until="domcontentloaded")
            page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=90_000)
            # The toolbar says idle before the kernel's websocket is up: ask the server.
            deadline = time.monotonic() + 90
            while not any(
                k["connections"] > 0 and k["execution_state"] == "idle"
                for k in _get(f"{lab}/api/kernels")
            ):
                assert time.monotonic() < deadline, "the kernel never became ready"
                page.wait_for_timeout(250)
            page.locator(".jp-CodeCell .jp-InputArea-editor").first.click()
            page.keyboard.press("Escape")
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
        finally:
            browser.close()

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
