"""Length-prefixed frames: unsigned LEB128 varint length, then that many bytes.

This is the framing libp2p protocols commonly use (it-length-prefixed in js,
msgio/varint in go), so other implementations can speak our protocols. The
decoder is sans-IO: feed it bytes, get whole frames; it enforces a maximum frame
size *before* buffering a body, so a hostile length prefix cannot make us
allocate.
"""

from __future__ import annotations

from kowalski_node.errors import KowalskiError

MAX_VARINT_BYTES = 10
DEFAULT_MAX_FRAME = 4 * 1024 * 1024


class FrameError(KowalskiError):
    """The byte stream is not valid framing; the stream cannot be resynchronised."""


class FrameTooLarge(FrameError):
    """A frame's announced length exceeds the limit."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


def encode_varint(value: int) -> bytes:
    if value < 0:
        raise ValueError("varint must be non-negative")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(buf: bytes | bytearray, start: int = 0) -> tuple[int, int] | None:
    """(value, bytes used) or None if more bytes are needed; FrameError if malformed."""
    value = 0
    for i in range(MAX_VARINT_BYTES):
        pos = start + i
        if pos >= len(buf):
            return None
        byte = buf[pos]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if i > 0 and byte == 0:
                raise FrameError("non-minimal varint length prefix")
            return value, i + 1
    raise FrameError(f"varint length prefix longer than {MAX_VARINT_BYTES} bytes")


def encode_frame(payload: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    if len(payload) > max_frame:
        raise FrameTooLarge(len(payload), max_frame)
    return encode_varint(len(payload)) + payload


class FrameDecoder:
    """Incremental decoder: `feed(bytes) -> [frames]`; holds at most one partial frame."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._need: int | None = None  # body length of the frame in progress

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def in_frame(self) -> bool:
        """True while part of a frame has arrived (its rest must come within a deadline)."""
        return bool(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        frames: list[bytes] = []
        while True:
            if self._need is None:
                header = decode_varint(self._buf)
                if header is None:
                    return frames
                size, used = header
                if size > self.max_frame:
                    self._buf.clear()  # the stream cannot be resynchronised; keep nothing
                    raise FrameTooLarge(size, self.max_frame)
                del self._buf[:used]
                self._need = size
            if len(self._buf) < self._need:
                return frames
            frames.append(bytes(self._buf[: self._need]))
            del self._buf[: self._need]
            self._need = None
