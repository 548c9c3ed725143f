"""Worker processes, each with its own duplex pipe, watched by one reader thread.

The reader waits on every worker's pipe and process sentinel at once
(``multiprocessing.connection.wait``) and only posts events: ``Completed`` for results,
``WorkerLost`` for a death. Everything else (routing, kills, reaping, replacements)
happens in the dispatcher thread, in ``send``, ``stop`` and ``settle``: two threads
reaping one process would race for its exit status.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import wait
from typing import Any

import cloudpickle

from .. import worker as child
from ..admission import Admission
from ..results import Failure
from ..tasks import Batch, Outcomes
from .base import Completed, Pool, Report, Running, WorkerLost

PREFETCH = 2  # batches queued per worker beyond the one it runs
KILL_GRACE = 1.0  # seconds between SIGTERM and SIGKILL
SHUTDOWN_GRACE = 5.0  # seconds an idle worker gets to exit before it is killed
START_FAILURES = 3  # workers in a row dying before they are ready: the pool is broken


def default_start_method() -> str:
    """forkserver where there is one (safe in a threaded kernel, fast), else spawn."""
    methods = multiprocessing.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else "spawn"


@contextlib.contextmanager
def _main_left_alone() -> Iterator[None]:
    """Keep multiprocessing from running the user's ``__main__`` again in a new worker.

    Workers get every function by value (cloudpickle), so they never need it; and a
    script without an ``if __name__ == "__main__"`` guard would start pools of its own.
    """
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = {name: main.__dict__[name] for name in ("__file__", "__spec__") if name in vars(main)}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.update(saved)


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"the worker process was killed by {name}"
    return f"the worker process exited with code {exitcode}"


class _Worker:
    """One worker process as the parent sees it."""

    def __init__(self, worker_id: str, process: Any, conn: Any, slot: child.Slot) -> None:
        self.id = worker_id
        self.process = process
        self.pid: int = process.pid
        self.conn = conn
        self.slot = slot
        self.in_flight: dict[int, Batch] = {}  # seq -> batch, in the order sent
        self.jobs: dict[int, None] = {}  # runs whose function this worker holds
        self.assigned = 0
        self.done = 0
        self.errors = 0
        # once killed: (status, reason, the task it was killed for or None for all)
        self.stopping: tuple[str, str, tuple[int, int] | None] | None = None
        self.kill_at: float | None = None
        self.retiring: str | None = None  # why it takes no more work and will be replaced
        self.ready = False  # set by the reader thread once the worker has started
        self.dead = False  # set by the reader thread
        self.eof = False  # set by the reader thread


class ProcessPool(Pool):
    """``workers`` processes; each batch goes to the least-loaded one."""

    kind = "process"

    def __init__(
        self,
        workers: int,
        report: Report,
        admission: Admission,
        *,
        start_method: str | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple = (),
        max_tasks_per_worker: int | None = None,
        threads_per_worker: int = 1,
    ) -> None:
        method = start_method or default_start_method()
        self._threads = threads_per_worker
        self._ctx = multiprocessing.get_context(method)
        if method == "forkserver":
            self._ctx.set_forkserver_preload(["cellpool.worker"])
        self._report = report
        self._admission = admission
        self._max_tasks = max_tasks_per_worker
        self._init = cloudpickle.dumps((initializer, initargs))
        self._jobs: dict[int, bytes] = {}
        self._workers: dict[str, _Worker] = {}
        self._serial = 0
        self._closing = False
        self._start_failures = 0
        self.broken: str | None = None
        self._wake_r, self._wake_w = os.pipe()
        for _ in range(workers):
            self._spawn()
        self._reader = threading.Thread(target=self._read, name="cellpool-reader", daemon=True)
        self._reader.start()

    def _spawn(self) -> None:
        self._serial += 1
        worker_id = f"p{self._serial}"
        parent_end, child_end = self._ctx.Pipe(duplex=True)
        slot, fd = child.Slot.create(self._threads)
        process = self._ctx.Process(
            target=child.main,
            args=(child_end, child.SharedFd(fd), self._init, self._threads),
            name=f"cellpool-{worker_id}",
            daemon=True,
        )
        try:
            with _main_left_alone():
                process.start()
        finally:
            child_end.close()
            os.close(fd)
        self._workers[worker_id] = _Worker(worker_id, process, parent_end, slot)
        os.write(self._wake_w, b"w")

    # -- the reader thread ---------------------------------------------------------

    def _read(self) -> None:
        # The reader touches a worker's pipe and process only while it is alive and the
        # pool open: the dispatcher closes them only after the reader saw the worker die
        # (it is then left out here) or, in shutdown, after this thread has ended.
        while not self._closing:
            workers = [w for w in list(self._workers.values()) if not w.dead]
            conns = {w.conn: w for w in workers if not w.eof}
            sentinels = {w.process.sentinel: w for w in workers}
            for ready in wait([*conns, *sentinels, self._wake_r]):
                if ready == self._wake_r:
                    os.read(self._wake_r, 4096)
                elif ready in conns:
                    self._receive(conns[ready])
                else:
                    self._buried(sentinels[ready])

    def _receive(self, worker: _Worker) -> None:
        try:
            message = pickle.loads(worker.conn.recv_bytes())
        except (EOFError, OSError):
            worker.eof = True
            return
        if message[0] == "ready":
            worker.ready = True
            return
        if message[0] == "out":
            _, stream, text = message
            lines = text.splitlines(keepends=True)
            target = sys.stderr if stream == "stderr" else sys.stdout
            target.write("".join(f"[{worker.id}] {line}" for line in lines))
            return
        _, seq, start, count, final, payload = message
        batch = worker.in_flight.get(seq)
        if batch is not None:
            self._report(
                Completed(batch, start, _unpickled(payload, count), worker.id, worker.pid, final)
            )

    def _buried(self, worker: _Worker) -> None:
        while not worker.eof and worker.conn.poll(0):
            self._receive(worker)  # results sent before it died still count
        worker.dead = True
        if not self._closing:
            self._report(WorkerLost(worker.id, worker.pid, "crashed", "", None))

    # -- the dispatcher's side -----------------------------------------------------

    def _available(self) -> list[_Worker]:
        """Workers that may take a batch now: alive, staying, under their limits."""
        if self._admission.machine_pause() is not None:
            return []
        return [
            w
            for w in self._workers.values()
            if not (w.dead or w.stopping or w.retiring)
            and len(w.in_flight) < PREFETCH * self._threads
            and self._admission.worker_pause(w.id) is None
        ]

    def pause_reasons(self) -> list[str]:
        machine = self._admission.machine_pause()
        if machine is not None:
            return [machine]
        paused = {w.id: self._admission.worker_pause(w.id) for w in self._workers.values()}
        return [f"{worker}: {reason}" for worker, reason in paused.items() if reason]

    def capacity(self) -> int:
        return sum(PREFETCH * self._threads - len(w.in_flight) for w in self._available())

    def _choose(self) -> _Worker:
        """The worker for the next batch: fewest tasks in flight, then most memory
        headroom (the one furthest from its limit, or the smallest)."""
        rss = {row["worker"]: row.get("rss") or 0 for row in self._admission.rows()}
        # A new sample may pause every worker between capacity() and here: then any
        # live worker takes this one batch.
        live = [w for w in self._workers.values() if not (w.dead or w.stopping or w.retiring)]
        return min(
            self._available() or live,
            key=lambda w: (
                sum(len(b.items) for b in w.in_flight.values()),
                len(w.in_flight),
                rss.get(w.id, 0),
            ),
        )

    def batch_limit(self) -> int | None:
        if self._max_tasks is None:
            return None
        return self._max_tasks - self._choose().assigned

    def send(self, batch: Batch) -> None:
        worker = self._choose()
        run_id = batch.run.serial
        job = None
        if run_id not in worker.jobs:
            job = self._job(batch)
            worker.jobs[run_id] = None
            if len(worker.jobs) > child.JOB_CACHE:
                del worker.jobs[next(iter(worker.jobs))]  # as the worker drops it
        worker.in_flight[batch.seq] = batch
        worker.assigned += len(batch.items)
        if self._max_tasks is not None and worker.assigned >= self._max_tasks:
            worker.retiring = f"reached max_tasks_per_worker={self._max_tasks}"
        with contextlib.suppress(OSError):  # it died: the reader reports it, the batch moves
            worker.conn.send_bytes(_message(batch, run_id, job))

    def _job(self, batch: Batch) -> bytes:
        """The run's function, pickled once for every worker."""
        run = batch.run
        data = self._jobs.get(run.serial)
        if data is None:
            try:
                data = cloudpickle.dumps((run.fn, run.star, run.retry_on, run.timeout))
            except Exception as error:
                stand_in = child.Unpicklable("function", error)
                data = cloudpickle.dumps((stand_in, run.star, run.retry_on, run.timeout))
            self._jobs[run.serial] = data
            if len(self._jobs) > child.JOB_CACHE:
                del self._jobs[next(iter(self._jobs))]
        return data

    def settle(self, event: Completed | WorkerLost) -> None:
        if isinstance(event, Completed):
            worker = self._workers.get(event.worker)
            if worker is None:
                return
            worker.done += len(event.outcomes.values)
            worker.errors += len(event.outcomes.failures)
            if event.final:
                worker.in_flight.pop(event.batch.seq, None)
                if worker.retiring and not worker.in_flight:
                    self._release(worker)
            return
        worker = self._workers.pop(event.worker)
        running = [
            (worker.in_flight[seq], position)
            for seq, position, _ in worker.slot.read()
            if seq in worker.in_flight
        ]
        exitcode = self._discard(worker)
        target = None
        if worker.stopping is not None:
            event.status, event.reason, target = worker.stopping
        elif worker.retiring and not worker.in_flight and exitcode == 0:
            event.status = "retired"
        else:
            event.reason = _exit_reason(exitcode)
        # A crash cannot be pinned on one of the tasks it was running: all end with it.
        event.culprits = [t for t in running if target is None or (t[0].seq, t[1]) == target]
        event.unfinished = [(batch, 0) for batch in worker.in_flight.values()]
        self._start_failures = 0 if worker.ready else self._start_failures + 1
        if self._start_failures >= START_FAILURES:
            self.broken = (
                f"{START_FAILURES} worker processes in a row died while starting: {event.reason}"
            )
        elif not self._closing:
            self._spawn()

    def _release(self, worker: _Worker) -> None:
        """Ask an idle worker to exit (it is replaced when the reader sees it go)."""
        with contextlib.suppress(OSError):
            worker.conn.send_bytes(pickle.dumps(None))

    def _discard(self, worker: _Worker) -> int | None:
        """Reap the worker's process (killing it if it lingers), free its resources,
        and return its exit code."""
        worker.process.join(SHUTDOWN_GRACE)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        exitcode = worker.process.exitcode
        worker.process.close()
        worker.conn.close()
        worker.slot.close()
        return exitcode

    def running(self) -> list[Running]:
        busy = []
        for worker in self._workers.values():
            if worker.dead or worker.stopping:
                continue
            for seq, position, started in worker.slot.read():
                batch = worker.in_flight.get(seq)
                if batch is not None:
                    busy.append(Running(worker.id, batch, position, started))
        return busy

    def stop(
        self, worker: str, status: str, reason: str, task: tuple[int, int] | None = None
    ) -> None:
        stopped = self._workers.get(worker)
        if stopped is None or stopped.stopping is not None or stopped.dead:
            return
        stopped.stopping = (status, reason, task)
        stopped.kill_at = time.monotonic() + KILL_GRACE
        stopped.process.terminate()

    def tick(self) -> None:
        now = time.monotonic()
        for worker in list(self._workers.values()):
            if worker.dead:
                continue
            if worker.kill_at is not None and now > worker.kill_at:
                worker.process.kill()
                worker.kill_at = None
            if worker.stopping is not None:
                continue
            action = self._admission.worker_action(worker.id, busy=bool(worker.in_flight))
            if action is None:
                continue
            verdict, reason = action
            if verdict == "kill":
                self.stop(worker.id, "crashed", reason)
            elif not worker.retiring:
                worker.retiring = reason
                if not worker.in_flight:
                    self._release(worker)

    def workers_info(self) -> list[dict[str, Any]]:
        rows = []
        now = time.time()
        for worker in list(self._workers.values()):
            running = [] if worker.dead else worker.slot.read()
            task = started = None
            for seq, position, since in running[:1]:  # the first thread's task
                batch = worker.in_flight.get(seq)
                if batch is not None:
                    task, started = batch.indices[position], since
            if worker.dead:
                state, reason = "dead", "the worker process died"
            elif worker.stopping is not None:
                state, reason = "dead", worker.stopping[1]
            elif worker.retiring:
                state, reason = "recycling", worker.retiring
            elif task is not None:
                state, reason = "busy", None
            else:
                paused = self._admission.machine_pause() or self._admission.worker_pause(worker.id)
                state, reason = ("idle", None) if paused is None else ("paused", paused)
            rows.append(
                {
                    "worker": worker.id,
                    "pid": worker.pid,
                    "state": state,
                    "task": task,
                    "task_seconds": now - started if started is not None else None,
                    "done": worker.done,
                    "errors": worker.errors,
                    "reason": reason,
                }
            )
        return rows

    def shutdown(self, wait: bool) -> None:
        self._closing = True
        os.write(self._wake_w, b"w")
        self._reader.join()
        for worker in self._workers.values():
            self._release(worker)
        for worker in self._workers.values():
            self._discard(worker)
        self._workers.clear()
        os.close(self._wake_r)
        os.close(self._wake_w)


