"""Process pools side by side: cellpool against ``ProcessPoolExecutor``, joblib and mpire.

Every workload runs on 2 worker processes:

* 20,000 ``x + 1`` tasks from a ``range``, cold: the time includes creating the pool,
  running and shutting it down. ``ProcessPoolExecutor.map(chunksize=500)`` with
  forkserver (the baseline, and cellpool's default start method on Linux) and with fork
  (its fastest configuration), joblib ``Parallel`` (loky, automatic batching), mpire
  ``WorkerPool.map`` (its default start method) and ``cellpool.Executor.run`` (records
  included).
* The same tasks, warm: one warm-up call on a started pool, then the best of 5 calls,
  for ``ProcessPoolExecutor`` (forkserver, chunksize=500) and cellpool (forkserver).
* 200 tasks of about 10 ms of pure-Python CPU each, cold: ``ProcessPoolExecutor``
  (chunksize=1), joblib, mpire and cellpool. The loop count is calibrated in the child,
  and the ideal is the same tasks' serial time, measured there before the pool starts,
  divided by the 2 workers. A row with no pool (the tasks dealt out to 2 bare forked
  processes) shows how near the ideal the machine itself gets: on a shared virtual
  machine, 2 busy processes can get much less than twice the CPU of one.
* Skewed durations, cold: 5,000 instant tasks then 200 tasks that sleep 20 ms, and the
  same in the other order, for ``ProcessPoolExecutor`` (fork and forkserver,
  chunksize=1), joblib, mpire and cellpool. The ideal is the sleeping alone, shared by
  the 2 workers (2 s): a batch sized on the instant tasks must not hold the slow ones.
* A 1,000,000-item generator through cellpool ``run``, cellpool ``map`` (consumed by a
  running sum) and ``ProcessPoolExecutor.map(chunksize=1000)``. Besides the wall time,
  a thread samples every 50 ms the memory of the whole process tree (the measuring
  process, the forkserver, the resource tracker and every worker) and keeps the peak,
  two ways: summed RSS, where a page the processes share counts once per process, and
  summed PSS, where it is split between them (the tree's true footprint; the target is
  judged on it). The measuring process's own peak (``VmHWM``, so Linux only) is
  reported too.

Every variant runs in a fresh subprocess of this script, so no variant inherits a warm
pool, a started forkserver or another's memory. The peers are imported inside the
variants: a worker that re-imports this script (forkserver, spawn) pays only for the
standard library. It prints a markdown table and the targets cellpool should meet. Run
it from the repository root::

    python benchmarks/processes.py          # full run, under a minute
    python benchmarks/processes.py --quick  # 2,000 / 40 / 100,000 items, for smoke testing
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tree_memory import TreePeak

WORKERS = 2
TINY_CHUNK = 500  # ProcessPoolExecutor's chunksize for the tiny tasks
CPU_CHUNK = 1  # and for the 10 ms tasks
STREAM_CHUNK = 1000  # and for the generator
WARM_REPEATS = 5
CPU_TASK_SECONDS = 0.010
CALIBRATION_LOOPS = 200_000
SAMPLE_SECONDS = 0.05  # how often the process tree's RSS is sampled
CHILD_TIMEOUT = 300.0  # seconds before a variant's subprocess is killed
MIB = 1024 * 1024


@dataclass(frozen=True)
class Sizes:
    tiny: int  # x + 1 tasks, cold and warm
    cpu: int  # 10 ms tasks
    stream: int  # generator items
    skew: tuple[int, int]  # instant tasks, 20 ms tasks


FULL = Sizes(tiny=20_000, cpu=200, stream=1_000_000, skew=(5_000, 200))
QUICK = Sizes(tiny=2_000, cpu=40, stream=100_000, skew=(500, 20))
SLOW_SECONDS = 0.020  # the slow tasks of the skewed workloads

Measured = dict[str, float]


# -- tasks: module-level, so that every pool can pickle them ------------------------


def inc(x: int) -> int:
    return x + 1


def nap(seconds: float) -> float:
    if seconds:
        time.sleep(seconds)
    return seconds


def spin(loops: int) -> int:
    """Pure-Python CPU work: ``loops`` additions."""
    total = 0
    for i in range(loops):
        total += i
    return total


# -- the pools, each created, used once and shut down --------------------------------


def ppe_list(
    fn: Callable[[int], int], items: Iterable[int], method: str, chunksize: int
) -> list[int]:
    with ProcessPoolExecutor(WORKERS, mp_context=get_context(method)) as pool:
        return list(pool.map(fn, items, chunksize=chunksize))


def joblib_list(fn: Callable[[int], int], items: Iterable[int]) -> list[int]:
    """Loky keeps its workers for the next call, so no shutdown is timed here."""
    from joblib import Parallel, delayed

    return Parallel(n_jobs=WORKERS)(delayed(fn)(x) for x in items)


def mpire_list(fn: Callable[[int], int], items: Iterable[int]) -> list[int]:
    from mpire import WorkerPool

    with WorkerPool(n_jobs=WORKERS) as pool:
        return pool.map(fn, items)


def cellpool_run(fn: Callable[[int], int], items: Iterable[int]) -> Any:
    import cellpool

    with cellpool.Executor("process", WORKERS, start_method="forkserver", progress="none") as pool:
        return pool.run(fn, items)


def cellpool_map_sum(fn: Callable[[int], int], items: Iterable[int]) -> int:
    import cellpool

    total = 0
    with cellpool.Executor("process", WORKERS, start_method="forkserver", progress="none") as pool:
        for value in pool.map(fn, items):
            total += value
    return total


def ppe_map_sum(fn: Callable[[int], int], items: Iterable[int]) -> int:
    total = 0
    with ProcessPoolExecutor(WORKERS, mp_context=get_context("forkserver")) as pool:
        for value in pool.map(fn, items, chunksize=STREAM_CHUNK):
            total += value
    return total


def bare_fork(fn: Callable[[int], int], items: Iterable[int]) -> None:
    """No pool: the items dealt out to forked processes that return nothing, to show how
    much parallel CPU the machine gives right now."""
    every = list(items)
    children = []
    for share in (every[i::WORKERS] for i in range(WORKERS)):
        pid = os.fork()
        if pid == 0:
            for x in share:
                fn(x)
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -- workload 1: tiny tasks, cold ----------------------------------------------------


def cold(pool_list: Callable[..., Any], sizes: Sizes) -> Measured:
    return {"wall": timed(lambda: pool_list(inc, range(sizes.tiny)))}


# -- workload 2: tiny tasks, warm ----------------------------------------------------


def best_call(call: Callable[[], Any]) -> float:
    """The shortest of ``WARM_REPEATS`` wall times of ``call()``, after one warm-up."""
    call()
    return min(timed(call) for _ in range(WARM_REPEATS))


def warm_ppe(sizes: Sizes) -> Measured:
    with ProcessPoolExecutor(WORKERS, mp_context=get_context("forkserver")) as pool:
        return {
            "wall": best_call(lambda: list(pool.map(inc, range(sizes.tiny), chunksize=TINY_CHUNK)))
        }


def warm_cellpool(sizes: Sizes) -> Measured:
    import cellpool

    with cellpool.Executor("process", WORKERS, start_method="forkserver", progress="none") as pool:
        return {"wall": best_call(lambda: pool.run(inc, range(sizes.tiny)))}


# -- workload 3: 10 ms CPU tasks, cold -----------------------------------------------


def calibrated_loops() -> int:
    """The ``spin`` loop count that takes ``CPU_TASK_SECONDS`` here (best of 5 trials)."""
    seconds = min(timed(lambda: spin(CALIBRATION_LOOPS)) for _ in range(5))
    return round(CALIBRATION_LOOPS * CPU_TASK_SECONDS / seconds)


def cpu(pool_list: Callable[..., Any], sizes: Sizes) -> Measured:
    items = [calibrated_loops()] * sizes.cpu
    serial = timed(lambda: [spin(loops) for loops in items])
    return {"wall": timed(lambda: pool_list(spin, items)), "ideal": serial / WORKERS}


# -- workload 4: skewed durations, cold ---------------------------------------------


def skewed(pool_list: Callable[..., Any], slow_first: bool, sizes: Sizes) -> Measured:
    instant, slow = sizes.skew
    parts = [[0.0] * instant, [SLOW_SECONDS] * slow]
    items = parts[1] + parts[0] if slow_first else parts[0] + parts[1]
    return {"wall": timed(lambda: pool_list(nap, items)), "ideal": slow * SLOW_SECONDS / WORKERS}


# -- workload 5: a long generator, with the process tree's memory --------------------


def own_peak_mib() -> float:
    """This process's peak RSS, in MiB, from ``VmHWM`` (which, unlike ``ru_maxrss``,
    does not carry the parent's peak over ``exec``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # the value is in kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def stream(consume: Callable[..., Any], sizes: Sizes) -> Measured:
    with TreePeak(pss=True, every=SAMPLE_SECONDS) as sampler:
        wall = timed(lambda: consume(inc, (i for i in range(sizes.stream))))
    return {
        "wall": wall,
        "tree_mib": sampler.peak / MIB,
        "tree_pss_mib": sampler.peak_pss / MIB,
        "own_mib": own_peak_mib(),
    }


