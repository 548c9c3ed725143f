"""cellpool: run a function over many inputs on threads or processes, from a notebook.

Live progress and per-worker resources while it runs, one record per input after.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .errors import RemoteError, TaskCancelled, TaskTimeout, WorkerCrashed
    from .executor import Executor, Job, run
    from .pipelines import Pipeline, Stage, pipeline, stage
    from .results import Results, TaskResult
    from .store import Journal

# Public names load on first use, so that a worker process, which imports only
# cellpool.worker, does not pay for the executor's imports.
_EXPORTS = {
    "Executor": "executor",
    "Job": "executor",
    "run": "executor",
    "Journal": "store",
    "Pipeline": "pipelines",
    "Stage": "pipelines",
    "pipeline": "pipelines",
    "stage": "pipelines",
    "Results": "results",
    "TaskResult": "results",
    "RemoteError": "errors",
    "TaskCancelled": "errors",
    "TaskTimeout": "errors",
    "WorkerCrashed": "errors",
}
__all__ = [
    "Executor",
    "Job",
    "Journal",
    "Pipeline",
    "RemoteError",
    "Results",
    "Stage",
    "TaskCancelled",
    "TaskResult",
    "TaskTimeout",
    "WorkerCrashed",
    "journal",
    "pipeline",
    "run",
    "stage",
]
__version__ = "0.1.0"


def journal(path: str | os.PathLike[str] | None = None) -> Journal:
    """The journal at ``path``, or the default one (``.cellpool/journal.db`` under the
    working directory): list its runs (``.runs()``), load one's ``Results`` without
    running anything (``.load(name)``) or forget one (``.forget(name)``)."""
    from .store import Journal

    return Journal(path)


def __getattr__(name: str) -> Any:
    if name == "http":  # cellpool.http.session(), for tasks: loads requests on first use
        return importlib.import_module(".http", __name__)
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cellpool' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


def load_ipython_extension(shell: Any) -> None:
    """``%load_ext cellpool``: register ``%%parallel``, ``%parallel``, ``%parallel_config``."""
    from .magics import load_ipython_extension as load

    load(shell)
