"""Pure task ledger: idempotency keys, fenced writes, commit-once, checkpoints, replication.

Public API: :class:`TaskLedger` (with :class:`WriteResult`/:class:`WriteOutcome`,
:class:`SubmitResult`), :class:`TaskRecord`/:class:`Checkpoint`/:class:`TaskState` and
:func:`merge_records`, the storage interface :class:`LedgerStore` with
:class:`InMemoryLedgerStore`, :class:`SubmitQueue`/:class:`RetryPolicy` (durable retries),
and the replication messages :class:`ReplicateRecord`, :class:`ReplicateAck` with
:func:`replica_answer`.
"""

from kowalski_node.tasks.ledger import (
    LedgerStats,
    SubmitResult,
    TaskLedger,
    WriteOutcome,
    WriteResult,
    task_id_for_key,
)
from kowalski_node.tasks.model import (
    TERMINAL_STATES,
    Checkpoint,
    TaskRecord,
    TaskState,
    commits_conflict,
    merge_records,
)
from kowalski_node.tasks.queue import RetryPolicy, SubmitQueue
from kowalski_node.tasks.replication import (
    ReplicateAck,
    ReplicateRecord,
    replica_answer,
)
from kowalski_node.tasks.store import InMemoryLedgerStore, LedgerStore, PendingSubmit

__all__ = [
    "TERMINAL_STATES",
    "Checkpoint",
    "InMemoryLedgerStore",
    "LedgerStats",
    "LedgerStore",
    "PendingSubmit",
    "ReplicateAck",
    "ReplicateRecord",
    "RetryPolicy",
    "SubmitQueue",
    "SubmitResult",
    "TaskLedger",
    "TaskRecord",
    "TaskState",
    "WriteOutcome",
    "WriteResult",
    "commits_conflict",
    "merge_records",
    "replica_answer",
    "task_id_for_key",
]
