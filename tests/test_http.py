"""cellpool.http sessions and async tasks against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import cellpool
from cellpool import Executor, http

from .conftest import settle


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so connection reuse shows
    disable_nagle_algorithm = True  # else keep-alive answers wait on delayed ACKs

    def setup(self):
        super().setup()
        with self.server.lock:
            self.server.connections += 1
            self.server.open += 1
            self.server.sockets.append(self.connection)

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass  # a connection this handler dropped on purpose
        finally:
            with self.server.lock:
                self.server.open -= 1

    def do_GET(self):
        with self.server.lock:
            self.server.hits[self.path] += 1
            hits = self.server.hits[self.path]
        if self.path.startswith("/flaky/") and hits <= 2:
            return self._answer(503, b"busy", {"Retry-After": "0"})
        if self.path.startswith("/drop/") and hits == 1:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)  # no answer at all: dropped
            return None
        if self.path == "/hang":
            time.sleep(3)
        if self.path.startswith("/drop/"):
            # after a dropped connection, this server's keep-alive sockets outlive the
            # clients' close; not keeping this one alive keeps the fd count exact
            self.close_connection = True
            return self._answer(200, self.path.encode(), {"Connection": "close"})
        return self._answer(200, self.path.encode())

    def _answer(self, status, body, headers=()):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for name, value in dict(headers).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins every handler thread


@pytest.fixture
def server():
    httpd = Server(("127.0.0.1", 0), Handler)
    httpd.sockets = []
    httpd.lock = threading.Lock()
    httpd.connections = httpd.open = 0
    httpd.hits = Counter()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    serving = threading.Thread(target=httpd.serve_forever, daemon=True)
    serving.start()
    yield httpd
    httpd.shutdown()
    for connection in httpd.sockets:  # the server's ends, so its handler threads end
        with contextlib.suppress(OSError):
            connection.shutdown(socket.SHUT_RDWR)
    httpd.server_close()
    serving.join()


@pytest.fixture
def pool_warnings():
    """What urllib3 logs about full connection pools."""
    seen = []

    class Catch(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger = logging.getLogger("urllib3.connectionpool")
    catch = Catch(logging.WARNING)
    logger.addHandler(catch)
    yield seen
    logger.removeHandler(catch)


def fetch(url):
    response = http.session().get(url)
    response.raise_for_status()
    return response.text


def test_thread_workers_reuse_their_own_sessions(server, pool_warnings):
    urls = [f"{server.base}/ok/{i}" for i in range(400)]
    with Executor("thread", 8, progress="none") as ex:
        results = ex.run(fetch, urls)
    assert results.values == [f"/ok/{i}" for i in range(400)]
    assert server.connections <= 8  # one connection per worker, reused
    assert pool_warnings == []
    # every session was closed when the executor shut down (the server's handler
    # threads see each close a moment later)
    assert settle(lambda: server.open) == 0


def test_threads_inside_processes_share_one_session_per_process(server, pool_warnings):
    urls = [f"{server.base}/ok/{i}" for i in range(300)]
    with Executor("process", 2, threads_per_worker=4, progress="none") as ex:
        results = ex.run(fetch, urls)
        threads = {row["threads"] for row in ex.workers_info()}
    assert results.ok and len(results) == 300
    assert server.connections <= 8  # at most the concurrency: 2 processes x 4 threads
    assert min(threads) >= 5  # the worker's own thread and its four task threads
    assert settle(lambda: server.open) == 0


def test_503_answers_and_dropped_connections_are_retried_to_success(server):
    urls = [f"{server.base}/flaky/{i}" for i in range(20)]
    urls += [f"{server.base}/drop/{i}" for i in range(20)]
    with Executor("thread", 4, progress="none") as ex:
        results = ex.run(fetch, urls)
    assert results.ok, results.errors
    assert all(server.hits[f"/flaky/{i}"] == 3 for i in range(20))
    assert all(server.hits[f"/drop/{i}"] == 2 for i in range(20))


def test_a_hanging_endpoint_becomes_an_error_record(server):
    def fetch_quickly(url):
        return http.session(timeout=0.3).get(url).status_code

    urls = [f"{server.base}/ok/1", f"{server.base}/hang", f"{server.base}/ok/2"]
    with Executor("thread", 3, progress="none") as ex:
        results = ex.run(fetch_quickly, urls)
    assert [r.status for r in results] == ["ok", "error", "ok"]
    assert "timed out" in results[1].error.lower()
    assert len(results) == 3


def test_every_url_gets_exactly_one_record(server):
    urls = [f"{server.base}/{kind}/{i}" for i in range(30) for kind in ("ok", "flaky", "drop")]
    with Executor("process", 2, threads_per_worker=3, progress="none") as ex:
        results = ex.run(fetch, urls)
    assert [r.index for r in results] == list(range(90))
    assert [r.item for r in results] == urls
    assert results.ok


async def wait_and_echo(x):
    await asyncio.sleep(0.05)
    if x == 7:
        raise ValueError("seven")
    return x


async def sleep_long_on_one(x):
    await asyncio.sleep(30 if x == 1 else 0.01)
    return x


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_async_tasks_run_many_at_once_on_each_worker(kind):
    started = time.monotonic()
    with Executor(kind, 2, concurrency=50, progress="none") as ex:
        results = ex.run(wait_and_echo, range(400))
    elapsed = time.monotonic() - started
    assert elapsed < 10  # one at a time would take 10 s per worker
    assert results[7].status == "error" and results[7].error == "seven"
    assert [v for v in results.values if v is not None] == [x for x in range(400) if x != 7]


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_an_async_task_past_its_timeout_is_recorded_as_a_timeout(kind):
    with Executor(kind, 1, timeout=1, progress="none") as ex:
        results = ex.run(sleep_long_on_one, range(4))
    assert [r.status for r in results] == ["ok", "timeout", "ok", "ok"]
    assert results[1].error_type == "TaskTimeout"


def test_a_job_of_async_tasks_can_be_awaited():
    async def main():
        with Executor("thread", 2, progress="none") as ex:
            return await ex.start(wait_and_echo, range(6))

    assert asyncio.run(main()).values == [0, 1, 2, 3, 4, 5]


def test_cellpool_http_is_reachable_from_the_package(tmp_path):
    import subprocess
    import sys

    probe = "import cellpool; print(type(cellpool.http.session()).__name__)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.stdout.strip() == "WorkerSession", done.stderr


def test_the_session_outside_a_worker_is_the_threads_own():
    assert http.session() is http.session()
    assert isinstance(http.session(), cellpool.http.WorkerSession)
    http.close()
