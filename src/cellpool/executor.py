"""``Executor`` and ``Job``: the public face of cellpool."""

from __future__ import annotations

import contextlib
import functools
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent import futures
from typing import Any, Protocol

from . import hooks
from . import options as check
from .admission import Admission, Limits
from .dispatch import AddRun, CancelRun, Dispatcher, Shutdown, Wake, interpreter_exiting
from .journaled import RERUN, JournaledInput, JournalSink, open_run
from .monitor import Monitor
from .pool.base import Pool
from .pool.dask import DaskPool
from .pool.process import ProcessPool
from .pool.thread import ThreadPool
from .results import Results
from .runs import PLAIN_SEQUENCES, Run, SequenceInput, StopMode
from .sinks import FutureSink, OrderedSink, Raised, RecordSink
from .view import View, ViewSource, WorkerBoard, no_events, normalize_progress, run_view
from .view.kernel import interrupted

POLL = 0.05  # how often a blocking wait lets widget events and signals through
SHOW_AFTER = 0.5  # a blocking run shows its live view ("auto") once it lasts this long
INTERRUPT_GRACE = 2.0  # how long Ctrl-C waits for the stop before re-raising
# Default max_pending per worker. A batch holds about 10 ms of measured work and each
# worker has at most two, so only microsecond tasks come near this cap; it lets them
# travel in batches big enough to cost about what a plain loop does.
PENDING_PER_WORKER = 4096
DEFAULT_CONCURRENCY = 32  # async def tasks in flight per worker thread
RUN_OPTIONS = (
    "timeout",
    "retries",
    "retry_on",
    "max_pending",
    "progress",
    "total",
    "label",
    "journal",
    "key",
    "rerun",
    "journal_keep_code",
)


class Watched(Protocol):
    """What a ``Job`` waits for: a run, or a pipeline's flow."""

    finished: threading.Event  # set once every input has its record
    created: float  # when it began, on the monotonic clock


