"""Request/response over one long-lived stream, multiplexed by request id.

Opening a libp2p stream costs a multistream negotiation (~5 ms here); a frame
round trip on an open stream costs ~1 ms. So a requester keeps one stream per
(peer, protocol) open and pipelines requests on it; the responder runs each
request in its own task, so a slow handler never delays a membership probe.

Works over anything with `read/write/close/reset` (libp2p net streams in
production, trio memory streams in tests). Every wait has a deadline: a stream
with no traffic and nothing in progress is closed, a frame that has started must
finish within `frame_timeout`, and each request has its own timeout. Deadlines
never cancel a read or a write halfway (see FramePump, FrameWriter). Malformed
input produces an error reply or a closed stream; it never raises out of the
serving task.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from kowalski_node.adapters.libp2p import envelope as env
from kowalski_node.adapters.libp2p.errors import (
    ConnectionLost,
    ProtocolViolation,
    RemoteError,
    RequestRejected,
    RequestTimeout,
    TransportError,
    describe_exception,
)
from kowalski_node.adapters.libp2p.framing import (
    DEFAULT_MAX_FRAME,
    FrameDecoder,
    FrameError,
    FrameTooLarge,
    encode_frame,
)

logger = logging.getLogger(__name__)

READ_SIZE = 64 * 1024


class ByteStream(Protocol):
    """The part of libp2p's INetStream we use."""

    async def read(self, n: int | None = None) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...

    async def reset(self) -> None: ...


@dataclass(frozen=True)
class RpcLimits:
    """Sizes and deadlines of one RPC stream."""

    max_frame: int = DEFAULT_MAX_FRAME
    idle_timeout: float = 60.0  # close a stream with no traffic and nothing pending
    frame_timeout: float = 10.0  # a started frame must complete within this
    write_timeout: float = 10.0  # a peer that stops reading cannot block us forever
    max_inflight: int = 64  # concurrent requests served per stream; more get `overloaded`


@dataclass(frozen=True)
class Request:
    """What a handler receives."""

    peer_id: str
    protocol: str
    type: str
    payload: Any
    request_id: int
    one_way: bool = False


RequestHandler = Callable[[Request], Awaitable[Any]]


class _IdleTimeout(Exception):
    """Internal: no traffic within the idle timeout."""


async def _read_some(stream: ByteStream, n: int) -> bytes:
    """Read up to n bytes; b"" on end of stream (libp2p raises StreamEOF, an EOFError)."""
    try:
        return await stream.read(n)
    except EOFError:
        return b""
    except (trio.Cancelled, KeyboardInterrupt):
        raise
    except Exception as exc:
        raise ConnectionLost(f"stream broke: {describe_exception(exc)}") from exc


class FrameReader:
    """Whole frames from a byte stream, with idle and per-frame deadlines."""

    def __init__(self, stream: ByteStream, limits: RpcLimits) -> None:
        self._stream = stream
        self._limits = limits
        self._decoder = FrameDecoder(limits.max_frame)
        self._frames: list[bytes] = []
        self._frame_deadline: float | None = None

    async def next_frame(self, *, idle: bool = True) -> bytes | None:
        """The next frame, or None at a clean end of stream.

        idle=True applies the idle timeout while no frame is in progress
        (raises _IdleTimeout); idle=False waits indefinitely between frames
        (the caller bounds the wait some other way).
        """
        while not self._frames:
            if self._decoder.in_frame:
                if self._frame_deadline is None:
                    self._frame_deadline = trio.current_time() + self._limits.frame_timeout
                deadline = self._frame_deadline
            else:
                self._frame_deadline = None
                deadline = trio.current_time() + self._limits.idle_timeout if idle else math.inf
            with trio.move_on_at(deadline) as scope:
                data = await _read_some(self._stream, READ_SIZE)
            if scope.cancelled_caught:
                if self._decoder.in_frame:
                    raise ProtocolViolation(
                        f"frame not completed within {self._limits.frame_timeout:.1f}s"
                    )
                raise _IdleTimeout()
            if not data:
                if self._decoder.in_frame:
                    raise ConnectionLost("stream closed in the middle of a frame")
                return None
            self._frames.extend(self._decoder.feed(data))  # FrameError propagates
        return self._frames.pop(0)


