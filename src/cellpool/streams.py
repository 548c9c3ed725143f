"""``sys.stdout`` and ``sys.stderr`` of a worker process: what tasks print goes to the parent.

Text is sent as ``("out", name, text)`` through ``send``, in whole lines. Code that wants
the real stream gets what it needs: ``fileno()`` is the worker's inherited fd (1 or 2),
so a subprocess or ``faulthandler`` writes there directly (not through the parent, so
without its ``[p1]`` prefix; in Jupyter, ipykernel captures that fd), and ``buffer``
takes bytes, which go the same way as text. Imported at worker start: stdlib only.
"""

from __future__ import annotations

import codecs
import io
import threading
from collections.abc import Callable, Iterable
from typing import Any

PENDING_MAX = 8192  # characters held without a newline before they are sent anyway


class ForwardedStream(io.TextIOBase):
    """A write-only text stream sending what is written to ``send``, whole lines at a time.

    ``write`` sends everything up to its last newline and keeps the rest until the next
    newline, a ``flush`` or ``close``, or ``PENDING_MAX`` characters. ``errors`` is
    ``"backslashreplace"``: bytes written to ``buffer`` that are not UTF-8, and lone
    surrogates in text, arrive as ``\\xNN`` / ``\\udcNN`` escapes; printing never raises
    a ``UnicodeError``. ``close`` flushes and marks the stream closed, leaving the fd
    open; after it ``write`` raises ``ValueError`` but ``flush`` does nothing (the worker
    flushes after every batch, even one whose task closed ``sys.stdout``). Safe to use
    from several threads: each ``write`` is sent whole, in order.
    """

    encoding = "utf-8"
    errors = "backslashreplace"
    mode = "w"
    line_buffering = True

    def __init__(self, send: Callable[[Any], Any], name: str, fd: int) -> None:
        self._send = send
        self._name = name
        self._fd = fd
        self._pending: list[str] = []
        self._size = 0
        self._closed = False
        self._lock = threading.RLock()  # reentrant: a signal handler may print mid-write
        self.buffer = ForwardedBytes(self)

    @property
    def name(self) -> str:
        return f"<{self._name}>"

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("I/O operation on closed file.")

    def _forward(self, text: str) -> None:
        if not text.isascii():  # O(1): only non-ASCII text may hold lone surrogates
            text = text.encode("utf-8", self.errors).decode("utf-8")
        self._send(("out", self._name, text))

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        with self._lock:
            self._check_open()
            self._pending.append(s)
            self._size += len(s)
            if "\n" in s:
                lines, newline, rest = "".join(self._pending).rpartition("\n")
                self._pending = [rest] if rest else []
                self._size = len(rest)
                self._forward(lines + newline)
            elif self._size > PENDING_MAX:
                self.flush()
        return len(s)

    def writelines(self, lines: Iterable[str]) -> None:
        self.write("".join(lines))

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                text = "".join(self._pending)
                self._pending, self._size = [], 0
                self._forward(text)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                self.buffer._finish()
                self.flush()
            finally:
                self._closed = True

    def fileno(self) -> int:
        self._check_open()
        return self._fd

    def isatty(self) -> bool:
        self._check_open()
        return False

    def readable(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"<cellpool.streams.ForwardedStream name={self.name!r} fd={self._fd}>"


class ForwardedBytes(io.BufferedIOBase):
    """``buffer`` of a ``ForwardedStream``: bytes decoded as UTF-8 (a character split
    across writes is kept until it is whole) and written to the text stream.

    Closing it closes the text stream, as closing ``sys.stdout.buffer`` would."""

    mode = "wb"

    def __init__(self, text: ForwardedStream) -> None:
        self._text = text
        self._decoder = codecs.getincrementaldecoder("utf-8")(text.errors)

    @property
    def name(self) -> str:
        return self._text.name

    @property
    def closed(self) -> bool:
        return self._text.closed

    def write(self, b: Any) -> int:
        data = memoryview(b).cast("B")  # TypeError for str, as a binary stream gives
        with self._text._lock:
            self._text._check_open()
            text = self._decoder.decode(data)
            if text:
                self._text.write(text)
        return data.nbytes

    def _finish(self) -> None:
        """Write what is left of an unfinished character, escaped."""
        text = self._decoder.decode(b"", final=True)
        if text:
            self._text.write(text)

    def flush(self) -> None:
        self._text.flush()

    def close(self) -> None:
        self._text.close()

    def fileno(self) -> int:
        return self._text.fileno()

    def isatty(self) -> bool:
        return self._text.isatty()

    def readable(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False
