"""Checks of user-given options: each bad value is a one-line error naming it."""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Iterable
from decimal import ROUND_FLOOR, Decimal
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
_SIZE = re.compile(r"\s*(\d+\.?\d*(?:e[+-]?\d+)?|\.\d+(?:e[+-]?\d+)?)\s*([a-z]*)\s*", re.I)
MAX_BYTES = 2**63 - 1  # 8 EiB: beyond any machine, and what a C int64 holds
_BYTES = "a whole number of bytes >= 1 or a size such as '512MB' or '2GiB'"


def _real(name: str, value: Any, expected: str) -> int | float:
    """``value`` as an int or a float; a TypeError naming ``name`` for anything else."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"{name} must be {expected}; got {type(value).__name__} {value!r:.40}")


def _whole_bytes(name: str, value: Any, expected: str) -> int:
    """Bytes from an int, a float or a size string; a whole number from 1 to MAX_BYTES.

    A plain number (or one in ``B``) must be whole; a size in a bigger unit is rounded
    down to whole bytes (``"0.1GiB"`` is 107374182)."""
    if isinstance(value, str):
        match = _SIZE.fullmatch(value)
        unit = match and _UNITS.get(match[2].lower())
        if unit is None:
            raise ValueError(f"{name} must be {expected}; got {value!r}")
        number = Decimal(match[1])  # exact, and no overflow: "1e400" is just too large
        if number <= MAX_BYTES:
            number *= unit
            if unit > 1:
                number = number.to_integral_value(ROUND_FLOOR)
    else:
        number = _real(name, value, expected)
        if isinstance(number, float) and not math.isfinite(number):
            raise ValueError(f"{name} must be {expected}; got {value!r}")
    if number > MAX_BYTES:  # before int(): "1e999999999" must not build a huge int
        raise ValueError(f"{name} must be at most {MAX_BYTES} bytes (8 EiB); got {value!r}")
    if number < 1 or number != int(number):
        raise ValueError(f"{name} must be {expected}; got {value!r}")
    return int(number)


def byte_size(name: str, value: Any) -> int | None:
    """Bytes from an int or a string such as ``"512MB"`` or ``"2 GiB"`` (``None``: none)."""
    if value is None:
        return None
    return _whole_bytes(name, value, _BYTES)


def fraction_or_bytes(name: str, value: Any) -> float | int:
    """A fraction of total memory in [0, 1) as a float, or a number of bytes as an int.

    A float of 1 or more counts as bytes only if it is whole: ``1.5`` could mean neither."""
    expected = f"a fraction of total memory in [0, 1) or {_BYTES}"
    if isinstance(value, str):
        return _whole_bytes(name, value, expected)
    number = _real(name, value, expected)
    if number == 0:
        return 0.0
    if isinstance(number, float):
        if 0 < number < 1:
            return number
        if number > 1 and math.isfinite(number) and not number.is_integer():
            raise ValueError(
                f"{name}={value!r} is ambiguous: a fraction of total memory must be under 1 "
                f"and a number of bytes whole (say 0.1 for 10%, or '{number:g}GB')"
            )
    return _whole_bytes(name, number, expected)


def fraction(name: str, value: Any) -> float:
    expected = "a fraction in (0, 1]"
    number = _real(name, value, expected)
    if not 0 < number <= 1:  # False for nan
        raise ValueError(f"{name} must be {expected}; got {value!r}")
    return float(number)


def start_method(method: Any) -> str:
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    if method not in methods:
        raise ValueError(f"start_method must be one of {methods}; got {method!r}")
    return method


def _int(name: str, value: Any, expected: str) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    raise TypeError(f"{name} must be {expected}; got {type(value).__name__} {value!r:.40}")


def positive_int(name: str, value: Any) -> int:
    number = _int(name, value, "an integer >= 1")
    if number < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
    return number


def non_negative_int(name: str, value: Any) -> int:
    number = _int(name, value, "an integer >= 0")
    if number < 0:
        raise ValueError(f"{name} must be an integer >= 0; got {value!r}")
    return number


def chunksize(value: Any) -> int:
    """``map(chunksize=...)``: checked as ``concurrent.futures`` does, though unused."""
    number = _int("chunksize", value, "an integer >= 1")
    if number < 1:
        raise ValueError("chunksize must be >= 1.")
    return number


def optional_seconds(name: str, value: Any) -> float | None:
    if value is None:
        return None
    expected = "a finite number of seconds > 0, or None"
    number = _real(name, value, expected)
    if not 0 < number < math.inf:  # False for nan
        raise ValueError(f"{name} must be {expected}; got {value!r}")
    return float(number)


def exception_types(value: Any) -> tuple[type[BaseException], ...]:
    types = value if isinstance(value, tuple) else (value,)
    if not types or not all(isinstance(t, type) and issubclass(t, BaseException) for t in types):
        raise TypeError(f"retry_on must be an exception class or a tuple of them; got {value!r}")
    return types


def journal(value: Any) -> Any:
    """A journal: ``None``, a run name or a path (a string or path), or a ``Journal``."""
    if value is None or isinstance(value, os.PathLike):
        return value
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("journal must name a run or a file; got an empty string")
        return value
    if type(value).__name__ == "Journal" and hasattr(value, "begin"):
        return value
    raise TypeError(
        f"journal must be a run name, a path or a cellpool.Journal; got {type(value).__name__}"
    )


def optional_callable(name: str, value: Any) -> Any:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable; got {type(value).__name__}")
    return value


def one_of(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")
    return value


def label(value: Any) -> str | None:
    """A run's label: a string of one line, or ``None`` for the function's name."""
    if value is None:
        return None
    if not isinstance(value, str) or "\n" in value:
        raise TypeError(f"label must be a one-line string; got {value!r}")
    return value


def callable_fn(caller: str, fn: Any) -> Any:
    if not callable(fn):
        raise TypeError(f"{caller}() needs a callable first; got {type(fn).__name__} {fn!r:.40}")
    return fn


def iterators(
    caller: str, iterables: Iterable[Any], shortest: bool = False
) -> tuple[list[Any], int | None]:
    """Iterators over ``iterables`` and their common length, if every one has a length;
    with ``shortest``, lengths may differ and the shortest counts."""
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
    if len(set(known)) > 1 and not shortest:
        raise ValueError(f"{caller}() iterables have different lengths: {known}")
    total = min(known) if known and len(known) == len(sizes) else None
    return its, total
