"""``cellpool.http.session()``: each worker's own ``requests.Session``.

Sharing one default ``Session`` across 32 threads overflows urllib3's 10-connection pool
("Connection pool is full, discarding connection", and more TCP connections than
needed), waits forever on a server that never answers and gives up at the first reset.
The session returned here belongs to the calling worker: one per thread in a thread
pool, one per process (shared by its ``threads_per_worker`` threads) in a process pool.
Its connection pool is sized to that concurrency; it retries connection errors, dropped
connections and 429/502/503/504 answers with exponential backoff (urllib3's ``Retry``,
honouring ``Retry-After``); it applies a default timeout; and it is closed when the
worker stops.
"""

from __future__ import annotations

import threading
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from . import worker

DEFAULT_TIMEOUT = (5.0, 30.0)  # seconds to connect, and to wait for each read
RETRY = Retry(
    total=5,
    connect=5,
    read=3,
    status=5,
    backoff_factor=0.1,
    backoff_max=10.0,
    status_forcelist=(429, 502, 503, 504),
    respect_retry_after_header=True,
    raise_on_status=False,  # the last answer comes back: response.raise_for_status() decides
)

_local = threading.local()
_process_wide: dict[str, WorkerSession] = {}  # in a worker process: its threads' session
_lock = threading.Lock()


class WorkerSession(requests.Session):
    """A ``requests.Session`` with a default timeout (``timeout=`` still overrides it)."""

    def __init__(self, pool_size: int, timeout: Any) -> None:
        super().__init__()
        self.default_timeout = timeout
        adapter = HTTPAdapter(pool_connections=16, pool_maxsize=pool_size, max_retries=RETRY)
        self.mount("http://", adapter)
        self.mount("https://", adapter)

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", self.default_timeout)
        return super().request(method, url, *args, **kwargs)


def session(timeout: Any = DEFAULT_TIMEOUT) -> requests.Session:
    """The calling worker's ``requests.Session``, made on first use.

    ``timeout`` (seconds, or a (connect, read) pair) applies to requests that give none;
    it is set when the worker's session is made.
    """
    if worker.THREADS is not None:  # in a worker process
        with _lock:
            made = _process_wide.get("session")
            if made is None:
                made = _process_wide["session"] = WorkerSession(worker.THREADS, timeout)
            return made
    made = getattr(_local, "session", None)
    if made is None:
        made = _local.session = WorkerSession(1, timeout)
    return made


def close() -> None:
    """Close the calling thread's own session (a thread worker that stops)."""
    made = getattr(_local, "session", None)
    _local.session = None
    if made is not None:
        made.close()


def close_process_session() -> None:
    """Close the session a worker process's threads share (once they have all stopped)."""
    made = _process_wide.pop("session", None)
    if made is not None:
        made.close()
