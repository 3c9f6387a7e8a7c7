"""Validation helpers for decoding msgpack-able dicts into core messages.

Shared by every core and the runtime's payloads, so it is a module of its own rather than
a part of membership. Every pure core (membership, capabilities, coordination, tasks)
turns its messages into plain
dicts with ``to_wire()`` and back with ``from_wire()``. Input from the network is hostile
until proven otherwise, so these helpers check types, ranges and sizes and raise
:class:`WireError` (a ``ValueError``) whose message names the message kind and field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

MAX_STR = 4096
MAX_LIST = 100_000


class WireError(ValueError):
    """A wire message is malformed; the message names the message kind and the field."""


def expect_dict(obj: object, what: str) -> Mapping[str, Any]:
    """Return ``obj`` as a mapping, or raise because a message must be a dict."""
    if not isinstance(obj, Mapping):
        raise WireError(f"{what}: expected a dict, got {type(obj).__name__}")
    return obj


def get_str(
    d: Mapping[str, Any],
    key: str,
    what: str,
    *,
    default: str | None = None,
    max_len: int = MAX_STR,
    allow_empty: bool = True,
) -> str:
    """Read a string field (required unless ``default`` is given)."""
    if key not in d:
        if default is None:
            raise WireError(f"{what}: missing field {key!r}")
        return default
    v = d[key]
    if not isinstance(v, str):
        raise WireError(f"{what}.{key}: expected str, got {type(v).__name__}")
    if len(v) > max_len:
        raise WireError(f"{what}.{key}: string of {len(v)} chars exceeds {max_len}")
    if not allow_empty and not v:
        raise WireError(f"{what}.{key}: must not be empty")
    return v


def get_opt_str(d: Mapping[str, Any], key: str, what: str, *, max_len: int = MAX_STR) -> str | None:
    """Read an optional string field; ``None`` or absent means not set."""
    if d.get(key) is None:
        return None
    return get_str(d, key, what, max_len=max_len)


def get_int(
    d: Mapping[str, Any],
    key: str,
    what: str,
    *,
    default: int | None = None,
    min_value: int | None = None,
    max_value: int | None = None,
) -> int:
    """Read an integer field (bools are rejected: they are ints in Python, not on the wire)."""
    if key not in d:
        if default is None:
            raise WireError(f"{what}: missing field {key!r}")
        return default
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise WireError(f"{what}.{key}: expected int, got {type(v).__name__}")
    if min_value is not None and v < min_value:
        raise WireError(f"{what}.{key}: {v} is below the minimum {min_value}")
    if max_value is not None and v > max_value:
        raise WireError(f"{what}.{key}: {v} is above the maximum {max_value}")
    return v


def get_float(
    d: Mapping[str, Any],
    key: str,
    what: str,
    *,
    default: float | None = None,
    min_value: float | None = None,
    max_value: float | None = None,
) -> float:
    """Read a finite number field (ints are accepted and converted)."""
    if key not in d:
        if default is None:
            raise WireError(f"{what}: missing field {key!r}")
        return default
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise WireError(f"{what}.{key}: expected a number, got {type(v).__name__}")
    f = float(v)
    if not math.isfinite(f):
        raise WireError(f"{what}.{key}: must be finite, got {f}")
    if min_value is not None and f < min_value:
        raise WireError(f"{what}.{key}: {f} is below the minimum {min_value}")
    if max_value is not None and f > max_value:
        raise WireError(f"{what}.{key}: {f} is above the maximum {max_value}")
    return f


def get_opt_float(
    d: Mapping[str, Any],
    key: str,
    what: str,
    *,
    min_value: float | None = None,
    max_value: float | None = None,
) -> float | None:
    """Read an optional finite number; ``None`` or absent means unknown."""
    if d.get(key) is None:
        return None
    return get_float(d, key, what, min_value=min_value, max_value=max_value)


def get_bool(d: Mapping[str, Any], key: str, what: str, *, default: bool | None = None) -> bool:
    """Read a boolean field."""
    if key not in d:
        if default is None:
            raise WireError(f"{what}: missing field {key!r}")
        return default
    v = d[key]
    if not isinstance(v, bool):
        raise WireError(f"{what}.{key}: expected bool, got {type(v).__name__}")
    return v


def get_opt_bool(d: Mapping[str, Any], key: str, what: str) -> bool | None:
    """Read an optional boolean; ``None`` or absent means unknown."""
    if d.get(key) is None:
        return None
    return get_bool(d, key, what)


def get_list(
    d: Mapping[str, Any],
    key: str,
    what: str,
    *,
    max_len: int = MAX_LIST,
    default: list[Any] | None = None,
) -> list[Any]:
    """Read a list field (tuples are accepted: msgpack may decode arrays as either)."""
    if key not in d:
        if default is None:
            raise WireError(f"{what}: missing field {key!r}")
        return default
    v = d[key]
    if not isinstance(v, list | tuple):
        raise WireError(f"{what}.{key}: expected a list, got {type(v).__name__}")
    if len(v) > max_len:
        raise WireError(f"{what}.{key}: {len(v)} items exceed the limit of {max_len}")
    return list(v)


def get_str_list(
    d: Mapping[str, Any],
    key: str,
    what: str,
    *,
    max_len: int = 1024,
    default: list[str] | None = None,
) -> list[str]:
    """Read a list of strings."""
    items = get_list(d, key, what, max_len=max_len, default=default)
    for i, item in enumerate(items):
        if not isinstance(item, str) or len(item) > MAX_STR:
            raise WireError(f"{what}.{key}[{i}]: expected a string of at most {MAX_STR} chars")
    return items


def get_bytes(
    d: Mapping[str, Any],
    key: str,
    what: str,
    *,
    max_len: int = 64 * 1024 * 1024,
    default: bytes | None = None,
) -> bytes:
    """Read a bytes field."""
    if key not in d:
        if default is None:
            raise WireError(f"{what}: missing field {key!r}")
        return default
    v = d[key]
    if not isinstance(v, bytes | bytearray):
        raise WireError(f"{what}.{key}: expected bytes, got {type(v).__name__}")
    if len(v) > max_len:
        raise WireError(f"{what}.{key}: {len(v)} bytes exceed the limit of {max_len}")
    return bytes(v)


def check_type_tag(d: Mapping[str, Any], expected: str, what: str) -> None:
    """Check the ``t`` (type) tag that every top-level message carries."""
    tag = d.get("t")
    if tag != expected:
        raise WireError(f"{what}: expected type tag {expected!r}, got {tag!r}")