def _message(batch: Batch, run_id: int, job: bytes | None) -> bytes:
    """The batch as bytes; inputs that cannot be pickled become error stand-ins."""
    try:
        items = cloudpickle.dumps(batch.items)
    except Exception:
        checked: list[Any] = []
        for item in batch.items:
            try:
                cloudpickle.dumps(item)
                checked.append(item)
            except Exception as error:
                checked.append(child.Unpicklable("arguments", error))
        items = cloudpickle.dumps(checked)
    return pickle.dumps((batch.seq, run_id, job, len(batch.items), items))


def _unpickled(payload: bytes, count: int) -> Outcomes:
    """A worker's outcomes; if this process cannot unpickle them, errors saying so."""
    try:
        outcomes: Outcomes = pickle.loads(payload)
    except Exception as error:
        now = time.time()
        failure = Failure(
            "PicklingError", f"could not unpickle the result: {type(error).__name__}: {error}"
        )
        return Outcomes(
            [None] * count,
            [now] * count,
            [now] * count,
            dict.fromkeys(range(count), (failure, False)),
        )
    for position, (failure, retryable) in outcomes.failures.items():
        if isinstance(failure.exception, bytes):
            outcomes.failures[position] = (
                failure._replace(exception=_exception(failure.exception)),
                retryable,
            )
    return outcomes


def _exception(data: bytes) -> BaseException | None:
    """A task's exception rebuilt here, or ``None`` if it cannot be."""
    try:
        return pickle.loads(data)
    except Exception:
        return None
