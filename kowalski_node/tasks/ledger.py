"""The task ledger: idempotent submission, fenced writes, commit-once, replica merge.

Every node runs one ledger over its own state (leader, replicas and submitter alike),
held in memory; its writes are recorded as data and made durable by the driver
(``store.py``).
Writes from a leader carry ``(epoch, leader)`` and are fenced against the record:

* an older epoch is STALE; the same epoch from a different leader is a CONFLICT;
* a newer epoch is admitted and raises the record's fence (the lease may not have
  reached this replica yet);
* a commit of an already committed task is refused as DUPLICATE, whatever its epoch,
  and counted in ``rejected_commits``. Executions may repeat; commits may not.

Outcomes are returned (:class:`WriteResult`), not raised: a refused duplicate is an
expected event in a failover, not an error.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, replace
from enum import StrEnum

from kowalski_node.tasks.model import (
    TERMINAL_STATES,
    Checkpoint,
    TaskRecord,
    TaskState,
    commits_conflict,
    merge_records,
)
from kowalski_node.tasks.store import LedgerState

MAX_IDEMPOTENCY_KEY = 256


class WriteOutcome(StrEnum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    """Already applied (same checkpoint again), or a second commit: refused, nothing changed."""
    STALE_EPOCH = "stale_epoch"
    CONFLICT = "conflict"
    REGRESSED = "regressed"
    """A checkpoint step lower than the one stored at the same or a newer epoch."""
    TERMINAL = "terminal"
    """The task is already committed, failed or cancelled."""
    UNKNOWN_TASK = "unknown_task"


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What a fenced write did. ``record`` is the stored record after the call (if the task exists)."""

    outcome: WriteOutcome
    record: TaskRecord | None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome is WriteOutcome.ACCEPTED


@dataclass(frozen=True, slots=True)
class SubmitResult:
    """``created`` is False when the idempotency key was already known (nothing new will run)."""

    record: TaskRecord
    created: bool
    payload_matches: bool = True


@dataclass(slots=True)
class LedgerStats:
    submitted: int = 0
    deduplicated: int = 0
    executions_started: int = 0
    commits: int = 0
    rejected_commits: int = 0
    stale_writes: int = 0
    conflicting_commits_seen: int = 0
    replicas_applied: int = 0


def task_id_for_key(idempotency_key: str) -> str:
    """Task ids derive from the idempotency key, so every node maps a resubmission to the same task."""
    return (
        "t"
        + hashlib.blake2b(
            idempotency_key.encode("utf-8"), digest_size=12, person=b"kowalski-task"
        ).hexdigest()
    )


