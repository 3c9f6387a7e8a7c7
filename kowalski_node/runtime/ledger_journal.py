"""The ledger's writes as data: the coordination core records them, the runtime performs them.

The coordination core and its `TaskLedger` write through a `LedgerStore`. In the node
that store is a `LedgerJournal`: a write (`put`, `put_pending`, `delete_pending`) is not
performed, it is appended to the journal as a `LedgerWrite` and seen by the core's own
later reads (an overlay over the durable store). The `TaskEngine` takes the journal after
every core call and performs it on the durable store (`SqliteLedgerStore`) in one
transaction, before it performs any of the call's effects: a message that reflects a
write never leaves before the write is durable, as before, and no storage write runs
inside the core.

Reads the overlay cannot answer still go to the durable store (its LRU cache answers
most of them); docs/cores.md says so.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import assert_never

from kowalski_node.tasks import LedgerStore, PendingSubmit, TaskRecord


@dataclass(frozen=True, slots=True)
class PutRecord:
    """Upsert a whole task record (and index its idempotency key if new)."""

    record: TaskRecord


@dataclass(frozen=True, slots=True)
class PutPending:
    """Store (or replace) the submitter's retry-queue entry of a task."""

    entry: PendingSubmit


@dataclass(frozen=True, slots=True)
class DeletePending:
    """Drop a task's retry-queue entry (a leader took it)."""

    task_id: str


LedgerWrite = PutRecord | PutPending | DeletePending


def perform_write(store: LedgerStore, write: LedgerWrite) -> None:
    """Perform one recorded write on a durable store."""
    match write:
        case PutRecord():
            store.put(write.record)
        case PutPending():
            store.put_pending(write.entry)
        case DeletePending():
            store.delete_pending(write.task_id)
        case _:
            assert_never(write)


class LedgerJournal(LedgerStore):
    """A `LedgerStore` that records writes instead of performing them (see the module)."""

    def __init__(self, durable: LedgerStore) -> None:
        self.durable = durable
        self._writes: list[LedgerWrite] = []
        self._records: dict[str, TaskRecord] = {}
        self._keys: dict[str, str] = {}
        self._pending: dict[str, PendingSubmit | None] = {}  # None: deleted

    def writes(self) -> list[LedgerWrite]:
        """The writes recorded since the last `performed()`, in order."""
        return list(self._writes)

    def performed(self) -> None:
        """The recorded writes are durable now: reads go to the durable store again."""
        self._writes.clear()
        self._records.clear()
        self._keys.clear()
        self._pending.clear()

    # ---------------------------------------------------------------- LedgerStore

    def get(self, task_id: str) -> TaskRecord | None:
        record = self._records.get(task_id)
        return record if record is not None else self.durable.get(task_id)

    def find_by_key(self, idempotency_key: str) -> str | None:
        found = self.durable.find_by_key(idempotency_key)
        return found if found is not None else self._keys.get(idempotency_key)

    def put(self, record: TaskRecord) -> None:
        self._writes.append(PutRecord(record))
        self._records[record.task_id] = record
        self._keys.setdefault(record.idempotency_key, record.task_id)

    def tasks(self) -> Iterator[TaskRecord]:
        merged = {r.task_id: r for r in self.durable.tasks()}
        merged.update(self._records)
        return iter(list(merged.values()))

    def put_pending(self, entry: PendingSubmit) -> None:
        self._writes.append(PutPending(entry))
        self._pending[entry.task_id] = entry

    def delete_pending(self, task_id: str) -> None:
        self._writes.append(DeletePending(task_id))
        self._pending[task_id] = None

    def pending(self) -> list[PendingSubmit]:
        merged = {e.task_id: e for e in self.durable.pending()}
        for task_id, entry in self._pending.items():
            if entry is None:
                merged.pop(task_id, None)
            else:
                merged[task_id] = entry
        return list(merged.values())
