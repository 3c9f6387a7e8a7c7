"""What a leader replicates to whom, and when it has enough acks to acknowledge.

Before a leader acknowledges a task (or moves past a step), the record goes to the
submitter and to the k successors in the election ranking. :class:`ReplicationTracker`
counts acks per (task, epoch, version); a replica that answers "fenced" means a newer
leader exists, and the old leader must stop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from kowalski_node.membership.wire import (
    WireError,
    check_type_tag,
    expect_dict,
    get_bool,
    get_int,
    get_str,
)
from kowalski_node.tasks.model import TERMINAL_STATES, TaskRecord, TaskState


@dataclass(frozen=True, slots=True)
class ReplicationPlan:
    """Send the record to ``targets``; acknowledge once ``needed`` of them have acked."""

    task_id: str
    targets: tuple[str, ...]
    needed: int


def plan_replication(
    task_id: str,
    leader: str,
    submitter: str,
    successors: Sequence[str],
    k: int,
    *,
    quorum: str | int = "all",
) -> ReplicationPlan:
    """Targets = the submitter plus k successors (never the leader; the submitter is not counted in k).

    ``quorum``: "all" (every target must ack), "majority", or an explicit count.
    """
    if k < 0:
        raise ValueError(f"replication factor k must be >= 0, got {k}")
    targets: list[str] = []
    if submitter and submitter != leader:
        targets.append(submitter)
    taken = 0
    for peer in successors:
        if taken >= k:
            break
        if peer == leader or peer in targets:
            continue
        targets.append(peer)
        taken += 1
    if quorum == "all":
        needed = len(targets)
    elif quorum == "majority":
        needed = len(targets) // 2 + 1 if targets else 0
    elif isinstance(quorum, int) and not isinstance(quorum, bool) and quorum >= 0:
        needed = min(quorum, len(targets))
    else:
        raise ValueError(
            f"replication quorum must be 'all', 'majority' or a count >= 0, got {quorum!r}"
        )
    return ReplicationPlan(task_id, tuple(targets), needed)


class ReplicationStatus(StrEnum):
    PENDING = "pending"
    SATISFIED = "satisfied"
    FENCED = "fenced"
    UNKNOWN = "unknown"


@dataclass(slots=True)
class _Pending:
    plan: ReplicationPlan
    epoch: int
    version: int
    acked: set[str] = field(default_factory=set)
    fenced_by: str = ""


class ReplicationTracker:
    """Counts acks for the latest version of each task a leader replicates."""

    def __init__(self) -> None:
        self._pending: dict[str, _Pending] = {}

    def start(self, plan: ReplicationPlan, epoch: int, version: int) -> ReplicationStatus:
        """Begin waiting for acks of (epoch, version); replaces an older round for the task."""
        self._pending[plan.task_id] = _Pending(plan, epoch, version)
        return ReplicationStatus.SATISFIED if plan.needed == 0 else ReplicationStatus.PENDING

    def ack(self, task_id: str, epoch: int, version: int, peer: str, ok: bool) -> ReplicationStatus:
        """Record one replica's answer; acks for older versions of the same epoch still count."""
        p = self._pending.get(task_id)
        if p is None:
            return ReplicationStatus.UNKNOWN
        if not ok:
            p.fenced_by = peer
            return ReplicationStatus.FENCED
        if epoch == p.epoch and version >= p.version and peer in p.plan.targets:
            p.acked.add(peer)
        return self.status(task_id)

    def status(self, task_id: str) -> ReplicationStatus:
        p = self._pending.get(task_id)
        if p is None:
            return ReplicationStatus.UNKNOWN
        if p.fenced_by:
            return ReplicationStatus.FENCED
        return (
            ReplicationStatus.SATISFIED
            if len(p.acked) >= p.plan.needed
            else ReplicationStatus.PENDING
        )

    def missing(self, task_id: str) -> list[str]:
        """Targets that have not acked yet (resend to these)."""
        p = self._pending.get(task_id)
        if p is None:
            return []
        return [t for t in p.plan.targets if t not in p.acked]

    def drop_target(self, task_id: str, peer: str) -> ReplicationStatus:
        """A target died: stop waiting for it (the plan's quorum shrinks with it)."""
        p = self._pending.get(task_id)
        if p is None:
            return ReplicationStatus.UNKNOWN
        if peer in p.plan.targets and peer not in p.acked:
            targets = tuple(t for t in p.plan.targets if t != peer)
            p.plan = ReplicationPlan(task_id, targets, min(p.plan.needed, len(targets)))
        return self.status(task_id)

    def finish(self, task_id: str) -> None:
        self._pending.pop(task_id, None)


@dataclass(frozen=True, slots=True)
class ReplicateRecord:
    """Leader -> replica: store/merge this record."""

    record: TaskRecord

    TAG = "replicate"

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.TAG, "rec": self.record.to_wire()}

    @classmethod
    def from_wire(cls, obj: object) -> ReplicateRecord:
        d = expect_dict(obj, "ReplicateRecord")
        check_type_tag(d, cls.TAG, "ReplicateRecord")
        return cls(TaskRecord.from_wire(d.get("rec")))


@dataclass(frozen=True, slots=True)
class ReplicateAck:
    """Replica -> leader. ``ok`` False: the replica follows a newer epoch (``epoch``/``leader``).

    ``state`` is the replica's state after the merge: when it is terminal (committed,
    failed, cancelled) the leader stops, and a committed one is adopted instead of running
    the task again.
    """

    task_id: str
    epoch: int
    version: int
    ok: bool
    leader: str = ""
    state: TaskState = TaskState.QUEUED

    TAG = "replicate_ack"

    @property
    def committed(self) -> bool:
        return self.state is TaskState.COMMITTED

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def to_wire(self) -> dict[str, Any]:
        return {
            "t": self.TAG,
            "k": self.task_id,
            "e": self.epoch,
            "v": self.version,
            "ok": self.ok,
            "l": self.leader,
            "s": self.state.value,
        }

    @classmethod
    def from_wire(cls, obj: object) -> ReplicateAck:
        what = "ReplicateAck"
        d = expect_dict(obj, what)
        check_type_tag(d, cls.TAG, what)
        state_s = get_str(d, "s", what, default=TaskState.QUEUED.value)
        try:
            state = TaskState(state_s)
        except ValueError:
            raise WireError(f"{what}.s: unknown task state {state_s!r}") from None
        return cls(
            task_id=get_str(d, "k", what, max_len=256, allow_empty=False),
            epoch=get_int(d, "e", what, min_value=0, max_value=2**62),
            version=get_int(d, "v", what, min_value=0, max_value=2**62),
            ok=get_bool(d, "ok", what),
            leader=get_str(d, "l", what, default="", max_len=256),
            state=state,
        )


def replica_answer(sent: TaskRecord, stored: TaskRecord) -> ReplicateAck:
    """How a replica answers after merging ``sent`` into its copy, giving ``stored``.

    Not ok when it already follows a newer epoch, or the same epoch under another leader;
    otherwise ok, reporting its state (terminal means: stop, adopt a commit).
    """
    if stored.epoch > sent.epoch or (stored.epoch == sent.epoch and stored.leader != sent.leader):
        return ReplicateAck(
            sent.task_id, stored.epoch, stored.version, False, stored.leader, stored.state
        )
    return ReplicateAck(sent.task_id, sent.epoch, sent.version, True, sent.leader, stored.state)
