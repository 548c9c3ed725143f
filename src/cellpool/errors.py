"""Exceptions that describe what happened to a task outside its own code."""

from __future__ import annotations

from concurrent.futures import BrokenExecutor


class TaskTimeout(TimeoutError):
    """A task ran past the executor's ``timeout``."""


class WorkerCrashed(RuntimeError):
    """The worker process running a task died (segfault, ``os._exit``, a kill)."""


class TaskCancelled(Exception):
    """A task was cancelled before it could finish."""


class RemoteError(Exception):
    """A task's exception that could not be rebuilt in this process.

    It keeps the original class name, message and traceback text.
    """

    def __init__(self, error_type: str, message: str, traceback: str | None = None):
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.message = message
        self.traceback = traceback


class BrokenPool(BrokenExecutor):
    """The pool can run nothing more: its initializer failed, or workers cannot start.

    A ``concurrent.futures.BrokenExecutor``, as the standard library's pools raise.
    """


class RemoteTraceback(Exception):
    """The traceback of a task's exception in the worker, as text: set as the
    ``__cause__`` of the exception a future raises, as the standard library does."""

    def __init__(self, traceback: str) -> None:
        super().__init__(traceback)
        self.traceback = traceback

    def __str__(self) -> str:
        return f'\n"""\n{self.traceback}"""'


def one_line(error: BaseException) -> str:
    """The first line of ``error``'s message, or its type's name: for one-line errors
    and warnings that name what went wrong underneath."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
