"""A two-stage pipeline, fetch then parse: cellpool's pipeline against the ways to write it.

1,000 inputs (URLs) go through two stages:

* fetch: an HTTP GET with the calling thread's own ``requests.Session``, on 32 threads.
  The benchmark's server (an ``asyncio`` streams server with keep-alive on 127.0.0.1, in
  a subprocess of its own so it takes no GIL from the clients: ``local_server.py``, as
  in ``http_clients.py``)
  answers each request after 50 ms with 2-4 KB of text derived from the path.
* parse: about 2 ms of pure-Python CPU over that text (a rolling hash of a fixed number
  of characters, cycling through the text), on 2 processes. The number of characters is
  calibrated once, in the benchmark's process, to take 2 ms here; every process of the
  run gets it through the environment, and the header gives the measured time per call.

The ideal is the slower stage alone: ``max(n x 50 ms / 32, n x parse / 2)``, the fetch
stage (1.56 s for 1,000) unless this machine parses slowly. Both are printed.

The variants, all cold (creating and shutting down their pools, workers or cluster is
timed; importing the libraries is not, as a notebook would have done it already):

1. ``sequential``: ``cellpool.run(fetch, urls, kind="thread", workers=32)``, then
   ``cellpool.run(parse, values, kind="process", workers=2)``: one stage after the other.
2. ``asyncio``: what a careful user writes by hand. An event loop with a
   ``ThreadPoolExecutor(32)`` for fetch and a ``ProcessPoolExecutor(2)`` (forkserver, as a
   notebook should use) for parse: a producer task feeds the URLs through a bounded
   ``asyncio.Queue`` to 32 fetch tasks, which pass each text through a second bounded
   queue to 4 parse tasks (2 per process, so a process never waits for its next input).
3. ``dask``: one ``LocalCluster`` of 2 worker processes x 16 threads (32 threads for
   fetch, as dask's workers run both stages), ``client.map(fetch, urls)`` then
   ``client.map(parse, futures)`` and a wait. Parse shares those workers: up to 32
   parses at once, held to 2 processes' CPU by the GIL, each process's parses sharing its
   GIL with its fetch threads. (Worker resources that allow 16 fetches and 1 parse per
   process, on 17 threads, and a ``SpecCluster`` with a 32-thread fetch worker and two
   1-thread parse workers, were tried: neither was faster here.) The cluster's start
   (until both workers are up) and shutdown are in its time, and also given apart in the
   notes.
4. ``pipeline``: ``cellpool.pipeline(cellpool.stage(fetch, kind="thread", workers=32),
   cellpool.stage(parse, kind="process", workers=2)).run(urls)``.

Every variant runs in a fresh subprocess of this script (``--variant NAME``, killed with
its process group after 300 s), the variants interleaved, in a rotated order, for 5
rounds; the table gives medians. The functions are defined at the top of this script:
forkserver and spawn workers re-import it by path as ``__mp_main__`` (paying only for
the standard library: the peers are imported inside the variants), and cellpool and
dask ship them by value with cloudpickle, as they would a notebook's. The benchmark's
process samples, every 50 ms, the summed RSS of the variant's whole process tree (its
process, forkservers, workers, the dask nannies and scheduler; ``tree_memory.py``); the
table gives the median of the runs' peaks. A variant's results are checked: one per
input, all ok, and those of 8 inputs equal to ``parse(fetch(url))`` computed serially
afterwards; the failed column counts, over all runs, the inputs that missed any of
these. A variant whose library or API is missing (``ImportError``, ``AttributeError``)
is "not available". No traffic leaves 127.0.0.1, and the children run without any
``*_proxy`` variable.

The server and both stages share the machine's CPUs: on a 2-CPU machine, the parse
stage's 2 processes leave little CPU to the fetch threads and the server.

It prints a markdown table and the targets the pipeline should meet. Run it from the
repository root (dask comes with the dask extra; requests and psutil with cellpool)::

    python benchmarks/pipelines.py          # 1,000 inputs, 5 rounds, about a minute
    python benchmarks/pipelines.py --quick  # 200 inputs, 2 rounds, for smoke testing
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import importlib
import itertools
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from multiprocessing import get_context
from typing import Any

from local_server import child_env, serve_until_stdin_closes, started_server
from tree_memory import TreePeak

FETCH_WORKERS = 32
PARSE_WORKERS = 2
DELAY = 0.050  # seconds the server waits before each answer
PARSE_SECONDS = 0.002  # the parse stage's CPU per input, once calibrated
BODY_BYTES = (2048, 4096)  # a page's size: at least, and less than
STEPS_ENV = "CELLPOOL_BENCH_PARSE_STEPS"  # how the calibrated step count reaches workers
PARSE_STEPS = int(os.environ.get(STEPS_ENV) or 30_000)  # characters hashed per parse
CALIBRATION_STEPS = 20_000
CALIBRATION_TRIALS = 50
QUEUE_SIZE = 64  # the asyncio variant's queues
PARSE_IN_FLIGHT = 2 * PARSE_WORKERS  # the asyncio variant's parse tasks
DASK_THREADS = FETCH_WORKERS // PARSE_WORKERS  # per dask worker process
CHECKED = 8  # inputs whose values are compared with a serial parse(fetch(url))
FULL = (1_000, 5)  # inputs, rounds
QUICK = (200, 2)
REQUEST_TIMEOUT = (5.0, 30.0)  # requests: seconds to connect, and to wait for each read
CHILD_TIMEOUT = 300.0  # seconds before a variant's process group is killed
SAMPLE_SECONDS = 0.05  # how often the variant's process tree's RSS is sampled
RESULT_MARK = "RESULT "  # the line a variant's subprocess prints its measurements on
MIB = 1024 * 1024

Outcome = int | str  # parse's value, or why the input has none


# -- the server, in its own subprocess ------------------------------------------------


@functools.cache
def page(path: str) -> bytes:
    """2-4 KB of text, the same for the same path: words of 16 hex digits."""
    size = BODY_BYTES[0] + zlib.crc32(path.encode()) % (BODY_BYTES[1] - BODY_BYTES[0])
    words = (
        hashlib.blake2b(f"{path}#{k}".encode(), digest_size=8).hexdigest()
        for k in range(size // 17 + 1)
    )
    return " ".join(words)[:size].encode()


async def respond(target: str, first: bool) -> tuple[bytes, str]:
    """The page for ``target``, after ``DELAY``."""
    await asyncio.sleep(DELAY)
    return page(target), "text/plain; charset=utf-8"  # no charset: requests would guess one


# -- the stages: module-level, so that every pool can ship them -----------------------


def fetch(url: str) -> str:
    """Stage 1: GET ``url`` with the calling thread's own ``requests.Session``; its text.

    The session hangs on the thread object (a module-level ``threading.local`` would
    not survive being shipped by value to dask's workers)."""
    thread = threading.current_thread()
    session = getattr(thread, "bench_session", None)
    if session is None:
        import requests

        session = thread.bench_session = requests.Session()  # type: ignore[attr-defined]
    got = session.get(url, timeout=REQUEST_TIMEOUT)
    got.raise_for_status()
    return got.text


def rolling_hash(text: str, steps: int) -> int:
    """Pure-Python CPU: a rolling hash of ``steps`` characters, cycling through ``text``."""
    digest = 0
    for char in itertools.islice(itertools.cycle(text), steps):
        digest = (digest * 31 + ord(char)) & 0xFFFFFFFF
    return digest


def parse(text: str) -> int:
    """Stage 2: about ``PARSE_SECONDS`` of pure-Python CPU over ``text``."""
    return rolling_hash(text, PARSE_STEPS)


# -- the variants: each takes the URLs and gives an outcome per URL, and notes ----------

Notes = dict[str, float]  # seconds, by what they measure


def failure(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def outcomes(results: Any) -> list[Outcome]:
    """parse's value per cellpool record, or why it failed."""
    return [
        record.value
        if record.status == "ok"
        else f"{record.status}: {record.error_type}: {record.error}"
        for record in results
    ]


def sequential(urls: list[str]) -> tuple[list[Outcome], Notes]:
    import cellpool

    start = time.perf_counter()
    fetched = cellpool.run(fetch, urls, kind="thread", workers=FETCH_WORKERS, progress="none")
    between = time.perf_counter()
    parsed = cellpool.run(
        parse, fetched.values, kind="process", workers=PARSE_WORKERS, progress="none"
    )
    end = time.perf_counter()
    got = [  # where fetch failed, its error rather than parse's on None
        value if record.status == "ok" else why
        for record, value, why in zip(fetched, outcomes(parsed), outcomes(fetched), strict=True)
    ]
    return got, {"fetch run": between - start, "parse run": end - between}


async def asyncio_queues(urls: list[str]) -> list[Outcome]:
    loop = asyncio.get_running_loop()
    got: list[Outcome] = ["missing"] * len(urls)
    todo: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue(QUEUE_SIZE)
    fetched: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue(QUEUE_SIZE)
    with (
        ThreadPoolExecutor(FETCH_WORKERS) as threads,
        ProcessPoolExecutor(PARSE_WORKERS, mp_context=get_context("forkserver")) as processes,
    ):

        async def produce() -> None:
            for item in enumerate(urls):
                await todo.put(item)
            for _ in range(FETCH_WORKERS):
                await todo.put(None)

        async def fetcher() -> None:
            while (item := await todo.get()) is not None:
                index, url = item
                try:
                    text = await loop.run_in_executor(threads, fetch, url)
                except Exception as exc:
                    got[index] = failure(exc)
                else:
                    await fetched.put((index, text))

        async def parser() -> None:
            while (item := await fetched.get()) is not None:
                index, text = item
                try:
                    got[index] = await loop.run_in_executor(processes, parse, text)
                except Exception as exc:
                    got[index] = failure(exc)

        parsers = [asyncio.create_task(parser()) for _ in range(PARSE_IN_FLIGHT)]
        await asyncio.gather(produce(), *(fetcher() for _ in range(FETCH_WORKERS)))
        for _ in parsers:
            await fetched.put(None)
        await asyncio.gather(*parsers)
    return got


def asyncio_hand_written(urls: list[str]) -> tuple[list[Outcome], Notes]:
    return asyncio.run(asyncio_queues(urls)), {}


def dask_map(urls: list[str]) -> tuple[list[Outcome], Notes]:
    from distributed import Client, LocalCluster, wait

    start = time.perf_counter()
    with (
        LocalCluster(
            n_workers=PARSE_WORKERS,
            threads_per_worker=DASK_THREADS,
            processes=True,
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(PARSE_WORKERS)
        started = time.perf_counter()
        fetched = client.map(fetch, urls, pure=False)
        parsed = client.map(parse, fetched, pure=False)
        wait(parsed)
        done = [future for future in parsed if future.status == "finished"]
        values = iter(client.gather(done))
        got: list[Outcome] = [
            next(values) if future.status == "finished" else failure(future.exception())
            for future in parsed
        ]
        ran = time.perf_counter()
    end = time.perf_counter()
    return got, {"cluster start": started - start, "shutdown": end - ran}


def cellpool_pipeline(urls: list[str]) -> tuple[list[Outcome], Notes]:
    import cellpool

    pipe = cellpool.pipeline(
        cellpool.stage(fetch, kind="thread", workers=FETCH_WORKERS, name="fetch"),
        cellpool.stage(parse, kind="process", workers=PARSE_WORKERS, name="parse"),
    )
    results = pipe.run(urls, progress="none")
    return outcomes(results), {}


@dataclass(frozen=True)
class Variant:
    label: str
    run: Callable[[list[str]], tuple[list[Outcome], Notes]]
    # imported before the clock starts, as a notebook would have; "module:name" also
    # looks the name up (a lazily loaded attribute loads its module then)
    imports: tuple[str, ...]


VARIANTS: dict[str, Variant] = {
    "sequential": Variant(
        f"sequential: cellpool.run thread {FETCH_WORKERS}, then process {PARSE_WORKERS}",
        sequential,
        ("requests", "cellpool.executor"),
    ),
    "asyncio": Variant(
        f"asyncio: TPE({FETCH_WORKERS}) + PPE({PARSE_WORKERS}, forkserver), queues of {QUEUE_SIZE}",
        asyncio_hand_written,
        ("requests",),
    ),
    "dask": Variant(
        f"dask: LocalCluster {PARSE_WORKERS} processes x {DASK_THREADS} threads, both stages",
        dask_map,
        ("requests", "distributed"),
    ),
    "pipeline": Variant(
        f"pipeline: cellpool.pipeline, thread {FETCH_WORKERS} -> process {PARSE_WORKERS}",
        cellpool_pipeline,
        ("requests", "cellpool.executor", "cellpool:pipeline", "cellpool:stage"),
    ),
}
PIPELINE = "pipeline"

Measured = dict[str, Any]


def check(got: list[Outcome], urls: list[str]) -> tuple[int, str]:
    """How many inputs have no value or a wrong one, and why the first has none: every
    outcome must be an int, and ``CHECKED`` of them equal to a serial parse(fetch(url))."""
    n = len(urls)
    if len(got) != n:
        return n, f"{len(got):,} outcomes for {n:,} inputs"
    failed = [i for i, outcome in enumerate(got) if not isinstance(outcome, int)]
    checked = sorted({i * (n - 1) // (CHECKED - 1) for i in range(CHECKED)})
    wrong = [i for i in checked if i not in failed and got[i] != parse(fetch(urls[i]))]
    if failed:
        return len(failed) + len(wrong), str(got[failed[0]])
    return len(wrong), f"input {wrong[0]}: not parse(fetch(url))" if wrong else ""


def child(name: str, n: int, port: int) -> None:
    """Run one variant, check its outcomes and print its measurements as a JSON line."""
    variant = VARIANTS[name]
    urls = [f"http://127.0.0.1:{port}/item/{i}" for i in range(n)]
    try:
        for needed in variant.imports:
            module, _, name = needed.partition(":")
            imported = importlib.import_module(module)
            if name:
                getattr(imported, name)
        start = time.perf_counter()
        got, notes = variant.run(urls)
        wall = time.perf_counter() - start
    except (ImportError, AttributeError) as exc:
        print(RESULT_MARK + json.dumps({"error": f"not available: {failure(exc)}"}), flush=True)
        sys.exit(1)
    except Exception as exc:
        traceback.print_exc()
        print(RESULT_MARK + json.dumps({"error": f"failed: {failure(exc)}"}), flush=True)
        sys.exit(1)
    failed, first_failure = check(got, urls)
    measured = {"wall": wall, "failed": failed, "first_failure": first_failure, "notes": notes}
    print(RESULT_MARK + json.dumps(measured), flush=True)


def in_subprocess(name: str, n: int, port: int, env: dict[str, str]) -> Measured | str:
    """A variant's measurements from a fresh subprocess, or why there are none."""
    command = [sys.executable, __file__, "--variant", name, "--inputs", str(n)]
    command += ["--port", str(port)]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group, killed with every worker left
    )
    try:
        with TreePeak(process.pid, every=SAMPLE_SECONDS) as tree:
            try:
                out, err = process.communicate(timeout=CHILD_TIMEOUT)
            except subprocess.TimeoutExpired:
                return f"timed out after {CHILD_TIMEOUT:.0f} s"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    lines = [line for line in out.splitlines() if line.startswith(RESULT_MARK)]
    got = json.loads(lines[-1].removeprefix(RESULT_MARK)) if lines else {}
    if "error" in got or process.returncode != 0 or not lines:
        if not got.get("error", "").startswith("not available"):
            print(f"--- {name} failed:\n{err}", file=sys.stderr)
        return got.get("error") or f"failed (exit {process.returncode})"
    return {**got, "tree_mib": tree.peak / MIB}


# -- calibration and report -------------------------------------------------------------


def calibrate() -> tuple[int, float]:
    """The ``rolling_hash`` step count that takes ``PARSE_SECONDS`` here (the median of
    ``CALIBRATION_TRIALS`` trials, after a warm-up of as many), and the median time per
    call it then takes over as many pages."""

    def timed(text: str, steps: int) -> float:
        start = time.perf_counter()
        rolling_hash(text, steps)
        return time.perf_counter() - start

    text = page("/item/0").decode()
    trials = [timed(text, CALIBRATION_STEPS) for _ in range(2 * CALIBRATION_TRIALS)]
    steps = round(
        CALIBRATION_STEPS * PARSE_SECONDS / statistics.median(trials[CALIBRATION_TRIALS:])
    )
    per_call = statistics.median(
        timed(page(f"/item/{i}").decode(), steps) for i in range(CALIBRATION_TRIALS)
    )
    return steps, per_call


@dataclass(frozen=True)
class Ideal:
    fetch: float
    parse: float

    @property
    def slower(self) -> float:
        return max(self.fetch, self.parse)


Row = dict[str, Any]  # a variant's medians, or its error


def summarize(runs: list[Measured | str]) -> Row:
    """The medians of a variant's successful runs, with its failures over all runs."""
    good = [run for run in runs if not isinstance(run, str)]
    errors = [run for run in runs if isinstance(run, str)]
    if not good:
        return {"error": errors[0]}
    notes = {key: statistics.median(run["notes"][key] for run in good) for key in good[0]["notes"]}
    return {
        "wall": statistics.median(run["wall"] for run in good),
        "tree_mib": statistics.median(run["tree_mib"] for run in good),
        "failed": sum(run["failed"] for run in good),
        "first_failure": next((run["first_failure"] for run in good if run["first_failure"]), ""),
        "notes": notes,
        "errors": errors,
        "runs": len(good),
    }


def row(name: str, got: Row, pipeline: Row, ideal: Ideal) -> list[str]:
    label = VARIANTS[name].label
    if "error" in got:
        return [label, got["error"].replace("|", "\\|"), "-", "-", "-", "-", ""]
    notes = [f"{key} {value:.2f} s" for key, value in got["notes"].items()]
    if got["errors"]:
        notes.append(f"{len(got['errors'])} run(s) failed: {got['errors'][0]}")
    if got["first_failure"]:
        notes.append(f"first failure: {got['first_failure'][:120]}")
    versus = "-" if "error" in pipeline else f"{got['wall'] / pipeline['wall']:.2f}x"
    return [
        label,
        f"{got['wall']:.3f}",
        f"{got['wall'] / ideal.slower:.2f}x",
        versus,
        f"{got['tree_mib']:.0f}",
        f"{got['failed']:,}",
        "; ".join(notes).replace("|", "\\|"),
    ]


def markdown(rows: list[list[str]], rounds: int) -> str:
    header = [
        "variant",
        f"wall s (median of {rounds})",
        "x ideal",
        "x pipeline",
        "peak tree RSS MiB",
        "failed (all runs)",
        "notes",
    ]
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def target_lines(summary: dict[str, Row], ideal: Ideal) -> list[str]:
    """A met or NOT met line per target of the pipeline, with its numbers."""
    pipe = summary[PIPELINE]
    lines = []
    for text, peer, check in (
        (
            "pipeline within 1.25x of the slower stage's ideal",
            None,
            lambda wall, _: (wall / ideal.slower <= 1.25, f"{wall / ideal.slower:.2f}x ideal"),
        ),
        (
            "pipeline at least 1.3x faster than sequential",
            "sequential",
            lambda wall, other: (other / wall >= 1.3, f"{other / wall:.2f}x faster"),
        ),
        (
            "pipeline no slower than asyncio",
            "asyncio",
            lambda wall, other: (wall <= other, f"{wall / other:.2f}x asyncio's time"),
        ),
    ):
        missing = [
            f"{name}: {summary[name]['error']}"
            for name in (PIPELINE, peer)
            if name is not None and "error" in summary[name]
        ]
        if missing:
            lines.append(f"- NOT met: {text} (not measured; {'; '.join(missing)})")
            continue
        met, numbers = check(pipe["wall"], None if peer is None else summary[peer]["wall"])
        met = met and pipe["failed"] == 0
        numbers += f"; {pipe['failed']:,} failed"
        lines.append(f"- {'met' if met else 'NOT met'}: {text}, none failed ({numbers})")
    return lines


def versions() -> str:
    names = ("cellpool", "requests", "dask", "distributed")
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} missing")
    return ", ".join(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 inputs, 2 rounds")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--inputs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve_until_stdin_closes(respond))
        return
    if args.variant:
        child(args.variant, args.inputs, args.port)
        return
    n, rounds = QUICK if args.quick else FULL
    steps, per_call = calibrate()
    ideal = Ideal(fetch=n * DELAY / FETCH_WORKERS, parse=n * per_call / PARSE_WORKERS)
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs (load {load}), {versions()}\n"
        f"{n:,} inputs; fetch: {DELAY * 1000:.0f} ms per GET on {FETCH_WORKERS} threads, "
        f"ideal {ideal.fetch:.3f} s; parse: {steps:,} steps, {per_call * 1000:.2f} ms per call "
        f"here, on {PARSE_WORKERS} processes, ideal {ideal.parse:.3f} s; "
        f"ideal = the slower stage, {ideal.slower:.3f} s\n"
        f"{rounds} rounds of fresh processes, one per variant, in a rotated order\n"
    )
    env = {**child_env(), STEPS_ENV: str(steps)}  # no proxies, and the parse's step count
    names = list(VARIANTS)
    runs: dict[str, list[Measured | str]] = {name: [] for name in names}
    with started_server(__file__, env) as port:
        for round_ in range(rounds):
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                runs[name].append(in_subprocess(name, n, port, env))
    summary = {name: summarize(got) for name, got in runs.items()}
    rows = [row(name, summary[name], summary[PIPELINE], ideal) for name in names]
    print(markdown(rows, rounds))
    print("\nTargets:", *target_lines(summary, ideal), sep="\n")


if __name__ == "__main__":
    main()
