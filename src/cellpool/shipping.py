"""Functions that keep their file names and source lines on the way to a worker.

cloudpickle ships a notebook's functions by value; from 3.1 on, their code arrives
with ``co_filename = "<dynamic-code>"``, and a cell's source lives only in this
process's ``linecache``. A worker's traceback would read ``File "<dynamic-code>",
line 6`` with no source line. ``ship(fn)`` wraps ``fn`` so that, unpickled in a
worker, it is ``fn`` itself, with the file name of every function it reaches restored
and the lines of files that exist only in ``linecache`` (cells) registered there.
``pack(fn)`` and ``unpack(data)`` do the same through bytes the caller carries.

Loading needs only this module (stdlib and cloudpickle), and costs one pass over the
shipped functions: do it once per run, not per task.
"""

from __future__ import annotations

import contextlib
import functools
import linecache
import os
import pickle
import sys
import types
from typing import Any

import cloudpickle

try:
    from cloudpickle.cloudpickle import _should_pickle_by_reference
except ImportError:  # pragma: no cover - a cloudpickle that renamed it

    def _should_pickle_by_reference(obj: Any, name: str | None = None) -> bool:
        module = getattr(obj, "__module__", None)
        return (
            module not in (None, "__main__")
            and module in sys.modules
            and module not in cloudpickle.list_registry_pickle_by_value()
            and "<locals>" not in getattr(obj, "__qualname__", "")
        )


def ship(fn: Any) -> Any:
    """``fn`` ready to pickle with cloudpickle: a ``Shipped`` if it reaches functions
    pickled by value, else ``fn`` itself (builtins, importable functions)."""
    functions = _by_value_functions(fn)
    return Shipped(fn, functions) if functions else fn


def pack(fn: Any) -> bytes:
    """``fn`` pickled with its file names and cell lines, for ``unpack`` in a worker.

    Bytes travel untouched where a ``Shipped`` would not: the dask scheduler unpickles
    a task's arguments and pickles them again for the worker."""
    return _pack(fn, [(f, f.__code__.co_filename) for f in _by_value_functions(fn)])


def unpack(data: bytes) -> Any:
    """In the worker: the function ``pack`` (or a pickled ``Shipped``) carried, its file
    names restored and its cells' lines in ``linecache``."""
    fn, fixes, sources = pickle.loads(data)
    for filename, lines in sources.items():
        # mtime None: linecache.checkcache keeps the entry
        linecache.cache[filename] = (sum(map(len, lines)), None, lines, filename)
    for function, filename in fixes:
        if function.__code__.co_filename != filename:
            function.__code__ = _renamed(function.__code__, filename)
    return fn


class Shipped:
    """A function that unpickles as itself, its file names and cell lines restored.

    Its pickle is made on first use and kept: pickle a ``Shipped`` once per run.
    """

    __slots__ = ("_data", "_fixes", "fn")

    def __init__(self, fn: Any, functions: list[types.FunctionType]) -> None:
        self.fn = fn
        self._fixes = [(f, f.__code__.co_filename) for f in functions]
        self._data: bytes | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        if self._data is None:
            self._data = _pack(self.fn, self._fixes)
        return unpack, (self._data,)


def _pack(fn: Any, fixes: list[tuple[types.FunctionType, str]]) -> bytes:
    sources: dict[str, list[str]] = {}
    for _, filename in fixes:
        if filename not in sources and not os.path.isfile(filename):
            lines = linecache.getlines(filename)
            if lines:
                sources[filename] = lines
    try:
        # one pickle: each function in fixes is the very object fn's pickle holds
        return cloudpickle.dumps((fn, fixes, sources))
    except Exception:
        return cloudpickle.dumps((fn, [], {}))  # fn as cloudpickle alone would ship it


def _renamed(code: types.CodeType, filename: str) -> types.CodeType:
    consts = tuple(
        _renamed(const, filename) if isinstance(const, types.CodeType) else const
        for const in code.co_consts
    )
    return code.replace(co_filename=filename, co_consts=consts)


def _global_names(code: types.CodeType) -> set[str]:
    """The names a function's code (and the code nested in it) may look up globally."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _by_value(obj: Any) -> bool:
    try:
        return not _should_pickle_by_reference(obj)
    except Exception:
        return False


def _by_value_functions(root: Any) -> list[types.FunctionType]:
    """The functions pickled by value that pickling ``root`` reaches: through
    globals, closures, defaults, partials, methods and classes pickled by value."""
    found: list[types.FunctionType] = []
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, types.FunctionType):
            if not _by_value(obj):
                continue
            found.append(obj)
            namespace = obj.__globals__
            stack.extend(namespace[n] for n in _global_names(obj.__code__) if n in namespace)
            for cell in obj.__closure__ or ():
                with contextlib.suppress(ValueError):  # an empty cell has no contents
                    stack.append(cell.cell_contents)
            stack.extend(obj.__defaults__ or ())
            stack.extend((obj.__kwdefaults__ or {}).values())
            stack.extend(obj.__dict__.values())  # __wrapped__, among others
        elif isinstance(obj, type):
            if _by_value(obj):
                stack.extend(vars(obj).values())
                stack.extend(obj.__bases__)
        elif isinstance(obj, types.MethodType):
            stack += [obj.__func__, obj.__self__]
        elif isinstance(obj, (staticmethod, classmethod)):
            stack.append(obj.__func__)
        elif isinstance(obj, property):
            stack += [obj.fget, obj.fset, obj.fdel]
        elif isinstance(obj, functools.partial):
            stack += [obj.func, *obj.args, *obj.keywords.values()]
        elif not isinstance(obj, types.ModuleType):
            stack.append(type(obj))  # an instance: its class's methods, if by value
    return found
