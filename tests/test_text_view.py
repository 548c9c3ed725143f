"""The terminal line: it fits the terminal's width, and a background job started at an
interactive prompt leaves the prompt alone.

Each test writes to a real pseudo-terminal whose size it sets, and reads what a
terminal would receive from the other end.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import struct
import subprocess
import sys
import termios
import threading
import time
import tty
from pathlib import Path

import pytest

import cellpool

IPYTHON = [sys.executable, "-m", "IPython", "--HistoryManager.hist_file=:memory:"]
ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[@-_]")


class Terminal:
    """A pseudo-terminal ``columns`` wide; ``output()`` is all that was written to it."""

    def __init__(self, columns: int, raw: bool = True) -> None:
        self.master, self.slave = os.openpty()
        if raw:  # bytes arrive as written: no "\n" -> "\r\n"
            tty.setraw(self.slave)
        self.resize(columns)
        self._received: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def resize(self, columns: int) -> None:
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: every holder of the other end has closed it
                return
            if not data:
                return
            self._received.append(data)

    def output(self) -> str:
        return b"".join(self._received).decode("utf-8", "replace")

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def wait_for(self, check, timeout: float = 30.0) -> str:
        """The output, once ``check(output)`` holds; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not check(output := self.output()):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; the terminal got {output!r}")
            time.sleep(0.02)
        return output

    def close(self) -> None:
        os.close(self.slave)
        self._reader.join(5)
        os.close(self.master)