class FramePump:
    """Frames read by one dedicated task, so a deadline never cancels a read.

    py-libp2p 0.8's yamux `read` takes bytes out of the stream's buffer and then
    awaits a lock to send a window update; a cancellation arriving there drops
    the bytes already taken. A reader that gives up after an idle timeout and
    carries on (a requester with a call pending, a responder still working on a
    request) would lose a frame whenever data lands on that instant. Here only
    `run` reads; `next_frame` waits on a memory channel, which is cancel-safe.
    The channel holds a few frames, so a slow consumer still pushes back on the
    sender through yamux's window.
    """

    def __init__(self, stream: ByteStream, limits: RpcLimits, *, depth: int = 8) -> None:
        self._reader = FrameReader(stream, limits)
        self._limits = limits
        self._send, self._receive = trio.open_memory_channel[bytes](depth)
        self._ended: BaseException | None = None

    async def run(self) -> None:
        """Read until the stream ends; the end (clean or not) reaches `next_frame`."""
        async with self._send:
            try:
                while True:
                    frame = await self._reader.next_frame(idle=False)
                    if frame is None:
                        return
                    await self._send.send(frame)
            except (FrameError, ProtocolViolation, TransportError) as exc:
                self._ended = exc

    async def next_frame(self, *, idle: bool = True) -> bytes | None:
        """The next frame; None at a clean end; _IdleTimeout after idle_timeout of silence."""
        deadline = trio.current_time() + self._limits.idle_timeout if idle else math.inf
        with trio.move_on_at(deadline):
            try:
                return await self._receive.receive()
            except trio.EndOfChannel:
                if self._ended is not None:
                    raise self._ended from None
                return None
        raise _IdleTimeout()


class FrameWriter:
    """Serialises whole frames onto a stream, with a write deadline.

    A write is shielded from the caller's cancellation: a frame cut off halfway
    would corrupt every later frame on the stream. Only the write deadline can
    interrupt it, and then the writer counts the stream as broken.
    """

    def __init__(self, stream: ByteStream, limits: RpcLimits) -> None:
        self._stream = stream
        self._limits = limits
        self._lock = trio.Lock()
        self._broken: str | None = None

    async def send(self, message: env.Envelope) -> None:
        frame = encode_frame(env.encode_envelope(message), self._limits.max_frame)
        await self.send_raw(frame)

    async def send_raw(self, frame: bytes) -> None:
        async with self._lock:
            if self._broken is not None:
                raise ConnectionLost(self._broken)
            with trio.CancelScope(shield=True):
                with trio.move_on_after(self._limits.write_timeout) as scope:
                    try:
                        await self._stream.write(frame)
                    except KeyboardInterrupt:
                        raise
                    except Exception as exc:
                        self._broken = f"write failed: {describe_exception(exc)}"
                        raise ConnectionLost(self._broken) from exc
                if scope.cancelled_caught:
                    self._broken = f"peer did not accept data for {self._limits.write_timeout:.1f}s"
                    raise ConnectionLost(self._broken)
        await trio.lowlevel.checkpoint_if_cancelled()  # the caller's cancellation, now


async def _close_quietly(stream: ByteStream, *, reset: bool = False) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1.0):
        try:
            if reset:
                await stream.reset()
            else:
                await stream.close()
        except Exception:  # noqa: BLE001, S110 - the stream is already broken; nothing left to do
            pass


# --------------------------------------------------------------------------- responder


