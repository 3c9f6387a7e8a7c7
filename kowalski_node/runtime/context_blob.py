"""Large task contexts as content-addressed files: encode, hash, decode, in bounded steps.

A task's context can be tens of MB. Everything here is blocking and meant to run in a
worker thread (`trio.to_thread.run_sync`), and it is written so that no single C call
holds the GIL for long: a thread that runs `json.dumps` or `msgpack.packb` over 50 MB
in one call (about 0.5 s measured) stalls the trio loop just as much as running it on
the loop would, because the loop thread cannot take the GIL back until the call ends.
So big strings are handled in slices of `SLICE` characters and big containers item by
item; each slice is one short C call and the interpreter switches threads in between.

The file format is plain msgpack of the context value (str stays str, bytes stay bytes),
always using the 32-bit str/bin/array/map headers for the top levels it streams, so the
same value always gives the same bytes and therefore the same sha256 (its blob id).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
import io
import json
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import msgpack

SLICE = 1 << 20  # characters / bytes handled per C call
_LIST_GROUP = 256  # small items encoded together
HASH_BLOCK = 1 << 20
_B64_SLICE = 4 * (SLICE // 4)  # base64 is decoded in whole 4-character groups

_STR32 = 0xDB
_BIN32 = 0xC6
_ARRAY32 = 0xDD
_MAP32 = 0xDF


class SlicedText:
    """A long text kept as its slices, never joined into one `str`.

    Creating a 50 MB `str` is one C call (~120 ms of page faults for the allocation on a
    loaded machine) that holds the GIL, and so the event loop, even in a worker thread.
    The node that receives a task over HTTP only hashes the context and writes it to a
    file, so it keeps the decoded slices (`pieces`); fingerprint and file are identical
    to those of the joined string.
    """

    __slots__ = ("length", "pieces")

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces
        self.length = sum(len(p) for p in pieces)

    def __len__(self) -> int:
        return self.length

    def join(self) -> str:
        return "".join(self.pieces)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SlicedText):
            return self.join() == other.join()
        if isinstance(other, str):
            return self.join() == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def aligned(self, unit: int) -> Iterator[str]:
        """The text again, in chunks whose lengths are multiples of `unit` (but the last)."""
        carry = ""
        for piece in self.pieces:
            text = carry + piece
            cut = len(text) - len(text) % unit
            if cut:
                yield text[:cut]
            carry = text[cut:]
        if carry:
            yield carry


# ----------------------------------------------------------------- canonical JSON hashing


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _is_big(value: Any) -> bool:
    if isinstance(value, str):
        return len(value) > SLICE
    if isinstance(value, (list, tuple)):
        return len(value) > _LIST_GROUP or any(_is_big(v) for v in value[:_LIST_GROUP])
    if isinstance(value, dict):
        return len(value) > _LIST_GROUP or any(_is_big(v) for v in value.values())
    return False


def canonical_json_parts(value: Any) -> Iterator[str]:
    """The text of `json.dumps(value, sort_keys=True, separators=(",", ":"),
    ensure_ascii=False)`, in pieces of bounded size (their concatenation is identical)."""
    if isinstance(value, SlicedText):
        yield '"'
        for piece in value.pieces:
            for i in range(0, len(piece), SLICE):
                yield _dumps(piece[i : i + SLICE])[1:-1]
        yield '"'
    elif isinstance(value, str) and len(value) > SLICE:
        yield '"'
        for i in range(0, len(value), SLICE):
            yield _dumps(value[i : i + SLICE])[1:-1]
        yield '"'
    elif isinstance(value, (list, tuple)) and _is_big(value):
        yield "["
        first = True
        pending: list[Any] = []

        def flush() -> Iterator[str]:
            nonlocal first
            if pending:
                text = _dumps(pending)[1:-1]
                yield text if first else "," + text
                first = False
                pending.clear()

        for item in value:
            if _is_big(item):
                yield from flush()
                if not first:
                    yield ","
                first = False
                yield from canonical_json_parts(item)
            else:
                pending.append(item)
                if len(pending) >= _LIST_GROUP:
                    yield from flush()
        yield from flush()
        yield "]"
    elif isinstance(value, dict) and _is_big(value) and all(isinstance(k, str) for k in value):
        yield "{"
        for n, key in enumerate(sorted(value)):
            yield ("," if n else "") + _dumps(key) + ":"
            yield from canonical_json_parts(value[key])
        yield "}"
    else:
        yield _dumps(value)


def submission_fingerprint(
    prompt: str,
    context: Any,
    context_encoding: str,
    model: str | None,
    sub_model: str | None,
    rlm: dict[str, Any] | None,
) -> str:
    """sha256 of the canonical JSON list `[prompt, context, encoding, model, sub_model, rlm]`
    (the same digest as hashing `json.dumps` of that list in one piece)."""
    digest = hashlib.sha256()
    digest.update(("[" + _dumps(prompt) + ",").encode("utf-8"))
    for part in canonical_json_parts(context):
        digest.update(part.encode("utf-8"))
    tail = "," + ",".join(_dumps(v) for v in (context_encoding, model, sub_model, rlm)) + "]"
    digest.update(tail.encode("utf-8"))
    return digest.hexdigest()


# ----------------------------------------------------------------- base64 in slices


def check_base64(text: str) -> None:
    """Raise `binascii.Error`/`ValueError` unless `text` is strict base64 (what
    `base64.b64decode(text, validate=True)` accepts), one slice at a time."""
    if len(text) <= _B64_SLICE:
        base64.b64decode(text, validate=True)
        return
    for i in range(0, len(text), _B64_SLICE):
        binascii.a2b_base64(text[i : i + _B64_SLICE], strict_mode=True)


def decode_base64(text: str | SlicedText) -> bytes:
    """`base64.b64decode(text)` for text already checked by `check_base64`, in slices."""
    if isinstance(text, SlicedText):
        return b"".join(binascii.a2b_base64(chunk) for chunk in text.aligned(_B64_SLICE))
    if len(text) <= _B64_SLICE:
        return base64.b64decode(text)
    return b"".join(
        binascii.a2b_base64(text[i : i + _B64_SLICE]) for i in range(0, len(text), _B64_SLICE)
    )


# ----------------------------------------------------------------- msgpack in slices


def _pack(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def _write_value(out: IO[bytes], value: Any, depth: int = 0) -> None:
    if isinstance(value, SlicedText):  # the same bytes as for the joined string (str32)
        pieces = [
            piece[i : i + SLICE].encode("utf-8")
            for piece in value.pieces
            for i in range(0, len(piece), SLICE)
        ]
        out.write(struct.pack(">BI", _STR32, sum(len(p) for p in pieces)))
        for piece in pieces:
            out.write(piece)
    elif isinstance(value, str) and len(value) > SLICE:
        pieces = [value[i : i + SLICE].encode("utf-8") for i in range(0, len(value), SLICE)]
        out.write(struct.pack(">BI", _STR32, sum(len(p) for p in pieces)))
        for piece in pieces:
            out.write(piece)
    elif isinstance(value, (bytes, bytearray)) and len(value) > SLICE:
        out.write(struct.pack(">BI", _BIN32, len(value)))
        view = memoryview(value)
        for i in range(0, len(value), SLICE):
            out.write(view[i : i + SLICE])
    elif depth < 4 and isinstance(value, (list, tuple)) and _is_big(value):
        out.write(struct.pack(">BI", _ARRAY32, len(value)))
        for item in value:
            _write_value(out, item, depth + 1)
    elif depth < 4 and isinstance(value, dict) and _is_big(value):
        out.write(struct.pack(">BI", _MAP32, len(value)))
        for key, item in value.items():
            out.write(_pack(key))
            _write_value(out, item, depth + 1)
    else:
        out.write(_pack(value))


def pack_sliced(value: Any) -> bytes:
    """msgpack of `value` (readable by any msgpack reader) built slice by slice, so a
    worker thread running it lets the event loop's thread take the GIL in between.
    Raises TypeError for values msgpack cannot encode."""
    out = io.BytesIO()
    _write_value(out, value)
    return out.getvalue()


def pack_sliced_into(value: Any, *, reserve: int, header: struct.Struct) -> bytes:
    """`header.pack(len(body)) + body` for body = msgpack of `value`, without the extra
    full-size concatenation (a length-prefixed frame)."""
    out = io.BytesIO()
    out.write(bytes(reserve))
    _write_value(out, value)
    size = out.tell() - reserve
    out.seek(0)
    out.write(header.pack(size))
    return out.getvalue()


def unpack_sliced(data: bytes) -> Any:
    """`msgpack.unpackb(data)` that decodes large strings and containers piece by piece."""
    unpacker = msgpack.Unpacker(
        io.BytesIO(data),
        raw=False,
        strict_map_key=False,
        read_size=SLICE,
        max_buffer_size=max(len(data), SLICE) + 1,
    )
    try:
        value = _read_value(unpacker, io.BytesIO(data))
    except msgpack.OutOfData:
        raise ValueError("msgpack data ends early") from None
    if unpacker.tell() != len(data):
        raise ValueError("msgpack data has trailing bytes")
    return value


def file_sha256(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while block := handle.read(HASH_BLOCK):
            digest.update(block)  # hashlib releases the GIL for large updates
            size += len(block)
    return digest.hexdigest(), size


def write_context_file(value: Any, directory: Path) -> tuple[str, int, Path]:
    """Encode `value` into `directory/<sha256>` (atomically); returns (sha256, size, path)."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".context-{os.getpid()}-{os.urandom(6).hex()}.tmp"
    try:
        with open(tmp, "wb") as out:
            _write_value(out, value)
        blob_id, size = file_sha256(tmp)
        final = directory / blob_id
        if final.exists():
            tmp.unlink()
        else:
            os.replace(tmp, final)
        return blob_id, size, final
    finally:
        tmp.unlink(missing_ok=True)


