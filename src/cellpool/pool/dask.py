"""Batches as dask tasks on a dask.distributed cluster.

dask does the scheduling across machines; cellpool keeps its own window, batching and
records on top. Each batch is one dask task (``pure=False``, so identical calls are
never merged), which runs the batch's tasks in the dask worker and returns their
outcomes column-wise, with the worker's address. A dask worker that dies is replaced
by its nanny and its tasks are rescheduled by dask; a batch that keeps killing workers
ends ``"crashed"``. Worker figures come from the scheduler (``scheduler_info()``).
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

from ..shipping import pack, unpack
from ..tasks import Batch, Outcomes, call, call_async
from .base import Completed, Pool, Report, Running, WorkerGone

PREFETCH = 4  # batches handed to dask per worker thread
PACKED_RUNS = 8  # runs whose packed function is kept for their next batches
INFO_SECONDS = 1.0  # how often the scheduler's figures are asked for


def _dask_distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise ImportError(
            'kind="dask" needs dask.distributed: pip install "cellpool[dask]"'
        ) from None
    return distributed


def run_batch(fn: Any, star: bool, retry_on: tuple, timeout: float | None, items: list) -> tuple:
    """Runs in a dask worker: the batch's tasks, and where they ran.

    ``fn`` comes as ``shipping.pack`` bytes (the scheduler passes them on untouched),
    or as itself when those could not be made."""
    import inspect

    from distributed import get_worker

    if isinstance(fn, bytes):
        fn = unpack(fn)
    if inspect.iscoroutinefunction(fn):
        outcomes = call_async(fn, star, items, retry_on, timeout, lambda item: None)
    else:
        outcomes = Outcomes.empty()
        for item in items:
            outcomes.add(call(fn, item, star, retry_on))
    return get_worker().address, os.getpid(), outcomes


class DaskPool(Pool):
    """Batches submitted to a dask cluster: an existing ``Client``, a scheduler
    ``address``, or a ``LocalCluster`` of ``workers`` processes started (and closed)
    here."""

    kind = "dask"
    batch_seconds = 0.05  # a dask task costs about a millisecond or more: fewer, larger

    def __init__(
        self, workers: int | None, report: Report, address: str | None, client: Any
    ) -> None:
        distributed = _dask_distributed()
        self._report = report
        self._cluster = None
        if client is None and address is None:
            self._cluster = distributed.LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0",  # any free port: never a clash with another
                silence_logs=40,
            )
            address = self._cluster.scheduler_address
        self._own_client = client is None
        self._client = client or distributed.Client(address)
        # dask merges tasks with equal keys: batch numbers restart in every process, so
        # two notebooks on one scheduler need keys of their own
        self._key = f"cellpool-{uuid.uuid4().hex[:12]}"
        self._futures: dict[int, Any] = {}  # batch seq -> its dask future
        self._sent_at: dict[int, float] = {}
        self._batches: dict[int, Batch] = {}
        self._packed: dict[int, Any] = {}  # run serial -> its function, pickled once
        self._counts: dict[str, list[int]] = {}  # address -> [done, errors]
        self._pids: dict[str, int] = {}  # address -> the pid its batches reported
        self._info: dict[str, Any] = {}
        self._info_at = 0.0
        self._closed = False

    @property
    def size(self) -> int:
        """Worker threads in the cluster now."""
        workers = self._scheduler_workers()
        return max(1, sum(w.get("nthreads", 1) for w in workers.values()))

    def _scheduler_workers(self) -> dict[str, Any]:
        if time.monotonic() - self._info_at > INFO_SECONDS:
            self._info = self._client.scheduler_info(n_workers=-1).get("workers", {})
            self._info_at = time.monotonic()
        return self._info

    def capacity(self, prefetch: bool = True) -> int:
        return (PREFETCH if prefetch else 1) * self.size - len(self._futures)

    def send(self, batch: Batch) -> None:
        run = batch.run
        future = self._client.submit(
            run_batch,
            self._fn(run),
            run.star,
            run.retry_on,
            run.timeout if run.is_async else None,
            batch.items,
            pure=False,
            key=f"{self._key}-{batch.seq}",
        )
        self._futures[batch.seq] = future
        self._sent_at[batch.seq] = time.monotonic()
        self._batches[batch.seq] = batch
        future.add_done_callback(lambda done, batch=batch: self._done(batch, done))

    def _fn(self, run: Any) -> Any:
        """The run's function as it travels, pickled once: in the worker, its tracebacks
        name its own files and show its lines, cells' included."""
        fn = self._packed.get(run.serial)
        if fn is None:
            try:
                fn = pack(run.fn)
            except Exception:
                fn = run.fn  # dask says why it cannot pickle it, as before
            self._packed[run.serial] = fn
            if len(self._packed) > PACKED_RUNS:
                del self._packed[next(iter(self._packed))]
        return fn

    def _done(self, batch: Batch, future: Any) -> None:
        """Runs on the client's thread: turn a finished dask task into an event."""
        status = future.status
        if status == "finished":
            address, pid, outcomes = future.result()
            self._report(Completed(batch, 0, outcomes, address, pid))
        elif status == "error":
            reason = f"dask could not run the batch: {future.exception()!r}"
            everything = [(batch, position) for position in range(len(batch.items))]
            self._report(WorkerGone("dask", 0, reason, True, everything))
        elif status != "cancelled":  # a cancelled future was reported by stop()
            # "lost": the worker holding its result died, and dask computes it again.
            # The callback fires once, so wait for that second completion.
            future.add_done_callback(lambda again: self._done(batch, again))

    def settle(self, event: Completed | WorkerGone) -> None:
        seq = event.batch.seq if isinstance(event, Completed) else event.running[0][0].seq
        self._futures.pop(seq, None)
        self._sent_at.pop(seq, None)
        self._batches.pop(seq, None)
        if isinstance(event, Completed):
            self._pids[event.worker] = event.pid
            counts = self._counts.setdefault(event.worker, [0, 0])
            counts[0] += len(event.outcomes.values)
            counts[1] += len(event.outcomes.failures)

    def running(self) -> list[Running]:
        # dask does not say which task of a batch runs: a batch counts from its hand-over
        return [
            Running(f"batch-{seq}", self._batches[seq], 0, self._sent_at[seq])
            for seq in list(self._futures)
            if seq in self._batches
        ]

    def stop(self, worker: str, why: str, task: tuple[int, int] | None = None) -> bool:
        seq = int(worker.removeprefix("batch-"))
        future = self._futures.get(seq)
        batch = self._batches.get(seq)
        if future is None or batch is None or future.status == "cancelled":
            return False
        future.cancel()
        everything = [(batch, position) for position in range(len(batch.items))]
        self._report(WorkerGone(worker, 0, why, True, everything))
        return True

    def workers_info(self) -> list[dict[str, Any]]:
        if self._closed:
            return []
        rows = []
        for address, info in sorted(self._scheduler_workers().items()):
            metrics = info.get("metrics", {})
            executing = metrics.get("task_counts", {}).get("executing", 0)
            paused = info.get("status") == "paused"
            done, errors = self._counts.get(address, [0, 0])
            rows.append(
                {
                    "worker": address,
                    "pid": self._pids.get(address),
                    "state": "paused" if paused else "busy" if executing else "idle",
                    "task": None,
                    "task_seconds": None,
                    "done": done,
                    "errors": errors,
                    "cpu_percent": metrics.get("cpu"),
                    "rss": metrics.get("memory"),
                    "fds": metrics.get("num_fds"),
                    "threads": info.get("nthreads"),
                    "reason": "the dask worker paused itself (memory)" if paused else None,
                }
            )
        return rows

    def close(self, cancel_running: bool) -> None:
        for future in self._futures.values():
            future.cancel()
        if self._own_client:
            self._client.close()
        if self._cluster is not None:
            self._cluster.close()
        self._closed = True

    def closed(self) -> bool:
        return self._closed