async def serve_rpc_stream(
    stream: ByteStream,
    *,
    peer_id: str,
    protocol: str,
    handler: RequestHandler,
    types: Collection[str] | None = None,
    limits: RpcLimits | None = None,
) -> None:
    """Answer requests on `stream` until it ends; never raises (errors are logged)."""
    lim = limits or RpcLimits()
    reader, writer = FramePump(stream, lim), FrameWriter(stream, lim)
    inflight = 0
    where = f"{protocol} from {peer_id}"

    async def send_error(type_: str, request_id: int, code: str, message: str) -> None:
        await writer.send(env.error_reply(type_, request_id, code, message))

    async def run_one(req: env.Envelope) -> None:
        nonlocal inflight
        one_way = req.kind == "notify"
        try:
            if types is not None and req.type not in types:
                raise RequestRejected(
                    env.ERR_UNKNOWN_TYPE, f"{protocol} has no message type {req.type!r}"
                )
            result = await handler(
                Request(peer_id, protocol, req.type, req.payload, req.id, one_way=one_way)
            )
            if not one_way:
                try:
                    await writer.send(env.reply_to(req, result))
                except (FrameTooLarge, env.MalformedMessage) as exc:
                    await send_error(
                        req.type,
                        req.id,
                        env.ERR_TOO_LARGE if isinstance(exc, FrameTooLarge) else env.ERR_INTERNAL,
                        f"reply not sendable: {exc}",
                    )
        except RequestRejected as exc:
            if not one_way:
                await send_error(req.type, req.id, exc.code, exc.message)
            else:
                logger.info("%s: rejected notify %s: %s", where, req.type, exc.message)
        except TransportError as exc:
            logger.debug("%s: could not answer %s: %s", where, req.type, exc)
        except Exception as exc:
            logger.exception("%s: handler for %s failed", where, req.type)
            if not one_way:
                await send_error(req.type, req.id, env.ERR_INTERNAL, f"{type(exc).__name__}")
        finally:
            inflight -= 1

    async def guarded(req: env.Envelope) -> None:
        try:
            await run_one(req)
        except TransportError as exc:  # the reply could not be written: stream is gone
            logger.debug("%s: reply to %s lost: %s", where, req.type, exc)

    async def serve_loop(nursery: trio.Nursery) -> None:
        nonlocal inflight
        while True:
            try:
                frame = await reader.next_frame(idle=True)
            except _IdleTimeout:
                if inflight:  # silent while we work on its request is not idle
                    continue
                raise
            if frame is None:
                return
            try:
                req = env.decode_envelope(frame)
            except env.MalformedMessage as exc:
                logger.info("%s: malformed message: %s", where, exc)
                await send_error("invalid", exc.request_id, exc.code, str(exc))
                continue
            if req.kind not in ("request", "notify"):
                await send_error(
                    req.type,
                    req.id,
                    env.ERR_MALFORMED,
                    f"a {req.kind} cannot be sent to a responder",
                )
                continue
            if inflight >= lim.max_inflight:
                if req.kind == "request":
                    await send_error(
                        req.type,
                        req.id,
                        env.ERR_OVERLOADED,
                        f"more than {lim.max_inflight} requests in flight",
                    )
                continue
            inflight += 1
            nursery.start_soon(guarded, req)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader.run)
            try:
                await serve_loop(nursery)
            except FrameTooLarge as exc:
                logger.info("%s: %s; closing the stream", where, exc)
                with trio.move_on_after(lim.write_timeout):
                    with contextlib.suppress(TransportError):
                        await send_error("invalid", 0, env.ERR_TOO_LARGE, str(exc))
            except FrameError as exc:
                logger.info("%s: bad framing (%s); closing the stream", where, exc)
            except _IdleTimeout:
                logger.debug("%s: idle for %.0fs; closing the stream", where, lim.idle_timeout)
            except ProtocolViolation as exc:
                logger.info("%s: %s; closing the stream", where, exc)
            except TransportError as exc:
                logger.debug("%s: stream ended: %s", where, exc)
            finally:
                nursery.cancel_scope.cancel()  # replies cannot be delivered any more
    finally:
        await _close_quietly(stream)


# --------------------------------------------------------------------------- requester


class _Pending:
    __slots__ = ("done", "outcome")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.outcome: env.Envelope | BaseException | None = None


