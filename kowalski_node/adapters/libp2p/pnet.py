"""Spec-compliant libp2p private network (pnet) protector, as a TCP transport wrapper.

The libp2p pnet spec: right after the TCP connection opens, each side sends a
random 24-byte nonce, then everything it writes is XOR-ed with the XSalsa20
keystream of (cluster key, its own nonce). Each side reads exactly 24 bytes of
the peer's nonce before decrypting. There is no MAC: a wrong key is only visible
as garbage. py-libp2p 0.8.1's own protector uses Salsa20 with an 8-byte nonce
(and a single short-read-prone `read(8)`), so it cannot talk to go/rust/js peers;
this module replaces it by wrapping the TCP transport instead of passing `psk=`.

Fast key-mismatch detection: every libp2p connection starts, in both directions,
with the multistream-select header `\\x13/multistream/1.0.0\\n`. We compare the
first 20 decrypted bytes with it; garbage means the peer holds another key (or
no key) and the connection is closed at once, instead of the upgrader hanging
until its 10-20 s timeouts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import trio
from libp2p.abc import IListener, IRawConnection, ITransport
from libp2p.custom_types import THandler
from libp2p.io.abc import ReadWriteCloser
from libp2p.io.exceptions import IOException
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.transport.tcp.tcp import TCP
from multiaddr import Multiaddr

from kowalski_node.adapters.libp2p.xsalsa20 import NONCE_SIZE, XSalsa20

logger = logging.getLogger(__name__)

MULTISTREAM_HEADER = b"\x13/multistream/1.0.0\n"
READ_CHUNK = 256 * 1024


class PnetError(IOException):
    """The pnet layer could not be established (short nonce, early close)."""


class PnetKeyMismatch(PnetError):
    """The peer's first decrypted bytes are garbage: it holds another cluster key (or none)."""


@dataclass
class PnetTrace:
    """What one connection got through; lets a failed dial be explained afterwards."""

    remote: tuple[str, int] | None
    outbound: bool
    opened_at: float
    nonce_received: bool = False
    header_verified: bool = False
    key_mismatch: bool = False
    closed_early: bool = False


