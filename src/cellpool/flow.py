"""One run of a pipeline: stage runs joined by handoffs, and one record per input.

Data flow, for stages 1..n (each stage's run is an ordinary ``Run`` on the stage's own
executor, ``indexed`` so that every task carries the index of the pipeline's input)::

    input --feeder--> run 1 --StageSink 1--> Handoff 1 --HandoffInput--> run 2 --> ...
                                 |                                         |
                                 | failed, cancelled                       | last stage:
                                 v                                         v every record
                              Flow.settle  <---------------------------------+
                                 |
                                 v
                    the pipeline's Results, one record per input

Who owns what:

    feeder of stage 1     reads the pipeline's input (user code); a journaled one's
                          (``JournaledInput``) restores records from the journal and
                          records inputs it cannot key (``Flow.restore``, ``Flow.put``)
    dispatcher of stage k StageSink k: writes stage k's own record of each input, hands
                          an ok value on to Handoff k, or settles the input (a failure,
                          a cancel, or the last stage's record); takes from Handoff k-1
    Flow                  the one place that makes a pipeline record of work done
                          (``settle``, which also queues it for the journal): its lock
                          guards ``results``, the counters and ``_ended``; state moves
                          RUNNING -> CANCELLED -> DONE or RUNNING -> DONE under it
    ``origins``           index -> (input, when stage 1 started it): set by stage 1's
                          dispatcher when it hands a value on, popped when the input is
                          settled; one writer and one remover per key, ordered by the
                          handoffs, each a single dict operation

The last stage run to end settles what no stage took (the handoffs' leftovers, after a
cancel) and, on a delivery thread, flushes the journal and completes the future.
"""

from __future__ import annotations

import enum
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from . import hooks
from .delivery import Deliveries
from .handoff import Handoff, HandoffState
from .journaled import JournaledInput, as_range, write_record
from .results import _UNFILLED, Failure, Results
from .sinks import Finished, FinishedBatch, with_results

if TYPE_CHECKING:
    from .chunks import StoredRecord
    from .runs import Run
    from .store import JournalRun


class FlowState(enum.Enum):
    RUNNING = "running"  # inputs flow through the stages
    CANCELLED = "cancelled"  # stopping: what no stage finishes is recorded cancelled
    DONE = "done"  # every input has its record and the future is complete