# -- the variants ----------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    workload: str  # "cold", "warm", "cpu", "quick-first", "slow-first" or "stream"
    label: str
    measure: Callable[[Sizes], Measured]
    note: str = ""
    peer: str = ""  # the module to import before anything is timed


CASES: dict[str, Case] = {
    "cold-ppe-forkserver": Case(
        "cold",
        "PPE.map, forkserver, chunksize=500",
        partial(cold, partial(ppe_list, method="forkserver", chunksize=TINY_CHUNK)),
        "baseline",
    ),
    "cold-ppe-fork": Case(
        "cold",
        "PPE.map, fork, chunksize=500",
        partial(cold, partial(ppe_list, method="fork", chunksize=TINY_CHUNK)),
        "PPE's fastest configuration",
    ),
    "cold-joblib": Case(
        "cold",
        "joblib Parallel (loky)",
        partial(cold, joblib_list),
        "loky keeps its workers: no shutdown timed",
        peer="joblib",
    ),
    "cold-mpire": Case(
        "cold",
        "mpire WorkerPool.map",
        partial(cold, mpire_list),
        "fork, mpire's default",
        peer="mpire",
    ),
    "cold-cellpool": Case(
        "cold",
        "cellpool run, forkserver",
        partial(cold, cellpool_run),
        "records included",
        peer="cellpool.executor",
    ),
    "warm-ppe": Case("warm", "PPE.map, forkserver, chunksize=500", warm_ppe, "baseline"),
    "warm-cellpool": Case(
        "warm",
        "cellpool run, forkserver",
        warm_cellpool,
        "records included",
        peer="cellpool.executor",
    ),
    "cpu-bare-fork": Case(
        "cpu",
        "2 bare forked processes, no pool",
        partial(cpu, bare_fork),
        "the machine's own limit",
    ),
    "cpu-ppe": Case(
        "cpu",
        "PPE.map, forkserver, chunksize=1",
        partial(cpu, partial(ppe_list, method="forkserver", chunksize=CPU_CHUNK)),
    ),
    "cpu-joblib": Case("cpu", "joblib Parallel (loky)", partial(cpu, joblib_list), peer="joblib"),
    "cpu-mpire": Case("cpu", "mpire WorkerPool.map", partial(cpu, mpire_list), peer="mpire"),
    "cpu-cellpool": Case(
        "cpu", "cellpool run, forkserver", partial(cpu, cellpool_run), peer="cellpool.executor"
    ),
    **{
        f"{order}-{name}": Case(
            order, label, partial(skewed, pool_list, order == "slow-first"), peer=peer
        )
        for order in ("quick-first", "slow-first")
        for name, label, pool_list, peer in [
            (
                "ppe-fork",
                "PPE.map, fork, chunksize=1",
                partial(ppe_list, method="fork", chunksize=1),
                "",
            ),
            (
                "ppe-forkserver",
                "PPE.map, forkserver, chunksize=1",
                partial(ppe_list, method="forkserver", chunksize=1),
                "",
            ),
            ("joblib", "joblib Parallel (loky)", joblib_list, "joblib"),
            ("mpire", "mpire WorkerPool.map", mpire_list, "mpire"),
            ("cellpool", "cellpool run, forkserver", cellpool_run, "cellpool.executor"),
        ]
    },
    "stream-ppe": Case(
        "stream", "PPE.map, forkserver, chunksize=1000, summed", partial(stream, ppe_map_sum)
    ),
    "stream-cellpool-run": Case(
        "stream",
        "cellpool run, forkserver",
        partial(stream, cellpool_run),
        "records included",
        peer="cellpool.executor",
    ),
    "stream-cellpool-map": Case(
        "stream",
        "cellpool map, forkserver, summed",
        partial(stream, cellpool_map_sum),
        peer="cellpool.executor",
    ),
}
BASELINES = {"cold": "cold-ppe-forkserver", "warm": "warm-ppe", "stream": "stream-ppe"}