class PnetStream(ReadWriteCloser):
    """A ReadWriteCloser that XSalsa20-encrypts everything under the cluster key."""

    def __init__(
        self,
        inner: ReadWriteCloser,
        key: bytes,
        trace: PnetTrace,
        *,
        verify_header: bool = True,
        on_mismatch: Callable[[PnetTrace], None] | None = None,
        nonce_factory: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._inner = inner
        self._key = key
        self._trace = trace
        self._verify_header = verify_header
        self._on_mismatch = on_mismatch
        self._nonce_factory = nonce_factory
        self._write_cipher: XSalsa20 | None = None
        self._read_cipher: XSalsa20 | None = None
        self._header_pos = 0 if verify_header else len(MULTISTREAM_HEADER)
        self._write_lock = trio.Lock()
        self._read_lock = trio.Lock()
        self._buffer = bytearray()  # decrypted bytes read ahead of the caller

    @property
    def trace(self) -> PnetTrace:
        return self._trace

    async def write(self, data: bytes) -> None:
        async with self._write_lock:
            prefix = b""
            if self._write_cipher is None:
                nonce = self._nonce_factory(NONCE_SIZE)
                self._write_cipher = XSalsa20(self._key, nonce)
                prefix = nonce  # sent together with the first payload: one segment
            await self._inner.write(prefix + self._write_cipher.apply(bytes(data)))

    async def _read_nonce(self) -> bytes:
        """Read exactly 24 bytes; a peer may deliver them in several segments."""
        nonce = b""
        while len(nonce) < NONCE_SIZE:
            chunk = await self._inner.read(NONCE_SIZE - len(nonce))
            if not chunk:
                self._trace.closed_early = True
                raise PnetError(
                    f"connection closed after {len(nonce)} of {NONCE_SIZE} pnet nonce bytes "
                    "(the peer likely rejected our cluster key, or is not a libp2p pnet peer)"
                )
            nonce += chunk
            if nonce.startswith(MULTISTREAM_HEADER):
                # A stock libp2p peer with no private network speaks multistream in
                # clear (20 bytes) and then waits; a random nonce never looks like that.
                self._trace.key_mismatch = True
                if self._on_mismatch is not None:
                    self._on_mismatch(self._trace)
                raise PnetKeyMismatch(
                    f"peer {_fmt(self._trace.remote)} speaks libp2p without a private "
                    "network (no cluster key)"
                )
        return nonce

    async def read(self, n: int | None = None) -> bytes:
        """Up to n decrypted bytes. Reads the socket in large pieces and serves the
        many small reads of the layers above (noise: 2-byte length, then body;
        yamux: 12-byte headers) from a buffer: fewer syscalls and cipher calls."""
        async with self._read_lock:
            if not self._buffer:
                if self._read_cipher is None:
                    self._read_cipher = XSalsa20(self._key, await self._read_nonce())
                    self._trace.nonce_received = True
                data = await self._inner.read(max(n or 0, READ_CHUNK))
                if not data:
                    if self._header_pos < len(MULTISTREAM_HEADER):
                        self._trace.closed_early = True
                    return b""
                plain = self._read_cipher.apply(data)
                if self._header_pos < len(MULTISTREAM_HEADER):
                    await self._check_header(plain)
                if n is None or len(plain) <= n:
                    return plain
                self._buffer += plain
            size = len(self._buffer) if n is None else min(n, len(self._buffer))
            out = bytes(self._buffer[:size])
            del self._buffer[:size]
            return out

    async def _check_header(self, plain: bytes) -> None:
        expected = MULTISTREAM_HEADER[self._header_pos : self._header_pos + len(plain)]
        if plain[: len(expected)] != expected:
            self._trace.key_mismatch = True
            if self._on_mismatch is not None:
                self._on_mismatch(self._trace)
            # closing a half-dead socket may fail; we are done with it either way
            with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self._inner.close()
            raise PnetKeyMismatch(
                f"peer {_fmt(self._trace.remote)} sent undecryptable data: "
                "likely a cluster key mismatch"
            )
        self._header_pos += len(expected)
        if self._header_pos == len(MULTISTREAM_HEADER):
            self._trace.header_verified = True

    async def close(self) -> None:
        await self._inner.close()

    def get_remote_address(self) -> tuple[str, int] | None:
        return self._inner.get_remote_address()


def _fmt(remote: tuple[str, int] | None) -> str:
    return "unknown" if remote is None else f"{remote[0]}:{remote[1]}"


class PnetTCPTransport(ITransport):
    """TCP transport whose every connection is pnet-protected with the cluster key.

    Keeps a small per-address record of recent outbound handshakes so a failed
    dial can be reported as "TCP up, but the key did not match" rather than as a
    generic upgrade timeout.
    """

    _TRACE_LIMIT = 256

    def __init__(self, key: bytes, *, verify_header: bool = True) -> None:
        if len(key) != 32:
            raise ValueError(f"pnet key must be 32 bytes, got {len(key)}")
        self._key = key
        self._verify_header = verify_header
        self._tcp = TCP()
        self._outbound: OrderedDict[tuple[str, int], PnetTrace] = OrderedDict()
        self.inbound_mismatches = 0
        self.outbound_mismatches = 0

    def _remember(self, trace: PnetTrace) -> None:
        if trace.remote is None:
            return
        self._outbound[trace.remote] = trace
        self._outbound.move_to_end(trace.remote)
        while len(self._outbound) > self._TRACE_LIMIT:
            self._outbound.popitem(last=False)

    def last_outbound_trace(self, host: str, port: int) -> PnetTrace | None:
        """The most recent outbound handshake to host:port, if any."""
        return self._outbound.get((host, port))

    def _mismatch(self, trace: PnetTrace) -> None:
        if trace.outbound:
            self.outbound_mismatches += 1
            logger.warning(
                "pnet: %s sent undecryptable data: likely a cluster key mismatch",
                _fmt(trace.remote),
            )
        else:
            self.inbound_mismatches += 1
            logger.warning(
                "pnet: refused inbound connection from %s: wrong or missing cluster key",
                _fmt(trace.remote),
            )

    def _wrap(self, inner: ReadWriteCloser, outbound: bool) -> PnetStream:
        trace = PnetTrace(
            remote=inner.get_remote_address(), outbound=outbound, opened_at=time.monotonic()
        )
        if outbound:
            self._remember(trace)
        return PnetStream(
            inner,
            self._key,
            trace,
            verify_header=self._verify_header,
            on_mismatch=self._mismatch,
        )

    async def dial(self, maddr: Multiaddr) -> IRawConnection:
        raw = await self._tcp.dial(maddr)
        if not isinstance(raw, RawConnection):
            raise TypeError(f"TCP transport returned {type(raw).__name__}, not RawConnection")
        return RawConnection(self._wrap(raw.stream, outbound=True), True)

    def create_listener(self, handler_function: THandler) -> IListener:
        async def protected(conn: ReadWriteCloser) -> None:
            await handler_function(self._wrap(conn, outbound=False))

        return self._tcp.create_listener(protected)

    def can_dial(self, maddr: Multiaddr) -> bool:
        return self._tcp.can_dial(maddr)

    def can_listen(self, maddr: Multiaddr) -> bool:
        return self._tcp.can_listen(maddr)

    def protocols(self) -> list[str]:
        return self._tcp.protocols()
