"""XSalsa20 against published and libsodium vectors; the pnet stream over real byte streams."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import cast

import pytest
import trio
import trio.testing
from libp2p.io.abc import ReadWriteCloser

from kowalski_node.adapters.libp2p.pnet import (
    MULTISTREAM_HEADER,
    PnetError,
    PnetKeyMismatch,
    PnetStream,
    PnetTrace,
)
from kowalski_node.adapters.libp2p.xsalsa20 import XSalsa20, hsalsa20, xsalsa20_keystream

VECTORS = Path(__file__).resolve().parents[1] / "protocols" / "vectors"

# Published in the NaCl distribution (tests/core3.c, tests/stream3.c), independent of our code.
NACL_KEY = bytes.fromhex("1b27556473e985d462cd51197a9a46c76009549eac6474f206c4ee0844f68389")
NACL_NONCE = bytes.fromhex("69696ee955b62b73cd62bda875fc73d68219e0036b7a0b37")
NACL_SUBKEY = bytes.fromhex("dc908dda0b9344a953629b733820778880f3ceb421bb61b91cbd4c3e66256ce4")
NACL_STREAM32 = bytes.fromhex("eea6a7251c1e72916d11c2cb214d3c252539121d8e234e652d651fa4c8cff880")


def test_hsalsa20_and_xsalsa20_match_nacl_published_vectors() -> None:
    assert hsalsa20(NACL_KEY, NACL_NONCE[:16]) == NACL_SUBKEY
    assert xsalsa20_keystream(NACL_KEY, NACL_NONCE, 32) == NACL_STREAM32


def test_golden_xsalsa20_file_vectors() -> None:
    data = json.loads((VECTORS / "xsalsa20.json").read_text())
    assert len(data["vectors"]) >= 2
    for vec in data["vectors"]:
        key, nonce = bytes.fromhex(vec["key"]), bytes.fromhex(vec["nonce"])
        assert hsalsa20(key, nonce[:16]).hex() == vec["hsalsa20_subkey"], vec["name"]
        stream = bytes.fromhex(vec["keystream"])
        assert xsalsa20_keystream(key, nonce, len(stream)) == stream, vec["name"]


@pytest.mark.parametrize("length", [1, 63, 64, 65, 1000, 70_000])
def test_xsalsa20_matches_libsodium_secretbox(length: int) -> None:
    """crypto_secretbox = XSalsa20 keystream: bytes 0..31 key Poly1305, the rest XOR the message."""
    from cryptography.hazmat.primitives.poly1305 import Poly1305
    from nacl.bindings import crypto_secretbox

    key, nonce = os.urandom(32), os.urandom(24)
    message = os.urandom(length)
    boxed = crypto_secretbox(message, nonce, key)
    tag, body = boxed[:16], boxed[16:]
    stream = xsalsa20_keystream(key, nonce, 32 + length)
    assert bytes(a ^ b for a, b in zip(message, stream[32:], strict=True)) == body
    assert Poly1305.generate_tag(stream[:32], body) == tag


def test_stream_state_continues_across_calls() -> None:
    key, nonce = os.urandom(32), os.urandom(24)
    data = os.urandom(5000)
    whole = XSalsa20(key, nonce).apply(data)
    cipher = XSalsa20(key, nonce)
    pieces = b"".join(cipher.apply(data[i : i + 7]) for i in range(0, len(data), 7))
    assert pieces == whole


def test_bad_key_and_nonce_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        XSalsa20(b"short", bytes(24))
    with pytest.raises(ValueError, match="24 bytes"):
        XSalsa20(bytes(32), bytes(8))


# ---------------------------------------------------------------- pnet stream (needs libp2p)


class _TrioRWC:
    """libp2p ReadWriteCloser over a trio stream, delivering at most `max_read` bytes per read."""

    def __init__(self, stream: trio.abc.Stream, max_read: int = 65536) -> None:
        self.stream = stream
        self.max_read = max_read

    async def read(self, n: int | None = None) -> bytes:
        size = self.max_read if n is None else min(n, self.max_read)
        try:
            return await self.stream.receive_some(size)
        except trio.ClosedResourceError:
            return b""

    async def write(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def close(self) -> None:
        await self.stream.aclose()

    def get_remote_address(self) -> tuple[str, int] | None:
        return ("127.0.0.1", 1)


def _pnet_pair(
    key_a: bytes, key_b: bytes, max_read: int = 65536
) -> tuple[PnetStream, PnetStream, list[PnetTrace]]:

    left, right = trio.testing.memory_stream_pair()
    mismatches: list[PnetTrace] = []
    a = PnetStream(
        cast(ReadWriteCloser, _TrioRWC(left, max_read)),
        key_a,
        PnetTrace(None, True, 0.0),
        on_mismatch=mismatches.append,
    )
    b = PnetStream(
        cast(ReadWriteCloser, _TrioRWC(right, max_read)),
        key_b,
        PnetTrace(None, False, 0.0),
        on_mismatch=mismatches.append,
    )
    return a, b, mismatches


def test_pnet_wire_matches_golden_vector() -> None:
    from kowalski_node.identity import ClusterKey

    vec = json.loads((VECTORS / "pnet_handshake.json").read_text())
    key = ClusterKey.from_swarm_key(vec["swarm_key"])
    sent: list[bytes] = []

    class Capture(_TrioRWC):
        async def write(self, data: bytes) -> None:
            sent.append(data)

    left, _ = trio.testing.memory_stream_pair()
    stream = PnetStream(
        cast(ReadWriteCloser, Capture(left)),
        key.key,
        PnetTrace(None, True, 0.0),
        nonce_factory=lambda n: bytes.fromhex(vec["nonce"])[:n],
    )
    trio.run(stream.write, bytes.fromhex(vec["plaintext"]))
    assert b"".join(sent).hex() == vec["wire"]


async def test_pnet_roundtrip_with_one_byte_reads() -> None:
    """The 24-byte nonce may arrive in pieces: a single read(24) would break (py-libp2p's bug)."""
    key = os.urandom(32)
    a, b, mismatches = _pnet_pair(key, key, max_read=1)
    payload = MULTISTREAM_HEADER + os.urandom(300)
    got = b""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.write, payload)
        with trio.fail_after(5):
            while len(got) < len(payload):
                got += await b.read(4096)
    assert got == payload
    assert not mismatches
    assert b.trace.header_verified


async def test_pnet_detects_wrong_key_immediately() -> None:
    a, b, mismatches = _pnet_pair(os.urandom(32), os.urandom(32))
    await a.write(MULTISTREAM_HEADER + b"\x07/noise\n")
    with trio.fail_after(2), pytest.raises(PnetKeyMismatch, match="cluster key mismatch"):
        await b.read(4096)
    assert len(mismatches) == 1
    assert b.trace.key_mismatch


async def test_pnet_reports_early_close_during_nonce() -> None:
    key = os.urandom(32)
    a, b, _ = _pnet_pair(key, key)
    await a._inner.write(b"\x01\x02\x03")
    await a.close()
    with trio.fail_after(2), pytest.raises(PnetError, match="3 of 24 pnet nonce bytes"):
        await b.read(100)


async def test_pnet_recognises_a_peer_without_private_network() -> None:
    """A stock libp2p peer sends the multistream header in clear where the nonce should be."""
    key = os.urandom(32)
    a, b, mismatches = _pnet_pair(key, key)
    await a._inner.write(MULTISTREAM_HEADER)  # then it waits for our answer
    with trio.fail_after(2), pytest.raises(PnetKeyMismatch, match="without a private network"):
        await b.read(100)
    assert len(mismatches) == 1
