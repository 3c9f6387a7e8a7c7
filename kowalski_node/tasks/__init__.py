"""Pure task ledger: idempotency keys, fenced writes, commit-once, checkpoints, replication.

Public API: :class:`TaskLedger` (with :class:`WriteResult`/:class:`WriteOutcome`,
:class:`SubmitResult`), :class:`TaskRecord`/:class:`Checkpoint`/:class:`TaskState` and
:func:`merge_records`, the in-memory :class:`LedgerState` whose changes are recorded
as :data:`LedgerWrite` effects (:class:`PutRecord`, :class:`PutPending`,
:class:`DeletePending`), the durable store port :class:`LedgerStore` (read once as a
:class:`LedgerSnapshot`) with :class:`InMemoryLedgerStore`, :class:`SubmitQueue`/:class:`RetryPolicy` (durable retries),
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
from kowalski_node.tasks.store import (
    LEDGER_WRITE_TYPES,
    DeletePending,
    InMemoryLedgerStore,
    LedgerSnapshot,
    LedgerState,
    LedgerStore,
    LedgerWrite,
    PendingSubmit,
    PutPending,
    PutRecord,
)

__all__ = [
    "LEDGER_WRITE_TYPES",
    "TERMINAL_STATES",
    "Checkpoint",
    "DeletePending",
    "InMemoryLedgerStore",
    "LedgerSnapshot",
    "LedgerState",
    "LedgerStats",
    "LedgerStore",
    "LedgerWrite",
    "PendingSubmit",
    "PutPending",
    "PutRecord",
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
