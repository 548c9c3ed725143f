"""Worker processes, each with its own duplex pipe.

Data flow::

    dispatcher --send()--> sender thread (one per worker: pickles, writes the pipe)
                                 |
                                 v
                          worker process (worker.py) --writes--> shared Slot
                                 |                                   |
                                 v                                   v
    dispatcher <--facts-- reader thread (reads every pipe,     dispatcher reads it for
                          reaps every process)                timeouts and crashes

Ownership: the dispatcher thread calls every ``ProcessPool`` method and owns the
``_Worker`` records (their state, batches in flight, counters). The reader thread owns
reading the pipes and reaping: it waits on every pipe and process sentinel at once
(``multiprocessing.connection.wait``), unpickles results, kills the process group of a
worker that died (processes its tasks started) and reaps it, then posts what it saw.
Each sender thread owns the writing end of its worker's pipe, so a full pipe blocks
only that sender. A pipe is closed by the dispatcher once the reader has reported the
worker gone and its sender has ended.
"""

from __future__ import annotations

import contextlib
import enum
import multiprocessing
import os
import pickle
import queue
import signal
import sys
import threading
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import TYPE_CHECKING, Any

import cloudpickle

from .. import hooks
from .. import worker as child
from ..admission import Admission
from ..results import Failure
from ..shipping import ship
from ..tasks import Batch, Outcomes
from .base import (
    Changed,
    Completed,
    Phase,
    Pool,
    PoolBroken,
    Report,
    Returned,
    Running,
    WorkerGone,
    WorkerReady,
)

if TYPE_CHECKING:
    from ..runs import Run

PREFETCH = 2  # batches queued per worker thread beyond the one it runs
KILL_GRACE = 1.0  # seconds between SIGTERM and SIGKILL
SHUTDOWN_GRACE = 5.0  # seconds an idle worker gets to exit at shutdown before it is killed
PRELOAD = ["cellpool.worker", "cellpool.shipping"]


def default_start_method() -> str:
    """forkserver where there is one (safe in a threaded kernel, fast), else spawn."""
    methods = multiprocessing.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else "spawn"


_hiding_lock = threading.Lock()
_hiding: list[dict[str, Any]] = []  # what __main__ had, while workers start (a stack)


@contextlib.contextmanager
def _main_left_alone() -> Iterator[None]:
    """Keep multiprocessing from running the user's ``__main__`` again in a new worker.

    Workers get every function by value (cloudpickle), so they never need it; and a
    script without an ``if __name__ == "__main__"`` guard would start pools of its own.
    Workers start on several threads at once: the first to start hides, the last to
    finish restores.
    """
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    with _hiding_lock:
        if not _hiding:
            names = ("__file__", "__spec__")
            saved = {name: main.__dict__[name] for name in names if name in vars(main)}
            main.__dict__.pop("__file__", None)
            main.__spec__ = None
        else:
            saved = _hiding[0]
        _hiding.append(saved)
    try:
        yield
    finally:
        with _hiding_lock:
            _hiding.pop()
            if not _hiding:
                main.__dict__.update(saved)


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"the worker process was killed by {name}"
    return f"the worker process exited with code {exitcode}"


