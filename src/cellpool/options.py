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


_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def byte_size(name: str, value: Any) -> int | None:
    """Bytes from an int or a string such as ``"512MB"`` or ``"2 GiB"``."""
    if value is None:
        return None
    if isinstance(value, str):
        number = value.strip().rstrip("bBiIkKmMgGtT ")
        unit = value.strip()[len(number) :].strip().lower()
        try:
            value = float(number) * _UNITS[unit]
        except (ValueError, KeyError):
            raise ValueError(f"{name} must be bytes or a size like '2GiB'; got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{name} must be a positive number of bytes; got {value!r}")
    return int(value)


def fraction_or_bytes(name: str, value: Any) -> float | int:
    """A fraction of total memory (under 1) or a number of bytes."""
    if isinstance(value, float) and 0 <= value < 1:
        return value
    if value == 0:
        return 0.0
    size = byte_size(name, value)
    assert size is not None
    return size


def fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a fraction in (0, 1]; got {value!r}")
    return float(value)


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
