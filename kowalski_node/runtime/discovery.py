"""Finding peers: bootstrap addresses, zeroconf mDNS, and peer exchange through membership.

* **Bootstrap**: each `--bootstrap` multiaddr (and `<data-dir>/bootstrap` from a join
  string, and `<data-dir>/known_peers` learned on earlier runs) is dialled with a
  deadline, retried with backoff (0.2 s doubling to 60 s, ±20 % jitter) while the peer
  is not a live member, and on success joins membership through it (a push-pull sync returns
  the whole member table: every other peer is known one round trip later).
* **mDNS** (`adapters/mdns.py`): a discovered peer of our cluster is dialled and joined
  the same way. It is off when every listen address is loopback (nobody else could
  dial us, and tests must never multicast on a real interface).
* **Peer exchange**: membership gossip carries each member's address; the membership
  driver puts it into the transport's peer store, so requests dial on demand.

A wrong cluster key is reported once per address, clearly, and retried slowly (the
other node may be re-initialised).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence

import trio

from kowalski_node.adapters.libp2p.api import TransportPort
from kowalski_node.adapters.libp2p.errors import ClusterKeyMismatch, DialError
from kowalski_node.membership import Status
from kowalski_node.runtime.membership_driver import MembershipDriver

log = logging.getLogger("kowalski_node.runtime.discovery")

RETRY_MIN_S = 0.2
RETRY_MAX_S = 60.0  # the transport's per-peer redial backoff has the same range
RETRY_JITTER = 0.2
MEMBER_WATCH_S = 10.0
KEY_MISMATCH_RETRY_S = 60.0
DIAL_TIMEOUT_S = 3.0


def _jittered(delay: float) -> float:
    return delay * (1.0 + RETRY_JITTER * (2 * random.random() - 1))


def peer_of(addr: str) -> str:
    """The peer id at the end of `/.../p2p/<id>` ('' if absent)."""
    _, sep, tail = addr.rpartition("/p2p/")
    return tail.split("/", 1)[0] if sep else ""


class Discovery:
    """Runs bootstrap dials and (optionally) mDNS; joins every found peer into membership."""

    def __init__(
        self,
        me: str,
        transport: TransportPort,
        membership: MembershipDriver,
        *,
        bootstrap: Sequence[str] = (),
        mdns: bool = False,
        cluster: str | None = None,
        mdns_interfaces: Sequence[str] | None = None,
        on_found: Callable[[str, float], None] | None = None,
    ) -> None:
        self.me = me
        self.transport = transport
        self.membership = membership
        self.bootstrap = [a for a in bootstrap if peer_of(a) != me]
        self.mdns = mdns
        self.cluster = cluster
        self.mdns_interfaces = list(mdns_interfaces) if mdns_interfaces is not None else None
        self.on_found = on_found
        self.key_mismatches: dict[str, str] = {}
        self._dialling: set[str] = set()
        self._nursery: trio.Nursery | None = None

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for addr in self.bootstrap:
                nursery.start_soon(self._bootstrap, addr)
            if self.mdns:
                nursery.start_soon(self._run_mdns)

    def _is_member(self, peer: str) -> bool:
        status = self.membership.core.status(peer)
        return status in (Status.ALIVE, Status.SUSPECT)

    async def _bootstrap(self, addr: str) -> None:
        """Dial until the peer is a member (or, once it is, until it drops out again)."""
        peer = peer_of(addr)
        delay = RETRY_MIN_S
        reported = False
        while True:
            if peer and self._is_member(peer):
                # it is in; watch slowly so a restarted cluster is rejoined through it
                await trio.sleep(MEMBER_WATCH_S)
                continue
            try:
                found = await self.transport.connect(addr, timeout=DIAL_TIMEOUT_S)
            except ClusterKeyMismatch as exc:
                self.key_mismatches[addr] = str(exc)
                if not reported:
                    log.error(
                        "event=bootstrap_refused addr=%s reason=key_mismatch detail=%r",
                        addr,
                        str(exc),
                    )
                    reported = True
                delay = KEY_MISMATCH_RETRY_S
            except DialError as exc:
                if exc.reason == DialError.REASON_BAD_ADDRESS:
                    log.error("event=bootstrap_bad_address addr=%s detail=%r", addr, str(exc))
                    return
                log.debug("bootstrap %s: %s", addr, exc)
                delay = min(RETRY_MAX_S, delay * 2)
            except Exception as exc:  # noqa: BLE001 - bootstrap is retried with backoff whatever failed
                log.debug("bootstrap %s: %s", addr, exc)
                delay = min(RETRY_MAX_S, delay * 2)
            else:
                log.info("event=bootstrap_connected peer=%s addr=%s", found, addr)
                self.membership.join([(found, addr)])
                if self.on_found is not None:
                    self.on_found(found, trio.current_time())
                delay = RETRY_MIN_S
                reported = False
                # give the join a moment before checking membership again
                await trio.sleep(1.0)
                continue
            await trio.sleep(_jittered(delay))

    async def _run_mdns(self) -> None:
        try:
            from kowalski_node.adapters.mdns import DiscoveredPeer, MdnsDiscovery
        except ImportError as exc:  # zeroconf missing: say so, keep running without it
            log.warning("event=mdns_unavailable reason=%r", str(exc))
            return

        def on_peer(found: DiscoveredPeer) -> None:
            if found.lost or not found.addrs or found.peer_id == self.me:
                return
            self.transport.add_peer_addrs(found.peer_id, found.addrs)
            if self._nursery is not None and found.peer_id not in self._dialling:
                self._nursery.start_soon(self._dial_found, found.peer_id, list(found.addrs))

        mdns = MdnsDiscovery(
            self.me,
            self.transport.listen_addrs,
            on_peer,
            cluster=self.cluster,
            interfaces=self.mdns_interfaces,
        )
        try:
            async with mdns.running():
                log.info("event=mdns_started")
                await trio.sleep_forever()
        except Exception as exc:  # noqa: BLE001 - mDNS is optional: log why it is off, keep the node running
            log.warning("event=mdns_failed reason=%r", str(exc)[:300])

    async def _dial_found(self, peer: str, addrs: list[str]) -> None:
        if self._is_member(peer):
            return
        self._dialling.add(peer)
        try:
            for addr in addrs:
                try:
                    await self.transport.connect(addr, timeout=DIAL_TIMEOUT_S)
                except ClusterKeyMismatch as exc:
                    log.warning(
                        "event=mdns_peer_refused peer=%s reason=key_mismatch detail=%r",
                        peer,
                        str(exc),
                    )
                    return
                except Exception as exc:  # noqa: BLE001 - one unreachable mDNS address: try the next
                    log.debug("mDNS peer %s at %s: %s", peer, addr, exc)
                    continue
                log.info("event=mdns_connected peer=%s addr=%s", peer, addr)
                self.membership.join([(peer, addr)])
                if self.on_found is not None:
                    self.on_found(peer, trio.current_time())
                return
        finally:
            self._dialling.discard(peer)
