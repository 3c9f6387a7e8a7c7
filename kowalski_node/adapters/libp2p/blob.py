"""Chunked, hash-verified, resumable file transfer over one stream (/kowalski/blob/1.0.0).

Large REPL inputs (up to GBs) must cross the network with bounded memory. The
sender streams fixed-size chunks, each carrying its sha256; the receiver checks
every chunk before writing it, and the whole file against its sha256 (which is
also its name: the store is content-addressed, so a blob already present is
not sent again). An interrupted transfer resumes from the last whole chunk on
disk. Memory on both sides stays at about one chunk; backpressure comes from
yamux flow control.

Exchange (all frames are envelopes; see protocols/README.md):
    sender   request blob.offer {blob_id, size, chunk_size, name, meta}
    receiver reply   blob.offer {offset}          (resume point; == size if present)
    sender   notify  blob.chunk {offset, data, sha256}   ... for each chunk from offset
    sender   request blob.end   {size}
    receiver reply   blob.end   {blob_id, size}  or error bad_request (hash mismatch)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kowalski_node.adapters.libp2p import envelope as env
from kowalski_node.adapters.libp2p.errors import (
    ProtocolViolation,
    RemoteError,
    RequestTimeout,
    TransportError,
)
from kowalski_node.adapters.libp2p.rpc import (
    ByteStream,
    FrameReader,
    FrameWriter,
    RpcLimits,
    _IdleTimeout,
)

logger = logging.getLogger(__name__)

DEFAULT_CHUNK = 256 * 1024  # 1 MiB frames cost ~40 MB more receiver RSS per 1 GiB (measured)
MIN_CHUNK = 4 * 1024
MAX_CHUNK = 4 * 1024 * 1024
FRAME_OVERHEAD = 1024  # envelope + msgpack headers around a chunk
BLOB_ID_RE = re.compile(r"^[0-9a-f]{64}$")
HASH_BLOCK = 1024 * 1024


class BlobOffer(BaseModel):
    """The sender's announcement; validated before anything touches the disk."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    blob_id: str = Field(pattern=BLOB_ID_RE.pattern)
    size: int = Field(ge=0)
    chunk_size: int = Field(ge=MIN_CHUNK, le=MAX_CHUNK)
    name: str = Field(default="", max_length=255)
    meta: Any = None


@dataclass(frozen=True)
class BlobReceipt:
    """What the sender learns once the receiver verified the whole file."""

    blob_id: str
    size: int
    resumed_from: int
    sent_bytes: int


BlobCallback = Callable[[str, BlobOffer, Path], Awaitable[None]]


def blob_limits(chunk_size: int, base: RpcLimits | None = None) -> RpcLimits:
    b = base or RpcLimits()
    return RpcLimits(
        max_frame=chunk_size + FRAME_OVERHEAD,
        idle_timeout=b.frame_timeout,  # inside a transfer, silence is an error
        frame_timeout=b.frame_timeout,
        write_timeout=b.write_timeout,
        max_inflight=1,
    )


