"""A worker thread's event loop running ``async def`` batches as one stream.

A lane keeps up to ``concurrency`` coroutines in flight across batches: as a task ends,
the next one starts, of the same batch or, once every task of that batch has started,
of the next batch, which the lane takes from its source as soon as it has room for a
task. (Run one batch at a time, the coroutines in flight dipped at every batch's end:
the slowest task of a batch held back the whole next batch.) Each batch is still
reported on its own, when its last task ends: one record per task, in order.

Tasks of a batch start in position order, so a batch can be given back "from position
``first`` on" when the pool recalls it. A task that had to wait for room looks at the
recall before it starts; tasks that start as their batch arrives do not: a batch
recalled while it travels to a lane with room runs there, rather than being sent back
and forth while another worker idles. A recalled batch is given back at once; the
outcomes of its tasks already started follow when they end.

Ownership: a lane, its event loop and every batch it holds belong to the one worker
thread that calls ``serve``. The pool's side (what a source item is, what the lane
reports, whether the pool recalled a batch) is in the hooks a subclass defines; the
hooks run on that thread too.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from queue import Empty, SimpleQueue
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from .results import Failure
from .tasks import Outcomes, Result, call_one_async, event_loop

EMPTY: Any = object()  # a source had nothing ready
ABANDONED: Any = object()  # the pool wrote the lane off: its thread stops at once

Item = TypeVar("Item")
OnStep = Callable[[int, float], None]


class Source(Protocol):
    """Where a lane's batches come from: the worker's pipe, or a queue of its pool."""

    def get(self) -> Any:
        """The next item, waiting for it (``None``: stop)."""

    def poll(self) -> Any:
        """The next item, or ``EMPTY`` if none is ready."""

    def watch(self, loop: Any, wake: Callable[[], None]) -> None:
        """Have ``loop`` call ``wake`` once an item may be ready (once at most)."""

    def unwatch(self, loop: Any) -> None:
        """Undo ``watch``: once this returns, ``wake`` is not called."""


class Inbox(Generic[Item]):
    """A queue of batches for worker threads that a thread running async tasks watches
    from its event loop, woken by the next ``put``, rather than block on it.

    ``put`` never blocks (the dispatcher calls it): waking a loop appends to it and
    writes a byte to its self-pipe. It wakes under ``_lock``, so that once a lane's
    ``unwatch`` returns its loop can close.
    """

    def __init__(self) -> None:
        self._items: SimpleQueue[Item] = SimpleQueue()
        self._lock = threading.Lock()  # guards _watchers
        self._watchers: dict[Any, Callable[[], None]] = {}  # event loop -> wake

    def put(self, item: Item) -> None:
        self._items.put(item)
        with self._lock:
            watchers, self._watchers = self._watchers, {}
            for loop, wake in watchers.items():
                loop.call_soon_threadsafe(wake)

    def get(self) -> Item:
        return self._items.get()

    def poll(self) -> Any:
        try:
            return self._items.get_nowait()
        except Empty:
            return EMPTY

    def watch(self, loop: Any, wake: Callable[[], None]) -> None:
        with self._lock:
            self._watchers[loop] = wake

    def unwatch(self, loop: Any) -> None:
        with self._lock:
            self._watchers.pop(loop, None)


class Work(NamedTuple):
    """An async batch as a lane runs it; ``key`` is what the pool knows it by."""

    key: Any
    fn: Any
    star: bool
    retry_on: tuple[type[BaseException], ...]
    timeout: float | None
    concurrency: int
    items: list[Any]
    blocked: Callable[[Any], Failure | None]  # a reason an item cannot run, if any


class _Held:
    """A batch in a lane: its results so far, how far it has started, where it ends."""

    __slots__ = ("at_once", "end", "on_step", "results", "returned", "running", "started", "work")

    def __init__(self, work: Work, at_once: int, on_step: OnStep) -> None:
        self.work = work
        self.results: list[Result | None] = [None] * len(work.items)
        self.started = 0  # the positions before this one have started
        self.running = 0  # started and not ended
        self.end = len(work.items)  # the positions from this one on were given back
        self.at_once = at_once  # the positions before this one start without a recall check
        self.returned = False  # given back while some of its tasks still ran
        self.on_step = on_step


class AsyncLane(ABC):
    """A worker thread's stream of async batches (see the module docstring).

    A subclass says which source items are async batches (``work``) and tells its pool
    what happens (``stepper``, ``took``, ``finished``, ``gave_back``, ``idle``).
    """

    def __init__(self, source: Source) -> None:
        self.source = source
        self._first: Any = None  # the item a stream starts with, until it takes it
        self._wake: Any = None  # an asyncio.Event: a task ended, or the source has an item
        self._running = 0  # tasks started and not ended, of every batch held
        self._room = 1  # coroutines in flight at most, as the last batch taken says
        self._tasks: set[Any] = set()
        self._failure: BaseException | None = None  # a report that raised: the lane stops

    # -- the pool's side -------------------------------------------------------------

    @abstractmethod
    def work(self, item: Any) -> Work | None:
        """``item`` as an async batch, or ``None`` if it is not one."""

    @abstractmethod
    def stepper(self, work: Work) -> OnStep:
        """What to call as a task of ``work`` takes the loop (``position``, ``started``)
        and gives it back (``-1``, ``0.0``): see ``tasks.call_one_async``."""

    def took(self, work: Work) -> None:  # noqa: B027 (a process lane has nothing to note)
        """The lane has taken ``work``: it holds it until its final report."""

    @abstractmethod
    def recalled(self, work: Work, waited: bool) -> bool:
        """Whether to give back ``work`` from its next task on; ``waited`` says that
        task waited for room (else it starts as its batch arrives)."""

    @abstractmethod
    def finished(self, work: Work, outcomes: Outcomes, final: bool) -> None:
        """Report the outcomes of ``work``'s positions 0...; ``final``: nothing follows."""

    @abstractmethod
    def gave_back(self, work: Work, first: int, final: bool) -> None:
        """Report ``work``'s positions ``first``... as given back, unstarted; unless
        ``final``, the outcomes of the positions before follow."""

    def abandoned(self) -> bool:
        """True once the pool has written this lane off."""
        return False

    def idle(self) -> None:  # noqa: B027 (a process lane has nothing to note)
        """Nothing runs on the lane any more (until its next batch)."""

    # -- the worker thread's loop ----------------------------------------------------

    def serve(self, run_plain: Callable[[Any], bool]) -> None:
        """Run the source's items until it gives ``None``: async batches as streams,
        the others with ``run_plain`` (which returns False if the lane must stop)."""
        item = self.source.get()
        while item is not None:
            if self.work(item) is None:
                if not run_plain(item):
                    return
                item = EMPTY
            else:
                # handed over through _first, so that no frame here holds the batch's
                # arguments once the lane has reported it
                self._first, item = item, None
                item = event_loop().run_until_complete(self._stream())
                if item is ABANDONED:
                    return
                self.idle()
            if item is EMPTY:
                item = self.source.get()

    async def _stream(self) -> Any:
        """Run async batches until none runs and the source has none ready; return what
        ended the stream: ``EMPTY``, ``ABANDONED``, or the next item that is not an
        async batch (for ``serve`` to run once every task here has ended)."""
        import asyncio

        loop = asyncio.get_running_loop()
        self._wake = wake = asyncio.Event()
        taking: _Held | None = self._take(self._taken_first())
        ended = EMPTY
        try:
            while True:
                if taking is not None:
                    taking = self._start(loop, taking)
                if taking is None and ended is EMPTY and self._running < self._room:
                    item = self._ready(loop)
                    if item is not EMPTY:
                        work = self.work(item)
                        if work is None:
                            ended = item
                        else:
                            taking = self._take(work)
                        item = work = None
                        continue
                if taking is None and not self._running:
                    return ended
                await wake.wait()
                wake.clear()
                if self._failure is not None:
                    raise self._failure
                if self.abandoned():
                    await self._cancel_all()
                    return ABANDONED
        finally:
            self.source.unwatch(loop)

    def _taken_first(self) -> Work:
        work = self.work(self._first)
        self._first = None
        assert work is not None
        return work

    def _ready(self, loop: Any) -> Any:
        """The source's next item, or ``EMPTY``, and then the lane is woken by the next.
        Watched before polling: an item put in between wakes the lane."""
        self.source.watch(loop, self._wake.set)
        item = self.source.poll()
        if item is not EMPTY:
            self.source.unwatch(loop)
        return item

    def _take(self, work: Work) -> _Held:
        self._room = work.concurrency
        self.took(work)
        return _Held(work, work.concurrency - self._running, self.stepper(work))

    def _start(self, loop: Any, held: _Held) -> _Held | None:
        """Start tasks of ``held`` while there is room, in position order; ``None``
        once every one has started or the rest was given back."""
        work = held.work
        while self._running < work.concurrency:
            position = held.started
            if self.recalled(work, position >= held.at_once):
                self._give_back(held)
                return None
            held.started += 1
            held.running += 1
            self._running += 1
            task = loop.create_task(self._task(held, position))
            self._tasks.add(task)
            task.add_done_callback(self._ended)
            if held.started == len(work.items):
                return None
        return held

    async def _task(self, held: _Held, position: int) -> None:
        work = held.work
        held.results[position] = await call_one_async(
            work.fn,
            work.star,
            work.items[position],
            work.retry_on,
            work.timeout,
            work.blocked,
            position,
            held.on_step,
        )
        held.running -= 1
        self._running -= 1
        if not held.running and held.started == held.end:
            self._report(held)
        self._wake.set()

    def _ended(self, task: Any) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._failure = task.exception()  # reporting failed (its pipe broke, say)
            self._wake.set()

    def _give_back(self, held: _Held) -> None:
        held.end = held.started
        if held.running:
            held.returned = True
            self.gave_back(held.work, held.end, final=False)
        else:
            self._report(held)

    def _report(self, held: _Held) -> None:
        """Report a batch whose started tasks have all ended."""
        outcomes = Outcomes.empty()
        for result in held.results[: held.end]:
            outcomes.add(result)  # type: ignore[arg-type]  # every one has ended
        if held.returned or held.end == len(held.work.items):
            self.finished(held.work, outcomes, final=True)
            return
        if held.end:
            self.finished(held.work, outcomes, final=False)
        self.gave_back(held.work, held.end, final=True)

    async def _cancel_all(self) -> None:
        import asyncio

        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