def child(name: str, sizes: Sizes) -> None:
    """Run one variant and print its measurements as a JSON line."""
    case = CASES[name]
    if case.peer:
        importlib.import_module(case.peer)
    print(json.dumps(case.measure(sizes)))


def in_subprocess(name: str, quick: bool) -> Measured | str:
    """A variant's measurements from a fresh subprocess, or why there are none."""
    command = [sys.executable, __file__, "--case", name, *(["--quick"] if quick else [])]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        return f"timed out after {CHILD_TIMEOUT:.0f} s"
    if done.returncode != 0:
        print(f"--- {name} failed:\n{done.stderr}", file=sys.stderr)
        return f"failed (exit {done.returncode})"
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- report ----------------------------------------------------------------------------


def workload_title(workload: str, sizes: Sizes) -> str:
    return {
        "cold": f"{sizes.tiny:,} `x + 1`, cold",
        "warm": f"{sizes.tiny:,} `x + 1`, warm, best of {WARM_REPEATS}",
        "cpu": f"{sizes.cpu:,} x 10 ms CPU, cold",
        "quick-first": f"{sizes.skew[0]:,} instant, then {sizes.skew[1]} x 20 ms sleep",
        "slow-first": f"{sizes.skew[1]} x 20 ms sleep, then {sizes.skew[0]:,} instant",
        "stream": f"{sizes.stream:,}-item generator",
    }[workload]


