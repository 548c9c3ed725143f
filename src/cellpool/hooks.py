"""Named points where a test can hold a thread, to force an interleaving.

Production code calls ``at(name)`` at a racy point (once per batch, never per task);
it costs a dict look-up unless a test installed a hook there with ``installed``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

_hooks: dict[str, Callable[[], None]] = {}


def at(name: str) -> None:
    hook = _hooks.get(name)
    if hook is not None:
        hook()


@contextlib.contextmanager
def installed(name: str, hook: Callable[[], None]) -> Iterator[None]:
    """Run ``hook`` whenever a thread reaches the point ``name``, inside the block."""
    _hooks[name] = hook
    try:
        yield
    finally:
        del _hooks[name]
