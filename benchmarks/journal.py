"""What a journal costs: the same runs with ``journal=`` and without, side by side.

Each measurement runs in a fresh subprocess of this script (so peak memory is its own),
journal off and on alternating, three times; medians are reported. The journal file
is a fresh one in a temporary directory each time.

1. 20,000 tiny tasks (``x + 1``) on 2 processes, cold pool: target at most 1.5x.
2. 1,000 tasks of 10 ms (``time.sleep``) on 2 processes: target at most 1.05x.
3. A 1,000,000-item generator through ``run`` on 2 processes: peak RSS of the whole
   process tree, journal on within 1.2x of off.
4. Resuming: a journal holding 100,000 ok records, the same run again (nothing left to
   run): target under 2 s.

Run it from the repository root::

    python benchmarks/journal.py          # about two minutes
    python benchmarks/journal.py --quick  # smaller sizes, for smoke testing
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psutil

REPEATS = 3


def inc(x: int) -> int:
    return x + 1


def nap(x: int) -> int:
    time.sleep(0.010)
    return x


def numbers(n: int):
    yield from range(n)


def tree_rss() -> int:
    me = psutil.Process()
    total = 0
    for process in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # it ended meanwhile
            total += process.memory_info().rss
    return total


def measure(workload: str, journal: bool, size: int) -> dict[str, float]:
    """One measurement, in this (fresh) process."""
    import cellpool  # and its executor module, before timing, as a notebook has them
    import cellpool.executor

    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "bench.db") if journal else None
    options = {"kind": "process", "workers": 2, "progress": "none", "journal": path}
    peak = [tree_rss()]
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], tree_rss())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    if workload == "resume":
        options["kind"] = "thread"
        cellpool.run(inc, range(size), **options)
    started = time.perf_counter()
    if workload == "tiny":
        cellpool.run(inc, range(size), **options)
    elif workload == "sleep":
        cellpool.run(nap, range(size), **options)
    elif workload == "stream":
        cellpool.run(inc, numbers(size), total=size, **options)
    else:
        results = cellpool.run(inc, range(size), **options)
        assert all(record.restored for record in results)
    wall = time.perf_counter() - started
    stop.set()
    watcher.join()
    return {"wall": wall, "peak_mib": peak[0] / 2**20}


def in_subprocess(workload: str, journal: bool, size: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", workload, str(int(journal)), str(size)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs=3)
    args = parser.parse_args()
    if args.child:
        workload, journal, size = args.child
        print(json.dumps(measure(workload, journal == "1", int(size))))
        return
    sizes = {"tiny": 20_000, "sleep": 1_000, "stream": 1_000_000}
    if args.quick:
        sizes = {"tiny": 2_000, "sleep": 100, "stream": 50_000}
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs; medians of {REPEATS}")
    print("| workload | journal off | journal on | ratio |\n| --- | --- | --- | --- |")
    verdicts = []
    for workload, size in sizes.items():
        runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        for _ in range(REPEATS):
            for journal in (False, True):
                runs[journal].append(in_subprocess(workload, journal, size))
        key = "peak_mib" if workload == "stream" else "wall"
        off = statistics.median(r[key] for r in runs[False])
        on = statistics.median(r[key] for r in runs[True])
        unit = "MiB peak" if key == "peak_mib" else "s"
        print(f"| {size:,} {workload} | {off:.3f} {unit} | {on:.3f} {unit} | {on / off:.2f}x |")
        bound = {"tiny": 1.5, "sleep": 1.05, "stream": 1.2}[workload]
        verdicts.append((f"{workload}: journal on within {bound}x of off", on / off <= bound))
    resume = in_subprocess("resume", True, 10_000 if args.quick else 100_000)
    print(f"| resume 100,000 restored, 0 to run | - | {resume['wall']:.3f} s | - |")
    verdicts.append(("resume under 2 s", resume["wall"] < 2))
    print("\nTargets:")
    for name, ok in verdicts:
        print(f"- {'PASS' if ok else 'FAIL'}: {name}")


if __name__ == "__main__":
    main()
