"""Pipelines: stages, each on its own pool, streaming inputs through bounded handoffs.

``pipeline(stage(fetch, kind="thread", workers=32), stage(parse, kind="process"))``
runs ``parse(fetch(x))`` for every input ``x``: an input enters a stage as soon as the
one before finished it, so the stages overlap, and a stage that falls behind holds the
ones before it back instead of letting their values pile up. Every input gets one
record: its last stage's value, or the failure of the stage where it stopped. The
plumbing is in ``flow.py`` and ``handoff.py``; each stage's run is an ordinary run of
the stage's executor, so timeouts, retries, crash survival and limits work as in any
run.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import hooks
from . import options as check
from .dispatch import CancelRun, Wake
from .executor import Executor, Job
from .flow import Flow
from .handoff import HandoffInput
from .journaled import RERUN, JournaledInput, identity, open_named_run
from .results import Results
from .runs import StopMode
from .view import View, make_view, normalize_progress

DEFAULT_BUFFER = 1024
# Executor options a stage takes; progress and journal are the pipeline's.
_STAGE_OPTIONS = frozenset(inspect.signature(Executor).parameters) - {
    "kind",
    "workers",
    "progress",
    "journal",
}
_DEFAULT_MIN_AVAILABLE = 0.10  # Executor's default min_available_memory
_RUN_DEFAULTS = {
    "progress": "auto",
    "total": None,
    "label": None,
    "journal": None,
    "key": None,
    "rerun": "errors",
    "journal_keep_code": False,
}


@dataclass(frozen=True)
class Stage:
    """One step of a pipeline: a function and the pool it runs on (see ``stage``)."""

    fn: Callable[..., Any]
    name: str
    kind: str = "thread"
    workers: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


def stage(
    fn: Callable[..., Any],
    *,
    kind: str = "thread",
    workers: int | None = None,
    name: str | None = None,
    **options: Any,
) -> Stage:
    """A pipeline stage: ``fn`` on a pool of its own, ``kind`` ``"thread"``,
    ``"process"`` or ``"dask"``, with ``workers`` and any other ``Executor`` option
    (``timeout``, ``retries``, ``memory_limit``, ``max_pending``...). ``name`` (by
    default the function's) names it in records and in the view."""
    check.callable_fn("stage", fn)
    check.check_kind(kind)
    unknown = sorted(set(options) - _STAGE_OPTIONS)
    if unknown:
        raise TypeError(f"stage() got an unexpected option {unknown[0]!r}")
    name = check.label(name) if name is not None else getattr(fn, "__name__", type(fn).__name__)
    return Stage(fn, name, kind, workers, dict(options))


def pipeline(*stages: Stage | Callable[..., Any], buffer: int = DEFAULT_BUFFER) -> Pipeline:
    """Chain ``stages`` (``stage(...)``, or plain functions for thread stages): each
    input goes through them in turn.

    ``buffer`` bounds how far a stage runs ahead: at most that many inputs have entered
    a stage and not yet been taken by the next (a stage's own ``max_pending`` overrides
    it for that stage), so memory stays flat however long the input.
    """
    return Pipeline(stages, buffer)


class Pipeline:
    """Stages to run inputs through; ``run`` blocks, ``start`` returns a ``Job``.

    Each call starts the stages' pools and shuts them down when it ends.
    """

    def __init__(self, stages: Iterable[Stage | Callable[..., Any]], buffer: int) -> None:
        self.stages = tuple(s if isinstance(s, Stage) else stage(s) for s in stages)
        if not self.stages:
            raise ValueError("a pipeline needs at least one stage")
        names = [s.name for s in self.stages]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"two stages are named {name!r}: give one a name=")
        self.buffer = check.positive_int("buffer", buffer)

    def __repr__(self) -> str:
        return "<cellpool.Pipeline " + " -> ".join(_describe(s) for s in self.stages) + ">"

    def run(self, *iterables: Iterable[Any], **opts: Any) -> Results:
        """Run every input through the stages; one record per input, in input order.

        ``opts``: ``progress``, ``total`` (how many inputs a generator will yield),
        ``label``, and to journal the pipeline's records and resume it (see
        "Durable runs"), ``journal``, ``key``, ``rerun`` and ``journal_keep_code``.
        Never raises for a task's failure. On Ctrl-C every stage is cancelled (running
        process tasks killed) before ``KeyboardInterrupt`` propagates.
        """
        job = self._start("run", iterables, opts, background=False)
        try:
            return job._block()
        except BaseException:
            job._close(wait=False)
            raise

    def start(self, *iterables: Iterable[Any], **opts: Any) -> PipelineJob:
        """Start the inputs through the stages and return a ``Job`` at once
        (``result()``, ``await``, ``cancel()``, ``partial()``); ``opts`` as for ``run``."""
        return self._start("start", iterables, opts, background=True)

    def _start(
        self,
        caller: str,
        iterables: tuple[Iterable[Any], ...],
        opts: dict[str, Any],
        background: bool,
    ) -> PipelineJob:
        opts = _run_options(caller, opts)
        label = opts["label"] or " -> ".join(s.name for s in self.stages)
        items, star, length = Executor._inputs(caller, self.stages[0].fn, iterables, sliced=False)
        journal_run, stored = None, None
        if opts["journal"] is not None:  # before any pool starts: a bad journal stops here
            code = hashlib.blake2b(digest_size=16)
            for s in self.stages:
                code.update(f"{s.name}={identity(s.fn)};".encode())
            journal_run, stored = open_named_run(
                opts["journal"], label, label, code.hexdigest(), opts["journal_keep_code"]
            )
        executors: list[Executor] = []
        try:
            executors = self._executors()
            flow = Flow([s.name for s in self.stages])
            flow.total = length or opts["total"]
            pairs: Iterator[tuple[int, Any]] = enumerate(items)
            if journal_run is not None:
                flow.journal_run = journal_run
                flow.settled = JournaledInput(items, opts["key"], stored, opts["rerun"], flow)
                journal_run.on_taken(functools.partial(executors[0]._dispatcher.post, Wake()))
                pairs = iter(flow.settled)
            self._start_runs(flow, executors, (pairs, star, length))
        except BaseException:
            for executor in executors:
                executor.shutdown(wait=False, cancel_futures=True)
            if journal_run is not None:
                journal_run.close()
            raise
        return PipelineJob(flow, self.stages, executors, opts["progress"], background, label)

    def _executors(self) -> list[Executor]:
        """One executor per stage, all or none. A later stage pauses for low machine
        memory later than the ones before it (by default), so under pressure the stages
        that bring new inputs in stop first and the rest drain."""
        executors: list[Executor] = []
        count = len(self.stages)
        try:
            for position, s in enumerate(self.stages):
                options = dict(s.options)
                options.setdefault(
                    "min_available_memory", _DEFAULT_MIN_AVAILABLE * (count - position) / count
                )
                executors.append(Executor(s.kind, s.workers, progress="none", **options))
        except BaseException:
            for executor in executors:
                executor.shutdown(wait=False, cancel_futures=True)
            raise
        return executors

    def _start_runs(
        self,
        flow: Flow,
        executors: list[Executor],
        inputs: tuple[Iterator[tuple[int, Any]], bool, int | None],
    ) -> None:
        """Start a run on every stage's executor, joined through ``flow``. ``inputs``
        are the first stage's: ``(index, item)`` pairs, whether items are argument
        tuples, and their number if the input knows it."""
        total = flow.total
        posts = [executor._dispatcher.post for executor in executors]
        for position, handoff in enumerate(flow.handoffs):
            handoff.wake_upstream = functools.partial(posts[position], Wake())
            handoff.wake_downstream = functools.partial(posts[position + 1], Wake())
        runs = flow.runs  # filled as they start: one may end before the next starts

        def cancel_runs() -> None:
            for run, post in zip(list(runs), posts, strict=False):
                post(CancelRun(run, StopMode.KILL))

        flow.cancel_runs = cancel_runs
        try:
            for position, (s, executor) in enumerate(zip(self.stages, executors, strict=True)):
                opts = executor._options("run", {"total": total})
                if "max_pending" not in s.options:
                    opts["max_pending"] = self.buffer
                if position > 0:
                    inputs = (HandoffInput(flow.handoffs[position - 1]), False, None)
                sink = flow.sinks[position]
                runs.append(executor._new_run(s.fn, inputs, sink, opts, indexed=True))
                hooks.at("pipeline.stage-started")
        except BaseException:
            cancel_runs()
            raise


