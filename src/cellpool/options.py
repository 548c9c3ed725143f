"""Checks of user-given options: each bad value is a one-line error naming it."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

KINDS = ("thread", "process", "dask")


def cpu_count() -> int:
    """CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_kind(kind: Any) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}; got {kind!r}")
    return kind


def default_workers(kind: str) -> int:
    return min(32, cpu_count() + 4) if kind == "thread" else cpu_count()


def start_method(method: Any) -> str:
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    if method not in methods:
        raise ValueError(f"start_method must be one of {methods}; got {method!r}")
    return method


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return value


def non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0; got {value!r}")
    return value


def optional_seconds(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds or None; got {value!r}")
    return float(value)


def exception_types(value: Any) -> tuple[type[BaseException], ...]:
    types = value if isinstance(value, tuple) else (value,)
    if not types or not all(isinstance(t, type) and issubclass(t, BaseException) for t in types):
        raise TypeError(f"retry_on must be an exception class or a tuple of them; got {value!r}")
    return types


def callable_fn(caller: str, fn: Any) -> Any:
    if not callable(fn):
        raise TypeError(f"{caller}() needs a callable first; got {type(fn).__name__} {fn!r:.40}")
    return fn


def iterators(caller: str, iterables: Iterable[Any]) -> tuple[list[Any], int | None]:
    """Iterators over ``iterables`` and their common length, if every one has a length."""
    iterables = list(iterables)
    if not iterables:
        raise TypeError(f"{caller}() needs at least one iterable of inputs")
    its, sizes = [], []
    for position, iterable in enumerate(iterables, start=2):
        try:
            its.append(iter(iterable))
        except TypeError:
            raise TypeError(
                f"{caller}() argument {position} must be iterable; got {type(iterable).__name__}"
            ) from None
        try:
            sizes.append(len(iterable))
        except TypeError:
            sizes.append(None)
    known = [size for size in sizes if size is not None]
    if len(set(known)) > 1:
        raise ValueError(f"{caller}() iterables have different lengths: {known}")
    total = known[0] if known and len(known) == len(sizes) else None
    return its, total