@pytest.fixture
def terminal(monkeypatch):
    """A ``Terminal`` factory; stderr writes to the last one made."""
    made: list[tuple[Terminal, object]] = []
    monkeypatch.delattr(sys, "ps1", raising=False)  # no interactive prompt unless a test says

    def make(columns: int) -> Terminal:
        term = Terminal(columns)
        stream = open(term.slave, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
        made.append((term, stream))
        monkeypatch.setattr(sys, "stderr", stream)
        return term

    yield make
    monkeypatch.undo()  # the real stderr back before its replacement closes
    for term, stream in made:
        stream.close()
        term.close()


def drawn_lines(output: str) -> list[str]:
    """Every line drawn: the output cut at each carriage return and newline."""
    return [line for line in re.split(r"[\r\n]", ESCAPE.sub("", output)) if line]


def screen_rows(output: str, columns: int) -> list[str]:
    """The rows a terminal ``columns`` wide shows after ``output`` (which writes from
    the top-left corner): it wraps at the last column and clears with ESC [K."""
    rows: list[list[str]] = [[]]
    row = col = 0
    wrap = False
    for token in re.findall(r"\x1b\[K|\x1b\[[0-9;?]*[ -/]*[@-~]|.", output, re.S):
        if token == "\r":
            col, wrap = 0, False
        elif token == "\n":
            row, wrap = row + 1, False
        elif token == "\x1b[K":
            del rows[row][col:]
        elif token.startswith("\x1b"):
            continue
        else:
            if wrap:
                row, col, wrap = row + 1, 0, False
            while len(rows) <= row:
                rows.append([])
            cells = rows[row]
            cells.extend(" " * (col + 1 - len(cells)))
            cells[col] = token
            if col == columns - 1:
                wrap = True
            else:
                col += 1
        while len(rows) <= row:
            rows.append([])
    return [text for cells in rows if (text := "".join(cells).rstrip())]


@pytest.mark.parametrize(
    ("columns", "label"),
    [(40, "squares"), (60, "squares"), (40, "a-label-much-too-long-for-forty-columns")],
)
def test_the_line_fits_a_narrow_terminal(terminal, columns, label):
    term = terminal(columns)
    results = cellpool.run(time.sleep, [0.05] * 12, workers=1, progress="text", label=label)
    assert results.ok
    output = term.wait_for(lambda out: out.endswith("\n"), timeout=5)
    lines = drawn_lines(output)
    assert len(lines) >= 3, lines  # it was redrawn while the run went on
    assert max(map(len, lines)) <= columns - 1, lines
    # Redrawn in place: the terminal shows one row, the last line, with no leftovers.
    assert screen_rows(output, columns) == [lines[-1]]
    first_part = f"{label} [thread x1] 12/12 (100%)"
    if len(first_part) > columns - 1:  # even the first part is too wide: cut
        assert lines[-1] == first_part[: columns - 2] + "…"
    else:  # the parts that fit
        assert lines[-1].startswith(first_part)


def test_a_resize_between_redraws_is_honoured(terminal):
    term = terminal(100)

    def step(i: int) -> None:
        if i == 5:
            term.resize(40)
        time.sleep(0.06)

    cellpool.run(step, range(12), workers=1, progress="text", label="resize")
    lines = drawn_lines(term.wait_for(lambda out: out.endswith("\n"), timeout=5))
    assert max(map(len, lines)) > 40, lines  # before the resize it used 100 columns
    after = [line for line in lines if int(re.search(r" (\d+)/12", line)[1]) >= 6]
    assert after, lines  # item 5 (which resized) had finished when these were drawn
    assert max(map(len, after)) <= 39, after


def test_a_background_job_at_the_repl_prints_one_line_when_it_ends(terminal, monkeypatch):
    term = terminal(60)
    monkeypatch.setattr(sys, "ps1", ">>> ", raising=False)  # as Python's REPL sets it
    gate = threading.Event()
    with cellpool.Executor("thread", 2) as executor:
        job = executor.start(lambda _: gate.wait(10), range(6), progress="text", label="bg")
        time.sleep(0.5)  # five refreshes: the old line redrew itself over the prompt
        assert not job.done()
        gate.set()
        assert job.result().ok
    output = term.wait_for(lambda out: "6/6" in out, timeout=5)
    assert "\r" not in output  # no redraw in place
    lines = drawn_lines(output)
    assert len(lines) == 1, lines
    assert lines[0].startswith("bg [thread x2] 6/6 (100%)")
    assert len(lines[0]) <= 59
    assert output.startswith("\n")  # on a fresh line: the prompt's line is left as is
    assert output.endswith("\n")


def test_a_background_job_in_ipython_prints_above_the_prompt(tmp_path):
    """A real IPython in a 60-column terminal: a job started from it ends while the
    next prompt waits with some input typed. The summary appears once, above the
    prompt, which is drawn again below it with the input kept."""
    pytest.importorskip("IPython")
    flag = tmp_path / "go"
    src = str(Path(cellpool.__file__).parents[1])
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env.update(
        PYTHONPATH=os.pathsep.join([src, env.get("PYTHONPATH", "")]),
        TERM="xterm",
        PROMPT_TOOLKIT_NO_CPR="1",  # nothing here answers a cursor position request
        IPYTHONDIR=str(tmp_path / "ipython"),
    )
    term = Terminal(60, raw=False)
    try:
        shell = subprocess.Popen(
            [*IPYTHON, "--no-banner", "--colors=nocolor", "--no-confirm-exit"],
            stdin=term.slave,
            stdout=term.slave,
            stderr=term.slave,
            env=env,
            start_new_session=True,
        )
        try:
            cells = [
                f"import os, time, cellpool; flag = {str(flag)!r}",
                "go = lambda _: [time.sleep(0.02) for _ in iter(lambda: os.path.exists(flag), 1)]",
                'job = cellpool.Executor("thread", 2).start(go, range(6), label="bg-job")',
            ]
            for number, cell in enumerate(cells, 1):
                term.wait_for(lambda out, n=number: f"In [{n}]:" in ESCAPE.sub("", out))
                term.type(cell + "\r")
            term.wait_for(lambda out: "In [4]:" in ESCAPE.sub("", out))
            term.type("x = 1")
            term.wait_for(lambda out: ESCAPE.sub("", out).rstrip().endswith("x = 1"))
            time.sleep(0.5)  # five refreshes while the prompt waits
            flag.touch()
            term.wait_for(lambda out: "6/6 (100%)" in out)
            with contextlib.suppress(AssertionError):  # a prompt not drawn again fails below
                term.wait_for(lambda out: "x = 1" in ESCAPE.sub("", out).partition("6/6")[2], 5)
            text = term.output()
            term.type("\rexit\r")
            shell.wait(30)
        finally:
            if shell.poll() is None:
                shell.kill()
                shell.wait()
    finally:
        term.close()
    text = ESCAPE.sub("", text)
    started = text.index("In [4]:")
    assert text.count("bg-job [") == 1, text[started:]  # drawn once, not redrawn
    summary = re.search(r"bg-job \[thread x2\] 6/6 \(100%\)[^\r\n]*", text)
    assert summary and len(summary[0]) <= 59, text[started:]
    # Above the prompt, which is drawn again below it with the input still there.
    assert re.search(r"In \[4\]: ?x = 1", text[summary.end() :]), text[started:]
