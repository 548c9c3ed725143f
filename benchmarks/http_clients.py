"""Many HTTP GETs against a slow local server: cellpool against the usual client patterns.

The benchmark starts its own HTTP/1.1 server on 127.0.0.1 (an ``asyncio`` streams
server with keep-alive, ``local_server.py``, in a subprocess of its own so it takes no
GIL from the clients) that answers every request after 20 ms (``asyncio.sleep``). It
counts the TCP connections it accepts and the requests it answers, and notes when the
first request came and the last answer left; ``GET /stats`` returns these as JSON (a
connection that asks only for ``/stats`` is not counted). No traffic leaves 127.0.0.1,
and the children run without any ``*_proxy`` variable.

2,000 and 10,000 GETs, 32 at a time, so the ideal wall time is ``n * 20 ms / 32``:

1. ``ThreadPoolExecutor(32)`` sharing one ``requests.Session()``: the common pattern.
   Its urllib3 pool keeps at most 10 idle connections: one handed back to a full pool
   is closed, with the warning "Connection pool is full, discarding connection".
2. ``ThreadPoolExecutor(32)`` with a ``requests.Session`` per thread (``threading.local``).
3. aiohttp: one ``ClientSession`` (connector limit 32) and ``asyncio.Semaphore(32)``.
4. cellpool, threads inside processes: 2 processes x ``threads_per_worker=16`` running
   ``cellpool.http.session().get(url).status_code``.
5. cellpool, async tasks: 2 processes x ``concurrency=16`` running an ``async def`` that
   uses one aiohttp ``ClientSession`` per worker process (connector limit 16).
6. cellpool, plain threads: ``Executor("thread", 32)`` running the same ``fetch`` as 4.

Each variant runs in a fresh subprocess of this script (killed after 300 s). Its wall
time is cold: it includes creating and shutting down the pool or session (for 4 and 5,
starting the worker processes and their imports), not importing the client library in
the benchmark's process, which a notebook would have done already. Besides that wall
time, each row gives the requests per second, the ratio to the ideal, the TCP
connections the server accepted, the urllib3 "Connection pool is full, discarding
connection" warnings (a ``logging.Handler`` on the ``urllib3.connectionpool`` logger,
installed in the worker processes too, through ``initializer``) and the failed requests
(an exception, or a status other than 200).
The notes give, as the server saw it: how long after the start the first request came,
how long it was busy from the first request to the last answer, how many requests it
held on average over that span (32 is the most a variant can keep going) and at most,
and its CPU time.

The server shares the machine's CPUs with the clients: on a small machine, a client
that burns CPU also slows the server down.

It prints a markdown table and the targets cellpool should meet. Run it from the
repository root (the bench extra has aiohttp)::

    python benchmarks/http_clients.py          # 2,000 and 10,000 requests, about a minute
    python benchmarks/http_clients.py --quick  # 200 and 1,000 requests, for smoke testing
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from local_server import child_env, serve_until_stdin_closes, started_server

import cellpool

CONCURRENCY = 32
DELAY = 0.020  # seconds the server waits before each answer
PROCESSES = 2  # cellpool worker processes in variants 4 and 5
PER_PROCESS = CONCURRENCY // PROCESSES  # threads or async tasks in each of them
FULL = (2_000, 10_000)
QUICK = (200, 1_000)
REQUEST_TIMEOUT = (5.0, 30.0)  # requests: seconds to connect, and to wait for each read
AIOHTTP_TIMEOUT = 30.0  # aiohttp: seconds for a whole request
CHILD_TIMEOUT = 300.0  # seconds before a variant's subprocess is killed
STATS_TIMEOUT = 10.0  # seconds for a /stats request
POOL_FULL = "Connection pool is full, discarding connection"
RESULT_MARK = "RESULT "  # the line a variant's subprocess prints its measurements on

Outcome = int | str  # a status code, or why the request failed


# -- the server, in its own subprocess ------------------------------------------------


@dataclass
class Counters:
    """What the server counts; ``GET /stats`` returns it as JSON."""

    connections: int = 0  # accepted, less those that asked only for /stats
    requests: int = 0  # answered, /stats not included
    first: float | None = None  # epoch of the first request since the last /stats
    last: float | None = None  # epoch of the last answer since the last /stats
    cpu: float = 0.0  # the server's CPU seconds so far, set when /stats is read
    in_flight: int = 0  # requests received and not yet answered
    peak: int = 0  # the most in flight at once since the last /stats
    held: float = 0.0  # seconds from request to answer, summed, since the last /stats

    def connected(self) -> None:
        self.connections += 1

    async def respond(self, target: str, first: bool) -> tuple[bytes, str]:
        """``/stats``: the counters, then a new first/last window; else ``ok`` after
        ``DELAY``. A connection whose first request is ``/stats`` is not counted."""
        if target == "/stats":
            if first:
                self.connections -= 1
            self.cpu = time.process_time()
            body = json.dumps(vars(self)).encode()
            self.first = self.last = None
            self.peak, self.held = self.in_flight, 0.0
            return body, "application/json"
        came = time.time()
        if self.first is None:
            self.first = came
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        await asyncio.sleep(DELAY)
        self.requests += 1
        self.in_flight -= 1
        self.last = time.time()
        self.held += self.last - came
        return b"ok", "text/plain"


def server_stats(port: int) -> dict[str, Any]:
    """The server's counters (and the start of a new first/last window)."""
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with no_proxy.open(f"http://127.0.0.1:{port}/stats", timeout=STATS_TIMEOUT) as got:
        return json.loads(got.read())