class Flow:
    """A pipeline's run: its stages' sinks and handoffs, and the pipeline's records."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self.total: int | None = None  # how many inputs, if known (for views)
        self.handoffs = [Handoff() for _ in self.names[1:]]
        self.sinks = [StageSink(self, k) for k in range(len(self.names))]
        self.runs: list[Run] = []  # the stage runs, set once all are made
        self.cancel_runs: Callable[[], None] = lambda: None  # set with ``runs``
        self.origins: dict[int, tuple[Any, float | None]] = {}
        self.results = Results()
        self.results._stage_names = self.names
        self.future: Future[Results] = Future()
        self.created = time.monotonic()
        self.finished = threading.Event()
        self.input_error: BaseException | None = None
        # a journaled pipeline's: its input, which restores records and keys the rest
        # (its ``keys`` are popped here, as records are made), and its journal run
        self.settled: JournaledInput | None = None
        self.journal_run: JournalRun | None = None
        # its own: a stage's executor may be shut down (Ctrl-C) before the flow ends
        self.deliveries = Deliveries()
        self._lock = threading.Lock()
        self._state = FlowState.RUNNING
        self._ended = 0  # stage runs that have ended
        self._inputs = 0  # 1 + the highest index recorded: how many inputs were read
        self._stopped_by: str | None = None  # the stage that ended early, if one did
        # the pipeline's records so far, for views: all of them, and per status
        self.done = 0
        self.failed = 0
        self.cancelled_tasks = 0

    @property
    def state(self) -> FlowState:
        return self._state

    def cancel(self, stopped_by: str | None = None) -> bool:
        """Stop every stage: running tasks are stopped, the rest recorded cancelled
        (``stopped_by``: because that stage ended early). False if the pipeline had
        already ended or was cancelled."""
        with self._lock:
            if self._state is not FlowState.RUNNING:
                return False
            self._state = FlowState.CANCELLED
            self._stopped_by = stopped_by
        for handoff in self.handoffs:
            handoff.cancel()
        self.cancel_runs()
        return True

    def settle(
        self,
        stage: int,
        index: int,
        item: Any,
        status: str,
        value: Any,
        failure: Failure | None,
        worker: str | None,
        pid: int | None,
        attempts: int,
        started: float | None,
        finished: float | None,
    ) -> None:
        """Make the pipeline's record of input ``index``, which ends at ``stage``, and
        journal it. ``item`` and ``started`` are stage 1's; a later stage's come from
        ``origins``."""
        if stage:
            item, started = self.origins.pop(index)
        with self._lock:
            self._make_room(index)
            self.results._put(
                index, index, item, status, value, failure, worker, pid, attempts, started, finished
            )
            self.results._stage[index] = stage + 1
            self.done += 1
            if status == "cancelled":
                self.cancelled_tasks += 1
            elif status != "ok":
                self.failed += 1
        key = None if self.settled is None else self.settled.keys.pop(index, None)
        if key is not None and self.journal_run is not None:
            record = (status, value, failure, worker, pid, attempts, started, finished)
            write_record(self.journal_run, key, index, item, *record, self.results._clock)

    def _make_room(self, index: int) -> None:
        """Under the lock: room for input ``index``'s record, which counts it read."""
        self.results._reserve(index)
        self._inputs = max(self._inputs, index + 1)

    # -- what a journaled input records without running anything (its feeder thread,
    # which may read on a little after a stop: once the flow is done, they are not
    # its inputs); ``settled`` counts these records, not ``done``, as for a run

    def restore(self, index: int, item: Any, record: StoredRecord) -> None:
        """An input's record from the journal, in its place."""
        with self._lock:
            if self._state is FlowState.DONE:
                return
            self._make_room(index)
            self.results._put_record(index, index, item, record, -self.results._clock)
            self.results._restored.add(index)

    def unkeyed(self, index: int, item: Any, failure: Failure) -> None:
        """An input that could not be keyed: its error record."""
        with self._lock:
            if self._state is FlowState.DONE:
                return
            self._make_room(index)
            self.results._put(index, index, item, "error", None, failure, None, None, 0, None, None)

    def snapshot(self) -> Results:
        """The pipeline's records made so far, in input order."""
        with self._lock:
            copy = self.results._copy()
        return copy._filled()

    def stage_ended(self, stage: int, run: Run) -> None:
        """Stage ``stage``'s run has ended (on its dispatcher)."""
        hooks.at("pipeline.stage-ended")
        if stage == 0:
            self.input_error = run.input_error
        if stage < len(self.handoffs):
            self.handoffs[stage].close()
        before = self.handoffs[stage - 1] if stage > 0 else None
        if before is not None and (before.state is HandoffState.OPEN or len(before)):
            # it ended with input left for it (its pool broke): nothing more can pass it
            self.cancel(stopped_by=self.names[stage])
        with self._lock:
            self._ended += 1
            last = self._ended == len(self.names)
        if last:
            self._finish()

    def _finish(self) -> None:
        for stage, handoff in enumerate(self.handoffs, start=1):
            failure = Failure("TaskCancelled", self._never_started(stage))
            for index, _value in handoff.leftover():
                self.settle(
                    stage, index, None, "cancelled", None, failure, None, None, 0, None, None
                )
        with self._lock:  # with the state: a record the feeder adds later is not kept
            inputs = self._inputs
            self.results._truncate(inputs)
            self._state = FlowState.DONE
        self.results._stages = {sink.name: sink.finished_records(inputs) for sink in self.sinks}
        error = self.input_error

        def flush_then_complete() -> None:  # on a delivery thread: it may wait on disk
            if self.journal_run is not None:
                self.journal_run.close()
            if error is not None:
                self.future.set_exception(with_results(error, self.results))
            else:
                self.future.set_result(self.results)

        self.deliveries.put(flush_then_complete)
        self.deliveries.close()  # its thread ends once the future is complete
        self.finished.set()

    def _never_started(self, stage: int) -> str:
        """Why an input waiting for ``stage`` never ran there."""
        name = self.names[stage]
        if self._stopped_by is None:
            return f"the pipeline was cancelled before stage {name!r} started it"
        stopped = f"the pipeline stopped (stage {self._stopped_by!r} ended early)"
        return f"{stopped} before stage {name!r} started it"

    def busy_seconds(self) -> list[float]:
        """Per stage, the seconds its workers spent on tasks so far."""
        return [sink.busy for sink in self.sinks]