def _decode_utf8(data: bytes) -> str:
    if len(data) <= SLICE:
        return data.decode("utf-8")
    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(data)
    parts = [decoder.decode(view[i : i + SLICE]) for i in range(0, len(data), SLICE)]
    parts.append(decoder.decode(b"", final=True))
    return "".join(parts)


def _read_value(unpacker: msgpack.Unpacker, peek: IO[bytes], depth: int = 0) -> Any:
    """One value. Big strings, bytes, arrays and maps are taken apart here (a header,
    then slices or items); everything else is one `unpack()` of a small encoding.
    `peek` is a second handle on the same file, to look at the next type byte."""
    peek.seek(unpacker.tell())
    head = peek.read(5)
    kind = head[0] if head else -1
    if kind in (0xDA, _STR32, 0xC5, _BIN32):  # str16/str32/bin16/bin32
        width = 2 if kind in (0xDA, 0xC5) else 4
        length = int.from_bytes(head[1 : 1 + width], "big")
        unpacker.read_bytes(1 + width)
        data = unpacker.read_bytes(length)
        if len(data) != length:
            raise ValueError(f"context file ends early ({len(data)} of {length} bytes)")
        return _decode_utf8(data) if kind in (0xDA, _STR32) else data
    if depth < 5 and kind in (0xDC, _ARRAY32):
        count = unpacker.read_array_header()
        return [_read_value(unpacker, peek, depth + 1) for _ in range(count)]
    if depth < 5 and kind in (0xDE, _MAP32):
        count = unpacker.read_map_header()
        out: dict[Any, Any] = {}
        for _ in range(count):
            key = _read_value(unpacker, peek, depth + 1)
            out[key] = _read_value(unpacker, peek, depth + 1)
        return out
    return unpacker.unpack()