# -- urllib3's "Connection pool is full" warnings --------------------------------------


class PoolFullCounter(logging.Handler):
    """Counts urllib3's "Connection pool is full, discarding connection" warnings; with a
    path, also appends a line there for each (a worker process's count reaches the
    benchmark that way)."""

    def __init__(self, path: str | None = None) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.path = path

    def emit(self, record: logging.LogRecord) -> None:
        if POOL_FULL not in record.getMessage():
            return
        self.count += 1
        if self.path is not None:
            with open(self.path, "a") as log:
                log.write(f"{os.getpid()}\n")


def count_pool_full(path: str | None = None) -> PoolFullCounter:
    """Install a ``PoolFullCounter`` on urllib3's pool logger: the ``initializer`` of the
    process variants."""
    counter = PoolFullCounter(path)
    logging.getLogger("urllib3.connectionpool").addHandler(counter)
    return counter


# -- the tasks: module-level, so cellpool can pickle them -------------------------------


def fetch(url: str) -> int:
    return cellpool.http.session().get(url).status_code


_aiohttp_sessions: dict[Any, Any] = {}  # event loop -> its ClientSession, in one worker


async def afetch(url: str) -> int:
    import aiohttp

    loop = asyncio.get_running_loop()
    session = _aiohttp_sessions.get(loop)
    if session is None:
        session = _aiohttp_sessions[loop] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=PER_PROCESS),
            timeout=aiohttp.ClientTimeout(total=AIOHTTP_TIMEOUT),
        )
    async with session.get(url) as got:
        await got.read()
        return got.status


# -- the variants: each takes the URLs and a path for worker warnings ---------------------


def attempt(get: Callable[[str], int], url: str) -> Outcome:
    try:
        return get(url)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def tpe_shared_session(urls: list[str], _: str) -> list[Outcome]:
    import requests

    with requests.Session() as session, ThreadPoolExecutor(CONCURRENCY) as pool:

        def get(url: str) -> int:
            return session.get(url, timeout=REQUEST_TIMEOUT).status_code

        return list(pool.map(lambda url: attempt(get, url), urls))


def tpe_session_per_thread(urls: list[str], _: str) -> list[Outcome]:
    import requests

    local = threading.local()
    sessions = []
    lock = threading.Lock()

    def get(url: str) -> int:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
            with lock:
                sessions.append(session)
        return session.get(url, timeout=REQUEST_TIMEOUT).status_code

    try:
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            return list(pool.map(lambda url: attempt(get, url), urls))
    finally:
        for session in sessions:
            session.close()


async def aiohttp_gather(urls: list[str]) -> list[Outcome]:
    import aiohttp

    semaphore = asyncio.Semaphore(CONCURRENCY)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=CONCURRENCY),
        timeout=aiohttp.ClientTimeout(total=AIOHTTP_TIMEOUT),
    ) as session:

        async def get(url: str) -> Outcome:
            async with semaphore:
                try:
                    async with session.get(url) as got:
                        await got.read()
                        return got.status
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    return f"{type(exc).__name__}: {exc}"

        return list(await asyncio.gather(*(get(url) for url in urls)))


def aiohttp_semaphore(urls: list[str], _: str) -> list[Outcome]:
    return asyncio.run(aiohttp_gather(urls))