class StageSink:
    """Where a stage run's records go: the stage's own record of each input, then the
    next stage (an ok value) or the pipeline's record (anything else, or the last
    stage's). Called by the stage's dispatcher only, and it never blocks; ``records``
    is read once the stage's run has ended."""

    def __init__(self, flow: Flow, stage: int) -> None:
        self._flow = flow
        self._stage = stage
        self.name = flow.names[stage]
        self._handoff = flow.handoffs[stage] if stage < len(flow.handoffs) else None
        self.records = Results()  # this stage's records: no items, no values
        self.busy = 0.0  # seconds of task time, for the views and the bottleneck

    def put(self, done: Finished) -> None:
        task = done.task
        self.put_many(
            FinishedBatch(
                [task.index],
                [task.item],
                task.attempts,
                done.status,
                [done.value],
                done.failure,
                None if done.started is None else [done.started],
                None if done.finished is None else [done.finished],
                done.worker,
                done.pid,
            )
        )

    def put_many(self, done: FinishedBatch) -> None:
        indices, count = done.indices, len(done.items)
        if self._stage == 0:  # increasing, as read: consecutive ones are written in slices
            indices = as_range(indices)
        self.records._reserve(max(indices))
        self.records._put_many(
            indices,
            [None] * count,
            done.status,
            None,
            done.failure,
            done.attempts,
            done.started,
            done.finished,
            done.worker,
            done.pid,
        )
        started = done.started or [None] * count
        finished = done.finished or [None] * count
        if done.started is not None and done.finished is not None:
            self.busy += math.fsum(finished) - math.fsum(started)
        values = done.values or [None] * count
        if done.status == "ok" and self._handoff is not None:
            if self._stage == 0:
                origins = self._flow.origins
                for k, index in enumerate(indices):
                    origins[index] = (done.items[k], started[k])
            self._handoff.put(zip(indices, values, strict=True))
            return
        attempts = done.attempts
        for k, index in enumerate(indices):
            self._flow.settle(
                self._stage,
                index,
                done.items[k],
                done.status,
                values[k],
                done.failure,
                done.worker,
                done.pid,
                attempts if isinstance(attempts, int) else attempts[k],
                started[k],
                finished[k],
            )

    def buffered(self) -> int:
        """Values handed on and not yet taken: they count against the run's
        ``max_pending``, so a stage cannot run ahead of the next (see ``handoff``).
        The first stage's also counts records the journal has yet to write, so a
        journal slower than the pipeline holds its input back."""
        waiting = 0 if self._handoff is None else len(self._handoff)
        journal_run = self._flow.journal_run
        if self._stage == 0 and journal_run is not None:
            waiting += journal_run.pending()
        return waiting

    def finish(self, run: Run) -> None:
        self._flow.stage_ended(self._stage, run)

    def finished_records(self, inputs: int) -> Results:
        """This stage's records of the pipeline's ``inputs``, once its run has ended,
        without the gaps of inputs that never reached it."""
        records = self.records
        records._truncate(inputs)
        return records._filled() if _UNFILLED in records._status else records
