"""Read `.npy` files without `ast`, so that stage loads on several threads cannot crash.

`np.load` parses the header with `ast.literal_eval`. On CPython 3.11 the AST
constructor's recursion counter is shared by every thread, and two threads parsing at
once can fail with `SystemError: AST constructor recursion depth mismatch`
(python/cpython#106905). The engine loads layers in worker threads, several at once
when one process hosts more than one stage, and CI hit exactly that. The headers we
read are the ones `np.save` writes (a dict of `descr`, `fortran_order`, `shape`), so a
strict pattern parses them; anything else is a `ValueError`, which callers already
treat as a damaged file.
"""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path
from typing import Literal

import numpy as np

MAGIC = b"\x93NUMPY"
_DESCR = re.compile(r"'descr'\s*:\s*'([<>|=]?[a-zA-Z]\d*)'")
_FORTRAN = re.compile(r"'fortran_order'\s*:\s*(True|False)")
_SHAPE = re.compile(r"'shape'\s*:\s*\(\s*((?:\d+\s*,\s*)*(?:\d+)?)\s*,?\s*\)")
_MAX_HEADER = 1 << 16  # np.save writes a few hundred bytes; refuse a hostile length


def parse_header(prefix: bytes) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """(dtype, shape, fortran_order, data offset) from the first bytes of a `.npy` file."""
    if len(prefix) < 10 or prefix[:6] != MAGIC:
        raise ValueError("not an .npy file (bad magic)")
    major = prefix[6]
    if major == 1:
        (length,) = struct.unpack_from("<H", prefix, 8)
        start = 10
    elif major in (2, 3):
        if len(prefix) < 12:
            raise ValueError("truncated .npy header")
        (length,) = struct.unpack_from("<I", prefix, 8)
        start = 12
    else:
        raise ValueError(f"unsupported .npy format version {major}")
    if length > _MAX_HEADER or len(prefix) < start + length:
        raise ValueError("truncated or oversized .npy header")
    text = prefix[start : start + length].decode("utf-8" if major == 3 else "latin-1")
    descr, fortran, shape = _DESCR.search(text), _FORTRAN.search(text), _SHAPE.search(text)
    if descr is None or fortran is None or shape is None:
        raise ValueError(f".npy header is not a plain array header: {text.strip()[:80]!r}")
    try:
        dtype = np.dtype(descr.group(1))
    except TypeError as exc:
        raise ValueError(f".npy header has an unknown dtype {descr.group(1)!r}") from exc
    if dtype.hasobject:
        raise ValueError(".npy file holds Python objects; refused")
    dims = tuple(int(d) for d in re.findall(r"\d+", shape.group(1)))
    return dtype, dims, fortran.group(1) == "True", start + length


def _header_prefix(head: bytes) -> int:
    """How many bytes the header needs, so a file reader knows how much to read."""
    if len(head) < 12 or head[:6] != MAGIC:
        raise ValueError("not an .npy file (bad magic)")
    if head[6] == 1:
        return 10 + struct.unpack_from("<H", head, 8)[0]
    return 12 + struct.unpack_from("<I", head, 8)[0]


def load_npy(path: Path, *, mmap: bool = True) -> np.ndarray:
    """One array from a file, memory-mapped read-only unless `mmap` is False."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(12)
        need = _header_prefix(head)
        if need > _MAX_HEADER + 12:
            raise ValueError(f"{path}: oversized .npy header")
        dtype, shape, fortran, offset = parse_header(head + fh.read(need - len(head)))
    count = math.prod(shape)
    if offset + count * dtype.itemsize != size:
        raise ValueError(f"{path}: {size} bytes, but its header describes {shape} {dtype}")
    order: Literal["F", "C"] = "F" if fortran else "C"
    if count == 0 or not mmap:
        data = np.fromfile(path, dtype=dtype, count=count, offset=offset)
        return data.reshape(shape, order=order)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)


def npy_from_bytes(data: bytes) -> np.ndarray:
    """One array from the bytes of a `.npy` file (a private, writable copy)."""
    dtype, shape, fortran, offset = parse_header(data[: _MAX_HEADER + 12])
    count = math.prod(shape)
    if offset + count * dtype.itemsize != len(data):
        raise ValueError(f"{len(data)} bytes, but the header describes {shape} {dtype}")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran else "C").copy()
