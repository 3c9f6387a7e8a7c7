"""Capability adverts: the local `DeviceProfile`, refreshed periodically, spread over GossipSub.

* Our advert is published on the `kowalski/capabilities/1` GossipSub topic (strict
  signing: the transport hands us the signer, and an advert whose `peer` is not its
  signer is dropped) every `refresh_s`, and whenever it changes materially.
* A GossipSub mesh needs a heartbeat or two to form, so a new member also gets our
  advert pushed directly over the membership protocol (type `advert`) the moment
  membership reports it up: the scheduler knows a new peer's capabilities within a
  round trip, not after a heartbeat.
* Received adverts go through the pure `CapabilityTable` merge (higher version wins; a
  join), so duplicates and reordering do not matter. Versions are wall-clock
  milliseconds, bumped to stay strictly increasing, so they grow across restarts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import trio

from kowalski_node.adapters.libp2p import protocol_ids
from kowalski_node.adapters.libp2p.api import GossipMessage, Request, TransportPort
from kowalski_node.adapters.libp2p.errors import RequestRejected
from kowalski_node.capabilities import CapabilityTable, DeviceProfile
from kowalski_node.wire import WireError

log = logging.getLogger("kowalski_node.runtime.capabilities")

ADVERT_TYPE = "advert"
ProfileSource = Callable[[int], DeviceProfile]


class CapabilityDriver:
    """Keeps our advert fresh and the table of everyone's adverts merged."""

    def __init__(
        self,
        me: str,
        transport: TransportPort,
        source: ProfileSource,
        *,
        refresh_s: float = 5.0,
        use_gossipsub: bool = True,
    ) -> None:
        self.me = me
        self.transport = transport
        self.source = source
        self.refresh_s = refresh_s
        self.use_gossipsub = use_gossipsub
        self.table = CapabilityTable()
        self._version = 0
        self.own: DeviceProfile | None = None
        self.rejected = 0
        self._changed = trio.Event()
        self._listeners: list[Callable[[DeviceProfile], None]] = []

    def on_change(self, listener: Callable[[DeviceProfile], None]) -> None:
        self._listeners.append(listener)

    def profile_of(self, peer: str) -> DeviceProfile | None:
        """A peer's latest advert (ours included), if one has been heard."""
        return self.table.get(peer)

    def next_version(self) -> int:
        self._version = max(self._version + 1, int(time.time() * 1000))
        return self._version

    def refresh(self) -> DeviceProfile:
        """Build a new advert now (psutil reads are quick) and merge it locally."""
        profile = self.source(self.next_version())
        self.own = profile
        self._merge(profile)
        return profile

    def _merge(self, profile: DeviceProfile) -> None:
        if self.table.merge(profile):
            for listener in list(self._listeners):
                try:
                    listener(profile)
                except Exception:
                    log.exception("capability listener failed")

    def poke(self) -> None:
        """Something changed (e.g. the measured tokens/s): publish a fresh advert now."""
        self._changed.set()

    async def start(self) -> None:
        """Subscribe to the topic (needs the transport running) and build the first advert."""
        self.refresh()
        if self.use_gossipsub:
            await self.transport.subscribe(protocol_ids.TOPIC_CAPABILITIES, self._on_gossip)

    async def run(self) -> None:
        """Publish periodically (and on `poke`) until cancelled."""
        while True:
            profile = self.refresh()
            if self.use_gossipsub:
                try:
                    await self.transport.publish(protocol_ids.TOPIC_CAPABILITIES, profile.to_wire())
                except Exception as exc:  # noqa: BLE001 - publishing is best effort; the next refresh retries
                    log.debug("advert publish failed: %s", exc)
            self._changed = trio.Event()
            with trio.move_on_after(self.refresh_s):
                await self._changed.wait()

    async def push_to(self, peer: str) -> None:
        """Send our advert straight to one peer (a new member), best effort."""
        if self.own is None:
            return
        try:
            await self.transport.notify(
                peer, protocol_ids.MEMBERSHIP, ADVERT_TYPE, self.own.to_wire(), timeout=2.0
            )
        except Exception as exc:  # noqa: BLE001 - a push is best effort; gossip delivers the advert too
            log.debug("advert push to %s failed: %s", peer, exc)

    def accept(self, sender: str, payload: Any) -> DeviceProfile | None:
        """Validate and merge an advert from `sender` (None if refused)."""
        try:
            profile = DeviceProfile.from_wire(payload)
        except (WireError, ValueError) as exc:
            self.rejected += 1
            log.info("event=advert_rejected sender=%s reason=%r", sender, str(exc)[:200])
            return None
        if profile.peer != sender:
            self.rejected += 1
            log.info("event=advert_rejected sender=%s reason=signer_mismatch", sender)
            return None
        self._merge(profile)
        return profile

    async def _on_gossip(self, msg: GossipMessage) -> None:
        if msg.sender != self.me:
            self.accept(msg.sender, msg.payload)

    async def handle_direct(self, req: Request) -> None:
        """Handler for a pushed advert (registered by the node on the membership protocol)."""
        if self.accept(req.peer_id, req.payload) is None:
            raise RequestRejected("bad_advert", "advert does not decode or is not the sender's")

    def forget(self, peer: str) -> None:
        self.table.forget(peer)