def row(name: str, results: dict[str, Measured | str], sizes: Sizes) -> list[str]:
    case = CASES[name]
    got = results[name]
    title = workload_title(case.workload, sizes)
    if isinstance(got, str):
        return [title, case.label, got, "-", case.note]
    notes = [case.note] if case.note else []
    if case.workload == "cpu":
        versus = f"{got['wall'] / got['ideal']:.2f}x ideal"
        notes.append(f"ideal {got['ideal']:.3f} s = serial / {WORKERS}")
    elif "ideal" in got:
        versus = f"{got['wall'] / got['ideal']:.2f}x ideal"
    else:
        base = results[BASELINES[case.workload]]
        versus = "-" if isinstance(base, str) else f"{got['wall'] / base['wall']:.2f}x"
    if case.workload == "stream":
        notes.append(
            f"tree peak PSS {got['tree_pss_mib']:.1f} MiB (summed RSS "
            f"{got['tree_mib']:.1f}), own VmHWM {got['own_mib']:.1f} MiB"
        )
    return [title, case.label, f"{got['wall']:.3f}", versus, "; ".join(notes)]


def markdown(rows: list[list[str]]) -> str:
    header = ["workload", "variant", "wall s", "ratio", "notes"]
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


Getter = Callable[..., float]  # (variant, key="wall") -> a measurement
Verdict = tuple[bool, str]  # met, and the numbers that decide it