def outcomes(results: Any) -> list[Outcome]:
    """A status code per cellpool record, or why it failed."""
    return [
        record.value
        if record.status == "ok"
        else f"{record.status}: {record.error_type}: {record.error}"
        for record in results
    ]


def _on_processes(task: Any, urls: list[str], warnings_path: str, **options: int) -> list[Outcome]:
    """``task`` over ``urls`` on cellpool's processes, counting pool-full warnings there."""
    with cellpool.Executor(
        "process",
        PROCESSES,
        progress="none",
        initializer=count_pool_full,
        initargs=(warnings_path,),
        **options,
    ) as pool:
        return outcomes(pool.run(task, urls))


def cellpool_threads_in_processes(urls: list[str], warnings_path: str) -> list[Outcome]:
    return _on_processes(fetch, urls, warnings_path, threads_per_worker=PER_PROCESS)


def cellpool_async_tasks(urls: list[str], warnings_path: str) -> list[Outcome]:
    return _on_processes(afetch, urls, warnings_path, concurrency=PER_PROCESS)


def cellpool_threads(urls: list[str], _: str) -> list[Outcome]:
    with cellpool.Executor("thread", CONCURRENCY, progress="none") as pool:
        return outcomes(pool.run(fetch, urls))


@dataclass(frozen=True)
class Case:
    label: str
    run: Callable[[list[str], str], list[Outcome]]
    imports: tuple[str, ...]  # imported before the clock starts, as a notebook would have


CASES: dict[str, Case] = {
    "tpe-shared": Case("TPE(32), one shared requests.Session", tpe_shared_session, ("requests",)),
    "tpe-per-thread": Case(
        "TPE(32), a requests.Session per thread", tpe_session_per_thread, ("requests",)
    ),
    "aiohttp": Case("aiohttp, Semaphore(32), connector limit 32", aiohttp_semaphore, ("aiohttp",)),
    "cellpool-process-threads": Case(
        f"cellpool process {PROCESSES} x threads_per_worker={PER_PROCESS}, cellpool.http.session()",
        cellpool_threads_in_processes,
        ("cellpool.executor", "cellpool.http"),
    ),
    "cellpool-process-async": Case(
        f"cellpool process {PROCESSES} x concurrency={PER_PROCESS}, async aiohttp",
        cellpool_async_tasks,
        ("cellpool.executor", "aiohttp"),
    ),
    "cellpool-thread": Case(
        f"cellpool thread {CONCURRENCY}, cellpool.http.session()",
        cellpool_threads,
        ("cellpool.executor", "cellpool.http"),
    ),
}
REQUESTS_CELLPOOL = "cellpool-process-threads"
ASYNC_CELLPOOL = "cellpool-process-async"

Measured = dict[str, Any]


def child(name: str, n: int, port: int) -> None:
    """Run one variant against the server and print its measurements as a JSON line."""
    for module in CASES[name].imports:
        importlib.import_module(module)
    counter = count_pool_full()
    urls = [f"http://127.0.0.1:{port}/work?i={i}" for i in range(n)]
    before = server_stats(port)
    with tempfile.TemporaryDirectory() as scratch:
        warnings_path = os.path.join(scratch, "pool-full")
        started = time.time()
        start = time.perf_counter()
        got = CASES[name].run(urls, warnings_path)
        wall = time.perf_counter() - start
        in_workers = 0
        if os.path.exists(warnings_path):
            with open(warnings_path) as log:
                in_workers = sum(1 for _ in log)
    after = server_stats(port)
    failed = [outcome for outcome in got if outcome != 200]
    measured = {
        "wall": wall,
        "connections": after["connections"] - before["connections"],
        "answered": after["requests"] - before["requests"],
        "server_cpu": after["cpu"] - before["cpu"],
        "peak": after["peak"],
        "held": after["held"],
        "first_after": None if after["first"] is None else after["first"] - started,
        "busy": None if after["first"] is None else after["last"] - after["first"],
        "warnings": counter.count + in_workers,
        "failed": len(failed) + n - len(got),
        "first_failure": str(failed[0]) if failed else "",
    }
    print(RESULT_MARK + json.dumps(measured), flush=True)


