"""Blob streams over a real socketpair: integrity, dedup, resume, corruption."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import trio

from kowalski_node.adapters.libp2p.blob import (
    BlobOffer,
    BlobStore,
    file_sha256,
    receive_blob_over,
    send_blob_over,
)
from kowalski_node.adapters.libp2p.errors import RemoteError, TransportError

CHUNK = 64 * 1024


class SockStream:
    """libp2p-like stream over a socket; optionally dies after `fail_after_bytes` written."""

    def __init__(
        self,
        stream: trio.SocketStream,
        fail_after_bytes: int | None = None,
        corrupt_write: int | None = None,
    ) -> None:
        self.stream = stream
        self.written = 0
        self.writes = 0
        self.fail_after_bytes = fail_after_bytes
        self.corrupt_write = corrupt_write

    async def read(self, n: int | None = None) -> bytes:
        try:
            data = await self.stream.receive_some(n or 65536)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise EOFError() from None
        if not data:
            raise EOFError()
        return data

    async def write(self, data: bytes) -> None:
        if self.fail_after_bytes is not None and self.written + len(data) > self.fail_after_bytes:
            await self.stream.aclose()
            raise OSError("connection dropped (test)")
        self.written += len(data)
        self.writes += 1
        if self.writes == self.corrupt_write:
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
        await self.stream.send_all(data)

    async def close(self) -> None:
        await self.stream.aclose()

    async def reset(self) -> None:
        await self.stream.aclose()


def sock_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


async def transfer(
    path: Path,
    store: BlobStore,
    *,
    fail_after_bytes: int | None = None,
    blob_id: str | None = None,
) -> tuple[object, Path | None]:
    left, right = sock_pair()
    received: list[Path | None] = []
    completed: list[tuple[str, BlobOffer, Path]] = []

    async def on_complete(peer: str, offer: BlobOffer, final: Path) -> None:
        completed.append((peer, offer, final))

    async def receiver() -> None:
        received.append(
            await receive_blob_over(
                SockStream(right), peer_id="sender", store=store, on_complete=on_complete
            )
        )

    outcome: object = None
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            try:
                outcome = await send_blob_over(
                    SockStream(left, fail_after_bytes),
                    path,
                    chunk_size=CHUNK,
                    meta={"task": "t1"},
                    blob_id=blob_id,
                    reply_timeout=5,
                )
            except (TransportError, OSError) as exc:
                outcome = exc
            finally:
                await left.aclose()
    if received[0] is not None:
        assert completed and completed[0][1].meta == {"task": "t1"}
    return outcome, received[0]


def make_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


async def test_transfer_verifies_and_dedups(tmp_path: Path) -> None:
    src = make_file(tmp_path / "input.bin", 5 * CHUNK + 123)
    store = BlobStore(tmp_path / "store")
    receipt, final = await transfer(src, store)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    assert final is not None and final.name == digest
    assert final.read_bytes() == src.read_bytes()
    assert receipt.blob_id == digest and receipt.sent_bytes == src.stat().st_size  # type: ignore[attr-defined]
    again, final2 = await transfer(src, store)
    assert final2 == final and again.sent_bytes == 0  # type: ignore[attr-defined]


async def test_empty_file(tmp_path: Path) -> None:
    src = make_file(tmp_path / "empty", 0)
    _receipt, final = await transfer(src, BlobStore(tmp_path / "store"))
    assert final is not None and final.read_bytes() == b""


async def test_interrupted_transfer_resumes_from_last_whole_chunk(tmp_path: Path) -> None:
    src = make_file(tmp_path / "input.bin", 20 * CHUNK)
    store = BlobStore(tmp_path / "store")
    outcome, final = await transfer(src, store, fail_after_bytes=7 * CHUNK + 5000)
    assert isinstance(outcome, Exception) and final is None
    digest, _ = file_sha256(src)
    assert not store.has(digest)
    receipt, final = await transfer(src, store)
    assert final is not None and final.read_bytes() == src.read_bytes()
    resumed = receipt.resumed_from  # type: ignore[attr-defined]
    assert resumed > 0 and resumed % CHUNK == 0 and resumed <= 7 * CHUNK


async def test_whole_file_hash_mismatch_is_refused(tmp_path: Path) -> None:
    src = make_file(tmp_path / "input.bin", 3 * CHUNK)
    store = BlobStore(tmp_path / "store")
    wrong = "0" * 64
    outcome, final = await transfer(src, store, blob_id=wrong)
    assert isinstance(outcome, RemoteError) and "sha256" in outcome.remote_message
    assert final is None and not store.has(wrong)
    assert not list(store.root.glob("*.part"))


async def test_corrupted_chunk_is_refused(tmp_path: Path) -> None:
    src = make_file(tmp_path / "input.bin", 4 * CHUNK)
    store = BlobStore(tmp_path / "store")
    left, right = sock_pair()
    sender = SockStream(left, corrupt_write=3)  # the offer, then chunk frames: flip chunk 2
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            results: list[Path | None] = []

            async def receiver() -> None:
                results.append(await receive_blob_over(SockStream(right), peer_id="s", store=store))

            nursery.start_soon(receiver)
            with pytest.raises((RemoteError, TransportError, OSError)):
                await send_blob_over(sender, src, chunk_size=CHUNK, reply_timeout=5)
            await left.aclose()
    assert results == [None]
    assert not store.has(file_sha256(src)[0])


def test_offer_validation() -> None:
    with pytest.raises(ValueError):
        BlobOffer.model_validate({"blob_id": "xyz", "size": 1, "chunk_size": CHUNK})
    with pytest.raises(ValueError):
        BlobOffer.model_validate({"blob_id": "0" * 64, "size": 1, "chunk_size": 10})
    with pytest.raises(ValueError, match="invalid blob id"):
        BlobStore(Path("/tmp")).path_for("../etc/passwd")


class StallingStream(SockStream):
    """A sender that goes silent (SIGSTOPped) after `stall_after` writes."""

    def __init__(self, stream: trio.SocketStream, stall_after: int) -> None:
        super().__init__(stream)
        self.stall_after = stall_after

    async def write(self, data: bytes) -> None:
        if self.writes >= self.stall_after:
            await trio.sleep_forever()
        await super().write(data)


async def test_a_sender_that_goes_silent_mid_transfer_ends_only_that_transfer(
    tmp_path: Path,
) -> None:
    """The receiver's idle timeout inside a transfer ends the transfer with None and keeps
    the partial file for a resume. It used to escape as rpc._IdleTimeout, which py-libp2p's
    connection nursery turned into the death of the whole receiving node."""
    from kowalski_node.adapters.libp2p.rpc import RpcLimits

    src = make_file(tmp_path / "input.bin", 6 * CHUNK)
    store = BlobStore(tmp_path / "store")
    left, right = sock_pair()
    limits = RpcLimits(idle_timeout=0.5, frame_timeout=0.5, write_timeout=0.5)
    received: list[Path | None] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def sender() -> None:
                # its own write deadline ends it (writes are shielded up to that deadline)
                with pytest.raises(TransportError, match="did not accept data"):
                    await send_blob_over(
                        StallingStream(left, stall_after=3),  # offer + 2 chunks, then silence
                        src,
                        chunk_size=CHUNK,
                        reply_timeout=5,
                        limits=limits,
                    )

            nursery.start_soon(sender)
            received.append(
                await receive_blob_over(
                    SockStream(right), peer_id="silent", store=store, limits=limits
                )
            )
    assert received == [None]
    offer = BlobOffer(blob_id=file_sha256(src)[0], size=6 * CHUNK, chunk_size=CHUNK, meta=None)
    assert store.resume_offset(offer) == 2 * CHUNK  # what arrived is kept


async def test_a_failing_stream_handler_resets_its_stream_and_returns() -> None:
    from kowalski_node.adapters.libp2p.transport import _guarded

    class Stream:
        reset_called = False

        async def reset(self) -> None:
            Stream.reset_called = True

    async def broken(stream: object) -> None:
        raise ValueError("a handler bug")

    await _guarded("/kowalski/test/1.0.0", broken)(Stream())  # type: ignore[arg-type]
    assert Stream.reset_called
