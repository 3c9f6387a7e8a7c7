"""The ledger's storage interface, and an in-memory implementation.

Deliberately small so that a SQLite adapter (``kowalski_node/adapters``) is a thin layer:
two tables (tasks, pending submits) and an index on the idempotency key. Every method is
a single atomic operation; the ledger never needs a multi-statement transaction because
each change is one whole-record upsert.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

from kowalski_node.tasks.model import TaskRecord


@dataclass(frozen=True, slots=True)
class PendingSubmit:
    """A task the submitter still has to hand to a leader (durable queue entry)."""

    task_id: str
    next_attempt_at: float
    attempts: int = 0
    last_error: str = ""


class LedgerStore(ABC):
    """Durable storage for task records and the submitter's pending queue.

    Contract for implementations:

    * ``put`` is an upsert of the whole record and must be durable when it returns
      (SQLite: one transaction per call); it also maintains the idempotency-key index.
    * ``find_by_key`` returns the task id stored for an idempotency key, if any.
    * ``tasks`` iterates over all records (order unspecified; used on restart and for status).
    * the pending-submit methods keep the retry queue across restarts.
    """

    @abstractmethod
    def get(self, task_id: str) -> TaskRecord | None: ...

    @abstractmethod
    def find_by_key(self, idempotency_key: str) -> str | None: ...

    @abstractmethod
    def put(self, record: TaskRecord) -> None: ...

    @abstractmethod
    def tasks(self) -> Iterator[TaskRecord]: ...

    @abstractmethod
    def put_pending(self, entry: PendingSubmit) -> None: ...

    @abstractmethod
    def delete_pending(self, task_id: str) -> None: ...

    @abstractmethod
    def pending(self) -> list[PendingSubmit]: ...


class InMemoryLedgerStore(LedgerStore):
    """Dict-backed store for tests and the simulator (a "restart" keeps the object)."""

    def __init__(self) -> None:
        self._tasks: dict[str, TaskRecord] = {}
        self._by_key: dict[str, str] = {}
        self._pending: dict[str, PendingSubmit] = {}

    def get(self, task_id: str) -> TaskRecord | None:
        return self._tasks.get(task_id)

    def find_by_key(self, idempotency_key: str) -> str | None:
        return self._by_key.get(idempotency_key)

    def put(self, record: TaskRecord) -> None:
        self._tasks[record.task_id] = record
        self._by_key.setdefault(record.idempotency_key, record.task_id)

    def tasks(self) -> Iterator[TaskRecord]:
        return iter(list(self._tasks.values()))

    def put_pending(self, entry: PendingSubmit) -> None:
        self._pending[entry.task_id] = entry

    def delete_pending(self, task_id: str) -> None:
        self._pending.pop(task_id, None)

    def pending(self) -> list[PendingSubmit]:
        return list(self._pending.values())

    def __len__(self) -> int:
        return len(self._tasks)