def _run_options(caller: str, opts: dict[str, Any]) -> dict[str, Any]:
    """A pipeline run's options, checked, with their defaults."""
    unknown = sorted(set(opts) - set(_RUN_DEFAULTS))
    if unknown:
        raise TypeError(f"{caller}() got an unexpected option {unknown[0]!r}")
    merged = {**_RUN_DEFAULTS, **opts}
    merged["progress"] = normalize_progress(merged["progress"])
    if merged["total"] is not None:
        merged["total"] = check.positive_int("total", merged["total"])
    if merged["label"] is not None:
        merged["label"] = check.label(merged["label"])
    merged["journal"] = check.journal(merged["journal"])
    merged["key"] = check.optional_callable("key", merged["key"])
    merged["rerun"] = check.one_of("rerun", merged["rerun"], RERUN)
    merged["journal_keep_code"] = bool(merged["journal_keep_code"])
    return merged


def _describe(s: Stage) -> str:
    workers = "" if s.workers is None else f" x{s.workers}"
    return f"{s.name} [{s.kind}{workers}]"


class PipelineJob(Job):
    """A started pipeline: a ``Job`` whose records are the pipeline's."""

    def __init__(
        self,
        flow: Flow,
        stages: tuple[Stage, ...],
        executors: list[Executor],
        progress: str,
        background: bool,
        label: str,
    ) -> None:
        self._flow = flow
        self._stages = stages
        self._executors = executors
        # nobody may wait for a background job: its pools stop when it ends (set first:
        # if showing the view fails, the pipeline is cancelled and still cleans up)
        flow.future.add_done_callback(lambda _future: self._close(wait=False))
        hooks.at("pipeline.job-made")
        super().__init__(flow, flow, progress, label, background, self._view_of, flow.cancel)

    def _view_of(self, progress: str, background: bool, cancel: Callable[[], Any]) -> View | None:
        from .view.pipeline import pipeline_line, pipeline_source

        source = pipeline_source(self._flow, self._executors, self._label, cancel)

        def widget() -> View:
            from .view.pipeline import PipelineWidget

            return PipelineWidget(source, background)

        return make_view(progress, background, widget, lambda: pipeline_line(source))

    def result(self, timeout: float | None = None) -> Results:
        """Wait for every input's record and return them (see ``Job.result``); the
        stages' pools are shut down once the pipeline has ended."""
        try:
            return super().result(timeout)
        finally:
            if self.done():
                self._close(wait=True)

    def _close(self, wait: bool) -> None:
        """Shut the stages' pools down (with ``wait``, and the flow's delivery thread:
        return once they are gone)."""
        ended = self._flow.future.done()
        for executor in self._executors:
            executor.shutdown(wait=wait, cancel_futures=not ended)
        if wait:
            me = threading.current_thread()
            for thread in self._flow.deliveries.threads():
                if thread is not me:
                    thread.join()

    def __repr__(self) -> str:
        state = "done" if self.done() else "running"
        stages = ", ".join(
            f"{name} {run.done - run.cancelled_tasks}"
            for name, run in zip(self._flow.names, self._flow.runs, strict=True)
        )
        total = "?" if self._flow.total is None else self._flow.total
        return (
            f"<cellpool.PipelineJob {state}: {self._flow.done}/{total} done "
            f"({stages}), {self._flow.failed} failed>"
        )
