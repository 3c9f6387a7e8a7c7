"""Per-task leases with strictly increasing fencing epochs, and the takeover rules.

Nobody coordinates: every node ranks the live capable peers for a task with weighted
rendezvous hashing and applies the same rules to the leases it has heard of.

* A valid lease (``now < expires_at``) held by a peer that is not down is followed.
* A lease *lapses* when it expires, or as soon as membership declares its holder down.
* After a lapse, the best-ranked eligible candidate claims with ``epoch + 1``; candidate
  number r (0-based, suspects skipped) waits ``r * claim_stagger`` first, so a successor
  takes over when the one above it is unreachable too.
* A holder renews its lease while it leads; stale or conflicting claims are ignored.

Leases travel as (epoch, holder, remaining ttl) so skewed clocks do not matter: every
node converts the remaining ttl to its own clock on receipt. Safety never depends on
leases, only liveness does: writes are fenced by epoch (:mod:`.fencing`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from kowalski_node.election.hashing import rank_candidates
from kowalski_node.errors import ConfigError
from kowalski_node.membership.wire import check_type_tag, expect_dict, get_float, get_int, get_str


@dataclass(frozen=True, slots=True)
class ElectionConfig:
    """Lease timing (seconds) and the replication factor k."""

    lease_ttl: float = 0.5
    """How long a claim or renewal is valid without another renewal."""
    renew_interval: float = 0.15
    """How often a leader renews (must be well under ``lease_ttl``)."""
    claim_stagger: float = 0.2
    """Extra wait per rank before a lower-ranked candidate claims a lapsed lease."""
    replicas: int = 2
    """k: successors that receive the task record and every checkpoint."""

    def __post_init__(self) -> None:
        if self.lease_ttl <= 0 or self.renew_interval <= 0 or self.claim_stagger < 0:
            raise ConfigError(
                "election: lease_ttl and renew_interval must be > 0, claim_stagger >= 0"
            )
        if self.renew_interval >= self.lease_ttl:
            raise ConfigError(
                f"election.renew_interval ({self.renew_interval}) must be < lease_ttl ({self.lease_ttl})"
            )
        if self.replicas < 0:
            raise ConfigError(f"election.replicas must be >= 0, got {self.replicas}")

    @classmethod
    def lan(cls) -> ElectionConfig:
        return cls()

    @classmethod
    def wan(cls) -> ElectionConfig:
        return cls(lease_ttl=5.0, renew_interval=1.5, claim_stagger=2.0, replicas=2)


@dataclass(frozen=True, slots=True)
class Lease:
    """Holder ``holder`` leads ``task_id`` at ``epoch`` until ``expires_at`` (local clock)."""

    task_id: str
    holder: str
    epoch: int
    expires_at: float

    TAG = "lease"

    def to_wire(self, now: float) -> dict[str, Any]:
        """Encode with the *remaining* ttl, so the receiver's clock offset does not matter."""
        return {
            "t": self.TAG,
            "k": self.task_id,
            "h": self.holder,
            "e": self.epoch,
            "ttl": max(0.0, self.expires_at - now),
        }

    @classmethod
    def from_wire(cls, obj: object, now: float) -> Lease:
        what = "Lease"
        d = expect_dict(obj, what)
        check_type_tag(d, cls.TAG, what)
        return cls(
            task_id=get_str(d, "k", what, max_len=256, allow_empty=False),
            holder=get_str(d, "h", what, max_len=256, allow_empty=False),
            epoch=get_int(d, "e", what, min_value=1, max_value=2**62),
            expires_at=now + get_float(d, "ttl", what, min_value=0.0, max_value=3600.0),
        )


@dataclass(frozen=True, slots=True)
class Lead:
    """We lead the task at ``epoch``. ``claimed``: this call made a new claim (replicate it first)."""

    task_id: str
    epoch: int
    lease: Lease
    claimed: bool


@dataclass(frozen=True, slots=True)
class Follow:
    """Another peer holds a valid lease."""

    task_id: str
    leader: str
    epoch: int


@dataclass(frozen=True, slots=True)
class Await:
    """No valid lease; ``expected`` should claim. Decide again at ``until``."""

    task_id: str
    expected: str
    until: float


@dataclass(frozen=True, slots=True)
class NoCandidate:
    """Nobody live is capable of leading this task; ``reason`` says why."""

    task_id: str
    reason: str


Decision = Lead | Follow | Await | NoCandidate


