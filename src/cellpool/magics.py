"""IPython magics: ``%%parallel``, ``%parallel`` and ``%parallel_config``.

``%load_ext cellpool`` registers them. A cell body becomes a function of the loop
target whose globals are the notebook's namespace: threads see it live, and process
workers receive (through cloudpickle) only the names the body actually uses.
"""

from __future__ import annotations

import argparse
import ast
import atexit
import itertools
import linecache
import shlex
from collections.abc import Callable
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class

from .executor import Executor
from .results import Results
from .store import Journal

_cell_numbers = itertools.count(1)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option as a one-line ``UsageError``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _option_parser(prog: str, per_run: bool) -> _Parser:
    parser = _Parser(prog=prog, add_help=False)
    parser.add_argument("-k", "--kind", choices=["thread", "process", "dask"])
    parser.add_argument("-w", "--workers", type=int)
    parser.add_argument("--timeout", type=float)
    parser.add_argument("--retries", type=int)
    parser.add_argument("--memory-limit", dest="memory_limit")
    parser.add_argument("--fd-limit", dest="fd_limit", type=int)
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    if per_run:  # these belong to one run: no session default (%parallel_config)
        parser.add_argument("-o", "--out")
        parser.add_argument("--background", action="store_true")
        parser.add_argument("--label")
        parser.add_argument("--journal")
        parser.add_argument("--rerun", choices=["errors", "none", "all"])
    return parser


def split_options(line: str, head_is_valid: Callable[[str], bool]) -> tuple[str, list[str]] | None:
    """Split ``line`` into a head and option words at the first ``-`` that can start them.

    An option must follow a space and the head before it must be valid, so that
    ``x in range(-3, 3) -w 2`` splits before ``-w``, not inside the expression.
    """
    starts = [i for i, ch in enumerate(line) if ch == "-" and (i == 0 or line[i - 1].isspace())]
    for start in [*starts, len(line)]:
        head = line[:start].strip()
        if head and head_is_valid(head):
            try:
                return head, shlex.split(line[start:])
            except ValueError as error:
                raise UsageError(f"cannot read the options: {error}") from None
    return None


def _is_loop_header(head: str) -> bool:
    try:
        ast.parse(f"for {head}: pass")
    except SyntaxError:
        return False
    return True


def _is_call_header(head: str) -> bool:
    return _split_call_header(head) is not None


def _split_call_header(head: str) -> tuple[str, str] | None:
    """``"FN ITERABLE"`` as two Python expressions, split at the first place that works."""
    for i, ch in enumerate(head):
        if ch.isspace() and _is_expression(head[:i]) and _is_expression(head[i:].strip()):
            return head[:i], head[i:].strip()
    return None


def _is_expression(text: str) -> bool:
    try:
        ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        return False
    return bool(text.strip())


def cell_function(target: str, body: str, namespace: dict[str, Any]) -> Callable[[Any], Any]:
    """A function of one item that binds ``target`` to it and runs ``body``.

    The value of the body's last expression is returned, as a cell's ``Out`` would be.
    Its globals are ``namespace``; its tracebacks point at the body's own lines.
    """
    filename = f"<parallel cell {next(_cell_numbers)}>"
    statements = ast.parse(body, filename).body
    if statements and isinstance(statements[-1], ast.Expr):
        last = statements[-1]
        statements[-1] = ast.copy_location(ast.Return(last.value), last)
    module = ast.parse(f"def cell(__cellpool_item__):\n    {target} = __cellpool_item__")
    module.body[0].body.extend(statements)  # type: ignore[attr-defined]
    lines = body.splitlines(keepends=True)
    linecache.cache[filename] = (len(body), None, lines, filename)
    scope: dict[str, Any] = {}
    exec(compile(module, filename, "exec"), namespace, scope)
    function = scope["cell"]
    function.__name__ = "%%parallel"  # how the live view names the run
    return function


