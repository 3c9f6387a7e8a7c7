"""Counters of the coordination protocol (exposed in status and /metrics, checked by the simulator)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class CoordStats:
    # owner side
    submitted: int = 0
    deduplicated: int = 0
    offers_sent: int = 0
    offer_timeouts: int = 0
    offers_refused: int = 0
    leader_changes: int = 0
    failovers: int = 0
    lease_lapses: int = 0
    lapses_revived: int = 0
    abandons: int = 0
    queued: int = 0
    commits: int = 0
    """Commits accepted by this owner (at most one per task)."""
    commit_retries: int = 0
    """A leader retried a commit that was already accepted (its reply was lost): answered again."""
    duplicate_commits_refused: int = 0
    fenced_commits: int = 0
    failed: int = 0
    takeovers: int = 0
    """Tasks this acceptor took over because their owner was down."""
    reformations: int = 0
    """Acceptor sets this owner re-formed (a dead member replaced through a ballot)."""
    yields: int = 0
    """Tasks this node stopped owning because another owner holds a newer ballot."""
    prepares_sent: int = 0
    prepare_refusals: int = 0
    prepare_timeouts: int = 0
    no_quorum_refusals: int = 0
    """Submissions refused because too few of their acceptors were reachable."""
    # any storage role
    promises: int = 0
    fenced_checkpoints: int = 0
    # leader side
    runs_started: int = 0
    """Executions: every StartRun, first runs and resumes alike."""
    resumes: int = 0
    results_adopted: int = 0
    """Offers that carried a finished result (final checkpoint): committed without running."""
    offers_declined: int = 0
    checkpoints_sent: int = 0
    replica_acks_missed: int = 0
    heartbeats_sent: int = 0
    commit_resends: int = 0
    final_resends: int = 0
    commits_acknowledged: int = 0
    fenced_aborts: int = 0
    aborts: int = 0
    runs_kept: int = 0
    """Re-offers at a newer ballot (a takeover, a re-formed acceptor set) to the leader
    already running the task: the run went on instead of restarting its step."""

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
