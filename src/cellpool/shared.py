"""Memory shared with a worker process, handed to it when the process is created.

Where the OS has ``memfd_create`` (Linux), an anonymous memory file: making one opens
no file and imports nothing, which a cold pool's first result waits for. Elsewhere, a
``multiprocessing`` RawArray (a heap arena backed by a temporary file, or a named
mapping on Windows).
"""

from __future__ import annotations

import mmap
import os
from multiprocessing import reduction
from typing import Any

HAVE_MEMFD = hasattr(os, "memfd_create")
DOUBLE = 8  # bytes


class SharedDoubles:
    """``count`` doubles, zeroed; pickle it into a new process's arguments to share it."""

    def __init__(self, backing: Any, fd: int | None, count: int) -> None:
        self._backing = backing  # an mmap of the memfd, or the RawArray
        self._fd = fd
        self._count = count
        self.view = memoryview(backing).cast("B").cast("d")

    @classmethod
    def create(cls, ctx: Any, count: int) -> SharedDoubles:
        """New shared doubles; ``ctx`` is the multiprocessing context of the worker."""
        if not HAVE_MEMFD:
            return cls(ctx.RawArray("d", count), None, count)
        fd = os.memfd_create("cellpool-slot", os.MFD_CLOEXEC)
        os.ftruncate(fd, count * DOUBLE)
        return cls(mmap.mmap(fd, count * DOUBLE), fd, count)

    def __reduce__(self) -> tuple[Any, tuple]:
        if self._fd is None:
            return SharedDoubles, (self._backing, None, self._count)
        return _mapped, (reduction.DupFd(self._fd), self._count)

    def close(self) -> None:
        self.view.release()
        if self._fd is not None:
            self._backing.close()
            os.close(self._fd)
            self._fd = None


def _mapped(dup: Any, count: int) -> SharedDoubles:
    """In the worker: the memfd it was handed, mapped."""
    fd = dup.detach()
    try:
        return SharedDoubles(mmap.mmap(fd, count * DOUBLE), None, count)
    finally:
        os.close(fd)  # the mapping stays
