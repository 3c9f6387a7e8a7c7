"""Volatile per-task state of the coordination core (lost on restart by design).

Everything durable lives in the task ledger; these records only say what this node is
currently waiting for, and are rebuilt from the ledger by ``Coordinator.recover``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

from kowalski_node.coordination.spec import TaskSpec


class OwnerPhase(StrEnum):
    QUEUED = "queued"
    """No live candidate; the SubmitQueue retries with backoff."""
    OFFERING = "offering"
    """An offer is out at ``epoch``; waiting for the candidate's answer."""
    LEASED = "leased"
    """``leader`` runs the task; its lease is renewed by every message it sends."""
    QUERYING = "querying"
    """Failing over: asking replicas for their copies before offering the next candidate."""
    PREPARING = "preparing"
    """A lease at ``epoch`` is out to the acceptors; a majority must promise it first."""
    DONE = "done"


class LeaderPhase(StrEnum):
    RUNNING = "running"
    """The driver is running a step."""
    ACKING = "acking"
    """A step's checkpoint is out; waiting for the owner (and, bounded, the replicas)."""
    FINALIZING = "finalizing"
    """The result is out as a final checkpoint; waiting for a majority of the acceptors."""
    COMMITTING = "committing"
    """The result is out; retrying the commit until the owner answers."""


@dataclass(slots=True)
class Owned:
    """A task this node owns (it was submitted here)."""

    task_id: str
    spec: TaskSpec
    phase: OwnerPhase = OwnerPhase.QUEUED
    epoch: int = 0
    leader: str = ""
    replicas: tuple[str, ...] = ()
    may_fail: bool = True
    """Only a fresh submission may fail for lack of a capable peer; recovered tasks wait."""
    failover: bool = False
    revivable: bool = False
    """The failover came from a lapsed lease: a word from the old leader cancels it."""
    known_epoch: int = 0
    excluded: set[str] = field(default_factory=set)
    query_pending: set[str] = field(default_factory=set)
    acceptors: tuple[str, ...] = ()
    """Who must promise a lease (the record's quorum set)."""
    next_acceptors: tuple[str, ...] = ()
    """The acceptor set this ballot installs (a dead member replaced, or a staged set
    found pending); empty: none."""
    joint: bool = False
    """This ballot's promises must come from a majority of `acceptors` *and* of
    `next_acceptors` (a pending staged set may have won: its members may hold state)."""
    installing: bool = False
    """Round two is out: the merged record staging `next_acceptors` goes to both sets
    (a majority of each must store it) before the new set is used alone."""
    promised: set[str] = field(default_factory=set)
    prepare_refused: set[str] = field(default_factory=set)
    prepare_deadline: float = math.inf
    prepare_attempts: int = 0
    lease_expires: float = math.inf
    offer_deadline: float = math.inf
    resend_at: float = math.inf
    query_deadline: float = math.inf
    queued_reported: bool = False
    keep_leader: str = ""
    """A ballot that is not about the leader (a takeover after the owner died, a
    re-formed acceptor set) offers the task to this running leader again if it is
    still a live candidate: it keeps its run (`Coordinator._keep_run`)."""
    wake: float = math.inf

    def next_wake(self) -> float:
        if self.phase is OwnerPhase.OFFERING:
            return min(self.offer_deadline, self.resend_at)
        if self.phase is OwnerPhase.LEASED:
            return self.lease_expires
        if self.phase is OwnerPhase.QUERYING:
            return self.query_deadline
        if self.phase is OwnerPhase.PREPARING:
            return min(self.prepare_deadline, self.resend_at)
        return math.inf


@dataclass(slots=True)
class Led:
    """A task this node leads at ``epoch``."""

    task_id: str
    epoch: int
    owner: str
    replicas: tuple[str, ...]
    phase: LeaderPhase = LeaderPhase.RUNNING
    step: int = 0
    owner_down: bool = False
    owner_acked: bool = False
    pending: set[str] = field(default_factory=set)
    checkpoint: bytes = b""
    replica_deadline: float = math.inf
    resend_at: float = math.inf
    last_owner_send: float = 0.0
    result: bytes | None = None
    error: str | None = None
    commit_at: float = math.inf
    commit_delay: float = 0.0
    commit_sends: int = 0
    acceptors: tuple[str, ...] = ()
    """Who must store the final result before the commit (majority)."""
    final_acked: set[str] = field(default_factory=set)
    awaiting_ballot: float = math.inf
    """A newer ballot fenced this run's writes, and it may name this node as its leader
    again (a takeover, a re-formed set: its offer follows the promises): until then the
    run is not aborted; if no such offer comes, it is aborted at this time."""
    run_epoch: int = 0
    """The epoch the driver's run was started at (`StartRun`): a re-offer to this same
    leader at a newer ballot moves ``epoch`` on and keeps the run, so the driver's
    reports and ``ContinueRun``/``AbortRun`` keep naming this one."""
    wake: float = math.inf

    def __post_init__(self) -> None:
        if not self.run_epoch:
            self.run_epoch = self.epoch


@dataclass(slots=True)
class Push:
    """The owner spreading a committed record to the replicas (best effort, bounded)."""

    task_id: str
    targets: set[str]
    attempts: int = 0
    wake: float = math.inf
