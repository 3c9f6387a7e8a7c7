"""Timing and replication parameters of the coordination protocol."""

from __future__ import annotations

from dataclasses import dataclass

from kowalski_node.errors import ConfigError


@dataclass(frozen=True, slots=True)
class CoordConfig:
    """Seconds unless stated. Defaults suit a LAN (round trips of a few ms)."""

    replicas: int = 2
    """k: successors in the ranking that receive the record and every checkpoint."""
    lease_ttl: float = 1.5
    """Owner side: a leader not heard from (checkpoint, heartbeat, commit) for this long is replaced."""
    heartbeat_interval: float = 0.25
    """Leader side: send a heartbeat when nothing went to the owner for this long."""
    offer_retry: float = 0.1
    """Resend an unanswered offer this often."""
    offer_timeout: float = 0.5
    """Give up on an unanswered offer after this long and offer the next candidate."""
    ack_retry: float = 0.1
    """Resend a checkpoint to targets that have not acknowledged it this often."""
    replica_ack_wait: float = 0.2
    """Replica acks are best effort: go on without the missing ones after this long."""
    commit_retry: float = 0.1
    """First commit retry delay; doubles up to ``commit_retry_max``; retried until answered."""
    commit_retry_max: float = 2.0
    query_timeout: float = 0.1
    """Before a failover, wait this long at most for replicas to report their copies."""
    replicate_attempts: int = 5
    """The owner pushes a committed record to the replicas at most this many times."""
    takeover_grace: float = 1.0
    """An acceptor takes over a dead owner's tasks this long after the verdict, if the owner
    is still down then (a refuted false verdict costs nothing; one that is not costs a
    ballot, since the running leader keeps its run)."""
    reform_grace: float = 0.5
    """An owner re-forms the acceptor sets of its running tasks this long after a member's
    death verdict. Until then a second death among the task's acceptors leaves no majority
    (the task waits for one to return), so this is short: re-forming keeps the leader's run
    and costs one ballot (two rounds), also when the verdict was false."""
    takeover_stagger: float = 0.5
    """The next live acceptor (in the recorded order) takes over only if the task is still
    orphaned this long after the previous one's turn. Two acceptors whose membership
    views differ can each believe the other goes first; a duel is safe (ballots), so
    this is short: it bounds that wait (it was ``lease_ttl``, and cost up to 1.5 s)."""

    def __post_init__(self) -> None:
        if self.replicas < 0 or self.replicas > 16:
            raise ConfigError(f"coordination.replicas must be within 0..16, got {self.replicas}")
        positive = (
            "lease_ttl",
            "heartbeat_interval",
            "offer_retry",
            "offer_timeout",
            "ack_retry",
            "commit_retry",
            "commit_retry_max",
            "query_timeout",
            "takeover_grace",
            "takeover_stagger",
            "reform_grace",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"coordination.{name} must be > 0, got {getattr(self, name)}")
        if self.replica_ack_wait < 0 or self.replicate_attempts < 1:
            raise ConfigError(
                "coordination: replica_ack_wait must be >= 0 and replicate_attempts >= 1"
            )
        if self.heartbeat_interval * 2 > self.lease_ttl:
            raise ConfigError(
                f"coordination.heartbeat_interval ({self.heartbeat_interval}) must be at most half "
                f"of lease_ttl ({self.lease_ttl})"
            )
        if self.commit_retry_max < self.commit_retry:
            raise ConfigError("coordination.commit_retry_max must be >= commit_retry")

    @classmethod
    def lan(cls) -> CoordConfig:
        return cls()

    @classmethod
    def wan(cls) -> CoordConfig:
        return cls(
            lease_ttl=15.0,
            heartbeat_interval=2.5,
            offer_retry=1.0,
            offer_timeout=5.0,
            ack_retry=1.0,
            replica_ack_wait=2.0,
            commit_retry=1.0,
            commit_retry_max=20.0,
            query_timeout=1.0,
            takeover_grace=15.0,
            takeover_stagger=5.0,
            reform_grace=5.0,
        )