class TaskLedger:
    """Fenced, idempotent task bookkeeping over a :class:`LedgerState` (in memory; each
    change is recorded there as a write for the driver to make durable)."""

    def __init__(self, state: LedgerState, node_id: str, rng: random.Random) -> None:
        self.state = state
        self.node_id = node_id
        self._rng = rng
        self.stats = LedgerStats()

    # ---------------------------------------------------------------- submission

    def submit(
        self,
        now: float,
        payload: bytes,
        *,
        submitter: str | None = None,
        idempotency_key: str | None = None,
        acceptors: tuple[str, ...] = (),
    ) -> SubmitResult:
        """Record a new task, or return the existing one for a known idempotency key."""
        if idempotency_key is not None:
            if not idempotency_key or len(idempotency_key) > MAX_IDEMPOTENCY_KEY:
                raise ValueError(
                    f"idempotency key must be 1..{MAX_IDEMPOTENCY_KEY} characters, got {len(idempotency_key)}"
                )
            key = idempotency_key
        else:
            key = f"auto-{self.node_id}-{self._rng.getrandbits(128):032x}"
        existing_id = self.state.find_by_key(key)
        task_id = existing_id or task_id_for_key(key)
        existing = self.state.get(task_id)
        if existing is not None:
            self.stats.deduplicated += 1
            return SubmitResult(existing, False, existing.payload == payload)
        record = TaskRecord(
            task_id=task_id,
            idempotency_key=key,
            submitter=submitter if submitter is not None else self.node_id,
            payload=payload,
            created_at=now,
            updated_at=now,
            acceptors=acceptors,
        )
        self.state.put(record)
        self.stats.submitted += 1
        return SubmitResult(record, True)

    def get(self, task_id: str) -> TaskRecord | None:
        return self.state.get(task_id)

    def find(self, idempotency_key: str) -> TaskRecord | None:
        task_id = self.state.find_by_key(idempotency_key)
        return self.state.get(task_id) if task_id is not None else None

    # ---------------------------------------------------------------- fenced writes

    def _fence(self, rec: TaskRecord, epoch: int, leader: str) -> WriteOutcome | None:
        if epoch < 1 or not leader:
            raise ValueError(
                f"task {rec.task_id}: leader writes need an epoch >= 1 and a leader id, got {epoch!r}, {leader!r}"
            )
        if epoch < rec.epoch:
            self.stats.stale_writes += 1
            return WriteOutcome.STALE_EPOCH
        if epoch == rec.epoch and rec.leader and leader != rec.leader:
            self.stats.stale_writes += 1
            return WriteOutcome.CONFLICT
        return None

    def _bump(
        self, rec: TaskRecord, now: float, epoch: int, leader: str, **changes: object
    ) -> TaskRecord:
        version = rec.version + 1 if epoch == rec.epoch else 1
        new = replace(rec, epoch=epoch, leader=leader, version=version, updated_at=now, **changes)  # type: ignore[arg-type]
        self.state.put(new)
        return new

    def lease(
        self, now: float, task_id: str, epoch: int, leader: str, owner: str | None = None
    ) -> WriteResult:
        """A leader claimed the task at ``epoch`` (the first write of every new leader).

        ``owner``: the node granting the lease (it becomes the record's ``submitter``).
        The same epoch and leader from another owner is a CONFLICT: two owners racing
        for one ballot, only the first one an acceptor saw may win it there.
        """
        rec = self.state.get(task_id)
        if rec is None:
            return WriteResult(
                WriteOutcome.UNKNOWN_TASK, None, f"task {task_id} is not in this ledger"
            )
        if rec.terminal:
            return WriteResult(
                WriteOutcome.TERMINAL, rec, f"task {task_id} is already {rec.state.value}"
            )
        refused = self._fence(rec, epoch, leader)
        if refused is None and owner and epoch == rec.epoch and owner != rec.submitter:
            self.stats.stale_writes += 1
            refused = WriteOutcome.CONFLICT
        if refused is not None:
            return WriteResult(refused, rec, _fence_detail(rec, epoch, leader))
        if epoch == rec.epoch:
            return WriteResult(WriteOutcome.ACCEPTED, rec)
        return WriteResult(
            WriteOutcome.ACCEPTED,
            self._bump(
                rec,
                now,
                epoch,
                leader,
                state=TaskState.LEASED,
                submitter=owner or rec.submitter,
            ),
        )

    def start_execution(self, now: float, task_id: str, epoch: int, leader: str) -> WriteResult:
        """The leader starts (or restarts, after a takeover) running the task: executions += 1."""
        rec = self.state.get(task_id)
        if rec is None:
            return WriteResult(
                WriteOutcome.UNKNOWN_TASK, None, f"task {task_id} is not in this ledger"
            )
        if rec.terminal:
            return WriteResult(
                WriteOutcome.TERMINAL, rec, f"task {task_id} is already {rec.state.value}"
            )
        refused = self._fence(rec, epoch, leader)
        if refused is not None:
            return WriteResult(refused, rec, _fence_detail(rec, epoch, leader))
        self.stats.executions_started += 1
        new = self._bump(
            rec, now, epoch, leader, state=TaskState.RUNNING, executions=rec.executions + 1
        )
        return WriteResult(WriteOutcome.ACCEPTED, new)

    def checkpoint(
        self, now: float, task_id: str, epoch: int, leader: str, step: int, snapshot: bytes
    ) -> WriteResult:
        """Store the snapshot after ``step``; refuses older epochs and regressing steps."""
        if step < 0:
            raise ValueError(f"checkpoint step must be >= 0, got {step}")
        rec = self.state.get(task_id)
        if rec is None:
            return WriteResult(
                WriteOutcome.UNKNOWN_TASK, None, f"task {task_id} is not in this ledger"
            )
        if rec.terminal:
            return WriteResult(
                WriteOutcome.TERMINAL, rec, f"task {task_id} is already {rec.state.value}"
            )
        refused = self._fence(rec, epoch, leader)
        if refused is not None:
            return WriteResult(refused, rec, _fence_detail(rec, epoch, leader))
        cur = rec.checkpoint
        if cur is not None:
            if step < cur.step:
                return WriteResult(
                    WriteOutcome.REGRESSED,
                    rec,
                    f"task {task_id}: step {step} < stored step {cur.step} (epoch {cur.epoch})",
                )
            if step == cur.step and epoch == cur.epoch:
                if cur.snapshot == snapshot:
                    return WriteResult(
                        WriteOutcome.DUPLICATE, rec, "this checkpoint is already stored"
                    )
                return WriteResult(
                    WriteOutcome.CONFLICT,
                    rec,
                    f"task {task_id}: a different snapshot for step {step} at epoch {epoch}",
                )
        new = self._bump(rec, now, epoch, leader, checkpoint=Checkpoint(step, epoch, snapshot))
        return WriteResult(WriteOutcome.ACCEPTED, new)

    def commit(
        self, now: float, task_id: str, epoch: int, leader: str, result: bytes
    ) -> WriteResult:
        """Commit the result exactly once. A second commit, from any epoch, is refused and counted."""
        rec = self.state.get(task_id)
        if rec is None:
            return WriteResult(
                WriteOutcome.UNKNOWN_TASK, None, f"task {task_id} is not in this ledger"
            )
        if rec.state is TaskState.COMMITTED:
            self.stats.rejected_commits += 1
            rec = replace(rec, rejected_commits=rec.rejected_commits + 1)
            self.state.put(rec)
            return WriteResult(
                WriteOutcome.DUPLICATE,
                rec,
                f"task {task_id} was already committed by {rec.leader} at epoch {rec.epoch}",
            )
        if rec.terminal:
            return WriteResult(
                WriteOutcome.TERMINAL, rec, f"task {task_id} is already {rec.state.value}"
            )
        refused = self._fence(rec, epoch, leader)
        if refused is not None:
            self.stats.rejected_commits += 1
            rec = replace(rec, rejected_commits=rec.rejected_commits + 1)
            self.state.put(rec)
            return WriteResult(refused, rec, _fence_detail(rec, epoch, leader))
        self.stats.commits += 1
        new = self._bump(
            rec, now, epoch, leader, state=TaskState.COMMITTED, commits=1, result=result, error=None
        )
        return WriteResult(WriteOutcome.ACCEPTED, new)

    def fail(self, now: float, task_id: str, epoch: int, leader: str, error: str) -> WriteResult:
        """Record a final failure (the task itself failed; not a node failure, which is a takeover)."""
        rec = self.state.get(task_id)
        if rec is None:
            return WriteResult(
                WriteOutcome.UNKNOWN_TASK, None, f"task {task_id} is not in this ledger"
            )
        if rec.terminal:
            return WriteResult(
                WriteOutcome.TERMINAL, rec, f"task {task_id} is already {rec.state.value}"
            )
        refused = self._fence(rec, epoch, leader)
        if refused is not None:
            return WriteResult(refused, rec, _fence_detail(rec, epoch, leader))
        new = self._bump(rec, now, epoch, leader, state=TaskState.FAILED, error=error)
        return WriteResult(WriteOutcome.ACCEPTED, new)

    def cancel(self, now: float, task_id: str) -> WriteResult:
        """The submitter cancels; a commit that already happened stands."""
        rec = self.state.get(task_id)
        if rec is None:
            return WriteResult(
                WriteOutcome.UNKNOWN_TASK, None, f"task {task_id} is not in this ledger"
            )
        if rec.terminal:
            return WriteResult(
                WriteOutcome.TERMINAL, rec, f"task {task_id} is already {rec.state.value}"
            )
        new = replace(rec, state=TaskState.CANCELLED, version=rec.version + 1, updated_at=now)
        self.state.put(new)
        self.state.delete_pending(task_id)
        return WriteResult(WriteOutcome.ACCEPTED, new)

    # ---------------------------------------------------------------- replication

    def apply_replica(self, now: float, incoming: TaskRecord) -> TaskRecord:
        """Merge a replicated copy into ours (idempotent, order-free). Returns the stored result."""
        cur = self.state.get(incoming.task_id)
        if cur is None:
            self.state.put(incoming)
            self.stats.replicas_applied += 1
            return incoming
        if commits_conflict(cur, incoming):
            self.stats.conflicting_commits_seen += 1
        merged = merge_records(cur, incoming)
        if merged != cur:
            self.state.put(merged)
            self.stats.replicas_applied += 1
        return merged

    def unfinished(self) -> list[TaskRecord]:
        """Tasks not yet committed, failed or cancelled (restart recovery, takeover scans)."""
        return [r for r in self.state.tasks() if r.state not in TERMINAL_STATES]


def _fence_detail(rec: TaskRecord, epoch: int, leader: str) -> str:
    return (
        f"task {rec.task_id}: write from {leader} at epoch {epoch} refused; "
        f"the record is at epoch {rec.epoch} led by {rec.leader or 'nobody'}"
    )
