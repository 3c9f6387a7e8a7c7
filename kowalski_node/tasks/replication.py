"""The replication messages of a task record, and how a replica answers one.

The coordination core sends a record to the task's replicas (`ReplicateRecord`); each
merges it into its ledger and answers with `replica_answer`: "fenced" (not ok) means a
newer leader exists and the old one must stop; a terminal state means stop, and a
committed one is adopted instead of running the task again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kowalski_node.tasks.model import TERMINAL_STATES, TaskRecord, TaskState
from kowalski_node.wire import (
    WireError,
    check_type_tag,
    expect_dict,
    get_bool,
    get_int,
    get_str,
)


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
