"""Shared fixtures: every test must leave no worker thread, child process or fd behind."""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time

import comm
import psutil
import pytest


def cellpool_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("cellpool-")]


def multiprocessing_helpers() -> set[int]:
    """The forkserver and resource tracker: shared by every pool of this interpreter."""
    from multiprocessing import forkserver, resource_tracker

    pids = {forkserver._forkserver._forkserver_pid, resource_tracker._resource_tracker._pid}
    return {pid for pid in pids if pid}


def worker_processes() -> list[psutil.Process]:
    helpers = multiprocessing_helpers()
    return [p for p in psutil.Process().children(recursive=True) if p.pid not in helpers]


def fd_targets() -> dict[int, str]:
    """This process's open fds and what each points at."""
    targets = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile (the listing's own fd, too)
            targets[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return targets


def open_fds() -> int:
    return len(fd_targets())


def settle(check, seconds: float = 5.0):
    """Poll ``check`` until it returns a falsy value or ``seconds`` pass; return the last."""
    deadline = time.monotonic() + seconds
    while (leftover := check()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return leftover


@pytest.fixture(autouse=True, scope="session")
def shared_multiprocessing_helpers():
    """Start the forkserver and resource tracker once, as the first process pool would.

    They belong to the interpreter, not to an executor: their fds and processes stay for
    the whole session and are not leaks.
    """
    import multiprocessing
    from multiprocessing import forkserver

    from cellpool.pool.process import PRELOAD

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    forkserver.ensure_running()
    # Where there is no memfd, workers' shared memory comes from multiprocessing's heap,
    # whose first arena (an fd) stays for the interpreter's life once made.
    context.RawArray("d", 8)


def iopub_messages(client, seconds: float = 60):
    """A kernel client's IOPub messages as they come, for at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            yield client.get_iopub_msg(timeout=1)
        except queue.Empty:
            continue


def execute_cells(sources: list[str]) -> list[list[dict]]:
    """Run cells in a fresh kernel; the outputs of each cell."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in sources])
    NotebookClient(notebook, timeout=60, allow_errors=True, kernel_name="python3").execute()
    return [cell.outputs for cell in notebook.cells]


@pytest.fixture(scope="session")
def kernel_clients():
    """``execute_cells``. jupyter_client keeps a zmq context and an event loop per
    process, made on first use and held for the session: make them before any test
    counts fds."""
    execute_cells(["1"])
    return execute_cells


@pytest.fixture(autouse=True)
def no_leaks(shared_multiprocessing_helpers):
    """Fail a test that leaves cellpool threads, worker processes or fds behind."""
    fds_before = fd_targets()
    yield
    assert not settle(cellpool_threads), f"threads left: {cellpool_threads()}"
    assert not settle(worker_processes), f"processes left: {worker_processes()}"
    if settle(lambda: open_fds() > len(fds_before)):
        new = {fd: target for fd, target in fd_targets().items() if fds_before.get(fd) != target}
        raise AssertionError(f"fds left: {new}")


class RecordingComm:
    """A comm that keeps every message a widget sends (as ipywidgets' own tests do)."""

    sent: list[float] = []

    def __init__(self, *args, **kwargs):
        self.comm_id = f"comm-{id(self)}"
        self.kernel = "present"

    def open(self, *args, **kwargs):
        pass

    def on_msg(self, *args, **kwargs):
        pass

    def send(self, *args, **kwargs):
        RecordingComm.sent.append(time.monotonic())

    def close(self, *args, **kwargs):
        pass


@pytest.fixture
def recording_comm(monkeypatch):
    RecordingComm.sent = []
    monkeypatch.setattr(comm, "create_comm", RecordingComm)
    return RecordingComm.sent