def _signal_group(pid: int, sig: int) -> None:
    """Signal the worker's process group (it and what its tasks started)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if hasattr(os, "killpg"):
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


class WorkerState(enum.Enum):
    STARTING = "starting"  # the process is starting
    INITIALIZING = "initializing"  # it runs the initializer
    READY = "ready"  # it takes work
    RETIRING = "retiring"  # it takes no more work and exits after what it holds
    STOPPING = "stopping"  # it is being killed
    GONE = "gone"  # the reader reported its exit


# Events of the pool's own threads, turned into facts by ``handle``.
@dataclass(slots=True)
class _Said:
    worker: str
    message: tuple


@dataclass(slots=True)
class _Outcomes:
    worker: str
    seq: int
    start: int
    outcomes: Outcomes
    final: bool


@dataclass(slots=True)
class _Started:
    worker: str
    process: Any
    conn: Any
    slot: child.Slot


@dataclass(slots=True)
class _Exited:
    worker: str
    exitcode: int | None
    why: str | None = None  # set when the process could not even start


class _Worker:
    """One worker process as the dispatcher sees it."""

    def __init__(self, worker_id: str) -> None:
        self.id = worker_id
        self.process: Any = None  # these four are set once its sender has started it
        self.pid: int | None = None
        self.conn: Any = None
        self.slot: child.Slot | None = None
        self.state = WorkerState.STARTING
        self.initializing_since: float | None = None  # when it began its initializer
        self.outbox: queue.SimpleQueue[bytes | Batch | None] = queue.SimpleQueue()
        self.sender: threading.Thread | None = None
        self.in_flight: dict[int, Batch] = {}  # seq -> batch, in the order sent
        self.jobs: dict[int, None] = {}  # runs whose function this worker holds
        self.assigned = 0
        self.done = 0
        self.errors = 0
        self.ready = False  # it has run the initializer (whatever its state since)
        self.why: str | None = None  # why it is retiring or stopping
        self.kill_at: float | None = None  # when SIGTERM turns into SIGKILL


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
        self._size = workers
        self._threads = threads_per_worker
        self._ctx = multiprocessing.get_context(method)
        if method == "forkserver":
            # what a worker's arguments and first job need to unpickle, loaded once in
            # the forkserver rather than in every worker it forks
            self._ctx.set_forkserver_preload(PRELOAD)
        self._report = report
        self._admission = admission
        self._max_tasks = max_tasks_per_worker
        self._boot = child.Boot(initializer, initargs)
        self._jobs: dict[int, bytes] = {}  # run serial -> its pickled function
        self._jobs_lock = threading.Lock()  # the senders share _jobs
        self._workers: dict[str, _Worker] = {}
        self._leaving: list[_Worker] = []  # gone, waiting for their sender to end
        self._paused: dict[str, str] = {}  # this tick's pauses, from one sample
        self._machine_pause: str | None = None
        self._serial = 0
        self._closing = False
        self._close_deadline: float | None = None
        self._watch_lock = threading.Lock()
        self._watched: dict[str, tuple[Any, Any]] = {}  # reader's: id -> (conn, process)
        self._unwatched = 0  # workers being started, not yet watched
        self._wake_r, self._wake_w = os.pipe()
        self._reader = threading.Thread(target=self._read, name="cellpool-reader", daemon=True)
        self._reader.start()
        for _ in range(workers):
            self._spawn()

    def _spawn(self) -> None:
        """A new worker: its sender thread starts the process (which can take a while,
        and pickles the initializer's arguments) and then writes its batches."""
        self._serial += 1
        worker = _Worker(f"p{self._serial}")
        worker.sender = threading.Thread(
            target=self._start_and_send,
            args=(worker,),
            name=f"cellpool-sender-{worker.id}",
            daemon=True,
        )
        self._workers[worker.id] = worker
        with self._watch_lock:
            self._unwatched += 1
        worker.sender.start()

    def _start_and_send(self, worker: _Worker) -> None:
        parent_end, child_end = self._ctx.Pipe(duplex=True)
        slot = child.Slot.create(self._ctx, self._threads)
        process = self._ctx.Process(
            target=child.main,
            args=(child_end, slot.shared, self._boot, self._threads),
            name=f"cellpool-{worker.id}",
            daemon=True,
        )
        try:
            with _main_left_alone():
                process.start()
        except BaseException as error:
            parent_end.close()
            slot.close()
            self._report(_Exited(worker.id, None, f"the worker could not start: {error!r}"))
            with self._watch_lock:
                self._unwatched -= 1
            return
        finally:
            child_end.close()
        self._report(_Started(worker.id, process, parent_end, slot))
        with self._watch_lock:
            self._unwatched -= 1
            self._watched[worker.id] = (parent_end, process)
        os.write(self._wake_w, b"w")
        self._send_loop(worker, parent_end)

    # -- the reader thread ---------------------------------------------------------

    def _read(self) -> None:
        while True:
            with self._watch_lock:
                watched = dict(self._watched)
                if self._closing and not watched and not self._unwatched:
                    self._report(Changed())  # the pool may have closed
                    return
            conns = {conn: worker for worker, (conn, _) in watched.items()}
            sentinels = {p.sentinel: worker for worker, (_, p) in watched.items()}
            for ready in wait([*conns, *sentinels, self._wake_r]):
                if ready == self._wake_r:
                    os.read(self._wake_r, 4096)
                elif ready in conns:
                    self._receive(conns[ready], ready)
                elif ready in sentinels:
                    self._bury(sentinels[ready], *watched[sentinels[ready]])

    def _receive(self, worker: str, conn: Any) -> bool:
        try:
            message = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return False
        if message[0] == "out":
            _, stream, text = message
            lines = text.splitlines(keepends=True)
            target = sys.stderr if stream == "stderr" else sys.stdout
            target.write("".join(f"[{worker}] {line}" for line in lines))
        elif message[0] == "done":
            _, seq, start, count, final, payload = message
            self._report(_Outcomes(worker, seq, start, _unpickled(payload, count), final))
        else:
            self._report(_Said(worker, message))
        return True

    def _bury(self, worker: str, conn: Any, process: Any) -> None:
        while conn.poll(0) and self._receive(worker, conn):
            pass  # results sent before it died still count
        _signal_group(process.pid, signal.SIGKILL)  # what its tasks started dies with it
        process.join()
        with self._watch_lock:
            del self._watched[worker]
        self._report(_Exited(worker, process.exitcode))

    # -- the sender threads --------------------------------------------------------

    def _send_loop(self, worker: _Worker, conn: Any) -> None:
        while (batch := worker.outbox.get()) is not None:
            if isinstance(batch, bytes):
                data = batch
            else:
                job = worker.outbox.get()
                data = _message(batch, self._job(batch) if job else None)
                hooks.at("process.batch-sending")  # the dispatcher may recall it meanwhile
            del batch
            with contextlib.suppress(OSError):  # it died: the reader reports it
                conn.send_bytes(data)
        self._report(Changed())  # the pool may have closed

    def _job(self, batch: Batch) -> bytes:
        """The run's function, pickled once for every worker."""
        run = batch.run
        with self._jobs_lock:
            data = self._jobs.get(run.serial)
        if data is None:
            try:
                data = cloudpickle.dumps((ship(run.fn), *_job_options(run)))
            except Exception as error:
                stand_in = child.Unpicklable("function", error)
                data = cloudpickle.dumps((stand_in, *_job_options(run)))
            with self._jobs_lock:
                self._jobs[run.serial] = data
                if len(self._jobs) > child.JOB_CACHE:
                    del self._jobs[next(iter(self._jobs))]
        return data

    # -- the dispatcher's side -----------------------------------------------------

    def handle(self, event: Any) -> list[Any]:
        worker = self._workers.get(event.worker)
        if worker is None:
            return []
        if isinstance(event, _Outcomes):
            batch = worker.in_flight.get(event.seq)
            if batch is None:
                return []
            return [
                Completed(batch, event.start, event.outcomes, worker.id, worker.pid, event.final)
            ]
        if isinstance(event, _Started):
            worker.process, worker.pid = event.process, event.process.pid
            worker.conn, worker.slot = event.conn, event.slot
            if worker.state is WorkerState.STOPPING:  # stopped while it started
                _signal_group(worker.pid, signal.SIGKILL)
            return []
        if isinstance(event, _Exited):
            return [self._gone(worker, event.exitcode, event.why)]
        said = event.message[0]
        # The facts hold whatever the worker's state: it may be retiring (it was given
        # its last tasks while starting) or stopping already.
        if said == "hello":
            worker.initializing_since = time.monotonic()
            if worker.state is WorkerState.STARTING:
                worker.state = WorkerState.INITIALIZING
        elif said == "ready":
            worker.ready = True
            if worker.state is WorkerState.INITIALIZING:
                worker.state = WorkerState.READY
            return [WorkerReady(worker.id)]
        elif said == "init-failed":
            return [PoolBroken(f"the initializer failed: {event.message[1]}")]
        elif said == "returned":
            _, seq, first, final = event.message
            batch = worker.in_flight.get(seq)
            return [] if batch is None else [Returned(batch, first, final)]
        return []

    def _gone(self, worker: _Worker, exitcode: int | None, why: str | None) -> WorkerGone:
        """What the worker left behind, read from its slot now that it is dead."""
        retired = worker.state is WorkerState.RETIRING and exitcode == 0
        if why is None:
            asked = worker.state in (WorkerState.STOPPING, WorkerState.RETIRING)
            why = worker.why if asked and worker.why else _exit_reason(exitcode)
        running, batch_phase = [], None
        if worker.slot is not None:
            running = [
                (worker.in_flight[seq], position)
                for seq, position, _ in worker.slot.read()
                if seq in worker.in_flight
            ]
            for phase, seq in worker.slot.phases():
                if seq in worker.in_flight and not running:
                    batch_phase = (worker.in_flight[seq], Phase(phase))
        unreported = [(batch, 0) for batch in worker.in_flight.values()]
        return WorkerGone(
            worker.id, worker.pid or 0, why, worker.ready, running, batch_phase, unreported, retired
        )

    def settle(self, event: Completed | WorkerGone | Returned) -> None:
        if isinstance(event, Returned):
            worker = self._holder(event.batch)
            if worker is not None and event.final:
                self._batch_ended(worker, event.batch)
            return
        worker = self._workers.get(event.worker)
        if worker is None:
            return
        if isinstance(event, Completed):
            worker.done += len(event.outcomes.values)
            worker.errors += len(event.outcomes.failures)
            if event.final:
                self._batch_ended(worker, event.batch)
            return
        worker.state = WorkerState.GONE
        del self._workers[worker.id]
        worker.outbox.put(None)
        self._leaving.append(worker)
        if not self._closing:
            self._spawn()

    def _batch_ended(self, worker: _Worker, batch: Batch) -> None:
        worker.in_flight.pop(batch.seq, None)
        if not worker.in_flight and (worker.state is WorkerState.RETIRING or self._closing):
            self._release(worker)

    def _holder(self, batch: Batch) -> _Worker | None:
        """The worker ``batch`` was sent to, if it is still there."""
        for worker in self._workers.values():
            if batch.seq in worker.in_flight:
                return worker
        return None

    def give_back(self, batch: Batch) -> bool:
        worker = self._holder(batch)
        if worker is None or worker.slot is None or worker.state is WorkerState.STOPPING:
            return False
        worker.slot.recall(max(worker.in_flight))
        return True

    def _release(self, worker: _Worker) -> None:
        """Ask an idle worker to exit (it is replaced when the reader sees it go)."""
        if worker.state is not WorkerState.STOPPING:
            worker.state = WorkerState.RETIRING
            worker.outbox.put(pickle.dumps(None))

    def _takers(self) -> list[_Worker]:
        """Workers that may take a batch now: ready, under their limits, not full."""
        if self._machine_pause is not None or self._closing:
            return []
        # A starting worker takes batches too: they wait in its pipe, as in the standard
        # library's call queue, and run once its initializer has.
        taking = (WorkerState.STARTING, WorkerState.INITIALIZING, WorkerState.READY)
        return [w for w in self._workers.values() if w.state in taking and w.id not in self._paused]

    def capacity(self, prefetch: bool = True, stream: bool = False) -> int:
        # Under a memory or fd limit a batch is sent only as a thread frees, so the
        # limits are checked just before it starts, not a prefetch earlier.
        limits = self._admission.limits
        limited = limits.memory_limit is not None or limits.fd_limit is not None
        ahead = PREFETCH + stream if prefetch and not limited else 1
        room = ahead * self._threads
        return sum(max(0, room - len(w.in_flight)) for w in self._takers())

    def pause_reasons(self) -> list[str]:
        if self._machine_pause is not None:
            return [self._machine_pause]
        return [f"{worker}: {reason}" for worker, reason in self._paused.items()]

    def _choose(self) -> _Worker:
        """The worker for the next batch: fewest tasks in flight, then most memory
        headroom (the one furthest from its limit, or the smallest)."""
        rss = {row["worker"]: row.get("rss") or 0 for row in self._admission.rows()}
        return min(
            self._takers(),
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
        new_job = run_id not in worker.jobs
        if new_job:
            worker.jobs[run_id] = None
            if len(worker.jobs) > child.JOB_CACHE:
                del worker.jobs[next(iter(worker.jobs))]  # as the worker drops it
        worker.in_flight[batch.seq] = batch
        worker.assigned += len(batch.items)
        if self._max_tasks is not None and worker.assigned >= self._max_tasks:
            worker.state = WorkerState.RETIRING
            worker.why = f"reached max_tasks_per_worker={self._max_tasks}"
        worker.outbox.put(batch)
        worker.outbox.put(new_job)  # type: ignore[arg-type]

    def running(self) -> list[Running]:
        busy = []
        for worker in self._workers.values():
            if worker.state is WorkerState.STOPPING or worker.slot is None:
                continue
            for seq, position, started in worker.slot.read():
                batch = worker.in_flight.get(seq)
                if batch is not None:
                    busy.append(Running(worker.id, batch, position, started))
        return busy

    def starting(self) -> list[tuple[str, float]]:
        return [
            (w.id, w.initializing_since)
            for w in self._workers.values()
            if w.initializing_since is not None and not w.ready
        ]

    def stop(self, worker: str, why: str, task: tuple[int, int] | None = None) -> bool:
        stopped = self._workers.get(worker)
        if stopped is None or stopped.state is WorkerState.STOPPING:
            return False
        stopped.state, stopped.why = WorkerState.STOPPING, why
        stopped.kill_at = time.monotonic() + KILL_GRACE
        if stopped.pid is not None:  # else it is killed as soon as it has started
            _signal_group(stopped.pid, signal.SIGTERM)
        return True

    def tick(self) -> None:
        now = time.monotonic()
        self._machine_pause = self._admission.machine_pause()
        self._paused = {}
        for worker in self._workers.values():
            reason = self._admission.worker_pause(worker.id)
            if reason is not None:
                self._paused[worker.id] = reason
        for worker in list(self._workers.values()):
            if worker.kill_at is not None and now > worker.kill_at and worker.pid is not None:
                _signal_group(worker.pid, signal.SIGKILL)
                worker.kill_at = None
            late = self._close_deadline is not None and now > self._close_deadline
            if late and not worker.in_flight:
                self.stop(worker.id, "it did not exit at shutdown")
            if worker.state not in (WorkerState.READY, WorkerState.RETIRING):
                continue
            action = self._admission.worker_action(worker.id, busy=bool(worker.in_flight))
            if action is None:
                continue
            verdict, reason = action
            if verdict == "kill":  # a recycling worker too: it may grow on past the limit
                self.stop(worker.id, reason)
            elif worker.state is WorkerState.READY:
                worker.state, worker.why = WorkerState.RETIRING, reason
                if not worker.in_flight:
                    self._release(worker)
        for worker in [w for w in self._leaving if not (w.sender and w.sender.is_alive())]:
            self._leaving.remove(worker)
            if worker.conn is not None:
                worker.conn.close()
                worker.slot.close()  # type: ignore[union-attr]
                hooks.at("process.worker-closed")  # its shared memory is gone

    def workers_info(self) -> list[dict[str, Any]]:
        rows = []
        now = time.monotonic()
        for worker in self._workers.values():
            task = started = None
            running = [] if worker.slot is None else worker.slot.read()
            for seq, position, since in running[:1]:  # the first thread's task
                batch = worker.in_flight.get(seq)
                if batch is not None:
                    task, started = batch.indices[position], since
            reason = worker.why
            if worker.state is WorkerState.STOPPING:
                state = "dead"
            elif worker.state is WorkerState.RETIRING:
                state = "recycling"
            elif worker.state in (WorkerState.STARTING, WorkerState.INITIALIZING):
                state = "starting"
            elif task is not None:
                state, reason = "busy", None
            else:
                paused = self._machine_pause or self._paused.get(worker.id)
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

    def close(self, cancel_running: bool) -> None:
        if self._closing:
            return
        self._closing = True
        self._close_deadline = time.monotonic() + SHUTDOWN_GRACE
        for worker in list(self._workers.values()):
            if cancel_running and worker.in_flight:
                self.stop(worker.id, "the executor shut down")
            elif not worker.in_flight:
                self._release(worker)
        os.write(self._wake_w, b"w")

    def closed(self) -> bool:
        if self._workers or self._leaving or self._reader.is_alive():
            if not self._workers:
                os.write(self._wake_w, b"w")  # let the reader see it has nothing to watch
            return False
        if self._wake_r >= 0:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1
        return True

    def abandon(self) -> None:
        for worker in list(self._workers.values()):
            self.stop(worker.id, "the executor was abandoned")
            if worker.pid is not None:
                _signal_group(worker.pid, signal.SIGKILL)


def _job_options(run: Run) -> tuple[bool, tuple, float | None, int]:
    """What a worker needs besides the function to run a run's tasks."""
    return run.star, run.retry_on, run.timeout, run.concurrency


def _message(batch: Batch, job: bytes | None) -> bytes:
    """The batch as bytes; inputs that cannot be pickled become error stand-ins."""
    stand_ins = False
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
                stand_ins = True
        items = cloudpickle.dumps(checked)
    header = (batch.seq, batch.run.serial, job, len(batch.items), stand_ins)
    return pickle.dumps((*header, items))


def _unpickled(payload: bytes, count: int) -> Outcomes:
    """A worker's outcomes; if this process cannot unpickle them, errors saying so."""
    try:
        outcomes: Outcomes = pickle.loads(payload)
    except BaseException as error:  # even SystemExit: it is the result's, not ours
        finished = time.monotonic()
        failure = Failure(
            "PicklingError", f"could not unpickle the result: {type(error).__name__}: {error}"
        )
        times = array("d", [finished]) * count
        return Outcomes([None] * count, times, times, dict.fromkeys(range(count), (failure, False)))
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
    except BaseException:
        return None
