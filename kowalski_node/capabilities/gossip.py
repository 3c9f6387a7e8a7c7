"""Pure dissemination of capability adverts: infection-style push plus version-vector pull.

The one advert path: the node (``runtime/capabilities_driver.py``) and the simulator
(``simulations/engine.py``) both run this core, through ``glue.perform_gossip_effects``.
Merges follow :class:`CapabilityTable`. Same driving contract as membership:
``handle(now, src, msg)``, ``tick(now)``, ``next_deadline()``; peers to talk to come
from membership through ``set_peers``, and ``peer_up`` when one joins. Adverts may carry
their origin's signature (``DeviceProfile.seal``); the core relays it untouched, and the
driver verifies it before a message reaches ``handle``.

* A peer that membership reports up gets our own advert pushed at once (``peer_up``),
  so a new member knows every live peer within a round trip of seeing it.

* A changed advert (our own via ``publish``, or one we merged) is pushed to ``fanout``
  random peers every ``push_interval``, ``ceil(λ·log10(n+1))`` times, least-sent first.
* Every ``sync_interval`` we send our version vector to one random peer; it answers with
  the adverts we lack or hold older, and asks back for those it lacks (anti-entropy, so
  a node that missed every push, or was partitioned, still converges).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, assert_never

from kowalski_node.capabilities.profile import DeviceProfile
from kowalski_node.capabilities.push_queue import PushQueue
from kowalski_node.capabilities.table import CapabilityTable
from kowalski_node.errors import ConfigError
from kowalski_node.membership.core import sample_small
from kowalski_node.wire import WireError, check_type_tag, expect_dict, get_bool, get_list

MAX_ADVERTS_PER_MESSAGE = 1024
MAX_VECTOR = 100_000


@dataclass(frozen=True, slots=True)
class GossipConfig:
    push_interval: float = 0.05
    fanout: int = 3
    retransmit_mult: float = 4.0
    max_per_push: int = 16
    sync_interval: float = 2.0

    def __post_init__(self) -> None:
        if (
            self.push_interval <= 0
            or self.sync_interval <= 0
            or self.fanout < 1
            or self.max_per_push < 1
        ):
            raise ConfigError(
                "capability gossip: intervals must be > 0, fanout and max_per_push >= 1"
            )
        if self.retransmit_mult <= 0:
            raise ConfigError("capability gossip: retransmit_mult must be > 0")

    @classmethod
    def lan(cls) -> GossipConfig:
        return cls()

    @classmethod
    def wan(cls) -> GossipConfig:
        return cls(
            push_interval=0.5, fanout=3, retransmit_mult=4.0, max_per_push=16, sync_interval=15.0
        )


@dataclass(slots=True)
class AdvertPush:
    """Adverts to merge."""

    adverts: list[DeviceProfile] = field(default_factory=list)

    TAG = "caps_push"

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.TAG, "a": [p.to_wire() for p in self.adverts]}

    @classmethod
    def from_wire(cls, obj: object) -> AdvertPush:
        d = expect_dict(obj, "AdvertPush")
        check_type_tag(d, cls.TAG, "AdvertPush")
        return cls(
            [
                DeviceProfile.from_wire(a)
                for a in get_list(d, "a", "AdvertPush", max_len=MAX_ADVERTS_PER_MESSAGE)
            ]
        )


@dataclass(slots=True)
class AdvertDigest:
    """Our version per peer; ``reply`` asks the receiver to send back what we lack."""

    versions: dict[str, int]
    reply: bool

    TAG = "caps_digest"

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.TAG, "v": [[p, v] for p, v in self.versions.items()], "r": self.reply}

    @classmethod
    def from_wire(cls, obj: object) -> AdvertDigest:
        what = "AdvertDigest"
        d = expect_dict(obj, what)
        check_type_tag(d, cls.TAG, what)
        versions: dict[str, int] = {}
        for i, pair in enumerate(get_list(d, "v", what, max_len=MAX_VECTOR)):
            if (
                not isinstance(pair, list | tuple)
                or len(pair) != 2
                or not isinstance(pair[0], str)
                or not 0 < len(pair[0]) <= 256
                or isinstance(pair[1], bool)
                or not isinstance(pair[1], int)
                or pair[1] < 0
            ):
                raise WireError(f"{what}.v[{i}]: expected [peer id, version >= 0]")
            versions[pair[0]] = pair[1]
        return cls(versions, get_bool(d, "r", what))


GossipMessage = AdvertPush | AdvertDigest


def decode_gossip(obj: object) -> GossipMessage:
    d = expect_dict(obj, "capability gossip message")
    tag = d.get("t")
    if tag == AdvertPush.TAG:
        return AdvertPush.from_wire(d)
    if tag == AdvertDigest.TAG:
        return AdvertDigest.from_wire(d)
    raise WireError(f"capability gossip message: unknown type tag {tag!r}")


@dataclass(slots=True)
class GossipSend:
    """Deliver ``message`` to ``to`` (best effort)."""

    to: str
    message: GossipMessage


@dataclass(slots=True)
class AdvertChanged:
    """The table's entry for ``peer`` changed (first advert or a newer one)."""

    peer: str
    profile: DeviceProfile


GossipEffect = GossipSend | AdvertChanged