def file_sha256(path: Path) -> tuple[str, int]:
    """(hex sha256, size) read in 1 MiB blocks (bounded memory). Blocking: run in a thread."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while block := handle.read(HASH_BLOCK):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


class BlobStore:
    """Content-addressed directory: `<blob_id>` when complete, `<blob_id>.part` while arriving."""

    def __init__(self, root: Path, max_blob_bytes: int = 64 * 1024**3) -> None:
        self.root = Path(root)
        self.max_blob_bytes = max_blob_bytes
        self._locks: dict[str, trio.Lock] = {}

    def transfer_lock(self, blob_id: str) -> trio.Lock:
        """One incoming transfer per blob at a time: a sender that resumes on a new stream
        waits until the old stream's handler (maybe still inside a disk write) has let go
        of the partial file, instead of racing it."""
        lock = self._locks.get(blob_id)
        if lock is None:
            lock = self._locks[blob_id] = trio.Lock()
        return lock

    def release_transfer_lock(self, blob_id: str, lock: trio.Lock) -> None:
        lock.release()
        if not lock.locked() and lock.statistics().tasks_waiting == 0:
            self._locks.pop(blob_id, None)

    def path_for(self, blob_id: str) -> Path:
        if not BLOB_ID_RE.match(blob_id):
            raise ValueError(f"invalid blob id {blob_id!r}")
        return self.root / blob_id

    def has(self, blob_id: str) -> bool:
        return self.path_for(blob_id).is_file()

    def _part(self, blob_id: str) -> tuple[Path, Path]:
        final = self.path_for(blob_id)
        return final.with_name(blob_id + ".part"), final.with_name(blob_id + ".part.json")

    def resume_offset(self, offer: BlobOffer) -> int:
        """Where the sender should start; truncates a partial file to its last whole chunk."""
        if self.has(offer.blob_id):
            return offer.size
        part, sidecar = self._part(offer.blob_id)
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            recorded = json.loads(sidecar.read_text())
            same_plan = (
                recorded.get("chunk_size") == offer.chunk_size
                and recorded.get("size") == offer.size
            )
        except (OSError, ValueError, AttributeError):
            same_plan = False
        if not same_plan or not part.exists():
            part.unlink(missing_ok=True)
            sidecar.write_text(json.dumps({"chunk_size": offer.chunk_size, "size": offer.size}))
            part.touch()
            return 0
        have = part.stat().st_size
        offset = min(have - have % offer.chunk_size, offer.size)
        if offset != have:
            os.truncate(part, offset)
        return offset

    def prefix_hasher(self, blob_id: str, offset: int) -> Any:
        """sha256 state over the first `offset` bytes already on disk (resume)."""
        digest = hashlib.sha256()
        part, _ = self._part(blob_id)
        remaining = offset
        with open(part, "rb") as handle:
            while remaining > 0:
                block = handle.read(min(HASH_BLOCK, remaining))
                if not block:
                    raise ValueError("partial blob shorter than its resume offset")
                digest.update(block)
                remaining -= len(block)
        return digest

    def append(self, blob_id: str, data: bytes) -> None:
        part, _ = self._part(blob_id)
        with open(part, "ab") as handle:
            handle.write(data)

    def finish(self, blob_id: str) -> Path:
        part, sidecar = self._part(blob_id)
        final = self.path_for(blob_id)
        os.replace(part, final)
        sidecar.unlink(missing_ok=True)
        return final

    def discard(self, blob_id: str) -> None:
        part, sidecar = self._part(blob_id)
        part.unlink(missing_ok=True)
        sidecar.unlink(missing_ok=True)


# --------------------------------------------------------------------------- sender


async def _expect_reply(reader: FrameReader, type_: str, request_id: int) -> Any:
    try:
        frame = await reader.next_frame(idle=True)
    except _IdleTimeout:
        raise RequestTimeout(f"the receiver did not answer {type_} in time") from None
    if frame is None:
        raise TransportError(f"receiver closed the blob stream before answering {type_}")
    reply = env.decode_envelope(frame)
    if reply.kind == "error":
        body = reply.payload if isinstance(reply.payload, dict) else {}
        raise RemoteError(str(body.get("code", "internal")), str(body.get("message", "")))
    if reply.kind != "reply" or reply.id != request_id or reply.type != type_:
        raise ProtocolViolation(f"expected a reply to {type_}, got {reply.kind} {reply.type}")
    return reply.payload


async def send_blob_over(
    stream: ByteStream,
    path: Path,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    meta: Any = None,
    name: str | None = None,
    blob_id: str | None = None,
    limits: RpcLimits | None = None,
    reply_timeout: float = 30.0,
) -> BlobReceipt:
    """Send one file; returns once the receiver has verified it (or raises)."""
    path = Path(path)
    if not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
        raise ValueError(f"chunk_size must be in [{MIN_CHUNK}, {MAX_CHUNK}]")
    size: int
    if blob_id is None:
        digest_hex, size = await trio.to_thread.run_sync(file_sha256, path)
        blob_id = str(digest_hex)
    else:
        size = path.stat().st_size
    lim = blob_limits(chunk_size, limits)
    reader, writer = FrameReader(stream, lim), FrameWriter(stream, lim)
    offer = {
        "blob_id": blob_id,
        "size": size,
        "chunk_size": chunk_size,
        "name": name if name is not None else path.name,
        "meta": meta,
    }
    await writer.send(env.request("blob.offer", offer, 1))
    with trio.fail_after(reply_timeout):
        answer = await _expect_reply(reader, "blob.offer", 1)
    offset = answer.get("offset") if isinstance(answer, dict) else None
    if (
        not isinstance(offset, int)
        or not 0 <= offset <= size
        or (offset % chunk_size and (offset != size))
    ):
        raise ProtocolViolation(f"receiver proposed an invalid resume offset {offset!r}")
    start = offset

    def read_chunk(handle: Any, length: int) -> tuple[bytes, bytes]:
        data = handle.read(length)
        return data, hashlib.sha256(data).digest()

    with open(path, "rb") as handle:  # noqa: ASYNC230 - opening is instant; every read runs in a worker thread
        handle.seek(offset)
        while offset < size:
            length = min(chunk_size, size - offset)
            data, digest = await trio.to_thread.run_sync(read_chunk, handle, length)
            if len(data) != length:
                raise TransportError(f"{path} changed while being sent (short read at {offset})")
            await writer.send(
                env.notify("blob.chunk", {"offset": offset, "data": data, "sha256": digest})
            )
            offset += length
    await writer.send(env.request("blob.end", {"size": size}, 2))
    try:
        with trio.fail_after(reply_timeout):
            done = await _expect_reply(reader, "blob.end", 2)
    except trio.TooSlowError:
        raise RequestTimeout(f"receiver did not confirm the blob within {reply_timeout}s") from None
    if not isinstance(done, dict) or done.get("blob_id") != blob_id or done.get("size") != size:
        raise ProtocolViolation(f"receiver confirmed something else: {done!r}")
    return BlobReceipt(blob_id=blob_id, size=size, resumed_from=start, sent_bytes=size - start)


# --------------------------------------------------------------------------- receiver


class _BlobAbort(Exception):
    def __init__(self, code: str, message: str, request_id: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


async def receive_blob_over(
    stream: ByteStream,
    *,
    peer_id: str,
    store: BlobStore,
    on_complete: BlobCallback | None = None,
    limits: RpcLimits | None = None,
) -> Path | None:
    """Serve one incoming blob transfer; returns the verified file's path, or None on failure.

    Never raises on bad input: the sender gets an error reply and the stream closes.
    """
    lim = blob_limits(MAX_CHUNK, limits)
    reader, writer = FrameReader(stream, lim), FrameWriter(stream, lim)
    offer: BlobOffer | None = None
    held_lock: trio.Lock | None = None
    try:
        frame = await reader.next_frame(idle=True)
        if frame is None:
            return None
        first = env.decode_envelope(frame)
        if first.kind != "request" or first.type != "blob.offer":
            raise _BlobAbort(
                env.ERR_UNKNOWN_TYPE, f"expected blob.offer, got {first.type}", first.id
            )
        try:
            offer = BlobOffer.model_validate(first.payload)
        except ValidationError as exc:
            problem = exc.errors()[0]["msg"]
            raise _BlobAbort(env.ERR_BAD_REQUEST, f"bad offer: {problem}", first.id) from None
        if offer.size > store.max_blob_bytes:
            raise _BlobAbort(
                env.ERR_TOO_LARGE, f"blob of {offer.size} bytes exceeds {store.max_blob_bytes}", 1
            )
        lock = store.transfer_lock(offer.blob_id)
        with trio.move_on_after(lim.write_timeout):
            await lock.acquire()
            held_lock = lock
        if held_lock is None:
            raise _BlobAbort(
                env.ERR_OVERLOADED, "another transfer of this blob is still running", first.id
            )
        held = store.has(offer.blob_id)
        offset = await trio.to_thread.run_sync(store.resume_offset, offer)
        hasher = (
            None
            if held
            else await trio.to_thread.run_sync(store.prefix_hasher, offer.blob_id, offset)
        )
        await writer.send(env.reply_to(first, {"offset": offset}))
        if offset:
            logger.info("blob %s from %s: resuming at %d", offer.blob_id[:12], peer_id, offset)
        while True:
            frame = await reader.next_frame(idle=True)
            if frame is None:
                raise _BlobAbort(env.ERR_BAD_REQUEST, "sender closed before blob.end")
            msg = env.decode_envelope(frame)
            if msg.kind == "notify" and msg.type == "blob.chunk" and hasher is not None:
                offset = await _accept_chunk(store, offer, msg.payload, offset, hasher)
            elif msg.kind == "request" and msg.type == "blob.end":
                if hasher is not None:
                    if offset != offer.size:
                        raise _BlobAbort(
                            env.ERR_BAD_REQUEST, f"got {offset} of {offer.size} bytes", msg.id
                        )
                    if hasher.hexdigest() != offer.blob_id:
                        await trio.to_thread.run_sync(store.discard, offer.blob_id)
                        raise _BlobAbort(
                            env.ERR_BAD_REQUEST, "whole-file sha256 does not match", msg.id
                        )
                    final = await trio.to_thread.run_sync(store.finish, offer.blob_id)
                else:
                    final = store.path_for(offer.blob_id)
                await writer.send(env.reply_to(msg, {"blob_id": offer.blob_id, "size": offer.size}))
                if on_complete is not None:
                    await on_complete(peer_id, offer, final)
                return final
            else:
                raise _BlobAbort(env.ERR_UNKNOWN_TYPE, f"unexpected {msg.kind} {msg.type}", msg.id)
    except _BlobAbort as exc:
        logger.info("blob from %s refused: %s", peer_id, exc.message)
        with trio.move_on_after(lim.write_timeout):
            with contextlib.suppress(TransportError):
                await writer.send(
                    env.error_reply("blob.error", exc.request_id, exc.code, exc.message)
                )
    except env.MalformedMessage as exc:
        logger.info("blob from %s: malformed frame: %s", peer_id, exc)
    except _IdleTimeout:
        # A sender that went silent mid-transfer (SIGSTOPped, its link gone). This escaped
        # once and took the whole receiving node down with it, through libp2p's nursery.
        logger.info(
            "blob from %s: the sender went silent for %.0f s; the partial file is kept for a "
            "resume",
            peer_id,
            lim.idle_timeout,
        )
    except (TransportError, OSError, ValueError) as exc:
        logger.info("blob from %s failed: %s", peer_id, exc)
    finally:
        if held_lock is not None and offer is not None:
            store.release_transfer_lock(offer.blob_id, held_lock)
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(1.0),
            contextlib.suppress(Exception),
        ):
            await stream.close()
    return None


async def _accept_chunk(
    store: BlobStore, offer: BlobOffer, payload: Any, offset: int, hasher: Any
) -> int:
    if not isinstance(payload, dict):
        raise _BlobAbort(env.ERR_BAD_REQUEST, "chunk payload must be a map")
    data, digest, at = payload.get("data"), payload.get("sha256"), payload.get("offset")
    if not isinstance(data, bytes) or not isinstance(digest, bytes) or at != offset:
        raise _BlobAbort(env.ERR_BAD_REQUEST, f"chunk out of order or malformed at {offset}")
    expected = min(offer.chunk_size, offer.size - offset)
    if len(data) != expected:
        raise _BlobAbort(env.ERR_BAD_REQUEST, f"chunk at {offset} has {len(data)} bytes")

    def verify_and_write() -> bool:
        if hashlib.sha256(data).digest() != digest:
            return False
        store.append(offer.blob_id, data)
        hasher.update(data)
        return True

    if not await trio.to_thread.run_sync(verify_and_write):
        raise _BlobAbort(env.ERR_BAD_REQUEST, f"chunk at {offset} failed its sha256 check")
    return offset + len(data)