class RpcChannel:
    """The requester's side of one stream: `call` and `notify`, pipelined by request id.

    `run_reader` must run in a nursery for the channel's lifetime; when the stream
    ends, every pending call fails at once with ConnectionLost.
    """

    def __init__(
        self, stream: ByteStream, *, peer_id: str, protocol: str, limits: RpcLimits | None = None
    ) -> None:
        self.peer_id = peer_id
        self.protocol = protocol
        self._stream = stream
        self._limits = limits or RpcLimits()
        self._reader = FramePump(stream, self._limits)
        self._writer = FrameWriter(stream, self._limits)
        self._pending: dict[int, _Pending] = {}
        self._next_id = 1
        self._closed_reason: str | None = None
        self._idle_since = trio.current_time()

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _fail_all(self, reason: str) -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
        for slot in self._pending.values():
            if slot.outcome is None:
                slot.outcome = ConnectionLost(
                    f"{self.protocol} stream to {self.peer_id} ended with a request pending: "
                    f"{reason}"
                )
            slot.done.set()
        self._pending.clear()

    async def run_reader(self) -> None:
        """Dispatch replies to waiting callers; closes an idle channel; never raises."""
        reason = "closed by peer"
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reader.run)
                try:
                    reason = await self._read_replies()
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self._fail_all(reason)
            await _close_quietly(self._stream, reset=reason != "idle")

    async def _read_replies(self) -> str:
        """Why the channel ended."""
        try:
            while True:
                try:
                    frame = await self._reader.next_frame(idle=True)
                except _IdleTimeout:
                    idle_for = trio.current_time() - self._idle_since
                    if not self._pending and idle_for >= self._limits.idle_timeout:
                        return "idle"
                    continue
                if frame is None:
                    return "closed by peer"
                self._dispatch(frame)
        except (FrameError, ProtocolViolation, TransportError) as exc:
            return str(exc)
        except env.MalformedMessage as exc:
            return f"undecodable reply: {exc}"

    def _dispatch(self, frame: bytes) -> None:
        reply = env.decode_envelope(frame)  # MalformedMessage ends the channel
        if reply.kind not in ("reply", "error"):
            raise ProtocolViolation(f"responder sent a {reply.kind}")
        slot = self._pending.pop(reply.id, None)
        if slot is None:
            if reply.kind == "error" and reply.id == 0:
                raise ProtocolViolation(f"peer reported a stream error: {reply.payload!r}")
            return  # a late reply after its caller timed out
        slot.outcome = reply
        slot.done.set()
        if not self._pending:
            self._idle_since = trio.current_time()

    async def call(self, type_: str, payload: Any, timeout: float) -> Any:
        """Send a request and wait for its reply payload (RemoteError for error replies)."""
        if self._closed_reason is not None:
            raise ConnectionLost(f"{self.protocol} stream to {self.peer_id} is closed")
        request_id = self._next_id
        self._next_id += 1
        slot = _Pending()
        self._pending[request_id] = slot
        try:
            with trio.move_on_after(timeout) as scope:
                await self._writer.send(env.request(type_, payload, request_id))
                await slot.done.wait()
            if scope.cancelled_caught:
                raise RequestTimeout(
                    f"no reply to {type_} from {self.peer_id} on {self.protocol} "
                    f"within {timeout:.2f}s"
                )
        except (FrameTooLarge, env.MalformedMessage):
            raise
        except ConnectionLost as exc:
            self._fail_all(str(exc))
            raise
        finally:
            self._pending.pop(request_id, None)
            if not self._pending:
                self._idle_since = trio.current_time()
        outcome = slot.outcome
        if isinstance(outcome, BaseException):
            raise outcome
        assert outcome is not None
        if outcome.kind == "error":
            body = outcome.payload if isinstance(outcome.payload, dict) else {}
            raise RemoteError(
                str(body.get("code", env.ERR_INTERNAL)),
                str(body.get("message", "")),
                self.peer_id,
                self.protocol,
            )
        return outcome.payload

    async def notify(self, type_: str, payload: Any, timeout: float) -> None:
        """Send a one-way message (no reply, no delivery guarantee beyond the stream)."""
        if self._closed_reason is not None:
            raise ConnectionLost(f"{self.protocol} stream to {self.peer_id} is closed")
        with trio.move_on_after(timeout) as scope:
            await self._writer.send(env.notify(type_, payload))
        if scope.cancelled_caught:
            raise RequestTimeout(f"could not send {type_} to {self.peer_id} within {timeout:.2f}s")

    async def aclose(self) -> None:
        self._fail_all("closed locally")
        await _close_quietly(self._stream)
