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
    if isinstance(value, str) and len(value) > SLICE:
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


def decode_base64(text: str) -> bytes:
    """`base64.b64decode(text)` for text already checked by `check_base64`, in slices."""
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
    if isinstance(value, str) and len(value) > SLICE:
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
