"""psutil figures for workers and the machine, sampled a few times a second.

One ``Monitor`` thread per executor keeps the latest sample; ``workers_info()``, the live
views and (later) dispatch decisions all read that sample instead of asking psutil again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil

SAMPLE_SECONDS = 0.25
CPU_WINDOW = 0.2  # CPU times tick in 10 ms steps: shorter windows read 0% or 200%


@dataclass(frozen=True)
class Machine:
    """The machine's CPU use (percent of all cores; ``None`` until a first window has
    been measured) and memory, in bytes."""

    cpu_percent: float | None
    memory_available: int
    memory_total: int


@dataclass(frozen=True)
class Sample:
    """One sampling of every worker (rows as in ``Executor.workers_info``) and the machine."""

    workers: list[dict[str, Any]]
    machine: Machine


class Sampler:
    """Adds resource figures to ``workers_info`` rows.

    CPU % is the CPU time a worker used over at least the last ``CPU_WINDOW`` seconds
    of wall time; a worker's first sample reads ``0.0``. Thread workers (rows with a
    ``native_id``) get their own thread's CPU time and the process's memory and fds.
    """

    def __init__(self) -> None:
        self._processes: dict[int, psutil.Process] = {}
        # per worker: CPU seconds and time at the window's start, and the last figure
        self._cpu_seen: dict[tuple[int, int | None], tuple[float, float, float]] = {}

    def _process(self, pid: int) -> psutil.Process:
        process = self._processes.get(pid)
        if process is None:
            process = self._processes[pid] = psutil.Process(pid)
        return process

    def _cpu_percent(self, key: tuple[int, int | None], cpu_seconds: float) -> float:
        now = time.monotonic()
        before = self._cpu_seen.get(key)
        if before is None:
            self._cpu_seen[key] = (cpu_seconds, now, 0.0)
            return 0.0
        since_cpu, since, last = before
        if now - since < CPU_WINDOW:
            return last
        percent = 100.0 * (cpu_seconds - since_cpu) / (now - since)
        self._cpu_seen[key] = (cpu_seconds, now, percent)
        return percent

    def _figures(self, pid: int, threads: bool) -> dict[str, Any]:
        try:
            process = self._process(pid)
            with process.oneshot():
                cpu = process.cpu_times()
                figures = {
                    "cpu_seconds": cpu.user + cpu.system,
                    "rss": process.memory_info().rss,
                    "fds": process.num_fds(),
                    "threads": process.num_threads(),
                }
                if threads:
                    figures["thread_cpu"] = {
                        t.id: t.user_time + t.system_time for t in process.threads()
                    }
                return figures
        except psutil.Error:
            return {}

    def enrich(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Copies of ``rows`` with their figures; rows that bring their own (dask's) are
        kept as they are."""
        rows = [dict(row) for row in rows]  # the published rows are never written to
        own = [row for row in rows if "rss" not in row]
        live = {row["pid"] for row in own if row["pid"] is not None}
        for pid in set(self._processes) - live:
            del self._processes[pid]
        with_threads = {row["pid"] for row in own if row.get("native_id") is not None}
        figures = {pid: self._figures(pid, pid in with_threads) for pid in live}
        for row in own:
            proc = figures.get(row["pid"], {})
            native_id = row.get("native_id")
            if native_id is not None:
                cpu_seconds = proc.get("thread_cpu", {}).get(native_id)
            else:
                cpu_seconds = proc.get("cpu_seconds")
            row["cpu_seconds"] = cpu_seconds
            row["cpu_percent"] = (
                None
                if cpu_seconds is None
                else self._cpu_percent((row["pid"], native_id), cpu_seconds)
            )
            row["rss"] = proc.get("rss")
            row["fds"] = proc.get("fds")
            row["threads"] = proc.get("threads")
        return rows


def _busy_and_total(times: Any) -> tuple[float, float]:
    """Busy and total CPU seconds, as psutil counts them: on Linux the guest times are
    already inside user and nice."""
    total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
    idle = times.idle + getattr(times, "iowait", 0.0)
    return total - idle, total


class MachineSampler:
    """The machine's figures. CPU % is measured over at least ``CPU_WINDOW`` seconds
    from the machine's CPU times, kept here: ``psutil.cpu_percent(None)`` would read 0%
    on its first call and share its window with whatever else in the process calls it."""

    def __init__(self) -> None:
        self._since = _busy_and_total(psutil.cpu_times())  # at the window's start
        self._since_at = time.monotonic()
        self._percent: float | None = None

    def sample(self) -> Machine:
        now = time.monotonic()
        if now - self._since_at >= CPU_WINDOW:
            busy, total = _busy_and_total(psutil.cpu_times())
            if total > self._since[1]:
                share = (busy - self._since[0]) / (total - self._since[1])
                self._percent = 100.0 * max(0.0, min(1.0, share))
            self._since, self._since_at = (busy, total), now
        memory = psutil.virtual_memory()
        return Machine(self._percent, memory.available, memory.total)


class Monitor:
    """Samples ``rows()`` (a pool's ``workers_info``) and the machine in one thread."""

    def __init__(self, rows: Callable[[], list[dict[str, Any]]]) -> None:
        self._rows = rows
        self._sampler = Sampler()
        self._machine = MachineSampler()
        self._lock = threading.Lock()  # one sampling at a time: CPU % needs the order
        self._stop = threading.Event()
        self.latest = self.sample()
        self._thread = threading.Thread(target=self._watch, name="cellpool-monitor", daemon=True)
        self._thread.start()

    def sample(self) -> Sample:
        """Take a sample now (it also becomes the latest)."""
        with self._lock:
            self.latest = Sample(self._sampler.enrich(self._rows()), self._machine.sample())
            return self.latest

    def _watch(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self.sample()

    def stop(self, wait: bool = True) -> None:
        self._stop.set()
        if wait and self._thread is not threading.current_thread():
            self._thread.join()
