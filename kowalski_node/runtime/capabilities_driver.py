"""Capability adverts: drives the pure `CapabilityGossip` core over the membership protocol.

The node and the simulator spread adverts through the same core (see docs/simulation.md);
this module is the node's half of it:

* Our advert is rebuilt from the local `DeviceProfile` source every `refresh_s` and on
  `poke` (versions are wall-clock milliseconds, bumped to stay strictly increasing, so
  they grow across restarts), signed with the node's identity key when it has one
  (`capabilities/seal.py`), and handed to the core with `publish`.
* The core's effects go through `glue.perform_gossip_effects`: a `GossipSend` becomes a
  one-way message of type `caps_push` / `caps_digest` on `/kowalski/membership/1.0.0`,
  queued per peer (`PeerSender`: a slow peer never delays the others, a full queue
  drops, the core's repeats and syncs repair); an `AdvertChanged` goes to the listeners
  (the coordinator's placement view).
* Membership events reach the core through `glue.membership_to_gossip` (a new member
  gets our advert pushed at once) and `set_peers` (the live set it pushes and syncs to).
* Received adverts are checked here, before the core sees them: a sealed advert must be
  signed by the key in its own peer ID, whoever relays it; an unsigned one (a node
  without an identity key, as in the in-process tests) is accepted only from its own
  peer, whom the transport authenticated. A copy no newer than what the table holds is
  not verified again (the core would drop it anyway).

`now` is `trio.current_time()`, so `trio.testing.MockClock` drives everything in tests.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

import trio

from kowalski_node.adapters.libp2p import protocol_ids
from kowalski_node.adapters.libp2p.api import Request, TransportPort
from kowalski_node.adapters.libp2p.errors import RequestRejected
from kowalski_node.capabilities import (
    AdvertChanged,
    AdvertDigest,
    AdvertPush,
    CapabilityGossip,
    CapabilityTable,
    DeviceProfile,
    GossipConfig,
    GossipEffect,
    GossipSend,
)
from kowalski_node.capabilities.gossip import MAX_ADVERTS_PER_MESSAGE
from kowalski_node.capabilities.seal import Signer, peek_seal, seal_advert, verify_seal
from kowalski_node.glue import membership_to_gossip, perform_gossip_effects
from kowalski_node.membership import MemberDown, MembershipEvent
from kowalski_node.runtime.core_timer import CoreTimer
from kowalski_node.runtime.sender import PeerSender
from kowalski_node.wire import WireError, check_type_tag, expect_dict, get_list

log = logging.getLogger("kowalski_node.runtime.capabilities")

GOSSIP_TYPES = (AdvertPush.TAG, AdvertDigest.TAG)
ProfileSource = Callable[[int], DeviceProfile]
SEND_QUEUE = 64
SEND_TIMEOUT_S = 2.0


def encode_push(msg: AdvertPush, me: str) -> dict[str, Any] | None:
    """A push on the wire: each advert as its seal (bytes) if signed, else its plain dict.

    An unsigned advert of another peer is left out (receivers refuse it; see the module
    docstring); None if nothing is left to send."""
    items: list[Any] = []
    for p in msg.adverts:
        if p.seal:
            items.append(p.seal)
        elif p.peer == me:
            items.append(p.to_wire())
    return {"t": msg.TAG, "a": items} if items else None


class CapabilityDriver:
    """Keeps our advert fresh and everyone's adverts merged, through `CapabilityGossip`."""

    def __init__(
        self,
        me: str,
        transport: TransportPort,
        source: ProfileSource,
        *,
        live_peers: Callable[[], list[str]],
        rng: random.Random,
        refresh_s: float = 5.0,
        config: GossipConfig | None = None,
        sign: Signer | None = None,
    ) -> None:
        self.me = me
        self.transport = transport
        self.source = source
        self.refresh_s = refresh_s
        self.config = config or GossipConfig.lan()
        self.sign = sign
        self.table = CapabilityTable()
        self.sender = PeerSender(
            transport, protocol_ids.MEMBERSHIP, queue_size=SEND_QUEUE, timeout_s=SEND_TIMEOUT_S
        )
        self._live_peers = live_peers
        self._rng = rng
        self._core: CapabilityGossip | None = None
        self._version = 0
        self.own: DeviceProfile | None = None
        self.rejected = 0
        self._changed = trio.Event()
        self.timer = CoreTimer(
            lambda: self.core.next_deadline(), lambda now: self._apply(self.core.tick(now))
        )
        self._listeners: list[Callable[[DeviceProfile], None]] = []

    # -------------------------------------------------------------- reading

    def on_change(self, listener: Callable[[DeviceProfile], None]) -> None:
        """Call `listener` with every advert that enters the table (ours and peers')."""
        self._listeners.append(listener)

    def profile_of(self, peer: str) -> DeviceProfile | None:
        """A peer's latest advert (ours included), if one has been heard."""
        return self.table.get(peer)

    @property
    def core(self) -> CapabilityGossip:
        if self._core is None:
            raise RuntimeError("capability driver: start() has not run")
        return self._core

    # -------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Create the core on trio's clock and publish the first advert (no peers yet)."""
        self._core = CapabilityGossip(
            self.me,
            rng=random.Random(self._rng.getrandbits(64)),
            now=trio.current_time(),
            config=self.config,
            table=self.table,
        )
        self.refresh()

    async def run(self) -> None:
        """Senders, the core's timers and the periodic refresh, until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.sender.run)
            nursery.start_soon(self.timer.run)
            await self._refresh_loop()

    def next_version(self) -> int:
        self._version = max(self._version + 1, int(time.time() * 1000))
        return self._version

    def refresh(self) -> DeviceProfile:
        """Build a new advert now (psutil reads are quick), sign it, and publish it."""
        profile = self.source(self.next_version())
        if self.sign is not None:
            profile = seal_advert(profile, self.sign)
        self.own = profile
        self._apply(self.core.publish(trio.current_time(), profile))
        return profile

    def poke(self) -> None:
        """Something changed (e.g. the measured tokens/s): publish a fresh advert now."""
        self._changed.set()

    async def _refresh_loop(self) -> None:
        while True:
            self._changed = trio.Event()
            with trio.move_on_after(self.refresh_s):
                await self._changed.wait()
            self.refresh()

    # -------------------------------------------------------------- inputs

    def member_event(self, event: MembershipEvent) -> None:
        """Membership changed: the core gossips with the new live set (and greets a joiner)."""
        if self._core is None:
            return
        self._core.set_peers(p for p in self._live_peers() if p != self.me)
        if isinstance(event, MemberDown):
            self.sender.forget(event.peer)  # its queue and task go; a later send starts anew
        self._apply(membership_to_gossip(self._core, trio.current_time(), event))

    async def handle_message(self, req: Request) -> None:
        """Handler for `caps_push` / `caps_digest` (registered on the membership protocol)."""
        if self._core is None:
            return
        try:
            if req.type == AdvertDigest.TAG:
                msg: AdvertPush | AdvertDigest = AdvertDigest.from_wire(req.payload)
            else:
                msg = AdvertPush(self._accept_adverts(req.peer_id, req.payload))
        except WireError as exc:
            self.rejected += 1
            log.info("event=advert_rejected sender=%s reason=%r", req.peer_id, str(exc)[:200])
            raise RequestRejected("bad_advert", str(exc)[:200]) from None
        self._apply(self._core.handle(trio.current_time(), req.peer_id, msg))

    def _accept_adverts(self, sender: str, payload: Any) -> list[DeviceProfile]:
        """The adverts of a push that may reach the core (see the module docstring)."""
        d = expect_dict(payload, "AdvertPush")
        check_type_tag(d, AdvertPush.TAG, "AdvertPush")
        accepted: list[DeviceProfile] = []
        for item in get_list(d, "a", "AdvertPush", max_len=MAX_ADVERTS_PER_MESSAGE):
            try:
                if isinstance(item, bytes):
                    profile = peek_seal(item)
                    held = self.table.get(profile.peer)
                    if held is not None and held.version >= profile.version:
                        continue  # stale or a duplicate: the core would not merge it
                    verify_seal(profile)
                else:
                    profile = DeviceProfile.from_wire(item)
                    if profile.peer != sender:
                        raise WireError("unsigned advert relayed by another peer")
            except WireError as exc:
                self.rejected += 1
                log.info("event=advert_rejected sender=%s reason=%r", sender, str(exc)[:200])
                continue
            accepted.append(profile)
        return accepted

    # -------------------------------------------------------------- effects

    def _apply(self, effects: list[GossipEffect]) -> None:
        perform_gossip_effects(self, effects)
        self.timer.wake()

    # the `glue.GossipSink` methods

    def gossip_send(self, eff: GossipSend) -> None:
        msg = eff.message
        payload = encode_push(msg, self.me) if isinstance(msg, AdvertPush) else msg.to_wire()
        if payload is not None:
            self.sender.send(eff.to, msg.TAG, payload)

    def advert_changed(self, eff: AdvertChanged) -> None:
        for listener in list(self._listeners):
            try:
                listener(eff.profile)
            except Exception:
                log.exception("capability listener failed")