class Job:
    """A ``start``-ed run going on in the background.

    Await it, or call ``result()``; ``partial()`` gives the records finished so far.
    """

    def __init__(
        self,
        run: Watched,
        sink: Any,
        progress: str,
        label: str,
        background: bool,
        new_view: Callable[[str, bool, Callable[[], Any]], View | None],
        stop: Callable[[], bool],
    ) -> None:
        self._run = run  # what ends: its ``finished`` event, ``created`` time
        self._sink = sink  # its ``future`` (the Results) and ``snapshot()``
        self._progress = progress
        self._label = label
        self._background = background
        self._new_view = new_view  # (progress, background, cancel) -> the view to show
        self._stop = stop
        self._view: View | None = None
        self._view_thread: threading.Thread | None = None
        if background or progress != "auto":
            try:
                self._show_view()
            except BaseException:  # Ctrl-C, or no view could be made: no run goes on unseen
                self.cancel()
                raise
        # else: a blocking run shows its view only if it lasts (see _block)

    def _show_view(self) -> None:
        """Display the view and start the thread that updates it."""
        self._view = self._new_view(self._progress, self._background, self.cancel)
        if self._view is not None:
            thread = threading.Thread(
                target=self._show, args=(self._view,), name="cellpool-progress", daemon=True
            )
            thread.start()
            # Set only once started: a Ctrl-C inside start() leaves no thread to join,
            # and the view to that thread alone if it did start.
            self._view_thread = thread

    def _show(self, view: View) -> None:
        while not self._run.finished.wait(view.refresh):
            view.update()
        view.update(final=True)
        if self._background:
            view.finish()  # a blocking run finishes from the cell's own thread

    def result(self, timeout: float | None = None) -> Results:
        """Wait for the run to end and return every record.

        Raises ``TimeoutError`` if it has not ended within ``timeout`` seconds, and the
        input's own exception if iterating the input failed (its ``.results`` holds the
        records of the items read before).
        """
        try:
            return self._sink.future.result(timeout)
        finally:
            if self._sink.future.done() and self._view_thread is not None:
                self._view_thread.join()

    def _wait(self, until: float | None = None) -> bool:
        """Wait for the run's end (True) or the monotonic time ``until`` (False), letting
        widget events (Cancel) through. The wait is timed: signal handlers run between
        waits even when the signal reached another thread."""
        with self._view.events() if self._view else no_events() as let_events_through:
            while not self._run.finished.wait(POLL):
                let_events_through()
                if until is not None and time.monotonic() >= until:
                    return False
        return True

    def _block(self) -> Results:
        """``result()`` for a caller that holds the cell. With ``progress="auto"`` the
        view appears once the run has lasted ``SHOW_AFTER`` seconds: a quick run shows
        just its ``Results``. Ctrl-C (a kernel interrupt) cancels the run, waits
        briefly for the stop and raises a ``KeyboardInterrupt`` that a kernel shows as
        a plain cell's."""
        try:
            lasting = self._view is None and self._progress == "auto"
            if lasting and not self._wait(until=self._run.created + SHOW_AFTER):
                self._show_view()
            self._wait()
        except KeyboardInterrupt:
            self.cancel()
            with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C: wait no more
                self._run.finished.wait(INTERRUPT_GRACE)
            raise interrupted() from None
        finally:
            thread = self._view_thread
            if thread is not None and self._run.finished.is_set():
                thread.join()
                self._view.finish()  # type: ignore[union-attr]
        return self.result()

    def cancel(self) -> bool:
        """Stop the run: pending tasks are cancelled, running process tasks killed.

        Returns False if the run had already ended.
        """
        if self.done():
            return False
        return self._stop()

    def done(self) -> bool:
        """True once every input has its record."""
        return self._sink.future.done()

    def partial(self) -> Results:
        """The records finished so far, in input order."""
        return self._sink.snapshot()

    def __await__(self) -> Generator[Any, None, Results]:
        import asyncio  # only for those who await: it is slow to import

        return asyncio.wrap_future(self._sink.future).__await__()

    def __repr__(self) -> str:
        state = "done" if self.done() else "running"
        run = self._run
        total = "?" if run.total is None else run.total
        return (
            f"<cellpool.Job {state}: {run.done}/{total} done, {run.failed} failed, "
            f"{run.cancelled_tasks} cancelled>"
        )