@magics_class
class ParallelMagics(Magics):
    """``%%parallel``, ``%parallel``, ``%parallel_config`` and ``%parallel_journal``."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.defaults: dict[str, Any] = {"kind": "thread"}
        self._executors: dict[tuple, Executor] = {}
        atexit.register(self.close)

    def close(self) -> None:
        """Shut down every executor the magics started."""
        for executor in self._executors.values():
            executor.shutdown(wait=True, cancel_futures=True)
        self._executors.clear()

    def _executor(self, options: dict[str, Any]) -> Executor:
        """An executor for these pool settings, kept warm for later cells."""
        pool = {
            name: options[name]
            for name in ("kind", "workers", "memory_limit", "fd_limit")
            if options.get(name) is not None
        }
        key = tuple(sorted(pool.items()))
        executor = self._executors.get(key)
        if executor is None:
            try:
                executor = Executor(**pool)
            except (ValueError, TypeError, NotImplementedError) as error:
                raise UsageError(str(error)) from None
            self._executors[key] = executor
        return executor

    def _options(self, prog: str, words: list[str], per_run: bool) -> dict[str, Any]:
        parsed = vars(_option_parser(prog, per_run).parse_args(words))
        given = {name: value for name, value in parsed.items() if value is not None}
        return {**self.defaults, **given}

    def _launch(self, fn: Callable[..., Any], items: Any, options: dict[str, Any]) -> Any:
        executor = self._executor(options)
        run_options = {
            name: options[name]
            for name in ("timeout", "retries", "progress", "label", "journal", "rerun")
            if name in options
        }
        background = bool(options.get("background"))
        try:
            job = executor._start("parallel", fn, (items,), run_options, background)
        except (ValueError, TypeError) as error:
            raise UsageError(str(error)) from None
        out = options.get("out")
        if background:
            if out:
                self.shell.user_ns[out] = job
                return None
            return job
        try:
            results = job._block()
        except KeyboardInterrupt:
            self._store(out, job.partial())
            raise
        self._store(out, results)
        return results

    def _store(self, name: str | None, value: Results) -> None:
        if name:
            self.shell.user_ns[name] = value

    @line_cell_magic
    def parallel(self, line: str, cell: str | None = None) -> Any:
        """Run a cell body, or a function, once per item on a pool of workers.

        Cell form:  ``%%parallel TARGET in ITERABLE [options]``
        Line form:  ``%parallel FN ITERABLE [options]``

        Options: ``-k/--kind thread|process``, ``-w/--workers N``, ``--timeout S``,
        ``--retries N``, ``--no-progress``, ``-o/--out NAME`` (store the Results),
        ``--background`` (start a Job and return at once; stored in NAME),
        ``--label TEXT`` (name the run in its view and summary; quote it if it has
        spaces: ``--label "first pass"``), ``--journal NAME`` (journal every record;
        the same cell run again restores what was done and runs the rest),
        ``--rerun errors|none|all`` (what a journaled run runs again).

        ``%parallel_config`` takes the pool and run options, not ``-o``,
        ``--background``, ``--label``, ``--journal`` or ``--rerun``: those belong to one
        run.
        """
        if cell is None:
            return self._line(line)
        split = split_options(line, _is_loop_header)
        if split is None:
            raise UsageError(
                f"%%parallel: expected 'TARGET in ITERABLE [options]', got {line.strip()!r}"
            )
        head, words = split
        loop = ast.parse(f"for {head}: pass").body[0]
        target = ast.unparse(loop.target)  # type: ignore[attr-defined]
        iterable = ast.unparse(loop.iter)  # type: ignore[attr-defined]
        options = self._options("%%parallel", words, per_run=True)
        try:
            fn = cell_function(target, cell, self.shell.user_ns)
        except SyntaxError as error:
            raise UsageError(f"%%parallel: the cell body is not valid Python: {error}") from None
        return self._launch(fn, self._iterable("%%parallel", iterable), options)

    def _line(self, line: str) -> Any:
        split = split_options(line, _is_call_header)
        if split is None:
            raise UsageError(f"%parallel: expected 'FN ITERABLE [options]', got {line.strip()!r}")
        head, words = split
        fn_text, iterable = _split_call_header(head)  # type: ignore[misc]
        options = self._options("%parallel", words, per_run=True)
        fn = self._evaluate("%parallel", fn_text)
        if not callable(fn):
            kind = type(fn).__name__
            raise UsageError(f"%parallel: the function {fn_text} is {_a(kind)}, not callable")
        return self._launch(fn, self._iterable("%parallel", iterable), options)

    def _evaluate(self, prog: str, text: str) -> Any:
        """``text`` evaluated in the user's namespace; an undefined name is a one-line
        ``UsageError`` (other errors raised by the user's code keep their traceback)."""
        try:
            return self.shell.ev(text)
        except NameError as error:
            raise UsageError(f"{prog}: {error}") from None

    def _iterable(self, prog: str, text: str) -> Any:
        items = self._evaluate(prog, text)
        try:
            iter(items)
        except TypeError:
            kind = type(items).__name__
            raise UsageError(f"{prog}: the iterable {text} is {_a(kind)}, not iterable") from None
        return items

    @line_magic
    def parallel_journal(self, line: str) -> Any:
        """``%parallel_journal [PATH] [--forget NAME]``: the runs of a journal (the
        default one, or the file at PATH), as a DataFrame where pandas is installed; with
        ``--forget NAME``, forget that run first."""
        parser = _Parser(prog="%parallel_journal", add_help=False)
        parser.add_argument("path", nargs="?")
        parser.add_argument("--forget")
        try:
            words = shlex.split(line)
        except ValueError as error:
            raise UsageError(f"%parallel_journal: cannot read the options: {error}") from None
        options = parser.parse_args(words)
        try:
            with Journal(options.path) as journal:
                if options.forget:
                    journal.forget(options.forget)
                runs = journal.runs()
        except (ValueError, KeyError) as error:
            raise UsageError(f"%parallel_journal: {error}") from None
        try:
            import pandas
        except ImportError:
            return runs
        return pandas.DataFrame(runs)

    @line_magic
    def parallel_config(self, line: str) -> dict[str, Any] | None:
        """Set this session's defaults for ``%%parallel``; with no options, show them.

        Takes the options of ``%%parallel`` but ``-o``, ``--background`` and ``--label``,
        which belong to one run: a label names one run, and as a default it would give
        every later run the same name.
        """
        try:
            words = shlex.split(line)
        except ValueError as error:
            raise UsageError(f"%parallel_config: cannot read the options: {error}") from None
        if not words:
            return dict(self.defaults)
        self.defaults = self._options("%parallel_config", words, per_run=False)
        return None


def _a(noun: str) -> str:
    return f"an {noun}" if noun[:1].lower() in "aeiou" else f"a {noun}"


def load_ipython_extension(shell: Any) -> None:
    """Called by ``%load_ext cellpool``."""
    shell.register_magics(ParallelMagics(shell))