def cold_target(get: Getter) -> Verdict:
    versus = get("cold-cellpool") / get("cold-ppe-forkserver")
    return versus <= 1.0, f"{versus:.2f}x PPE"


def warm_target(get: Getter) -> Verdict:
    versus = get("warm-cellpool") / get("warm-ppe")
    return versus <= 1.05, f"{versus:.2f}x PPE"


def cpu_target(get: Getter) -> Verdict:
    versus = get("cpu-cellpool") / get("cpu-cellpool", "ideal")
    return versus <= 1.1, f"{versus:.2f}x ideal"


def skew_target(order: str) -> Callable[[Getter], Verdict]:
    def check(get: Getter) -> Verdict:
        versus = get(f"{order}-cellpool") / get(f"{order}-cellpool", "ideal")
        joblib = get(f"{order}-joblib") / get(f"{order}-joblib", "ideal")
        return versus <= 1.15 and versus < joblib, f"{versus:.2f}x ideal, joblib {joblib:.2f}x"

    return check


def stream_target(get: Getter) -> Verdict:
    versus = get("stream-cellpool-map") / get("stream-ppe")
    peak = get("stream-cellpool-map", "tree_pss_mib")
    return versus <= 1.0 and peak < 100, f"{versus:.2f}x PPE, {peak:.1f} MiB PSS"


TARGETS: dict[str, Callable[[Getter], Verdict]] = {
    "cold tiny tasks: cellpool at most 1.0x PPE (forkserver, chunksize=500)": cold_target,
    "warm tiny tasks: cellpool at most 1.05x PPE (forkserver, chunksize=500)": warm_target,
    "10 ms CPU tasks: cellpool within 1.1x of ideal": cpu_target,
    "skewed, instant first: cellpool within 1.15x of ideal, faster than joblib": skew_target(
        "quick-first"
    ),
    "skewed, slow first: cellpool within 1.15x of ideal, faster than joblib": skew_target(
        "slow-first"
    ),
    "generator: cellpool map at most 1.0x PPE (chunksize=1000), tree peak PSS under 100 MiB": (
        stream_target
    ),
}


def target_lines(results: dict[str, Measured | str]) -> list[str]:
    """A PASS or FAIL line per target, with its numbers; NOT MEASURED if a variant failed."""

    def get(name: str, key: str = "wall") -> float:
        got = results[name]
        if isinstance(got, str):
            raise LookupError(f"{name} {got}")
        return got[key]

    lines = []
    for text, check in TARGETS.items():
        try:
            met, numbers = check(get)
        except LookupError as missing:
            lines.append(f"- NOT MEASURED: {text} ({missing})")
            continue
        lines.append(f"- {'PASS' if met else 'FAIL'}: {text} ({numbers})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller workloads")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    if args.case:
        child(args.case, sizes)
        return
    versions = ", ".join(
        f"{name} {metadata.version(name)}" for name in ("cellpool", "joblib", "mpire")
    )
    print(
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, {versions}; "
        f"{WORKERS} workers, one fresh process per variant\n"
    )
    results = {name: in_subprocess(name, args.quick) for name in CASES}
    print(markdown([row(name, results, sizes) for name in CASES]))
    print("\nTargets:", *target_lines(results), sep="\n")


if __name__ == "__main__":
    main()