def _read_whole_str_or_bin(path: Path, size: int) -> tuple[bool, Any]:
    """The common case, a file that is one big string or binary: read and decode it slice
    by slice straight from the file (no full-size intermediate copies)."""
    with open(path, "rb") as handle:
        head = handle.read(5)
        if len(head) < 5 or head[0] not in (_STR32, _BIN32):
            return False, None
        length = struct.unpack(">I", head[1:])[0]
        if length != size - 5:
            return False, None
        if head[0] == _BIN32:
            data = bytearray(length)
            view = memoryview(data)
            for i in range(0, length, SLICE):
                if handle.readinto(view[i : i + SLICE]) != min(SLICE, length - i):
                    raise ValueError("context file ends early")
            return True, bytes(data)
        decoder = codecs.getincrementaldecoder("utf-8")()
        parts = []
        while block := handle.read(SLICE):
            parts.append(decoder.decode(block))
        parts.append(decoder.decode(b"", final=True))
        return True, "".join(parts)


def read_context_file(path: Path) -> Any:
    """Decode a file written by `write_context_file` (any msgpack value is accepted)."""
    size = path.stat().st_size
    whole, value = _read_whole_str_or_bin(path, size)
    if whole:
        return value
    with open(path, "rb") as handle, open(path, "rb") as peek:
        unpacker = msgpack.Unpacker(
            handle,
            raw=False,
            strict_map_key=False,
            read_size=SLICE,
            max_buffer_size=max(size, SLICE) + 1,
        )
        try:
            value = _read_value(unpacker, peek)
        except msgpack.OutOfData:
            raise ValueError("context file ends early") from None
        if unpacker.tell() != size:
            raise ValueError("context file has trailing bytes")
        return value


