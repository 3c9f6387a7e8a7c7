"""An in-process `TransportPort` over the seeded `FakeNetwork`, driven by trio.

The runtime's own code (effect mapping, handlers, timers) runs unchanged on top of it,
so tests exercise the real `Node` logic with `trio.testing.MockClock` and the network
faults FakeNetwork models (delay, loss, duplication, reordering, partitions, kill,
pause). Time is trio's clock: `FakeNetwork` gets `trio.current_time()`.

What it does not model: dialing (every hub member is reachable unless the network says
otherwise), connection events on kill (a killed node's peers only notice through
timeouts, as with SIGSTOP on real hosts), and blobs beyond a local file copy.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import AsyncIterator, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from kowalski_node.adapters.libp2p.api import (
    BlobCallback,
    BlobReceipt,
    ConnectionCallback,
    ConnectionEvent,
    Request,
    RequestHandler,
)
from kowalski_node.adapters.libp2p.errors import (
    ConnectionLost,
    ProtocolNotSupported,
    RemoteError,
    RequestRejected,
    RequestTimeout,
    TransportError,
)
from kowalski_node.testing.network import FakeNetwork

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Req:
    rid: int
    protocol: str
    type: str
    payload: Any
    one_way: bool


@dataclass(frozen=True)
class _Rep:
    rid: int
    ok: bool
    payload: Any
    code: str = ""


@dataclass
class _Waiter:
    event: trio.Event = field(default_factory=trio.Event)
    reply: _Rep | None = None


class FakeHub:
    """All in-process transports of one test; `run()` delivers messages at their time."""

    def __init__(self, network: FakeNetwork) -> None:
        self.network = network
        self.transports: dict[str, FakeTransport] = {}
        self._wake = trio.Event()

    def transport(self, peer_id: str, addr: str | None = None) -> FakeTransport:
        t = FakeTransport(self, peer_id, addr or f"/memory/{peer_id}/p2p/{peer_id}")
        self.transports[peer_id] = t
        self.network.add_node(peer_id)
        return t

    def send(self, src: str, dst: str, message: Any) -> None:
        self.network.send(trio.current_time(), src, dst, message)
        self._wake.set()

    async def run(self) -> None:
        """Deliver due messages forever (run in a nursery; cancel to stop)."""
        while True:
            now = trio.current_time()
            for d in self.network.pop_due(now):
                target = self.transports.get(d.dst)
                if target is not None and target.up:
                    target._deliver(d.src, d.message)
            nxt = self.network.next_time()
            self._wake = trio.Event()
            with trio.move_on_after(max(0.0, nxt - now) if math.isfinite(nxt) else 3600.0):
                await self._wake.wait()


class FakeTransport:
    """One node's endpoint on a `FakeHub`; implements `TransportPort`."""

    def __init__(self, hub: FakeHub, peer_id: str, addr: str) -> None:
        self.hub = hub
        self.peer_id = peer_id
        self._addr = addr
        self._handlers: dict[str, tuple[RequestHandler, frozenset[str] | None]] = {}
        self._waiters: dict[int, _Waiter] = {}
        self._rid = itertools.count(1)
        self._conn_callbacks: list[ConnectionCallback] = []
        self._blob_callbacks: list[BlobCallback] = []
        self._known: set[str] = set()
        self._nursery: trio.Nursery | None = None
        self.up = False
        self.request_timeout_s = 5.0

    # -------------------------------------------------------------- lifecycle

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[FakeTransport]:
        """Serve while inside (same shape as `Libp2pTransport.running()`)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.up = True
            try:
                yield self
            finally:
                self.up = False
                for w in self._waiters.values():
                    w.event.set()
                nursery.cancel_scope.cancel()

    # -------------------------------------------------------------- addresses, peers

    @property
    def listen_addrs(self) -> list[str]:
        return [self._addr]

    def connected_peers(self) -> list[str]:
        return sorted(p for p in self._known if self._reachable(p))

    def is_connected(self, peer_id: str) -> bool:
        return peer_id in self._known and self._reachable(peer_id)

    def _reachable(self, peer_id: str) -> bool:
        net = self.hub.network
        other = self.hub.transports.get(peer_id)
        return (
            other is not None
            and other.up
            and net.is_up(peer_id)
            and net.can_talk(self.peer_id, peer_id)
        )

    def add_peer_addrs(self, peer_id: str, addrs: Iterable[str], ttl_s: int = 600) -> None:
        if peer_id != self.peer_id:
            self._learn(peer_id)

    def _learn(self, peer_id: str) -> None:
        if peer_id not in self._known and peer_id != self.peer_id:
            self._known.add(peer_id)
            event = ConnectionEvent(peer_id, True, trio.current_time())
            for cb in list(self._conn_callbacks):
                cb(event)

    async def connect(self, addr: str, timeout: float | None = None) -> str:
        peer = addr.rsplit("/p2p/", 1)[-1]
        if peer == self.peer_id:
            raise TransportError(f"{addr} is this node's own address")
        if not self._reachable(peer):
            with trio.move_on_after(timeout if timeout is not None else 3.0):
                await trio.sleep_forever()
            raise TransportError(f"{addr}: no answer (fake network: down or partitioned)")
        self._learn(peer)
        other = self.hub.transports[peer]
        other._learn(self.peer_id)
        return peer

    async def disconnect(self, peer_id: str) -> None:
        self._known.discard(peer_id)

    # -------------------------------------------------------------- requests

    def register_handler(
        self, protocol: str, handler: RequestHandler, *, types: Collection[str] | None = None
    ) -> None:
        self._handlers[protocol] = (handler, None if types is None else frozenset(types))

    async def request(
        self, peer_id: str, protocol: str, type_: str, payload: Any, *, timeout: float | None = None
    ) -> Any:
        if not self.up:
            raise TransportError("transport is not running")
        limit = self.request_timeout_s if timeout is None else timeout
        rid = next(self._rid)
        waiter = self._waiters[rid] = _Waiter()
        self._learn(peer_id)
        self.hub.send(self.peer_id, peer_id, _Req(rid, protocol, type_, payload, False))
        try:
            with trio.move_on_after(limit):
                await waiter.event.wait()
        finally:
            self._waiters.pop(rid, None)
        rep = waiter.reply
        if rep is None:
            if not self.up:
                raise ConnectionLost("transport closed")
            raise RequestTimeout(f"{type_} to {peer_id} timed out after {limit:.2f}s")
        if not rep.ok:
            if rep.code == "protocol_not_supported":
                raise ProtocolNotSupported(protocol, peer_id)
            raise RemoteError(rep.code, str(rep.payload), peer_id, protocol)
        return rep.payload

    async def notify(
        self, peer_id: str, protocol: str, type_: str, payload: Any, *, timeout: float | None = None
    ) -> None:
        if not self.up:
            raise TransportError("transport is not running")
        self._learn(peer_id)
        self.hub.send(self.peer_id, peer_id, _Req(0, protocol, type_, payload, True))

    def _deliver(self, src: str, message: Any) -> None:
        self._learn(src)
        if isinstance(message, _Rep):
            waiter = self._waiters.get(message.rid)
            if waiter is not None and waiter.reply is None:
                waiter.reply = message
                waiter.event.set()
        elif isinstance(message, _Req):
            assert self._nursery is not None
            self._nursery.start_soon(self._serve, src, message)

    async def _serve(self, src: str, req: _Req) -> None:
        entry = self._handlers.get(req.protocol)
        if entry is None:
            if not req.one_way:
                self.hub.send(
                    self.peer_id, src, _Rep(req.rid, False, req.protocol, "protocol_not_supported")
                )
            return
        handler, types = entry
        if types is not None and req.type not in types:
            if not req.one_way:
                self.hub.send(
                    self.peer_id,
                    src,
                    _Rep(req.rid, False, f"unknown type {req.type!r}", "unknown_type"),
                )
            return
        request = Request(src, req.protocol, req.type, req.payload, req.rid, req.one_way)
        try:
            result = await handler(request)
        except RequestRejected as exc:
            if not req.one_way:
                self.hub.send(self.peer_id, src, _Rep(req.rid, False, exc.message, exc.code))
            return
        except Exception as exc:
            log.exception("fake transport: handler for %s failed", req.protocol)
            if not req.one_way:
                self.hub.send(self.peer_id, src, _Rep(req.rid, False, str(exc), "internal"))
            return
        if not req.one_way:
            self.hub.send(self.peer_id, src, _Rep(req.rid, True, result))

    # -------------------------------------------------------------- blobs

    async def send_blob(
        self,
        peer_id: str,
        path: Path,
        *,
        meta: Any = None,
        blob_id: str | None = None,
        timeout: float | None = None,
    ) -> BlobReceipt:
        raise TransportError("the fake transport does not carry blobs")

    def on_blob(self, callback: BlobCallback) -> None:
        self._blob_callbacks.append(callback)

    def blob_path(self, blob_id: str) -> Path | None:
        return None

    # -------------------------------------------------------------- events

    def on_connection_event(self, callback: ConnectionCallback) -> None:
        self._conn_callbacks.append(callback)

    async def set_allow_list(self, peers: Iterable[str] | None) -> None:
        return None