class CapabilityGossip:
    """Spreads adverts between the peers membership says are live."""

    def __init__(
        self,
        me: str,
        *,
        rng: random.Random,
        now: float,
        config: GossipConfig | None = None,
        table: CapabilityTable | None = None,
    ) -> None:
        self.me = me
        self.config = config or GossipConfig()
        self.table = table if table is not None else CapabilityTable()
        self._rng = rng
        self._peers: list[str] = []
        self._queue = PushQueue()  # peers whose advert has pushes left
        self._limit = self._retransmit_limit()
        self._vv: dict[str, int] = {}
        self._vv_gen = -1
        self._vv_table: CapabilityTable | None = None
        self._next_push_at = now
        self._next_sync_at = now + self.config.sync_interval * rng.random()
        self.pushes_sent = 0

    def set_peers(self, peers: Iterable[str]) -> None:
        """The live peers to gossip with (from membership), excluding ourselves."""
        unique = set(peers)
        unique.discard(self.me)
        self._peers = sorted(unique)
        self._limit = self._retransmit_limit()

    def publish(self, now: float, profile: DeviceProfile) -> list[GossipEffect]:
        """Advertise our own (new) profile."""
        if profile.peer != self.me:
            raise ValueError(f"publish: advert is for {profile.peer!r}, this node is {self.me!r}")
        out: list[GossipEffect] = []
        self._merge(profile, out)
        self._next_push_at = min(self._next_push_at, now)
        return out

    def peer_up(self, now: float, peer: str) -> list[GossipEffect]:
        """Membership saw ``peer`` come up: push it our own advert now (one message), so
        it need not wait for a random push or a sync to learn about us."""
        own = self.table.get(self.me)
        if own is None or peer == self.me:
            return []
        return [GossipSend(peer, AdvertPush([own]))]

    def handle(self, now: float, src: str, msg: GossipMessage) -> list[GossipEffect]:
        out: list[GossipEffect] = []
        match msg:
            case AdvertPush():
                merge = self.table.merge
                for advert in msg.adverts:
                    if merge(advert):
                        self._queue.reset(advert.peer)
                        out.append(AdvertChanged(advert.peer, advert))
            case AdvertDigest():
                theirs = msg.versions
                if theirs == self._version_vector():
                    return out  # the same view: nothing to send either way
                mine = self.table.profiles()
                newer_here = [p for peer, p in mine.items() if theirs.get(peer, -1) < p.version]
                for i in range(0, len(newer_here), MAX_ADVERTS_PER_MESSAGE):
                    out.append(
                        GossipSend(src, AdvertPush(newer_here[i : i + MAX_ADVERTS_PER_MESSAGE]))
                    )
                if msg.reply and any(
                    peer not in mine or mine[peer].version < v
                    for peer, v in theirs.items()
                    if peer != self.me
                ):
                    out.append(GossipSend(src, AdvertDigest(self._versions(), False)))
            case _:
                assert_never(msg)
        return out

    def tick(self, now: float) -> list[GossipEffect]:
        out: list[GossipEffect] = []
        cfg = self.config
        if now >= self._next_push_at:
            self._next_push_at = now + cfg.push_interval
            if self._queue and self._peers:
                targets = sample_small(self._rng, self._peers, min(cfg.fanout, len(self._peers)))
                for target in targets:
                    adverts = self._take()
                    if not adverts:
                        break
                    self.pushes_sent += 1
                    out.append(GossipSend(target, AdvertPush(adverts)))
        if now >= self._next_sync_at:
            self._next_sync_at = now + cfg.sync_interval
            if self._peers:
                out.append(
                    GossipSend(self._rng.choice(self._peers), AdvertDigest(self._versions(), True))
                )
        return out

    def next_deadline(self) -> float:
        d = self._next_sync_at
        if self._queue and self._peers and self._next_push_at < d:
            d = self._next_push_at
        return d

    def forget(self, peer: str) -> None:
        """A peer left: drop its advert (a strictly newer one brings it back)."""
        self.table.forget(peer)
        self._queue.discard(peer)

    def _merge(self, advert: DeviceProfile, out: list[GossipEffect]) -> None:
        if self.table.merge(advert):
            self._queue.reset(advert.peer)
            out.append(AdvertChanged(advert.peer, advert))

    def _retransmit_limit(self) -> int:
        """How many pushes an advert gets: ceil(λ·log10(n + 2)), n the peers we gossip with."""
        return max(1, math.ceil(self.config.retransmit_mult * math.log10(len(self._peers) + 2)))

    def _take(self) -> list[DeviceProfile]:
        """The next push: up to ``max_per_push`` adverts, least sent first (ties by peer id)."""
        queue = self._queue
        get = self.table.get
        adverts: list[DeviceProfile] = []
        for peer in queue.take(self.config.max_per_push, self._limit):
            prof = get(peer)
            if prof is None:  # forgotten meanwhile: nothing left to push
                queue.discard(peer)
            else:
                adverts.append(prof)
        return adverts

    def _versions(self) -> dict[str, int]:
        """Our version vector for a digest message (a copy: messages are never shared state)."""
        return dict(self._version_vector())

    def _version_vector(self) -> dict[str, int]:
        """Peer -> advert version, sorted by peer; rebuilt only after the table changed."""
        table = self.table
        if self._vv_gen != table.generation or self._vv_table is not table:
            self._vv = {peer: p.version for peer, p in table.profiles().items()}
            self._vv_gen = table.generation
            self._vv_table = table
        return self._vv
