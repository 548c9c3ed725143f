"""psutil figures for workers: CPU %, memory, open files, threads."""

from __future__ import annotations

import time
from typing import Any

import psutil


class Sampler:
    """Adds resource figures to ``workers_info`` rows.

    CPU % is the CPU time a worker used since the previous sample over the wall time
    between them; a worker's first sample reads ``0.0``. Thread workers (rows with a
    ``native_id``) get their own thread's CPU time and the process's memory and fds.
    """

    def __init__(self) -> None:
        self._processes: dict[int, psutil.Process] = {}
        self._cpu_seen: dict[tuple[int, int | None], tuple[float, float]] = {}

    def _process(self, pid: int) -> psutil.Process:
        process = self._processes.get(pid)
        if process is None:
            process = self._processes[pid] = psutil.Process(pid)
        return process

    def _cpu_percent(self, key: tuple[int, int | None], cpu_seconds: float) -> float:
        now = time.monotonic()
        before = self._cpu_seen.get(key)
        self._cpu_seen[key] = (cpu_seconds, now)
        if before is None or now <= before[1]:
            return 0.0
        return 100.0 * (cpu_seconds - before[0]) / (now - before[1])

    def enrich(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        live = {row["pid"] for row in rows if row["pid"] is not None}
        for pid in set(self._processes) - live:
            del self._processes[pid]
        figures: dict[int, dict[str, Any]] = {}
        for pid in live:
            try:
                process = self._process(pid)
                with process.oneshot():
                    cpu = process.cpu_times()
                    figures[pid] = {
                        "cpu_seconds": cpu.user + cpu.system,
                        "rss": process.memory_info().rss,
                        "fds": process.num_fds(),
                        "threads": process.num_threads(),
                        "thread_cpu": {
                            t.id: t.user_time + t.system_time for t in process.threads()
                        },
                    }
            except psutil.Error:
                figures[pid] = {}
        for row in rows:
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
