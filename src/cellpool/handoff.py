"""Between two pipeline stages: the values one stage finished, waiting for the next.

A ``Handoff`` is written by the upstream stage's dispatcher (through its sink) and read
by the downstream stage's dispatcher (through ``HandoffInput``, that run's input). Both
sides only append or pop, so neither ever blocks: back-pressure comes from the runs'
allowances instead. The upstream sink counts the handoff's depth as values waiting to
be consumed (``Sink.buffered``), so the upstream run reads a new input only while

    inputs it has read - inputs it has recorded as failed - inputs taken downstream
        <= its max_pending

which bounds how far a fast stage can get ahead of a slow one. Each side wakes the
other's dispatcher when it changes what the other may do: a value handed on (something
to take), a value taken (room to read more), the upstream run ending.

Ownership: ``_values`` is a deque (the upstream appends, the downstream pops: each
operation atomic); ``_state`` is guarded by ``_lock``. ``HandoffInput``'s fields are
its dispatcher's.
"""

from __future__ import annotations

import enum
import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any


class HandoffState(enum.Enum):
    OPEN = "open"  # the upstream run goes on: more values may come
    CLOSED = "closed"  # the upstream run has ended: what is here is all there will be
    CANCELLED = "cancelled"  # the pipeline was cancelled: nothing more is taken


class Handoff:
    """``(index, value)`` pairs finished upstream, in the order they finished."""

    def __init__(self) -> None:
        self._values: deque[tuple[int, Any]] = deque()
        self._lock = threading.Lock()
        self._state = HandoffState.OPEN
        self.taken = 0  # pairs taken downstream (written by the downstream dispatcher)
        self.wake_upstream: Callable[[], None] = lambda: None  # set when the runs exist
        self.wake_downstream: Callable[[], None] = lambda: None

    def __len__(self) -> int:
        """How many values wait (read by the upstream sink and by views)."""
        return len(self._values)

    @property
    def state(self) -> HandoffState:
        return self._state

    def put(self, pairs: Iterable[tuple[int, Any]]) -> None:
        """Hand values on (upstream dispatcher; never blocks)."""
        self._values.extend(pairs)
        self.wake_downstream()

    def close(self) -> None:
        """The upstream run has ended."""
        with self._lock:
            if self._state is HandoffState.OPEN:
                self._state = HandoffState.CLOSED
        self.wake_downstream()

    def cancel(self) -> None:
        """Take nothing more: what is here, or comes later, is left for ``leftover``."""
        with self._lock:
            self._state = HandoffState.CANCELLED
        self.wake_downstream()

    def take(self, count: int) -> list[tuple[int, Any]]:
        """Up to ``count`` waiting pairs (downstream dispatcher; never blocks)."""
        if self._state is HandoffState.CANCELLED:
            return []
        values = self._values
        taken = [values.popleft() for _ in range(min(count, len(values)))]
        if taken:
            self.taken += len(taken)
            self.wake_upstream()  # room for the upstream run to read more
        return taken

    def ended(self) -> bool:
        """True when nothing more will be taken."""
        state = self._state
        return state is HandoffState.CANCELLED or (
            state is HandoffState.CLOSED and not self._values
        )

    def leftover(self) -> list[tuple[int, Any]]:
        """What was never taken (once both stages have ended)."""
        values = list(self._values)
        self._values.clear()
        return values


class HandoffInput:
    """A downstream run's input: the handoff's pairs, within the run's allowance. The
    run is ``indexed``: each pair carries the index of the pipeline's input."""

    error = None  # a handoff never raises
    starved = False

    def __init__(self, handoff: Handoff) -> None:
        self._handoff = handoff
        self._allowance = 0  # how many may have been taken in all
        self._stopped = False

    def take(self, count: int) -> list[tuple[int, Any]]:
        if self._stopped:
            return []
        room = self._allowance - self._handoff.taken
        return self._handoff.take(min(count, room)) if room > 0 else []

    def buffered(self) -> int:
        """Pairs waiting that the run may take now."""
        if self._stopped:
            return 0
        return max(0, min(len(self._handoff), self._allowance - self._handoff.taken))

    def ended(self) -> bool:
        return self._stopped or self._handoff.ended()

    def grant(self, allowance: int) -> None:
        if allowance > self._allowance:
            self._allowance = allowance
            if len(self._handoff):  # values wait that may now be taken: look again
                self._handoff.wake_downstream()

    def drain(self) -> None:
        self.stop()  # a downstream run is not sized: a cancel never asks it to drain

    def stop(self) -> None:
        # what waits in the handoff is the pipeline's to record (Flow.finish)
        self._stopped = True
