"""Wire format between the node and a sandbox worker: 4-byte big-endian length + msgpack map.

Stdlib + msgpack only: the worker imports this before it confines itself, and the parent
uses the incremental `FrameDecoder`, which refuses oversized or malformed frames so that
hostile code writing garbage to the pipe cannot make the node allocate or crash.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

HEADER = struct.Struct(">I")
# Largest frame the parent accepts from a worker (outputs are capped far below this).
DEFAULT_MAX_FRAME = 64 * 1024 * 1024


class ProtocolError(Exception):
    """The peer sent something that is not a well-formed frame."""


def encode(message: dict[str, Any]) -> bytes:
    """One frame: length prefix + msgpack body (bytes stay bytes, str stays str)."""
    body = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def encode_sliced(message: dict[str, Any]) -> bytes:
    """`encode`, with large strings/bytes packed in slices (blocking: call it in a worker
    thread, so a 50 MB context never holds the GIL, and the event loop, in one piece)."""
    from kowalski_node.runtime.context_blob import pack_sliced_into

    return pack_sliced_into(message, reserve=HEADER.size, header=HEADER)


def decode_body(body: bytes) -> dict[str, Any]:
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated types
        raise ProtocolError(f"undecodable frame ({type(exc).__name__}: {exc})") from None
    if not isinstance(message, dict) or not isinstance(message.get("t"), str):
        raise ProtocolError("frame is not a map with a string 't' field")
    return message


class FrameDecoder:
    """Incremental decoder: feed bytes, pop complete messages."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_message(self) -> dict[str, Any] | None:
        """The next complete message, or None if more bytes are needed."""
        if len(self._buffer) < HEADER.size:
            return None
        (length,) = HEADER.unpack_from(self._buffer)
        if length > self.max_frame:
            raise ProtocolError(f"frame of {length} bytes exceeds the {self.max_frame}-byte limit")
        end = HEADER.size + length
        if len(self._buffer) < end:
            return None
        body = bytes(self._buffer[HEADER.size : end])
        del self._buffer[:end]
        return decode_body(body)

    @property
    def buffered(self) -> int:
        return len(self._buffer)


def prompt_digest(prompt: str, model: str | None) -> str:
    """Short fingerprint of one sub-call, recorded so a replay can tell it asked the same thing."""
    import hashlib

    return hashlib.sha256(f"{model or ''}\x00{prompt}".encode("utf-8", "replace")).hexdigest()[:16]
