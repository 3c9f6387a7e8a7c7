"""SWIM/Lifeguard parameters, with a LAN profile and a WAN/constrained profile.

The reasoning behind the LAN numbers is in docs/cores.md ("membership"). In short: a probe
round every 100 ms makes the aggregate probe rate on any member ~10/s, so a dead member is
first probed within ~0.46 s at p99; a probe fails after 150 ms (40 ms direct + 110 ms
indirect); suspicion then lasts 200 ms once K=3 independent probers confirm it (they do
within ~150 ms because everyone re-probes a freshly suspected member). A *false* suspicion
gets no confirmations, so it keeps the 2.5 s maximum, which the refutation beats by orders
of magnitude even at 5 % loss.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from kowalski_node.errors import ConfigError


@dataclass(frozen=True, slots=True)
class SwimConfig:
    """All timing and fan-out knobs of the membership core (seconds, counts)."""

    probe_interval: float = 0.1
    """Period between two regular probe rounds (scaled by the local health multiplier)."""
    probe_timeout: float = 0.04
    """Wait for a direct ack before asking ``indirect_checks`` peers to probe (scaled by health)."""
    indirect_timeout: float = 0.11
    """Extra wait for an indirect ack before the probe counts as failed (scaled by health)."""
    indirect_checks: int = 3
    """k: relays asked to probe the target when the direct probe times out."""
    suspicion_min: float = 0.2
    """Suspicion timeout once ``suspicion_confirmations`` independent suspecters agree."""
    suspicion_max: float = 2.5
    """Suspicion timeout with no confirmation (Lifeguard: a lone suspicion is likely false)."""
    suspicion_confirmations: int = 3
    """K: confirmations that shrink the timeout from max to min (log-scaled in between)."""
    scale_suspicion_with_size: bool = False
    """Multiply both suspicion bounds by max(1, log10(n)), as memberlist does. Off on the LAN:
    refutations reach suspecters by direct (re-)probes, not only by gossip, so they do not
    need more time in bigger clusters; on for the WAN profile."""
    probe_on_suspect: bool = True
    """Probe a member as soon as we hear it is suspected: confirms real deaths fast and hands
    a live member its own suspicion (buddy system) so it refutes within one round trip."""
    suspect_probers: int = 10
    """How many members, in expectation, act on ``probe_on_suspect`` (each hearer probes with
    probability suspect_probers / (n - 2); 0 means every hearer). All of them would make one
    suspicion cost O(n) probes, and a non-transitive partition, where every node suspects
    half the cluster, O(n^2) per round; ten is enough for K=3 fast confirmations."""
    gossip_interval: float = 0.03
    """Period of fire-and-forget gossip when there is something to spread."""
    gossip_fanout: int = 3
    """Members each gossip round is sent to."""
    gossip_to_dead: float = 5.0
    """Keep gossiping to members declared dead this recently, so a wrongly dead one can refute."""
    retransmit_mult: float = 4.0
    """λ: each update is sent ceil(λ·log10(n+1)) times before it is dropped from the queue."""
    max_piggyback: int = 8
    """Updates piggybacked per message (bounds message size)."""
    sync_interval: float = 10.0
    """Push-pull anti-entropy with a random live member (0 disables); stretched beyond 32
    members by ceil(log2(n/32)) + 1, as memberlist does, since a sync costs O(n)."""
    reconnect_interval: float = 0.5
    """Ping a random dead member (its ping carries its death so it refutes; an answer triggers
    a full sync) or sync with an unreachable seed: this is how partitions heal."""
    dead_retention: float = 300.0
    """Forget dead/left members after this long (they can still rejoin through a sync)."""
    join_retry_interval: float = 0.5
    """Resend the join sync to seeds until some member answers."""
    leave_drain: float = 0.3
    """After ``leave()``, keep answering and gossiping this long before ``LeaveComplete``."""
    max_health: int = 8
    """Lifeguard local health multiplier cap: timeouts stretch up to (1 + max_health)x."""

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool):
                continue
            if isinstance(v, int | float) and v < 0:
                raise ConfigError(f"membership.{f.name} must be >= 0, got {v}")
        positive = (
            "probe_interval",
            "probe_timeout",
            "indirect_timeout",
            "suspicion_min",
            "gossip_interval",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"membership.{name} must be > 0, got {getattr(self, name)}")
        if self.suspicion_max < self.suspicion_min:
            raise ConfigError(
                f"membership.suspicion_max ({self.suspicion_max}) must be >= suspicion_min ({self.suspicion_min})"
            )
        if self.gossip_fanout < 1 or self.max_piggyback < 1:
            raise ConfigError("membership.gossip_fanout and membership.max_piggyback must be >= 1")
        if self.retransmit_mult <= 0:
            raise ConfigError(f"membership.retransmit_mult must be > 0, got {self.retransmit_mult}")

    @classmethod
    def lan(cls) -> SwimConfig:
        """LAN profile: a dead peer is marked dead by every member in < 1 s (p99 in the tests)."""
        return cls()

    @classmethod
    def wan(cls) -> SwimConfig:
        """WAN / constrained profile (Wi-Fi across sites, phones): fewer messages, patient timeouts."""
        return cls(
            probe_interval=1.0,
            probe_timeout=0.5,
            indirect_timeout=1.0,
            indirect_checks=3,
            suspicion_min=3.0,
            suspicion_max=18.0,
            suspicion_confirmations=3,
            scale_suspicion_with_size=True,
            gossip_interval=0.2,
            gossip_fanout=3,
            gossip_to_dead=30.0,
            retransmit_mult=4.0,
            max_piggyback=8,
            sync_interval=30.0,
            reconnect_interval=5.0,
            dead_retention=3600.0,
            join_retry_interval=2.0,
            leave_drain=2.0,
        )

    @classmethod
    def profile(cls, name: str) -> SwimConfig:
        """Look a profile up by name (``lan``, ``wan``, ``constrained``)."""
        key = name.strip().lower()
        if key == "lan":
            return cls.lan()
        if key in ("wan", "constrained"):
            return cls.wan()
        raise ConfigError(
            f"unknown membership profile {name!r}: expected 'lan', 'wan' or 'constrained'"
        )
