"""Ordered, bounded, best-effort one-way sends to peers (one queue and task per peer).

Cores hand out many small messages and tolerate loss (they retry what matters), so a
slow, paused or unreachable peer must never block the caller or delay messages to other
peers: each peer gets its own FIFO queue drained by its own task; a full queue drops
(counted). Order per peer is kept, which the coordination protocol relies on (an
`Abandon` must not overtake the checkpoint before it).
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from kowalski_node.adapters.libp2p.api import TransportPort

log = logging.getLogger("kowalski_node.runtime.sender")

Item = tuple[str, Any]


class PeerSender:
    """`send(peer, type, payload)` never blocks; call `run()` in a nursery first."""

    def __init__(
        self,
        transport: TransportPort,
        protocol: str,
        *,
        queue_size: int = 1024,
        timeout_s: float = 2.0,
    ) -> None:
        self.transport = transport
        self.protocol = protocol
        self.queue_size = queue_size
        self.timeout_s = timeout_s
        self._queues: dict[str, trio.MemorySendChannel[Item]] = {}
        self._nursery: trio.Nursery | None = None
        self.dropped = 0
        self.failed = 0
        self.sent = 0

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None
                for q in self._queues.values():
                    q.close()
                self._queues.clear()

    def send(self, peer: str, type_: str, payload: Any) -> bool:
        """Queue one message; False if it was dropped (queue full, or not running)."""
        q = self._queues.get(peer)
        if q is None:
            if self._nursery is None:
                self.dropped += 1
                return False
            send, receive = trio.open_memory_channel[Item](self.queue_size)
            self._queues[peer] = q = send
            self._nursery.start_soon(self._drain, peer, receive)
        try:
            q.send_nowait((type_, payload))
            return True
        except trio.WouldBlock:
            self.dropped += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self._queues.pop(peer, None)
            self.dropped += 1
        return False

    async def _drain(self, peer: str, receive: trio.MemoryReceiveChannel[Item]) -> None:
        async with receive:
            async for type_, payload in receive:
                try:
                    await self.transport.notify(
                        peer, self.protocol, type_, payload, timeout=self.timeout_s
                    )
                    self.sent += 1
                except Exception as exc:  # noqa: BLE001 - best effort: the cores retry what matters
                    self.failed += 1
                    log.debug("send %s to %s failed: %s", type_, peer, exc)

    def forget(self, peer: str) -> None:
        """Drop a peer's queue (it is gone); a later send starts a fresh one."""
        q = self._queues.pop(peer, None)
        if q is not None:
            q.close()