# ----------------------------------------------------------------- a JSON body, in slices

_WS = b" \t\r\n"
_BACKSLASH = 0x5C


def _skip_ws(data: bytes, i: int) -> int:
    while i < len(data) and data[i] in _WS:
        i += 1
    return i


def _string_end(data: bytes, i: int) -> int:
    """Index of the quote closing the JSON string that opens at `data[i]`."""
    j = i + 1
    while True:
        k = data.find(b'"', j)
        if k < 0:
            raise ValueError("unterminated string")
        b = k - 1
        while b > i and data[b] == _BACKSLASH:
            b -= 1
        if (k - 1 - b) % 2 == 0:
            return k
        j = k + 1


_HIGH_SURROGATE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}")
_STRUCTURE = re.compile(rb'["{}\[\]]')
_SCALAR_END = re.compile(rb"[,}\]\s]")


def _value_end(data: bytes, i: int) -> int:
    """Index just past the JSON value that starts at `data[i]` (structure only)."""
    c = data[i : i + 1]
    if c == b'"':
        return _string_end(data, i) + 1
    if c in (b"{", b"["):
        depth = 0
        j = i
        while True:
            m = _STRUCTURE.search(data, j)
            if m is None:
                raise ValueError("unterminated value")
            ch = data[m.start() : m.start() + 1]
            if ch == b'"':
                j = _string_end(data, m.start()) + 1
                continue
            depth += 1 if ch in (b"{", b"[") else -1
            j = m.start() + 1
            if depth == 0:
                return j
    m = _SCALAR_END.search(data, i)
    return m.start() if m else len(data)


def top_level_string_span(data: bytes, key: str) -> tuple[int, int] | None:
    """(opening quote, closing quote) of the string value of `key` in the top-level JSON
    object `data`; None when it is absent, not a string, repeated, or `data` is not an
    object (the caller then parses the body the ordinary way)."""
    try:
        i = _skip_ws(data, 0)
        if data[i : i + 1] != b"{":
            return None
        i += 1
        found: tuple[int, int] | None = None
        while True:
            i = _skip_ws(data, i)
            if data[i : i + 1] == b"}":
                return found
            if data[i : i + 1] != b'"':
                return None
            end = _string_end(data, i)
            name = json.loads(data[i : end + 1])
            i = _skip_ws(data, end + 1)
            if data[i : i + 1] != b":":
                return None
            i = _skip_ws(data, i + 1)
            value_end = _value_end(data, i)
            if name == key:
                if found is not None or data[i : i + 1] != b'"':
                    return None
                found = (i, value_end - 1)
            i = _skip_ws(data, value_end)
            if data[i : i + 1] == b",":
                i += 1
            elif data[i : i + 1] != b"}":
                return None
    except (ValueError, IndexError):
        return None


def decode_json_string(data: bytes, start: int, end: int) -> SlicedText | None:
    """The JSON string whose content is `data[start:end]`, decoded slice by slice; no cut
    falls inside an escape sequence or a UTF-8 character. None if it cannot be cut
    (e.g. a megabyte of backslashes). Raises ValueError for an invalid string."""
    pieces: list[str] = []
    i = start
    while i < end:
        p = min(i + SLICE, end)
        if p < end:
            k = data.rfind(b"\\", max(i, p - 12), p)
            if k >= 0:  # an escape may straddle p: cut before its backslash run
                p = k
                while p > i and data[p - 1] == _BACKSLASH:
                    p -= 1
            if p - 6 >= i and _HIGH_SURROGATE.fullmatch(data, p - 6, p):
                run = 1  # is that backslash an escape of its own (odd run)?
                while p - 6 - run >= i and data[p - 6 - run] == _BACKSLASH:
                    run += 1
                if run % 2:  # a high surrogate: keep it with its low half
                    p -= 6
            while p > i and (data[p] & 0xC0) == 0x80:
                p -= 1
            if p <= i:
                return None
        pieces.append(json.loads(b'"' + data[i:p] + b'"'))
        i = p
    return SlicedText(pieces)