class LeaderElection:
    """One node's view of the leases of the tasks it takes part in."""

    def __init__(self, me: str, config: ElectionConfig | None = None) -> None:
        self.me = me
        self.config = config or ElectionConfig()
        self._leases: dict[str, Lease] = {}
        self._first_seen: dict[str, float] = {}
        self._lapsed_at: dict[str, float] = {}
        self.claims = 0

    def current(self, task_id: str) -> Lease | None:
        """The freshest lease we know for the task (maybe expired)."""
        return self._leases.get(task_id)

    def observe(self, now: float, lease: Lease) -> bool:
        """Learn about a claim or renewal. Returns True if it replaced what we knew.

        Higher epochs win; at the same epoch only the same holder can extend its lease
        (the first claim of an epoch wins, a concurrent claim of it is a conflict).
        """
        cur = self._leases.get(lease.task_id)
        self._first_seen.setdefault(lease.task_id, now)
        if cur is None or lease.epoch > cur.epoch:
            self._leases[lease.task_id] = lease
            self._lapsed_at.pop(lease.task_id, None)
            return True
        if (
            lease.epoch == cur.epoch
            and lease.holder == cur.holder
            and lease.expires_at > cur.expires_at
        ):
            self._leases[lease.task_id] = lease
            return True
        return False

    def decide(
        self,
        now: float,
        task_id: str,
        candidates: Mapping[str, float],
        *,
        suspected: Collection[str] = (),
        down: Collection[str] = (),
    ) -> Decision:
        """Apply the lease rules. ``candidates``: live capable peers -> capability weight.

        ``suspected`` and ``down`` come from membership: suspects keep their lease until it
        expires but are skipped as claimants; a down holder's lease lapses at once.
        """
        first = self._first_seen.setdefault(task_id, now)
        lease = self._leases.get(task_id)
        if lease is not None and now < lease.expires_at and lease.holder not in down:
            if lease.holder == self.me:
                return Lead(task_id, lease.epoch, lease, False)
            return Follow(task_id, lease.holder, lease.epoch)
        if lease is None:
            lapse = first
        else:
            lapse = self._lapsed_at.setdefault(task_id, min(now, lease.expires_at))
        ranking = [
            p for p in rank_candidates(task_id, candidates) if p not in suspected and p not in down
        ]
        if not ranking:
            if not candidates:
                return NoCandidate(task_id, "no live peer is capable of leading this task")
            return NoCandidate(task_id, "every capable peer is suspected or down")
        try:
            my_rank = ranking.index(self.me)
        except ValueError:
            my_rank = -1
        stagger = self.config.claim_stagger
        if my_rank >= 0 and now >= lapse + my_rank * stagger:
            return self._claim(now, task_id, lease)
        # Who should be claiming by now? The lowest rank whose turn has come.
        turns = int((now - lapse) / stagger) if stagger > 0 else len(ranking)
        expected = ranking[min(max(turns, 0), len(ranking) - 1)]
        if my_rank >= 0:
            until = lapse + my_rank * stagger
        else:
            until = now + (stagger if stagger > 0 else self.config.renew_interval)
        return Await(task_id, expected, until)

    def _claim(self, now: float, task_id: str, prev: Lease | None) -> Lead:
        epoch = (prev.epoch if prev is not None else 0) + 1
        lease = Lease(task_id, self.me, epoch, now + self.config.lease_ttl)
        self._leases[task_id] = lease
        self._lapsed_at.pop(task_id, None)
        self.claims += 1
        return Lead(task_id, epoch, lease, True)

    def renew(self, now: float, task_id: str) -> Lease | None:
        """Extend our own still-valid lease; ``None`` if we no longer hold a valid one."""
        lease = self._leases.get(task_id)
        if lease is None or lease.holder != self.me or now >= lease.expires_at:
            return None
        renewed = Lease(task_id, self.me, lease.epoch, now + self.config.lease_ttl)
        self._leases[task_id] = renewed
        return renewed

    def release(self, now: float, task_id: str) -> Lease | None:
        """Hand over gracefully (drain): expire our lease now so the next candidate claims at once."""
        lease = self._leases.get(task_id)
        if lease is None or lease.holder != self.me:
            return None
        released = Lease(task_id, self.me, lease.epoch, now)
        self._leases[task_id] = released
        self._lapsed_at[task_id] = now
        return released

    def needs_renewal(self, now: float, task_id: str) -> bool:
        """True when we hold the lease and the renewal interval has passed since it was last extended."""
        lease = self._leases.get(task_id)
        if lease is None or lease.holder != self.me or now >= lease.expires_at:
            return False
        return lease.expires_at - now <= self.config.lease_ttl - self.config.renew_interval

    def led_by_me(self, now: float) -> list[str]:
        """Tasks for which we hold a valid lease."""
        return [
            t
            for t, lease in self._leases.items()
            if lease.holder == self.me and now < lease.expires_at
        ]

    def forget(self, task_id: str) -> None:
        """Drop a finished task."""
        self._leases.pop(task_id, None)
        self._first_seen.pop(task_id, None)
        self._lapsed_at.pop(task_id, None)
