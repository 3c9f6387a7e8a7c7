"""The ledger's state in memory, its writes as data, and the durable store port.

The ledger never calls storage. Its state (`LedgerState`: every task record, the
idempotency-key index, the submitter's retry queue) lives in memory, loaded once when the
node starts from a `LedgerSnapshot` that the driver reads from its durable store. Every
change is one whole-record upsert (or one retry-queue entry) and is also recorded as a
`LedgerWrite`; the coordination core returns the recorded writes at the head of its
effect list, and the driver performs them on its `LedgerStore` (one transaction per core
call) before any other effect of that call: a message that reflects a write leaves only
once the write is durable. The node's store is SQLite (`adapters/sqlite_store.py`); the
simulator and the test drivers use `InMemoryLedgerStore`, through the same glue
(`glue.perform_ledger_writes`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import assert_never

from kowalski_node.tasks.model import TaskRecord


@dataclass(frozen=True, slots=True)
class PendingSubmit:
    """A task the submitter still has to hand to a leader (durable queue entry)."""

    task_id: str
    next_attempt_at: float
    attempts: int = 0
    last_error: str = ""


@dataclass(frozen=True, slots=True)
class PutRecord:
    """Upsert a whole task record (and index its idempotency key if the key is new)."""

    record: TaskRecord


@dataclass(frozen=True, slots=True)
class PutPending:
    """Store (or replace) the submitter's retry-queue entry of a task."""

    entry: PendingSubmit


@dataclass(frozen=True, slots=True)
class DeletePending:
    """Drop a task's retry-queue entry (a leader took it, or it was cancelled)."""

    task_id: str


LedgerWrite = PutRecord | PutPending | DeletePending
LEDGER_WRITE_TYPES = (PutRecord, PutPending, DeletePending)


@dataclass(frozen=True, slots=True)
class LedgerSnapshot:
    """Everything a durable store holds for the ledger, read once at start.

    Orders are the stores' insertion orders (the ledger's iteration order, which the
    coordination core's recovery does not depend on: it sorts)."""

    records: tuple[TaskRecord, ...] = ()
    keys: tuple[tuple[str, str], ...] = ()
    """(idempotency key, task id): the first task stored with a key keeps it."""
    pending: tuple[PendingSubmit, ...] = ()


class LedgerStore(ABC):
    """The durable side of a ledger (a port): read once at start, then only written.

    * ``load`` returns everything stored (a restarted node rebuilds its ledger from it);
    * ``apply`` performs a call's writes in order, atomically, and is durable when it
      returns (SQLite: one transaction). If it raises, none of them is durable and the
      caller must not perform the effects that followed them.
    """

    @abstractmethod
    def load(self) -> LedgerSnapshot: ...

    @abstractmethod
    def apply(self, writes: Sequence[LedgerWrite]) -> None: ...


@dataclass(slots=True)
class _Tables:
    """The three tables, as dicts (insertion-ordered, so iteration is deterministic)."""

    records: dict[str, TaskRecord] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    pending: dict[str, PendingSubmit] = field(default_factory=dict)

    @classmethod
    def of(cls, snapshot: LedgerSnapshot) -> _Tables:
        return cls(
            {r.task_id: r for r in snapshot.records},
            dict(snapshot.keys),
            {e.task_id: e for e in snapshot.pending},
        )

    def snapshot(self) -> LedgerSnapshot:
        return LedgerSnapshot(
            tuple(self.records.values()),
            tuple(self.keys.items()),
            tuple(self.pending.values()),
        )

    def perform(self, write: LedgerWrite) -> None:
        match write:
            case PutRecord(record):
                self.records[record.task_id] = record
                self.keys.setdefault(record.idempotency_key, record.task_id)
            case PutPending(entry):
                self.pending[entry.task_id] = entry
            case DeletePending(task_id):
                self.pending.pop(task_id, None)
            case _:
                assert_never(write)


class LedgerState:
    """The ledger's state in memory; every change is also recorded as a `LedgerWrite`.

    Holds every task record whole (payload, checkpoint, result): the ledger merges,
    answers queries and deduplicates resubmissions from them. docs/cores.md says what
    that costs in memory."""

    __slots__ = ("_tables", "_writes")

    def __init__(self, snapshot: LedgerSnapshot | None = None) -> None:
        self._tables = _Tables.of(snapshot) if snapshot is not None else _Tables()
        self._writes: list[LedgerWrite] = []

    def take_writes(self) -> list[LedgerWrite]:
        """The writes recorded since the last call, in order (the core returns them)."""
        writes, self._writes = self._writes, []
        return writes

    def snapshot(self) -> LedgerSnapshot:
        """What a durable store that performed every write taken so far holds."""
        return self._tables.snapshot()

    def get(self, task_id: str) -> TaskRecord | None:
        return self._tables.records.get(task_id)

    def find_by_key(self, idempotency_key: str) -> str | None:
        return self._tables.keys.get(idempotency_key)

    def put(self, record: TaskRecord) -> None:
        self._write(PutRecord(record))

    def tasks(self) -> Iterator[TaskRecord]:
        return iter(list(self._tables.records.values()))

    def put_pending(self, entry: PendingSubmit) -> None:
        self._write(PutPending(entry))

    def delete_pending(self, task_id: str) -> None:
        self._write(DeletePending(task_id))

    def pending(self) -> list[PendingSubmit]:
        return list(self._tables.pending.values())

    def __len__(self) -> int:
        return len(self._tables.records)

    def _write(self, write: LedgerWrite) -> None:
        self._tables.perform(write)
        self._writes.append(write)


class InMemoryLedgerStore(LedgerStore):
    """A durable store in memory, for the simulator and tests: it survives a simulated
    restart because the driver keeps the object while it replaces the node's cores."""

    def __init__(self) -> None:
        self._tables = _Tables()

    def load(self) -> LedgerSnapshot:
        return self._tables.snapshot()

    def apply(self, writes: Sequence[LedgerWrite]) -> None:
        for write in writes:
            self._tables.perform(write)

    def get(self, task_id: str) -> TaskRecord | None:
        """What is stored for a task (the simulator's end-of-run checkers read it)."""
        return self._tables.records.get(task_id)

    def tasks(self) -> Iterable[TaskRecord]:
        return list(self._tables.records.values())

    def pending(self) -> list[PendingSubmit]:
        return list(self._tables.pending.values())

    def __len__(self) -> int:
        return len(self._tables.records)
