"""cellpool: run a function over many inputs on threads or processes, from a notebook.

Live progress and per-worker resources while it runs, one record per input after.
"""

from .errors import RemoteError, TaskCancelled, TaskTimeout, WorkerCrashed
from .executor import Executor, Job, run
from .results import Results, TaskResult

__all__ = [
    "Executor",
    "Job",
    "RemoteError",
    "Results",
    "TaskCancelled",
    "TaskResult",
    "TaskTimeout",
    "WorkerCrashed",
    "run",
]
__version__ = "0.1.0"


def load_ipython_extension(shell: object) -> None:
    """``%load_ext cellpool``: register ``%%parallel``, ``%parallel``, ``%parallel_config``."""
    from .magics import load_ipython_extension as load

    load(shell)
