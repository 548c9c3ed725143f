"""Reading a run's input on a thread of its own, so the dispatcher never runs user code.

A user's iterator can block (a slow generator, a network stream) or raise. The feeder
thread reads it into a buffer, never past the *allowance* the dispatcher grants (the
number of items the run may have read so far, which keeps memory bounded), and tells
the dispatcher when items arrive or the input ends. The dispatcher only takes from the
buffer, which never blocks.

Ownership: ``_read``, ``_allowance``, ``_state`` and ``error`` are guarded by ``_lock``;
the iterator is touched only by the feeder thread. ``_parts`` is a deque of lists of
items: the feeder appends at its right end and counts ``_appended``, the dispatcher
takes from its left end and counts ``_taken``. Each deque operation is atomic, so a
part is there to take the moment it is read.
"""

from __future__ import annotations

import enum
import itertools
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

CHUNK = 512  # the most items read between two looks at the allowance


class FeederState(enum.Enum):
    READING = "reading"  # reads while under its allowance
    DRAINING = "draining"  # the run was cancelled: read the rest (a sized input) for records
    ENDED = "ended"  # the input ran out or raised (``error``)
    STOPPED = "stopped"  # told to stop: reads nothing more


class Feeder:
    """Reads ``items`` ahead of the dispatcher; ``on_change`` is called (from the feeder
    thread, and it must not block) whenever items arrive or the input ends."""

    def __init__(self, items: Iterator[Any], on_change: Callable[[], None], name: str) -> None:
        self._items = items
        self._on_change = on_change
        self._lock = threading.Lock()
        self._wanted = threading.Condition(self._lock)
        self._parts: deque[list[Any]] = deque()
        self._appended = 0  # items put in _parts (written by the feeder thread only)
        self._taken = 0  # items taken from _parts (written by the dispatcher only)
        self._allowance = 0  # items the feeder may have read in all
        self._read = 0
        self._state = FeederState.READING
        self.error: BaseException | None = None  # what iterating the input raised
        self.starved = False  # it waits for a larger allowance
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while self._state is FeederState.READING and self._read >= self._allowance:
                    self.starved = True  # read by map's consumer, without the lock
                    self._wanted.wait()
                self.starved = False
                if self._state not in (FeederState.READING, FeederState.DRAINING):
                    return
                want = CHUNK
                if self._state is FeederState.READING:
                    want = min(CHUNK, self._allowance - self._read)
            count, error = self._read_chunk(want)
            with self._lock:
                self._read += count
                ran_out = error is not None or count < want
                if ran_out and self._state is not FeederState.STOPPED:
                    self.error = error
                    self._state = FeederState.ENDED
                done = self._state in (FeederState.ENDED, FeederState.STOPPED)
            if done:
                self._on_change()  # the input has ended
                return

    def _read_chunk(self, want: int) -> tuple[int, BaseException | None]:
        """Read up to ``want`` items into the buffer, in parts that double from one, so
        items are there to take soon after they are read even when the input then
        blocks, while a fast input is read at C speed. Returns (items read, the error
        iterating raised)."""
        parts, count, part_size = self._parts, 0, 1
        while count < want:
            size = min(part_size, want - count)
            part: list[Any] = []
            error = None
            try:
                part.extend(itertools.islice(self._items, size))  # user code, no lock held
            except BaseException as exc:  # even SystemExit: it is the input's, not ours
                error = exc  # what the part got before it still counts
            if part:
                was_empty = not parts
                parts.append(part)  # atomic: the dispatcher may take it at once
                self._appended += len(part)
                count += len(part)
                if was_empty:
                    self._on_change()
            if error is not None or len(part) < size:
                return count, error
            part_size *= 2
        return count, None

    def grant(self, allowance: int) -> None:
        """Let the feeder read until it has read ``allowance`` items in all."""
        with self._lock:
            if allowance > self._allowance:
                self._allowance = allowance
                self._wanted.notify()

    def take(self, count: int) -> list[Any]:
        """Up to ``count`` items read so far (never blocks; the feeder may be appending)."""
        parts = self._parts
        taken: list[Any] = []
        while parts and len(taken) < count:
            need = count - len(taken)
            part = parts[0]
            if len(part) <= need:
                taken += parts.popleft()
            else:
                taken += part[:need]
                parts[0] = part[need:]  # only this thread touches the left end
        self._taken += len(taken)
        return taken

    def buffered(self) -> int:
        return self._appended - self._taken

    def ended(self) -> bool:
        """True once the input has run out, raised or was stopped, and every item read
        was taken."""
        with self._lock:
            return self._state in (FeederState.ENDED, FeederState.STOPPED) and not self._parts

    def drain(self) -> None:
        """Read the rest of the input regardless of the allowance (for a cancelled run
        over a sized input, whose every item gets a record)."""
        with self._lock:
            if self._state is FeederState.READING:
                self._state = FeederState.DRAINING
                self._wanted.notify()

    def stop(self) -> None:
        """Read nothing more (what was read stays to be taken). A thread blocked in the
        user's iterator ends when that returns."""
        with self._lock:
            if self._state is not FeederState.ENDED:
                self._state = FeederState.STOPPED
            self._wanted.notify()
