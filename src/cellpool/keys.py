"""Journal keys: what identifies an input across runs and kernels.

The default key is a digest of the input's pickle, the same in every process whatever
its hash seed (``stable_key``); a journaled run's feeder thread makes it for each input.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from typing import Any

import cloudpickle

from .errors import one_line

# Types whose pickle names no class, module or function and never fails: it loads in
# any kernel, and is what a key hashes as it is
PLAIN = frozenset({int, float, str, bytes, bool, type(None)})


class _SortedSets:
    """A pickler whose sets and frozensets are written with their elements sorted (by
    each element's own pickle), so the bytes do not depend on the process's hash seed."""

    def persistent_id(self, obj: Any) -> Any:
        if not isinstance(obj, (set, frozenset)):
            return None
        return (type(obj), tuple(sorted(obj, key=lambda e: _dumps_with(type(self), e))))


class _KeyPickler(_SortedSets, pickle.Pickler):
    pass


class _CloudKeyPickler(_SortedSets, cloudpickle.Pickler):
    pass


def _dumps_with(pickler: type[pickle.Pickler], obj: Any) -> bytes:
    buffer = io.BytesIO()
    pickler(buffer, protocol=5).dump(obj)
    return buffer.getvalue()


def _key_bytes(item: Any) -> bytes:
    kind = type(item)
    # a plain value's pickle holds no set and never fails: it is the key's as it is
    if kind in PLAIN or (kind is tuple and all(type(part) in PLAIN for part in item)):
        return pickle.dumps(item, protocol=5)  # the common case, in half the time
    try:
        data, pickler = pickle.dumps(item, protocol=5), _KeyPickler
    except Exception:
        try:
            data, pickler = cloudpickle.dumps(item, protocol=5), _CloudKeyPickler
        except Exception as error:
            raise TypeError(
                f"cellpool cannot make a key for a {type(item).__name__} item: {one_line(error)}"
            ) from None
    # EMPTY_SET and FROZENSET: only then is the slower, set-sorting pickler needed. The
    # bytes may also occur in data, which costs time only: the choice is the same in
    # every process for a given item.
    if b"\x8f" in data or b"\x91" in data:
        return _dumps_with(pickler, item)
    return data


def stable_key(item: Any) -> str:
    """The default key of an input: a hex digest (blake2b, 16 bytes) of its pickle.

    Equal items have equal keys in every process: sets and frozensets are pickled with
    sorted elements, as their order follows the hash seed. A dict's order is its own
    (insertion order), so ``{"a": 1, "b": 2}`` and ``{"b": 2, "a": 1}`` differ; so do
    ``1``, ``1.0`` and ``True``. What pickle refuses (a lambda) is pickled with
    cloudpickle; a ``TypeError`` (one line) if neither can.
    """
    data = pickle.dumps(item, protocol=5) if type(item) in PLAIN else _key_bytes(item)
    return hashlib.blake2b(data, digest_size=16).hexdigest()