def in_subprocess(name: str, requests: int, port: int) -> Measured | str:
    """A variant's measurements from a fresh subprocess, or why there are none."""
    command = [sys.executable, __file__, "--case", name, "--requests", str(requests)]
    command += ["--port", str(port)]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=CHILD_TIMEOUT, env=child_env()
        )
    except subprocess.TimeoutExpired:
        return f"timed out after {CHILD_TIMEOUT:.0f} s"
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if done.returncode != 0 or not lines:
        print(f"--- {name}, {requests:,} requests, failed:\n{done.stderr}", file=sys.stderr)
        return f"failed (exit {done.returncode})"
    return json.loads(lines[-1].removeprefix(RESULT_MARK))


# -- report ----------------------------------------------------------------------------


def ideal(requests: int) -> float:
    return requests * DELAY / CONCURRENCY


def row(name: str, requests: int, got: Measured | str) -> list[str]:
    head = [f"{requests:,}", CASES[name].label]
    if isinstance(got, str):
        return [*head, got, "-", "-", "-", "-", "-", ""]
    notes = []
    if got["first_after"] is not None:
        notes.append(
            f"first request at +{got['first_after']:.2f} s, server busy {got['busy']:.2f} s "
            f"({got['busy'] / ideal(requests):.2f}x ideal), in flight mean "
            f"{got['held'] / max(got['busy'], 1e-9):.1f} and peak {got['peak']}"
        )
    notes.append(f"server CPU {got['server_cpu']:.2f} s")
    if got["answered"] != requests:
        notes.append(f"server answered {got['answered']:,}")
    if got["first_failure"]:
        notes.append(f"first failure: {got['first_failure'][:120]}")
    return [
        *head,
        f"{got['wall']:.3f}",
        f"{requests / got['wall']:,.0f}",
        f"{got['wall'] / ideal(requests):.2f}x",
        f"{got['connections']:,}",
        f"{got['warnings']:,}",
        f"{got['failed']:,}",
        "; ".join(notes).replace("|", "\\|"),
    ]


def markdown(rows: list[list[str]]) -> str:
    header = [
        "requests",
        "variant",
        "wall s",
        "req/s",
        "x ideal",
        "TCP conns",
        "pool-full warnings",
        "failed",
        "notes",
    ]
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def target_lines(
    results: dict[tuple[str, int], Measured | str], sizes: tuple[int, ...]
) -> list[str]:
    """A PASS or FAIL line per target, NOT MEASURED if the variant failed, and the peers'
    ratios to the ideal."""
    lines = []
    for name, limit, what in (
        (REQUESTS_CELLPOOL, 1.5, "requests-based cellpool (threads in processes)"),
        (ASYNC_CELLPOOL, 1.3, "async cellpool"),
    ):
        for requests in sizes:
            text = f"{what} within {limit}x of the ideal at {requests:,} requests, none failed"
            got = results[name, requests]
            if isinstance(got, str):
                lines.append(f"- NOT MEASURED: {text} ({got})")
                continue
            versus = got["wall"] / ideal(requests)
            met = versus <= limit and got["failed"] == 0
            numbers = f"{versus:.2f}x ideal, {got['failed']:,} failed"
            lines.append(f"- {'PASS' if met else 'FAIL'}: {text} ({numbers})")
    for name, case in CASES.items():
        if name in (REQUESTS_CELLPOOL, ASYNC_CELLPOOL):
            continue
        ratios = []
        for requests in sizes:
            got = results[name, requests]
            value = got if isinstance(got, str) else f"{got['wall'] / ideal(requests):.2f}x"
            ratios.append(f"{requests:,}: {value}")
        lines.append(f"- peer {case.label}: {', '.join(ratios)}")
    return lines


def versions() -> str:
    names = ("cellpool", "requests", "urllib3", "aiohttp")
    return ", ".join(f"{name} {metadata.version(name)}" for name in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 and 1,000 requests")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        counters = Counters()
        asyncio.run(serve_until_stdin_closes(counters.respond, counters.connected))
        return
    if args.case:
        child(args.case, args.requests, args.port)
        return
    sizes = QUICK if args.quick else FULL
    print(
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, {versions()}; "
        f"{CONCURRENCY} requests at a time, {DELAY * 1000:.0f} ms each, "
        f"ideal = n x {DELAY * 1000:.0f} ms / {CONCURRENCY}; one fresh process per variant\n"
    )
    with started_server(__file__, child_env()) as port:
        results = {
            (name, requests): in_subprocess(name, requests, port)
            for requests in sizes
            for name in CASES
        }
    rows = [row(name, requests, got) for (name, requests), got in results.items()]
    print(markdown(rows))
    print("\nTargets:", *target_lines(results, sizes), sep="\n")


if __name__ == "__main__":
    main()
