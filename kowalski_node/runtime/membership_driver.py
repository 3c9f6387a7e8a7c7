"""Drives the pure SWIM core over the transport: timers from trio, probes over direct streams.

Effect mapping:

* `Send(to, msg, addr)` → a one-way message on `/kowalski/membership/1.0.0` (type = the
  message tag, payload = `to_wire()`), queued per peer so a slow or paused peer never
  delays probes to others; a full queue drops (SWIM tolerates loss). `addr` is handed to
  the transport as a dial hint first.
* `MemberUp(peer, addr)` → the address goes into the transport's peer store (this is the
  peer exchange: members learned through membership gossip become dialable), then the
  listeners hear about it; `MemberSuspect/Alive/Down/LeaveComplete` → listeners.
* A transport disconnect → `expedite_probe` (a hint; only a failed probe suspects).

`now` is `trio.current_time()`, so `trio.testing.MockClock` drives everything in tests.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, assert_never

import trio

from kowalski_node.adapters.libp2p import protocol_ids
from kowalski_node.adapters.libp2p.api import ConnectionEvent, Request, TransportPort
from kowalski_node.adapters.libp2p.errors import RequestRejected
from kowalski_node.glue import perform_membership_effects
from kowalski_node.membership import (
    LeaveComplete,
    MemberAlive,
    MemberDown,
    Membership,
    MembershipEffect,
    MembershipEvent,
    MemberSuspect,
    MemberUp,
    Send,
    decode_message,
)
from kowalski_node.membership.messages import Ack, Gossip, Nack, Ping, PingReq, Sync
from kowalski_node.runtime.core_timer import CoreTimer
from kowalski_node.wire import WireError

log = logging.getLogger("kowalski_node.runtime.membership")

MEMBERSHIP_TYPES = frozenset({Ping.TAG, PingReq.TAG, Ack.TAG, Nack.TAG, Gossip.TAG, Sync.TAG})
SEND_QUEUE = 128
SEND_TIMEOUT_S = 1.0

EventListener = Callable[[MembershipEvent], None]
ExtraHandler = Callable[[Request], Awaitable[Any]]


class MembershipDriver:
    """Owns one `Membership` core; call `run()` in a nursery, `join()` with seeds."""

    def __init__(self, core: Membership, transport: TransportPort) -> None:
        self.core = core
        self.transport = transport
        self._listeners: list[EventListener] = []
        self.timer = CoreTimer(
            core.next_deadline, lambda now: self.apply(core.tick(now)), stopped=lambda: core.stopped
        )
        self._queues: dict[str, trio.MemorySendChannel[tuple[str, dict[str, Any], str]]] = {}
        self._nursery: trio.Nursery | None = None
        self.dropped_sends = 0
        self.bad_messages = 0
        self.latency_ms: dict[str, float] = {}
        self._ping_sent: dict[tuple[str, int], float] = {}
        self.left = trio.Event()
        self._extra: dict[str, ExtraHandler] = {}

    def on_event(self, listener: EventListener) -> None:
        self._listeners.append(listener)

    # -------------------------------------------------------------- wiring

    def add_type(self, type_: str, handler: ExtraHandler) -> None:
        """Serve one more message type on the membership protocol (call before `install`)."""
        if type_ in MEMBERSHIP_TYPES:
            raise ValueError(f"membership message type {type_!r} is taken")
        self._extra[type_] = handler

    def install(self) -> None:
        """Register the protocol handler and the connection hint (before `run`)."""
        self.transport.register_handler(
            protocol_ids.MEMBERSHIP,
            self._on_request,
            types=MEMBERSHIP_TYPES | frozenset(self._extra),
        )
        self.transport.on_connection_event(self._on_connection)

    async def run(self) -> None:
        """Timer loop and per-peer senders; runs until cancelled (or the leave completed)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                await self.timer.run()
            finally:
                self._nursery = None
                for q in self._queues.values():
                    q.close()
                self._queues.clear()
                nursery.cancel_scope.cancel()

    def wake(self) -> None:
        self.timer.wake()

    # -------------------------------------------------------------- inputs

    def join(self, seeds: list[tuple[str, str]]) -> None:
        """Contact seeds `(peer_id, addr)` (push-pull sync; the core retries until answered)."""
        for peer, addr in seeds:
            if addr:
                self.transport.add_peer_addrs(peer, [addr])
        self.apply(self.core.join(trio.current_time(), seeds))

    def leave(self) -> None:
        """Announce a graceful leave; `left` is set when it had time to spread."""
        self.apply(self.core.leave(trio.current_time()))

    async def _on_request(self, req: Request) -> Any:
        extra = self._extra.get(req.type)
        if extra is not None:
            return await extra(req)
        try:
            msg = decode_message(req.payload)
        except WireError as exc:
            self.bad_messages += 1
            raise RequestRejected("bad_message", str(exc)) from None
        if isinstance(msg, Ack):
            sent = self._ping_sent.pop((req.peer_id, msg.seq), None)
            if sent is not None:
                rtt = (trio.current_time() - sent) * 1000.0
                prev = self.latency_ms.get(req.peer_id)
                self.latency_ms[req.peer_id] = rtt if prev is None else 0.7 * prev + 0.3 * rtt
        self.apply(self.core.handle(trio.current_time(), req.peer_id, msg))

    def _on_connection(self, event: ConnectionEvent) -> None:
        if not event.connected and self.core.status(event.peer_id) is not None:
            self.apply(self.core.expedite_probe(trio.current_time(), event.peer_id))

    # -------------------------------------------------------------- effects

    def apply(self, effects: list[MembershipEffect]) -> None:
        perform_membership_effects(self, effects)
        self.timer.wake()

    # the `glue.MembershipSink` methods

    def send(self, eff: Send) -> None:
        msg = eff.message
        if isinstance(msg, Ping) and msg.target == eff.to:
            if len(self._ping_sent) > 4096:
                self._ping_sent.clear()
            self._ping_sent[(eff.to, msg.seq)] = trio.current_time()
        q = self._queues.get(eff.to)
        if q is None:
            if self._nursery is None:
                return
            send, receive = trio.open_memory_channel[tuple[str, dict[str, Any], str]](SEND_QUEUE)
            self._queues[eff.to] = q = send
            self._nursery.start_soon(self._sender, eff.to, receive)
        try:
            q.send_nowait((msg.TAG, msg.to_wire(), eff.addr))
        except trio.WouldBlock:
            self.dropped_sends += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self._queues.pop(eff.to, None)

    async def _sender(
        self, peer: str, receive: trio.MemoryReceiveChannel[tuple[str, dict[str, Any], str]]
    ) -> None:
        async with receive:
            async for tag, payload, addr in receive:
                if addr and not self.transport.is_connected(peer):
                    self.transport.add_peer_addrs(peer, [addr])
                try:
                    await self.transport.notify(
                        peer, protocol_ids.MEMBERSHIP, tag, payload, timeout=SEND_TIMEOUT_S
                    )
                except Exception as exc:  # noqa: BLE001 - lossy by design: SWIM recovers from drops
                    self.dropped_sends += 1
                    log.debug("membership send %s to %s failed: %s", tag, peer, exc)

    def member_event(self, eff: MembershipEvent) -> None:
        match eff:
            case MemberUp():
                if eff.addr:
                    self.transport.add_peer_addrs(eff.peer, [eff.addr])
                log.info(
                    "event=member_up peer=%s addr=%s inc=%d", eff.peer, eff.addr, eff.incarnation
                )
            case MemberSuspect():
                log.info("event=member_suspect peer=%s inc=%d", eff.peer, eff.incarnation)
            case MemberAlive():
                log.info("event=member_alive peer=%s inc=%d", eff.peer, eff.incarnation)
            case MemberDown():
                log.info(
                    "event=member_down peer=%s inc=%d left=%s", eff.peer, eff.incarnation, eff.left
                )
                self.latency_ms.pop(eff.peer, None)
            case LeaveComplete():
                self.left.set()
            case _:
                assert_never(eff)
        for listener in list(self._listeners):
            try:
                listener(eff)
            except Exception:
                log.exception("membership listener failed")
