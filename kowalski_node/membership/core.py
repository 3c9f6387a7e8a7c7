"""SWIM membership with Lifeguard refinements, as a pure (sans-IO) state machine.

The driver owns time and I/O. It calls ``handle(now, src, msg)`` for every message,
``tick(now)`` whenever ``now >= next_deadline()``, and performs the returned effects
(:class:`Send`, member events). Randomness comes only from the injected ``random.Random``,
so a driver with a seeded RNG and a seeded network replays a history exactly.

What it does (docs/cores.md has the full story):

* a probe round every ``probe_interval`` to the next member of a shuffled round-robin list;
  on a missed direct ack, ``indirect_checks`` relays probe on our behalf (ping-req);
* a failed probe makes the target *suspect*; suspicion lasts between ``suspicion_min`` and
  ``suspicion_max`` depending on how many independent members confirmed it (Lifeguard);
* a member refutes a suspicion about itself by raising its incarnation;
* updates are piggybacked on probes/acks and gossiped, each ``ceil(λ·log10(n+1))`` times;
* a local health multiplier stretches our own timeouts when *we* look slow (missed nacks);
* push-pull syncs join a node through seeds, repair state periodically, and heal partitions
  by contacting dead members (a remote "dead" verdict is merged as "suspect").
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice

from kowalski_node.membership.config import SwimConfig
from kowalski_node.membership.effects import (
    LeaveComplete,
    MemberAlive,
    MemberDown,
    MembershipEffect,
    MemberSuspect,
    MemberUp,
    Send,
)
from kowalski_node.membership.messages import (
    STATUS_RANK,
    Ack,
    Gossip,
    MembershipMessage,
    MemberUpdate,
    Nack,
    Ping,
    PingReq,
    Status,
    Sync,
)


def sample_small(rng: random.Random, population: list[str], k: int) -> list[str]:
    """``rng.sample(population, k)``, faster for the fanouts gossip uses (k <= 5, n > 21).

    Same result and the same draws from ``rng``: it is CPython's own set-based branch of
    ``Random.sample`` (``_randbelow`` via ``getrandbits``) without the generic overhead.
    Any other case, or an RNG subclass (which may draw differently), goes to ``rng.sample``.
    """
    n = len(population)
    if k > 5 or n <= 21 or type(rng) is not random.Random:
        return rng.sample(population, k)
    getrandbits = rng.getrandbits
    bits = n.bit_length()
    result: list[str] = []
    selected: set[int] = set()
    for _ in range(k):
        j = getrandbits(bits)
        while j >= n or j in selected:
            j = getrandbits(bits)
        selected.add(j)
        result.append(population[j])
    return result


_ALIVE = Status.ALIVE
_SUSPECT = Status.SUSPECT
_DEAD = Status.DEAD
_LEFT = Status.LEFT


@dataclass(slots=True)
class MemberInfo:
    """A read-only view of one member, for status pages and drivers."""

    peer: str
    addr: str
    status: Status
    incarnation: int
    since: float


@dataclass(slots=True)
class MembershipStats:
    """Counters a driver can export (simulation reports, /metrics)."""

    probes: int = 0
    probe_failures: int = 0
    indirect_probes: int = 0
    suspicions: int = 0
    refutations: int = 0
    deaths_declared: int = 0
    messages_sent: int = 0
    syncs_sent: int = 0


@dataclass(slots=True)
class _Member:
    peer: str
    addr: str
    status: Status
    incarnation: int
    since: float
    susp_start: float = 0.0
    susp_deadline: float = 0.0
    next_reprobe: float = 0.0
    confirmers: set[str] | None = None


@dataclass(slots=True)
class _Probe:
    seq: int
    target: str
    start: float
    direct_deadline: float
    final_deadline: float
    regular: bool
    direct_only: bool = False
    indirect_sent: bool = False
    reconnect: bool = False
    expected_nacks: int = 0
    nacks: int = 0


@dataclass(slots=True)
class _Relay:
    requester: str
    req_seq: int
    nack_at: float
    expire_at: float
    nacked: bool = False


class Membership:
    """One node's view of the cluster. Not thread-safe; one driver calls it at a time."""

    def __init__(
        self,
        me: str,
        *,
        config: SwimConfig,
        rng: random.Random,
        now: float,
        addr: str = "",
        incarnation: int = 0,
        members: Iterable[tuple[str, str]] = (),
    ) -> None:
        """Create the core. ``members`` pre-populates alive peers (simulators skip the join storm)."""
        if not me:
            raise ValueError("membership: the local peer id must not be empty")
        self.me = me
        self.addr = addr
        self.config = config
        self._rng = rng
        self._inc = incarnation
        self._members: dict[str, _Member] = {}
        for peer, peer_addr in members:
            if peer != me:
                self._members[peer] = _Member(peer, peer_addr, _ALIVE, 0, now)
        self._live_cache: list[str] | None = None
        self._probe_order: list[str] = []
        self._probe_idx = 0
        self._probes: dict[int, _Probe] = {}
        self._probing: dict[str, int] = {}
        self._relays: dict[int, _Relay] = {}
        # dicts, not sets: iteration order must not depend on string hashing (replayable runs)
        self._suspected: dict[str, None] = {}
        self._down: dict[str, None] = {}
        self._bq: list[dict[str, MemberUpdate]] = [{}]
        self._bq_where: dict[str, int] = {}
        # Earliest timer of the outstanding probes / relays / suspicions (None = recompute).
        # ``next_deadline`` runs after every message; the caches keep it O(1) between changes.
        self._probe_dl: float | None = math.inf
        self._relay_dl: float | None = math.inf
        self._susp_dl: float | None = math.inf
        self._rt_live: list[str] | None = None
        self._rt_cap = 1
        self._seq = 0
        self._health = 0
        self._last_now = now
        self._next_probe_at = now + rng.random() * config.probe_interval
        self._next_gossip_at = now
        self._next_sync_at = (
            now + config.sync_interval * (0.5 + rng.random())
            if config.sync_interval > 0
            else math.inf
        )
        self._next_reconnect_at = (
            now + config.reconnect_interval * rng.random()
            if config.reconnect_interval > 0
            else math.inf
        )
        self._seeds: dict[str, str] = {}
        self._join_pending = False
        self._next_join_at = math.inf
        self._leaving = False
        self._leave_done_at = math.inf
        self._stopped = False
        self.stats = MembershipStats()

    # ------------------------------------------------------------------ queries

    @property
    def incarnation(self) -> int:
        """Our own incarnation number (raised on every refutation)."""
        return self._inc

    @property
    def health(self) -> int:
        """Lifeguard local health multiplier (0 = healthy; timeouts scale by 1 + health)."""
        return self._health

    @property
    def stopped(self) -> bool:
        """True once a graceful leave has completed; the core then ignores all input."""
        return self._stopped

    def status(self, peer: str) -> Status | None:
        """The status of ``peer`` (``None`` when unknown or forgotten)."""
        if peer == self.me:
            return _LEFT if self._leaving else _ALIVE
        m = self._members.get(peer)
        return m.status if m is not None else None

    def live_peers(self, include_self: bool = True) -> list[str]:
        """Members that are alive or suspect (suspects are members until declared down)."""
        live = list(self._live())
        if include_self and not self._leaving:
            live.append(self.me)
        return live

    def alive_peers(self) -> list[str]:
        """Members that are alive and not under suspicion (excluding ourselves)."""
        return [p for p, m in self._members.items() if m.status is _ALIVE]

    def members(self) -> list[MemberInfo]:
        """Every known member including ourselves, sorted by peer id."""
        out = [
            MemberInfo(
                self.me, self.addr, self.status(self.me) or _ALIVE, self._inc, self._last_now
            )
        ]
        out.extend(
            MemberInfo(m.peer, m.addr, m.status, m.incarnation, m.since)
            for m in self._members.values()
        )
        out.sort(key=lambda i: i.peer)
        return out

    def addr_of(self, peer: str) -> str:
        """Last known address of ``peer`` ('' when unknown)."""
        if peer == self.me:
            return self.addr
        m = self._members.get(peer)
        return m.addr if m is not None else ""

    def cluster_size(self) -> int:
        """n as used for suspicion and retransmit scaling: live members including ourselves."""
        return len(self._live()) + 1

    def next_deadline(self) -> float:
        """The earliest time ``tick`` has work to do (``inf`` when stopped)."""
        if self._stopped:
            return math.inf
        d = self._leave_done_at
        if not self._leaving:
            d = min(
                d,
                self._next_probe_at,
                self._next_sync_at,
                self._next_reconnect_at,
                self._next_join_at,
            )
        if self._bq_where and self._next_gossip_at < d:
            d = self._next_gossip_at
        t = self._probe_dl
        if t is None:
            t = self._probe_timer()
        if t < d:
            d = t
        t = self._relay_dl
        if t is None:
            t = self._relay_timer()
        if t < d:
            d = t
        t = self._susp_dl
        if t is None:
            t = self._suspicion_timer()
        if t < d:
            d = t
        return d

    def _probe_timer(self) -> float:
        """Earliest probe timer: the direct deadline until ping-reqs went out, then the final one."""
        d = self._probe_dl
        if d is None:
            d = math.inf
            for p in self._probes.values():
                t = p.final_deadline if p.indirect_sent else p.direct_deadline
                if t < d:
                    d = t
            self._probe_dl = d
        return d

    def _relay_timer(self) -> float:
        d = self._relay_dl
        if d is None:
            d = math.inf
            for r in self._relays.values():
                t = r.expire_at if r.nacked else r.nack_at
                if t < d:
                    d = t
            self._relay_dl = d
        return d

    def _suspicion_timer(self) -> float:
        """Earliest suspicion deadline, or re-probe of a suspect not being probed right now."""
        d = self._susp_dl
        if d is None:
            d = math.inf
            members = self._members
            probing = self._probing
            for peer in self._suspected:
                m = members[peer]
                t = m.susp_deadline
                if peer not in probing and m.next_reprobe < t:
                    t = m.next_reprobe
                if t < d:
                    d = t
            self._susp_dl = d
        return d

    # ------------------------------------------------------------------ inputs

    def join(self, now: float, seeds: Iterable[tuple[str, str]]) -> list[MembershipEffect]:
        """Contact seed peers ``(peer, addr)`` with a push-pull sync; retried until one answers."""
        out: list[MembershipEffect] = []
        if self._stopped:
            return out
        now = self._clock(now)
        for peer, peer_addr in seeds:
            if peer and peer != self.me:
                self._seeds[peer] = peer_addr
        if self._seeds:
            self._join_pending = True
            self._next_join_at = now + self.config.join_retry_interval
            snapshot = self._snapshot()
            for peer in self._seeds:
                self._send(out, peer, Sync(snapshot, True))
                self.stats.syncs_sent += 1
        return out

    def leave(self, now: float) -> list[MembershipEffect]:
        """Announce a graceful leave; ``LeaveComplete`` follows after ``leave_drain``."""
        out: list[MembershipEffect] = []
        if self._leaving or self._stopped:
            return out
        now = self._clock(now)
        self._leaving = True
        self._inc += 1
        self._broadcast(MemberUpdate(self.me, _LEFT, self._inc, self.addr))
        self._leave_done_at = now + self.config.leave_drain
        self._next_gossip_at = now
        self._gossip_round(now, out)
        return out

    def expedite_probe(self, now: float, peer: str) -> list[MembershipEffect]:
        """Probe ``peer`` now: the transport saw a hint (connection reset, EOF) that it may be gone.

        A hint never marks anyone suspect by itself; only a failed probe does.
        """
        out: list[MembershipEffect] = []
        now = self._clock(now)
        m = self._members.get(peer)
        if self._stopped or self._leaving or m is None or m.status in (_DEAD, _LEFT):
            return out
        self._start_probe(now, peer, False, out)
        return out

    def handle(self, now: float, src: str, msg: MembershipMessage) -> list[MembershipEffect]:
        """Process one message from peer ``src`` (already decoded and validated)."""
        out: list[MembershipEffect] = []
        if self._stopped:
            return out
        now = self._clock(now)
        if isinstance(msg, Ping):
            self._apply_all(now, msg.updates, out)
            if msg.target == self.me:
                self._send(out, src, Ack(msg.seq, self._inc, self._take_updates(None)))
        elif isinstance(msg, Ack):
            self._apply_all(now, msg.updates, out)
            self._on_ack(now, msg, out)
        elif isinstance(msg, Gossip):
            self._apply_all(now, msg.updates, out)
        elif isinstance(msg, PingReq):
            self._apply_all(now, msg.updates, out)
            self._on_ping_req(now, src, msg, out)
        elif isinstance(msg, Nack):
            probe = self._probes.get(msg.seq)
            if probe is not None:
                probe.nacks += 1
        elif isinstance(msg, Sync):
            self._on_sync(now, src, msg, out)
        else:  # pragma: no cover - the union is closed; defend against driver bugs
            raise TypeError(f"membership: unexpected message type {type(msg).__name__}")
        return out

    def tick(self, now: float) -> list[MembershipEffect]:
        """Run every timer that is due at ``now``."""
        out: list[MembershipEffect] = []
        if self._stopped:
            return out
        now = self._clock(now)
        cfg = self.config
        if self._leaving:
            if now >= self._leave_done_at:
                self._stopped = True
                out.append(LeaveComplete())
                return out
        else:
            if now >= self._next_probe_at:
                self._next_probe_at = now + cfg.probe_interval * (1 + self._health)
                target = self._next_probe_target()
                if target is not None:
                    self._start_probe(now, target, True, out)
            if now >= self._next_sync_at:
                self._next_sync_at = now + cfg.sync_interval * self._push_pull_scale()
                live = self._live()
                if live:
                    self._send_sync(out, self._rng.choice(live), True)
            if now >= self._next_reconnect_at:
                self._next_reconnect_at = now + cfg.reconnect_interval
                self._reconnect(now, out)
            if self._join_pending and now >= self._next_join_at:
                self._next_join_at = now + cfg.join_retry_interval
                snapshot = self._snapshot()
                for peer in self._seeds:
                    self._send(out, peer, Sync(snapshot, True))
                    self.stats.syncs_sent += 1
        if self._probes and now >= self._probe_timer():
            self._run_probe_timers(now, out)
        if self._relays and now >= self._relay_timer():
            self._run_relay_timers(now, out)
        if self._suspected and now >= self._suspicion_timer():
            self._run_suspicion_timers(now, out)
        if now >= self._next_gossip_at and self._bq_where:
            self._gossip_round(now, out)
        return out

    # ------------------------------------------------------------------ probing

    def _next_probe_target(self) -> str | None:
        order = self._probe_order
        members = self._members
        for _ in range(2):
            while self._probe_idx < len(order):
                peer = order[self._probe_idx]
                self._probe_idx += 1
                m = members.get(peer)
                if m is not None and (m.status is _ALIVE or m.status is _SUSPECT):
                    return peer
            order = list(self._live())
            self._rng.shuffle(order)
            self._probe_order = order
            self._probe_idx = 0
            if not order:
                return None
        return None

    def _start_probe(
        self,
        now: float,
        target: str,
        regular: bool,
        out: list[MembershipEffect],
        direct_only: bool = False,
    ) -> None:
        if target in self._probing:
            return
        cfg = self.config
        scale = 1 + self._health
        seq = self._next_seq()
        final = now + (cfg.probe_timeout + cfg.indirect_timeout) * scale
        direct = final if direct_only else now + cfg.probe_timeout * scale
        probe = _Probe(seq, target, now, direct, final, regular, direct_only, direct_only)
        self._probes[seq] = probe
        pd = self._probe_dl
        if pd is not None and direct < pd:
            self._probe_dl = direct
        m = self._members.get(target)
        if m is not None and m.status is _SUSPECT:
            m.next_reprobe = final + cfg.probe_interval * scale
        self._probing[target] = seq
        if target in self._suspected:  # its re-probe time and "being probed" both changed
            self._susp_dl = None
        self.stats.probes += 1
        self._send(out, target, Ping(seq, target, self._take_updates(target)))

    def _on_ack(self, now: float, ack: Ack, out: list[MembershipEffect]) -> None:
        probe = self._probes.pop(ack.seq, None)
        if probe is not None:
            self._probe_dl = None
            self._probing.pop(probe.target, None)
            if probe.target in self._suspected:
                self._susp_dl = None
            if not probe.direct_only:
                self._adjust_health(-1)
            m = self._members.get(probe.target)
            if m is not None and ack.inc > m.incarnation:
                self._apply(now, MemberUpdate(m.peer, _ALIVE, ack.inc, m.addr), out, False)
            if probe.reconnect:
                # A member we had declared dead answers: exchange tables so both sides
                # learn (and refute) what the other believed during the split.
                self._send_sync(out, probe.target, True)
            return
        relay = self._relays.pop(ack.seq, None)
        if relay is not None:
            self._relay_dl = None
            self._send(out, relay.requester, Ack(relay.req_seq, ack.inc, self._take_updates(None)))

    def _run_probe_timers(self, now: float, out: list[MembershipEffect]) -> None:
        for probe in list(self._probes.values()):
            if not probe.indirect_sent and now >= probe.direct_deadline:
                probe.indirect_sent = True
                self._probe_dl = None
                self._send_ping_reqs(now, probe, out)
            if now >= probe.final_deadline:
                del self._probes[probe.seq]
                self._probe_dl = None
                self._probing.pop(probe.target, None)
                if probe.target in self._suspected:
                    self._susp_dl = None
                self._probe_failed(now, probe, out)

    def _send_ping_reqs(self, now: float, probe: _Probe, out: list[MembershipEffect]) -> None:
        candidates = [p for p in self._live() if p != probe.target]
        k = min(self.config.indirect_checks, len(candidates))
        if k <= 0:
            return
        relays = sample_small(self._rng, candidates, k)
        target_addr = self.addr_of(probe.target)
        remaining = max(0.0, probe.final_deadline - now)
        probe.expected_nacks = k
        self.stats.indirect_probes += 1
        for relay in relays:
            self._send(
                out,
                relay,
                PingReq(probe.seq, probe.target, target_addr, remaining, self._take_updates(None)),
            )

    def _probe_failed(self, now: float, probe: _Probe, out: list[MembershipEffect]) -> None:
        if probe.direct_only:
            return  # a re-probe of a suspect: it only fishes for a refutation, it confirms nothing
        self.stats.probe_failures += 1
        # Lifeguard: with relays we can tell "target is down" (relays nack) from "we are slow".
        if probe.expected_nacks > 0:
            self._adjust_health(max(0, probe.expected_nacks - probe.nacks))
        else:
            self._adjust_health(1)
        m = self._members.get(probe.target)
        if m is None or m.status is _DEAD or m.status is _LEFT:
            return
        self._apply(now, MemberUpdate(m.peer, _SUSPECT, m.incarnation, m.addr, self.me), out, False)

    def _on_ping_req(self, now: float, src: str, msg: PingReq, out: list[MembershipEffect]) -> None:
        if msg.target == self.me:
            self._send(out, src, Ack(msg.seq, self._inc, self._take_updates(None)))
            return
        seq = self._next_seq()
        nack_at = now + msg.timeout * 0.8
        self._relays[seq] = _Relay(src, msg.seq, nack_at, now + msg.timeout)
        rd = self._relay_dl
        if rd is not None and nack_at < rd:
            self._relay_dl = nack_at
        ping = Ping(seq, msg.target, self._take_updates(msg.target))
        self._send(out, msg.target, ping, msg.target_addr)

    def _run_relay_timers(self, now: float, out: list[MembershipEffect]) -> None:
        for seq, relay in list(self._relays.items()):
            if not relay.nacked and now >= relay.nack_at:
                relay.nacked = True
                self._relay_dl = None
                self._send(out, relay.requester, Nack(relay.req_seq))
            if now >= relay.expire_at:
                del self._relays[seq]
                self._relay_dl = None

    def _adjust_health(self, delta: int) -> None:
        h = self._health + delta
        self._health = 0 if h < 0 else min(h, self.config.max_health)

    # ------------------------------------------------------------------ suspicion

    def _volunteer_to_probe(self) -> bool:
        """Whether to probe a suspicion we heard: about ``suspect_probers`` hearers do."""
        want = self.config.suspect_probers
        others = self.cluster_size() - 2  # neither us nor the suspect
        if want <= 0 or others <= want:
            return True
        return self._rng.random() * others < want

    def _suspicion_timeout(self, confirmations: int) -> float:
        cfg = self.config
        n = self.cluster_size()
        scale = max(1.0, math.log10(n)) if cfg.scale_suspicion_with_size else 1.0
        lo = cfg.suspicion_min * scale
        hi = max(lo, cfg.suspicion_max * scale)
        k = cfg.suspicion_confirmations
        # With too few other members, confirmations cannot arrive: do not wait for them.
        if n - 2 < k:
            k = max(0, n - 2)
        if k <= 0:
            return lo
        frac = math.log(confirmations + 1) / math.log(k + 1)
        return max(lo, hi - (hi - lo) * frac)

    def _run_suspicion_timers(self, now: float, out: list[MembershipEffect]) -> None:
        members = self._members
        probing = self._probing
        for peer in list(self._suspected):
            m = members[peer]
            if now >= m.susp_deadline:
                del self._suspected[peer]
                self._susp_dl = None
                self._apply(now, MemberUpdate(peer, _DEAD, m.incarnation, m.addr), out, False)
            elif peer not in probing and now >= m.next_reprobe and not self._leaving:
                # Keep asking the suspect directly: its ack carries the refutation even if
                # every gossip copy of it missed us.
                self._start_probe(now, peer, False, out, direct_only=True)

    # ------------------------------------------------------------------ state merge

    def _apply_all(
        self, now: float, updates: list[MemberUpdate], out: list[MembershipEffect]
    ) -> None:
        members = self._members
        for u in updates:
            m = members.get(u.peer)
            if m is not None and u.status is _ALIVE and u.incarnation <= m.incarnation:
                continue  # the common case: old news about a live member (``_apply`` ignores it)
            self._apply(now, u, out, False)

    def _apply(
        self, now: float, u: MemberUpdate, out: list[MembershipEffect], from_sync: bool
    ) -> None:
        """Merge one update; accepted changes are re-broadcast (infection-style dissemination)."""
        if u.peer == self.me:
            self._about_me(now, u)
            return
        status = u.status
        if from_sync and status is _DEAD:
            # A remote dead verdict is weaker than our own evidence: suspect, let it refute.
            status = _SUSPECT
            u = MemberUpdate(u.peer, _SUSPECT, u.incarnation, u.addr, u.by)
        m = self._members.get(u.peer)
        if m is None:
            if status is _ALIVE:
                self._members[u.peer] = _Member(u.peer, u.addr, _ALIVE, u.incarnation, now)
                self._member_became_live(u.peer, appended=True)
                out.append(MemberUp(u.peer, u.addr, u.incarnation))
                self._broadcast(u)
            return
        if status is _ALIVE:
            if u.incarnation <= m.incarnation:
                return
            prev = m.status
            m.incarnation = u.incarnation
            if u.addr:
                m.addr = u.addr
            m.status = _ALIVE
            m.since = now
            if prev is _SUSPECT:
                self._clear_suspicion(m)
                out.append(MemberAlive(m.peer, m.incarnation))
            elif prev is _DEAD or prev is _LEFT:
                self._down.pop(m.peer, None)
                self._member_became_live(m.peer)
                out.append(MemberUp(m.peer, m.addr, m.incarnation))
            self._broadcast(u)
            return
        if status is _SUSPECT:
            if m.status is _DEAD or m.status is _LEFT or u.incarnation < m.incarnation:
                return
            if m.status is _SUSPECT and u.incarnation == m.incarnation:
                conf = m.confirmers
                by = u.by or "?"
                if conf is None or by in conf:
                    return
                conf.add(by)
                m.susp_deadline = m.susp_start + self._suspicion_timeout(len(conf) - 1)
                self._susp_dl = None
                self._broadcast(u)
                return
            # alive at <= incarnation, or suspect at an older one: start a fresh suspicion
            m.status = _SUSPECT
            m.incarnation = u.incarnation
            m.since = now
            m.susp_start = now
            m.next_reprobe = now + self.config.probe_interval
            m.confirmers = {u.by or "?"}
            m.susp_deadline = now + self._suspicion_timeout(0)
            self._suspected[m.peer] = None
            self._susp_dl = None
            self.stats.suspicions += 1
            out.append(MemberSuspect(m.peer, m.incarnation))
            self._broadcast(u)
            if (
                self.config.probe_on_suspect
                and u.by != self.me
                and not self._leaving
                and self._volunteer_to_probe()
            ):
                self._start_probe(now, m.peer, False, out)
            return
        # DEAD or LEFT
        if u.incarnation < m.incarnation:
            return
        if m.status is _DEAD or m.status is _LEFT:
            # Already out: only record a newer or stronger fact, without a second event.
            if (u.incarnation, STATUS_RANK[status]) > (m.incarnation, STATUS_RANK[m.status]):
                m.status = status
                m.incarnation = u.incarnation
                self._broadcast(MemberUpdate(u.peer, status, u.incarnation, u.addr))
            return
        if m.status is _SUSPECT:
            self._clear_suspicion(m)
        m.status = status
        m.incarnation = u.incarnation
        m.since = now
        self._left_live(m.peer)
        self._down[m.peer] = None
        if status is _DEAD:
            self.stats.deaths_declared += 1
        out.append(MemberDown(m.peer, m.incarnation, status is _LEFT))
        self._broadcast(MemberUpdate(u.peer, status, u.incarnation, u.addr))

    def _about_me(self, now: float, u: MemberUpdate) -> None:
        """Someone said something about us: refute anything but 'alive' (unless we are leaving)."""
        if self._leaving:
            return
        if u.status is _ALIVE:
            if u.incarnation > self._inc:
                # An earlier life of ours announced a higher number: continue above it.
                self._inc = u.incarnation + 1
                self._broadcast(MemberUpdate(self.me, _ALIVE, self._inc, self.addr))
            return
        if u.incarnation < self._inc:
            return
        self._inc = u.incarnation + 1
        self.stats.refutations += 1
        self._adjust_health(1)
        self._broadcast(MemberUpdate(self.me, _ALIVE, self._inc, self.addr))
        self._next_gossip_at = min(self._next_gossip_at, now)

    def _clear_suspicion(self, m: _Member) -> None:
        m.confirmers = None
        if self._suspected.pop(m.peer, 0) is None:
            self._susp_dl = None

    def _member_became_live(self, peer: str, appended: bool = False) -> None:
        live = self._live_cache
        if appended and live is not None:
            # A new member sits last in ``_members``, so last in the live list too. The list
            # is replaced, never changed in place: ``_retransmit_limit`` keys on its identity.
            self._live_cache = [*live, peer]
        else:
            self._live_cache = None
        order = self._probe_order
        # SWIM: insert new members at a random position of the remaining round.
        pos = self._rng.randint(self._probe_idx, len(order))
        order.insert(pos, peer)

    # ------------------------------------------------------------------ sync / reconnect

    def _snapshot(self) -> list[MemberUpdate]:
        snap = [MemberUpdate(self.me, _LEFT if self._leaving else _ALIVE, self._inc, self.addr)]
        snap.extend(
            MemberUpdate(m.peer, m.status, m.incarnation, m.addr) for m in self._members.values()
        )
        return snap

    def _send_sync(self, out: list[MembershipEffect], peer: str, reply: bool) -> None:
        self.stats.syncs_sent += 1
        self._send(out, peer, Sync(self._snapshot(), reply))

    def _on_sync(self, now: float, src: str, msg: Sync, out: list[MembershipEffect]) -> None:
        if not msg.reply:
            # Any answer to a sync means we are connected to the cluster: stop retrying the join.
            self._join_pending = False
            self._next_join_at = math.inf
        for u in msg.members:
            if u.status is _SUSPECT and not u.by:
                u = MemberUpdate(u.peer, _SUSPECT, u.incarnation, u.addr, src)
            elif u.status is _DEAD:
                u = MemberUpdate(u.peer, _DEAD, u.incarnation, u.addr, src)
            self._apply(now, u, out, True)
        if msg.reply:
            self._send_sync(out, src, False)

    def _reconnect(self, now: float, out: list[MembershipEffect]) -> None:
        """Try one dead member (a cheap ping carrying its death) or an unreachable seed (a sync)."""
        cfg = self.config
        horizon = now - cfg.dead_retention
        members = self._members
        for peer in [p for p in self._down if members[p].since < horizon]:
            del members[peer]
            del self._down[peer]
            self._drop_queued(peer)
        dead = [p for p in self._down if members[p].status is _DEAD and p not in self._probing]
        seeds = [p for p in self._seeds if p not in members or members[p].status is _LEFT]
        total = len(dead) + len(seeds)
        if total == 0:
            return
        pick = self._rng.randrange(total)
        if pick < len(dead):
            self._start_probe(now, dead[pick], False, out, direct_only=True)
            probe = self._probes[self._probing[dead[pick]]]
            probe.reconnect = True
        else:
            self._send_sync(out, seeds[pick - len(dead)], True)

    def _push_pull_scale(self) -> int:
        """memberlist's push-pull scaling: full-table syncs get rarer beyond 32 members."""
        n = self.cluster_size()
        if n <= 32:
            return 1
        return math.ceil(math.log2(n) - math.log2(32)) + 1

    # ------------------------------------------------------------------ dissemination

    def _retransmit_limit(self) -> int:
        live = self._live()
        if live is not self._rt_live:  # the live set changed since we last computed it
            self._rt_live = live
            self._rt_cap = max(
                1, math.ceil(self.config.retransmit_mult * math.log10(len(live) + 1 + 1))
            )
        return self._rt_cap

    def _broadcast(self, u: MemberUpdate) -> None:
        where = self._bq_where.get(u.peer)
        if where is not None:
            del self._bq[where][u.peer]
        self._bq[0][u.peer] = u
        self._bq_where[u.peer] = 0

    def _drop_queued(self, peer: str) -> None:
        where = self._bq_where.pop(peer, None)
        if where is not None:
            del self._bq[where][peer]

    def _take_updates(self, about: str | None) -> list[MemberUpdate]:
        """Pick up to ``max_piggyback`` updates, least-sent first; ``about``'s suspicion goes first."""
        picked: list[MemberUpdate] = []
        skip = None
        if about is not None:
            m = self._members.get(about)
            if m is not None and (m.status is _SUSPECT or m.status is _DEAD):
                # Buddy system: tell the member what we believe, so it can refute at once.
                picked.append(MemberUpdate(about, m.status, m.incarnation, m.addr, self.me))
                skip = about  # already said first: do not repeat a queued update about it
        where = self._bq_where
        if not where:
            return picked
        room = self.config.max_piggyback - len(picked)
        if room <= 0:
            return picked
        bq = self._bq
        # Pick level by level, least sent first. Each picked update then moves up one level
        # (to the end of it), or leaves the queue after ``cap`` sends. Moves are applied
        # afterwards, highest level first, so nothing is picked twice in one call and every
        # level keeps its order; a level picked whole moves in one C-level update.
        taken: list[tuple[int, list[str] | None]] = []
        for level, bucket in enumerate(bq):
            if not bucket:
                continue
            if len(bucket) <= room and (skip is None or skip not in bucket):
                picked.extend(bucket.values())
                taken.append((level, None))  # the whole level
                room -= len(bucket)
            else:
                if skip is not None and skip in bucket:
                    items = [kv for kv in bucket.items() if kv[0] != skip][:room]
                else:
                    items = list(islice(bucket.items(), room))
                if not items:
                    continue
                picked.extend([upd for _, upd in items])
                taken.append((level, [peer for peer, _ in items]))
                room -= len(items)
            if room == 0:
                break
        if taken:
            cap = self._retransmit_limit()
            for level, peers in reversed(taken):
                bucket = bq[level]
                nxt = level + 1
                if nxt >= cap:
                    for peer in bucket if peers is None else peers:
                        del where[peer]
                    if peers is None:
                        bucket.clear()
                    else:
                        for peer in peers:
                            del bucket[peer]
                    continue
                if len(bq) <= nxt:
                    bq.append({})
                up = bq[nxt]
                if peers is None:
                    where.update(dict.fromkeys(bucket, nxt))
                    if up:
                        up.update(bucket)
                        bucket.clear()
                    else:
                        bq[nxt] = bucket
                        bq[level] = up
                else:
                    for peer in peers:
                        up[peer] = bucket.pop(peer)
                        where[peer] = nxt
        return picked

    def _gossip_round(self, now: float, out: list[MembershipEffect]) -> None:
        cfg = self.config
        self._next_gossip_at = now + cfg.gossip_interval
        if not self._bq_where:
            return
        targets = self._live()  # not modified below: extended copies only
        if self._down:
            # Recently dead members hear gossip too. ``_down`` is in the order members went
            # down (``since`` never decreases along it), so the recent ones are a suffix.
            horizon = now - cfg.gossip_to_dead
            members = self._members
            recent: list[str] = []
            for p in reversed(self._down):
                m = members[p]
                if m.since < horizon:
                    break
                if m.status is _DEAD:
                    recent.append(p)
            if recent:
                recent.reverse()
                targets = targets + recent
        if not targets:
            return
        k = min(cfg.gossip_fanout, len(targets))
        for peer in sample_small(self._rng, targets, k):
            updates = self._take_updates(None)
            if not updates:
                break
            self._send(out, peer, Gossip(updates))

    # ------------------------------------------------------------------ helpers

    def _left_live(self, peer: str) -> None:
        """``peer`` went from alive/suspect to dead/left: drop it from the live list (a copy)."""
        live = self._live_cache
        if live is not None:
            live = live.copy()
            live.remove(peer)
            self._live_cache = live

    def _live(self) -> list[str]:
        live = self._live_cache
        if live is None:
            live = [
                p for p, m in self._members.items() if m.status is _ALIVE or m.status is _SUSPECT
            ]
            self._live_cache = live
        return live

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _send(
        self, out: list[MembershipEffect], to: str, msg: MembershipMessage, addr: str = ""
    ) -> None:
        self.stats.messages_sent += 1
        if not addr:
            m = self._members.get(to)
            addr = m.addr if m is not None else self._seeds.get(to, "")
        out.append(Send(to, msg, addr))

    def _clock(self, now: float) -> float:
        """Time never runs backwards inside the core (a driver's clock jump back is clamped)."""
        if now < self._last_now:
            return self._last_now
        self._last_now = now
        return now