class Executor(futures.Executor):
    """A pool of workers that runs functions over many inputs, one record per input.

    A ``concurrent.futures.Executor`` (``submit``, ``map``, ``shutdown``, ``with``) with
    ``run`` (block, get ``Results``) and ``start`` (get a ``Job`` at once) added.
    See the README for every option.
    """

    def __init__(
        self,
        kind: str = "thread",
        workers: int | None = None,
        *,
        timeout: float | None = None,
        retries: int = 0,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] = (Exception,),
        memory_limit: int | str | None = None,
        fd_limit: int | None = None,
        min_available_memory: float | int | str = 0.10,
        max_tasks_per_worker: int | None = None,
        max_pending: int | None = None,
        threads_per_worker: int = 1,
        concurrency: int | None = None,
        progress: str | bool = "auto",
        initializer: Callable[..., Any] | None = None,
        initargs: tuple = (),
        start_method: str | None = None,
        address: str | None = None,
        client: Any = None,
        security: Any = None,
        memory_pause: float = 0.80,
        fd_pause: float = 0.90,
        journal: Any = None,
    ) -> None:
        self.kind = check.check_kind(kind)
        self.workers = check.positive_int(
            "workers", check.default_workers(kind) if workers is None else workers
        )
        self._defaults = {
            "timeout": check.optional_seconds("timeout", timeout),
            "retries": check.non_negative_int("retries", retries),
            "retry_on": check.exception_types(retry_on),
            "max_pending": check.positive_int(
                "max_pending",
                PENDING_PER_WORKER * self.workers if max_pending is None else max_pending,
            ),
            "progress": normalize_progress(progress),
            "journal": check.journal(journal),
        }
        self._admission = Admission(
            Limits(
                memory_limit=check.byte_size("memory_limit", memory_limit),
                fd_limit=None if fd_limit is None else check.positive_int("fd_limit", fd_limit),
                min_available_memory=check.fraction_or_bytes(
                    "min_available_memory", min_available_memory
                ),
                memory_pause=check.fraction("memory_pause", memory_pause),
                fd_pause=check.fraction("fd_pause", fd_pause),
            )
        )
        self.concurrency = check.positive_int(
            "concurrency", DEFAULT_CONCURRENCY if concurrency is None else concurrency
        )
        for name, given in {"address": address, "client": client, "security": security}.items():
            if given is not None and self.kind != "dask":
                raise ValueError(f"{name} applies to kind='dask' only")
        for name, given in {
            "max_tasks_per_worker": max_tasks_per_worker,
            "start_method": start_method,
            "threads_per_worker": None if threads_per_worker == 1 else threads_per_worker,
        }.items():
            if given is not None and self.kind != "process":
                raise ValueError(f"{name} applies to kind='process' only")
        if max_tasks_per_worker is not None:
            check.positive_int("max_tasks_per_worker", max_tasks_per_worker)
        self.threads_per_worker = check.positive_int("threads_per_worker", threads_per_worker)
        if start_method is not None:
            check.start_method(start_method)
        if initializer is not None:
            check.callable_fn("initializer", initializer)
        if initializer is not None and self.kind == "dask":
            raise ValueError("initializer does not apply to kind='dask' (use a dask WorkerPlugin)")
        # The dispatcher exists before the pool, whose threads post to it from the start.
        self._dispatcher = Dispatcher(self.workers, self._admission, self._defaults["timeout"])
        self._pool = self._make_pool(
            initializer,
            tuple(initargs),
            start_method,
            max_tasks_per_worker,
            address,
            client,
            security,
        )
        hooks.at("executor.pool-made")  # its workers may report before the dispatcher runs
        if isinstance(self._pool, DaskPool) and workers is None:
            self.workers = self._dispatcher.workers = self._pool.size  # the cluster's
        dispatcher = self._dispatcher
        dispatcher.rows = self._pool.workers_info()  # its thread, their owner, starts below
        self._monitor = Monitor(lambda: dispatcher.rows)
        self._admission.monitor = self._monitor
        dispatcher.start(self._pool, self._monitor)
        # A dropped executor is collected, and then shuts down as with shutdown(wait=False):
        # nothing its threads hold refers back to it.
        dispatcher.owner = weakref.ref(
            self, lambda _, post=dispatcher.post: post(Shutdown(False, abandoned=True))
        )
        self._shutdown_lock = threading.Lock()
        self._closed = False

    def _make_pool(
        self,
        initializer: Callable[..., Any] | None,
        initargs: tuple,
        start_method: str | None,
        max_tasks_per_worker: int | None,
        address: str | None,
        client: Any,
        security: Any,
    ) -> Pool:
        post = self._dispatcher.post
        if self.kind == "thread":
            return ThreadPool(self.workers, post, self._admission, initializer, initargs)
        if self.kind == "process":
            return ProcessPool(
                self.workers,
                post,
                self._admission,
                start_method=start_method,
                initializer=initializer,
                initargs=initargs,
                max_tasks_per_worker=max_tasks_per_worker,
                threads_per_worker=self.threads_per_worker,
            )
        local_workers = self.workers if address is None and client is None else None
        return DaskPool(local_workers, post, address, client, security)

    def _options(self, caller: str, opts: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(opts) - set(RUN_OPTIONS))
        if unknown:
            raise TypeError(f"{caller}() got an unexpected option {unknown[0]!r}")
        merged = {
            **self._defaults,
            "total": None,
            "label": None,
            "key": None,
            "rerun": "errors",
            "journal_keep_code": False,
        }
        for name, value in opts.items():
            if name == "label":
                merged[name] = check.label(value)
            elif name == "journal":
                merged[name] = check.journal(value)
            elif name == "key":
                merged[name] = check.optional_callable(name, value)
            elif name == "rerun":
                merged[name] = check.one_of(name, value, RERUN)
            elif name == "journal_keep_code":
                merged[name] = bool(value)
            elif name == "timeout":
                merged[name] = check.optional_seconds(name, value)
            elif name == "retries":
                merged[name] = check.non_negative_int(name, value)
            elif name == "retry_on":
                merged[name] = check.exception_types(value)
            elif name == "progress":
                merged[name] = normalize_progress(value)
            elif value is not None:
                merged[name] = check.positive_int(name, value)
        return merged

    @staticmethod
    def _inputs(
        caller: str,
        fn: Callable[..., Any],
        iterables: Iterable[Any],
        shortest: bool = False,
        sliced: bool = True,
    ) -> tuple[Iterator[Any] | SequenceInput, bool, int | None]:
        """The items (argument tuples when several iterables), whether they are
        tuples to spread, and how many there are if known. Iterables of different
        lengths are an error, or with ``shortest`` (``map``) end at the shortest.
        Lists, tuples and ranges are sliced by the dispatcher unless ``sliced`` is
        false (a journaled run reads every input on its feeder thread)."""
        check.callable_fn(caller, fn)
        its, total = check.iterators(caller, iterables, shortest)
        star = len(its) > 1
        if sliced and all(type(iterable) in PLAIN_SEQUENCES for iterable in iterables):
            return SequenceInput(list(iterables), allowance=0), star, total
        if not star:
            return its[0], False, total
        return zip(*its, strict=not shortest), True, total

    def _journaled(
        self,
        fn: Callable[..., Any],
        inputs: tuple[Iterator[Any] | SequenceInput, bool, int | None],
        opts: dict[str, Any],
    ) -> tuple[JournalSink, tuple[Iterator[Any], bool, int | None]]:
        """The sink and the input of a journaled run: what the journal holds as done
        is recorded from it, the rest runs (see ``journaled.py``)."""
        items, star, total = inputs
        journal_run, stored = open_run(opts["journal"], fn, opts["journal_keep_code"])
        dispatcher = self._dispatcher
        sink = JournalSink(dispatcher.deliveries, journal_run, lambda: dispatcher.post(Wake()))
        sink.input = JournaledInput(items, opts["key"], stored, opts["rerun"], sink)
        return sink, (iter(sink.input), star, total)

    def _new_run(
        self,
        fn: Callable[..., Any],
        inputs: tuple[Iterator[Any] | SequenceInput, bool, int | None],
        sink: Any,
        opts: dict[str, Any],
        future: futures.Future[Any] | None = None,
        indexed: bool = False,
    ) -> Run:
        items, star, total = inputs
        dispatcher = self._dispatcher
        with self._shutdown_lock:
            if interpreter_exiting():
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if dispatcher.failure is not None:
                raise dispatcher.failure
            if dispatcher.broken is not None:
                raise dispatcher.broken
            run = Run(
                fn,
                items,
                star,
                opts["total"] if total is None else total,
                total is not None,
                sink,
                timeout=opts["timeout"],
                retries=opts["retries"],
                retry_on=opts["retry_on"],
                max_pending=opts["max_pending"],
                concurrency=self.concurrency,
                future=future,
                on_input=lambda: dispatcher.post(Wake()),
                indexed=indexed,
            )
            dispatcher.post(AddRun(run))
        return run

    # -- concurrent.futures --------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        """Run ``fn(*args, **kwargs)`` on a worker; returns a ``Future`` for its value."""
        check.callable_fn("submit", fn)
        future: futures.Future[Any] = futures.Future()
        call = functools.partial(fn, **kwargs) if kwargs else fn
        opts = self._options("submit", {})
        sink = FutureSink(future, self._dispatcher.deliveries)
        run = self._new_run(call, (SequenceInput([[args]], 0), True, 1), sink, opts, future)
        post = self._dispatcher.post
        future.add_done_callback(lambda f: f.cancelled() and post(CancelRun(run, StopMode.DROP)))
        return future

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        """Values of ``fn`` over the inputs, in input order, as they become ready.

        The work starts at once, as the standard library's, and stops at the shortest
        input. The input is read lazily: at most ``max_pending`` tasks are in flight or
        waiting to be consumed. The first failure is raised when it is reached.
        ``chunksize`` is checked and otherwise ignored: cellpool sizes its batches from
        measured task times. An iterator dropped unread lets the work finish.
        """
        check.chunksize(chunksize)
        inputs = self._inputs("map", fn, iterables, shortest=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        sink = OrderedSink()
        run = self._new_run(fn, inputs, sink, self._options("map", {}))
        return MapIterator(run, sink, deadline, self._dispatcher.post)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the workers once the work submitted so far is done.

        With ``cancel_futures``, tasks not yet started are cancelled. With ``wait``,
        return only when every worker thread and process is gone.
        """
        dispatcher = self._dispatcher
        with self._shutdown_lock:
            if not self._closed or cancel_futures:
                self._closed = True
                dispatcher.post(Shutdown(cancel_futures))
        if not wait:
            return
        me = threading.current_thread()
        if self._pool.owns(me):
            raise RuntimeError("cannot join current thread")
        while dispatcher.thread.is_alive():  # timed: Ctrl-C gets through
            dispatcher.thread.join(POLL)
        for thread in dispatcher.deliveries.threads():
            if thread is not me:
                thread.join()
        self._monitor.stop()

    # -- cellpool ------------------------------------------------------------------

    def start(self, fn: Callable[..., Any], *iterables: Iterable[Any], **opts: Any) -> Job:
        """Start ``fn`` over the inputs and return a ``Job`` at once.

        ``opts`` override the executor's ``timeout``, ``retries``, ``retry_on``,
        ``max_pending`` and ``progress`` for this run; ``total`` tells the progress view
        how many inputs a generator will yield; ``label`` names the run in its view and
        summary (by default, the function's name).
        """
        return self._start("start", fn, iterables, opts, background=True)

    def _start(
        self,
        caller: str,
        fn: Callable[..., Any],
        iterables: tuple[Iterable[Any], ...],
        opts: dict[str, Any],
        background: bool,
    ) -> Job:
        merged = self._options(caller, opts)
        journaled = merged["journal"] is not None
        inputs = self._inputs(caller, fn, iterables, sliced=not journaled)
        if journaled:
            sink, inputs = self._journaled(fn, inputs, merged)
        else:
            sink = RecordSink(self._dispatcher.deliveries)
        try:
            run = self._new_run(fn, inputs, sink, merged, indexed=journaled)
        except BaseException:
            if journaled:
                sink.close_journal()
            raise
        if journaled:
            run.settled = sink.input
        name = merged["label"] or getattr(fn, "__name__", type(fn).__name__)
        label = f"{name} [{self.kind} x{self.workers}]"
        return Job(
            run,
            sink,
            merged["progress"],
            label,
            background,
            functools.partial(self._view_of, run, sink, label),
            functools.partial(self._cancel_run, run),
        )

    def _cancel_run(self, run: Run) -> bool:
        self._dispatcher.post(CancelRun(run, StopMode.KILL))
        return True

    def _view_of(
        self,
        run: Run,
        sink: RecordSink,
        label: str,
        progress: str,
        background: bool,
        cancel: Callable[[], Any],
    ) -> View | None:
        """The view of one run of this executor's (see ``view.make_view``)."""
        return run_view(
            progress, self.view_source(run, sink.future.result, label, cancel), background
        )

    def view_source(
        self, run: Run, results: Callable[[], Results], label: str, cancel: Callable[[], Any]
    ) -> ViewSource:
        """What a view of ``run`` reads: its counters, this executor's workers and
        monitor."""
        dispatcher = self._dispatcher
        board = WorkerBoard(lambda: dict(run.by_worker), lambda: dispatcher.departures)
        return ViewSource(
            run,
            label,
            self._monitor,
            self._admission.note,
            cancel,
            board,
            results,
            self.dashboard_link,
        )

    def run(self, fn: Callable[..., Any], *iterables: Iterable[Any], **opts: Any) -> Results:
        """Run ``fn`` over the inputs and return a record for every input.

        Never raises for a task's failure: look at ``Results.errors``. On Ctrl-C (a
        kernel interrupt) the run is cancelled and running process tasks are killed
        before ``KeyboardInterrupt`` propagates.
        """
        return self._start("run", fn, iterables, opts, background=False)._block()

    @property
    def dashboard_link(self) -> str | None:
        """The dask dashboard's address, for ``kind="dask"`` (``None`` otherwise, or
        when dask names none)."""
        return getattr(self._pool, "dashboard_link", None)

    def workers_info(self) -> list[dict[str, Any]]:
        """The latest figures for each worker; see the README for the fields."""
        return self._monitor.sample().workers

    def __repr__(self) -> str:
        state = "shut down" if self._closed else "running"
        return f"<cellpool.Executor kind={self.kind!r} workers={self.workers} {state}>"


def run(
    fn: Callable[..., Any],
    *iterables: Iterable[Any],
    kind: str = "thread",
    workers: int | None = None,
    **opts: Any,
) -> Results:
    """Run ``fn`` over the inputs on a temporary executor; see ``Executor.run``.

    On Ctrl-C the executor is left to stop in the background: threads still running a
    task cannot be killed, and waiting for them would delay the interrupt.
    """
    per_run = ("total", "label", "key", "rerun", "journal_keep_code")
    run_opts = {name: opts.pop(name) for name in per_run if name in opts}
    executor = Executor(kind, workers, **opts)
    try:
        results = executor.run(fn, *iterables, **run_opts)
    except BaseException:
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    executor.shutdown(wait=True)
    return results


class MapIterator(Iterator[Any]):
    """The values of a ``map`` call, in input order.

    Closing it (or dropping it after reading from it) cancels the tasks not started, as
    the standard library's iterator does; dropping it unread lets the work finish and
    keeps none of the values. Values come from the sink a chunk at a time, so reading
    one costs a ``deque.popleft``.
    """

    def __init__(
        self, run: Run, sink: OrderedSink, deadline: float | None, post: Callable[[Any], None]
    ) -> None:
        self._run = run
        self._sink = sink
        self._deadline = deadline
        self._post = post
        self._block: deque[Any] = deque()
        self._read = [False]  # shared with the finalizer, which must not hold self
        self._announce_every = max(1, run.max_pending // 8)
        self._unannounced = 0  # values taken since the dispatcher was last woken
        self._finalizer = weakref.finalize(self, _map_dropped, run, sink, post, self._read)

    def __next__(self) -> Any:
        try:
            value = self._block.popleft()
        except IndexError:
            value = self._next_block()
        if type(value) is Raised:
            self.close()
            raise value.error
        return value

    def _next_block(self) -> Any:
        self._read[0] = True
        self._sink.returned()
        if self._run.input.starved and self._unannounced >= self._announce_every:
            self._unannounced = 0  # the input waits for room: tell the dispatcher there is
            self._post(Wake())
        try:
            self._block.extend(self._sink.take(self._deadline))
        except StopIteration:
            self._finalizer.detach()
            raise
        except BaseException:  # a timeout: stop, as the standard library's map does
            self.close()
            raise
        self._unannounced += len(self._block)
        return self._block.popleft()

    def close(self) -> None:
        """Stop: tasks not started are cancelled; no more values come."""
        self._read[0] = True
        self._block.clear()
        self._finalizer()


def _map_dropped(run: Run, sink: OrderedSink, post: Callable[[Any], None], read: list) -> None:
    if run.finished.is_set():
        return
    if read[0]:
        post(CancelRun(run, StopMode.DROP))
    else:
        sink.discard()
        post(Wake())
