"""Thread-pool overhead: cellpool against ``concurrent.futures.ThreadPoolExecutor``.

Two workloads, both ``x + 1`` on 8 threads, so the time is the pools' own overhead:

* 20,000 tiny tasks from a ``range``: ``ThreadPoolExecutor.map`` (into a list),
  ``cellpool.Executor.run`` (records included) and ``cellpool.Executor.map`` (into a
  list). Wall time is the best of 3 and includes creating and shutting down the pool.
* A 1,000,000-item generator: the same three variants, the ``map`` ones consumed by a
  running sum that keeps nothing. Each variant runs in a fresh subprocess that reports
  its wall time and peak RSS (``VmHWM``, so Linux only), so the variants' memory does
  not mix. Every child imports cellpool, so each peak includes that import.

It prints a markdown table ready for the README. Run it from the repository root::

    python benchmarks/threads.py          # full run
    python benchmarks/threads.py --quick  # 100,000-item generator, for smoke testing
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cellpool

WORKERS = 8
TINY_TASKS = 20_000
REPEATS = 3
STREAM_ITEMS = 1_000_000
QUICK_STREAM_ITEMS = 100_000
CHILD_TIMEOUT = 300.0  # seconds before a streaming child is killed
BASELINE = "ThreadPoolExecutor.map"


def inc(x: int) -> int:
    return x + 1


# -- workload 1: tiny tasks, in this process ---------------------------------------


def tiny_tpe_map() -> None:
    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(inc, range(TINY_TASKS)))


def tiny_cellpool_run() -> None:
    with cellpool.Executor("thread", WORKERS, progress="none") as pool:
        pool.run(inc, range(TINY_TASKS))


def tiny_cellpool_map() -> None:
    with cellpool.Executor("thread", WORKERS, progress="none") as pool:
        list(pool.map(inc, range(TINY_TASKS)))


TINY_VARIANTS: dict[str, Callable[[], None]] = {
    BASELINE: tiny_tpe_map,
    "cellpool run": tiny_cellpool_run,
    "cellpool map": tiny_cellpool_map,
}


def best_wall(fn: Callable[[], None]) -> float:
    """The shortest of ``REPEATS`` wall times of ``fn()``, in seconds."""
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


# -- workload 2: a long generator, one fresh subprocess per variant ----------------


def stream_tpe_map(items: int) -> None:
    total = 0
    with ThreadPoolExecutor(WORKERS) as pool:
        for value in pool.map(inc, (i for i in range(items))):
            total += value


def stream_cellpool_run(items: int) -> None:
    with cellpool.Executor("thread", WORKERS, progress="none") as pool:
        pool.run(inc, (i for i in range(items)))


def stream_cellpool_map(items: int) -> None:
    total = 0
    with cellpool.Executor("thread", WORKERS, progress="none") as pool:
        for value in pool.map(inc, (i for i in range(items))):
            total += value


STREAM_VARIANTS: dict[str, Callable[[int], None]] = {
    BASELINE: stream_tpe_map,
    "cellpool run": stream_cellpool_run,
    "cellpool map": stream_cellpool_map,
}


def peak_rss_mib() -> float:
    """This process's peak resident set size, in MiB (Linux).

    Read from ``VmHWM`` rather than ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries
    ``ru_maxrss`` over ``exec``, so a child would report at least its parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # the value is in kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(case: str, items: int) -> None:
    """Run one streaming variant and print its wall seconds and peak RSS as JSON."""
    start = time.perf_counter()
    STREAM_VARIANTS[case](items)
    wall = time.perf_counter() - start
    print(json.dumps({"wall": wall, "rss_mib": peak_rss_mib()}))


def in_subprocess(case: str, items: int) -> dict[str, float] | str:
    """The child's measurements, or why there are none."""
    command = [sys.executable, __file__, "--case", case, "--items", str(items)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        return f"timed out after {CHILD_TIMEOUT:.0f} s"
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        return f"failed (exit {done.returncode})"
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- report ------------------------------------------------------------------------


def ratio(value: float, baseline: float) -> str:
    return f"{value / baseline:.2f}x"


def tiny_rows() -> list[list[str]]:
    workload = f"{TINY_TASKS:,} tiny tasks"
    walls = {name: best_wall(fn) for name, fn in TINY_VARIANTS.items()}
    return [
        [workload, name, f"{wall:.3f}", "-", ratio(wall, walls[BASELINE])]
        for name, wall in walls.items()
    ]


def stream_rows(items: int) -> list[list[str]]:
    workload = f"{items:,}-item generator"
    measured = {name: in_subprocess(name, items) for name in STREAM_VARIANTS}
    base = measured[BASELINE]
    rows = []
    for name, got in measured.items():
        if isinstance(got, str):
            rows.append([workload, name, got, "-", "-"])
            continue
        versus = "-"
        if not isinstance(base, str):
            wall_ratio = ratio(got["wall"], base["wall"])
            versus = f"wall {wall_ratio}, RSS {ratio(got['rss_mib'], base['rss_mib'])}"
        rows.append([workload, name, f"{got['wall']:.3f}", f"{got['rss_mib']:.1f}", versus])
    return rows


def markdown(rows: list[list[str]]) -> str:
    header = ["workload", "variant", "wall s", "peak RSS MiB", f"ratio vs {BASELINE}"]
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100,000-item generator")
    parser.add_argument("--case", choices=STREAM_VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--items", type=int, default=STREAM_ITEMS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        child(args.case, args.items)
        return
    items = QUICK_STREAM_ITEMS if args.quick else STREAM_ITEMS
    print(
        f"Python {platform.python_version()}, cellpool {cellpool.__version__}, "
        f"{WORKERS} threads, best of {REPEATS} for tiny tasks, "
        f"one fresh process per generator run\n"
    )
    print(markdown(tiny_rows() + stream_rows(items)))


if __name__ == "__main__":
    main()
