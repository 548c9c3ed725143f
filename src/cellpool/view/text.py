"""The terminal view: one line on stderr, redrawn in place.

The line fits the terminal: each redraw reads the stream's current width and draws at
most ``width - 1`` columns (a line that reaches the last column makes some terminals
wrap, and ``"\\r"`` then returns only to the start of the second row). The summary's
``" | "`` parts come most important first, so the last ones go first; then the line is
cut with an ellipsis.

A background job (``start``, ``%%parallel --background``) started at an interactive
prompt does not redraw: the prompt is back and owns the cursor, and a line redrawn in
place from another thread would land on it. Such a view stays silent while the job
runs and prints one line when it ends: above the prompt through prompt_toolkit's
``run_in_terminal`` when a prompt_toolkit prompt (IPython's) is waiting, which hides
the prompt, prints and draws it again below; else as a plain line of its own.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import unicodedata
from collections.abc import Callable
from typing import Any, TextIO

from .kernel import no_events

REFRESH = 0.1  # seconds between redraws: at most ten a second
FALLBACK_WIDTH = 80  # columns, for a stream that is no terminal
SEPARATOR = " | "
CLEAR_TO_END = "\x1b[K"
ABOVE_PROMPT_WAIT = 3.0  # seconds the prompt gets to print the last line (it may first
# wait a second for a cursor position report the terminal never sends)


def char_width(char: str) -> int:
    """Columns a terminal gives ``char``: 0 for combining marks, 2 for wide ones."""
    if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def display_width(text: str) -> int:
    return sum(char_width(char) for char in text)


def printable(text: str) -> str:
    """``text`` with control characters (a newline in a label, say) made spaces."""
    return "".join(" " if unicodedata.category(char) == "Cc" else char for char in text)


def fit(line: str, limit: int, ellipsis: str = "…") -> str:
    """``line`` in at most ``limit`` columns: its last ``" | "`` parts dropped, then,
    if still too wide, cut to end with ``ellipsis``."""
    parts = line.split(SEPARATOR)
    while len(parts) > 1 and display_width(SEPARATOR.join(parts)) > limit:
        parts.pop()
    line = SEPARATOR.join(parts)
    if display_width(line) <= limit:
        return line
    room = limit - display_width(ellipsis)
    if room < 0:
        return ""
    kept, used = [], 0
    for char in line:
        used += char_width(char)
        if used > room:
            break
        kept.append(char)
    return "".join(kept) + ellipsis


def terminal_width(stream: TextIO) -> int:
    """The width of the terminal ``stream`` writes to, now; 80 for anything else."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):  # no fd, not a terminal, closed
        return FALLBACK_WIDTH
    return columns or FALLBACK_WIDTH  # a pty nobody sized says 0


def is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def prompt_is_interactive() -> bool:
    """True at an interactive prompt: Python's REPL (it sets ``sys.ps1``) or IPython's
    terminal shell. Not in a script, and not in a kernel, whose stderr is no terminal."""
    if hasattr(sys, "ps1"):
        return True
    ipython = sys.modules.get("IPython")  # loaded wherever IPython runs; else do not load it
    terminal = sys.modules.get("IPython.terminal.interactiveshell")
    if ipython is None or terminal is None:
        return False
    return isinstance(ipython.get_ipython(), terminal.TerminalInteractiveShell)


def waiting_prompt() -> tuple[Any, Any] | None:
    """The prompt_toolkit application that holds the terminal now and its event loop,
    or ``None``."""
    application = sys.modules.get("prompt_toolkit.application")
    app = None if application is None else application.get_app_or_none()
    loop = None if app is None or not app.is_running else app.loop
    return None if loop is None else (app, loop)


class _Claim:
    """True for the first call only, from whichever thread: the last line is printed
    once, by the prompt's loop or by the view's thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._claimed = False

    def __call__(self) -> bool:
        with self._lock:
            first, self._claimed = not self._claimed, True
        return first


class TextProgress:
    """Redraws a summary line, ``line()``, on ``stream``.

    ``quiet``: draw nothing while the run goes on and print one line when it ends,
    without disturbing a prompt (for a background job at an interactive prompt).
    """

    refresh = REFRESH

    def __init__(self, line: Callable[[], str], stream: TextIO, quiet: bool = False) -> None:
        self._summary = line
        self._stream = stream
        self._quiet = quiet
        self._tty = is_terminal(stream)
        self._drawn = 0  # columns of the line on screen, for a stream that cannot clear
        self._ellipsis = "…" if _encodes(stream, "…") else "..."

    def _line(self) -> str:
        line = printable(self._summary())
        return fit(line, terminal_width(self._stream) - 1, self._ellipsis)

    def update(self, final: bool = False) -> None:
        if self._quiet:
            if final:
                self._print_last(self._line())
            return
        line = self._line()
        width = display_width(line)
        clear = CLEAR_TO_END if self._tty else " " * max(self._drawn - width, 0)
        self._stream.write("\r" + line + clear + ("\n" if final else ""))
        self._stream.flush()
        self._drawn = width

    def _print_last(self, line: str) -> None:
        """``line`` on a line of its own, above the prompt if one is waiting."""

        def write(text: str) -> None:
            self._stream.write(text)
            self._stream.flush()

        claim = _Claim()
        prompt = waiting_prompt()
        if prompt is not None:
            # On the prompt's own event loop, as prompt_toolkit requires: the prompt is
            # erased, the line printed where it was, and the prompt drawn again below.
            from prompt_toolkit.application import run_in_terminal

            printed = threading.Event()

            def above_prompt() -> None:
                if claim():
                    write(line + "\n")
                printed.set()

            app, loop = prompt
            with contextlib.suppress(RuntimeError):  # its loop has just closed
                loop.call_soon_threadsafe(run_in_terminal, above_prompt, context=app.context)
                if printed.wait(ABOVE_PROMPT_WAIT):
                    return
        # No prompt to print above (or it ended meanwhile): start a fresh line, so
        # nothing the screen holds (a prompt, a cell's output) is overwritten.
        if claim():
            write(("\n" if self._tty else "") + line + "\n")

    def finish(self) -> None:
        """Nothing more to show: the last line stays."""

    def events(self) -> contextlib.AbstractContextManager[Callable[[], None]]:
        return no_events()


def _encodes(stream: TextIO, text: str) -> bool:
    try:
        text.encode(getattr(stream, "encoding", None) or "utf-8")
    except (LookupError, UnicodeEncodeError):
        return False
    return True
