"""`SqliteLedgerStore`: the task ledger's durable storage, plus the node's own small tables.

One SQLite file per node (`<data-dir>/node.db`). Tables:

* `tasks` — whole `TaskRecord`s (msgpack of `to_wire()`), with the columns list queries
  need (state, created/updated time) pulled out;
* `idem_keys` — idempotency key → task id (first writer wins, as in the in-memory store);
* `pending` — the submitter's durable retry queue (`PendingSubmit`);
* `aliases` — client-chosen task ids → ledger task ids;
* `task_info` — the runtime's per-task metadata (a JSON object: fingerprint, priority,
  which peers did what), `history` — an append-only log of what each peer did;
* `kv` — counters and small values that must survive a restart (advert version,
  membership incarnation, totals); `blobs` — other durable per-task state by name
  (e.g. the coordination core's owner state).

Durability choice: WAL journal with `synchronous=NORMAL` by default. In WAL mode a commit
with NORMAL is durable against the process dying at any point (SIGKILL, crash: the WAL is
in the OS page cache and is replayed on open); only an OS crash or power cut can lose the
last few commits. FULL adds an fsync per commit (~1-10 ms on ordinary disks), which would
cap acceptance far below 2,000 tasks/s, and the case it covers (power loss) is already
covered by replication: every task record lives on the submitter and on k successors.
`synchronous="FULL"` is available for single-device deployments that want it.

The ledger reads this store once, when the node starts (`load`: every record, key and
retry-queue entry); after that its state lives in the coordination core's memory and
only its writes come here (`apply`: the writes of one core call in one transaction,
before any message of that call leaves). Every call runs on the caller's thread and is
quick (no fsync); `batch()` groups many writes into one transaction (batch submissions:
one commit for thousands of tasks, with their metadata).
Not thread-safe: the node uses it from the trio thread only.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, assert_never

import msgpack

from kowalski_node.errors import ConfigError
from kowalski_node.runtime.ports import HistoryRow
from kowalski_node.tasks.model import TaskRecord
from kowalski_node.tasks.store import (
    DeletePending,
    LedgerSnapshot,
    LedgerStore,
    LedgerWrite,
    PendingSubmit,
    PutPending,
    PutRecord,
)

DB_FILENAME = "node.db"
SCHEMA_VERSION = 1
Synchronous = Literal["NORMAL", "FULL"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id    TEXT PRIMARY KEY,
    state      TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    record     BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_by_created ON tasks (created_at);
CREATE TABLE IF NOT EXISTS idem_keys (
    idem_key TEXT PRIMARY KEY,
    task_id  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pending (
    task_id         TEXT PRIMARY KEY,
    next_attempt_at REAL NOT NULL,
    attempts        INTEGER NOT NULL,
    last_error      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS aliases (
    alias   TEXT PRIMARY KEY,
    task_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS task_info (
    task_id TEXT PRIMARY KEY,
    data    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS history (
    task_id TEXT NOT NULL,
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    at      REAL NOT NULL,
    peer    TEXT NOT NULL,
    action  TEXT NOT NULL,
    epoch   INTEGER,
    detail  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS history_by_task ON history (task_id, seq);
CREATE TABLE IF NOT EXISTS kv (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS blobs (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
"""


def _pack(record: TaskRecord) -> bytes:
    data: bytes = msgpack.packb(record.to_wire(), use_bin_type=True)
    return data


def _unpack(blob: bytes) -> TaskRecord:
    return TaskRecord.from_wire(msgpack.unpackb(blob, raw=False, strict_map_key=False))


class SqliteLedgerStore(LedgerStore):
    """Durable `LedgerStore` on SQLite (WAL). Open with a data dir or a file path."""

    def __init__(self, path: Path, *, synchronous: Synchronous = "NORMAL") -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ConfigError(f"sqlite synchronous must be NORMAL or FULL, got {synchronous!r}")
        path = Path(path)
        if path.is_dir():
            path = path / DB_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        try:
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
            self._check_schema()
        except sqlite3.DatabaseError as exc:
            raise ConfigError(
                f"cannot open the task store {path}: {exc} (is the file corrupt, or not a "
                "kowalski-node database?)"
            ) from None
        self._depth = 0  # nesting of batch()
        self._indexed: set[str] = set()
        """Task ids whose idempotency key is in `idem_keys` (skips a statement per update)."""
        self._unwritten: list[LedgerWrite] = []
        """Writes of an `apply` whose transaction failed: retried first by the next one."""
        self._open_writes: list[LedgerWrite] = []
        self._open_indexed: set[str] | None = None
        """What the open transaction's `apply` calls wrote (settled when it ends)."""

    def _check_schema(self) -> None:
        row = self._db.execute("SELECT value FROM kv WHERE key='schema_version'").fetchone()
        if row is None:
            self._db.execute(
                "INSERT INTO kv (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
        elif int(row[0]) > SCHEMA_VERSION:
            raise ConfigError(
                f"the task store {self.path} was written by a newer kowalski-node "
                f"(schema {row[0]} > {SCHEMA_VERSION}); upgrade this node"
            )

    # ---------------------------------------------------------------- transactions

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Group every write inside into one transaction (one commit, atomic)."""
        if self._depth == 0:
            self._db.execute("BEGIN IMMEDIATE")
        self._depth += 1
        ok = False
        try:
            yield
            ok = True
        finally:
            self._depth -= 1
            if self._depth == 0:
                committed = False
                try:
                    if ok:
                        self._db.execute("COMMIT")
                        committed = True
                finally:
                    if not committed:
                        with contextlib.suppress(sqlite3.Error):
                            self._db.execute("ROLLBACK")
                    self._settle(committed)

    def _settle(self, committed: bool) -> None:
        """The transaction ended: the ledger writes it held are durable, or to be retried."""
        if committed:
            if self._open_indexed is not None:
                self._indexed = self._open_indexed
        else:
            self._unwritten = [*self._open_writes, *self._unwritten]
        self._open_writes = []
        self._open_indexed = None

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self.batch():
            yield self._db

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()

    # ---------------------------------------------------------------- LedgerStore

    def load(self) -> LedgerSnapshot:
        """Every record, key and retry-queue entry, in insertion order (node start)."""
        records = tuple(
            _unpack(r[0])
            for r in self._db.execute("SELECT record FROM tasks ORDER BY rowid").fetchall()
        )
        keys = tuple(
            (str(r[0]), str(r[1]))
            for r in self._db.execute(
                "SELECT idem_key, task_id FROM idem_keys ORDER BY rowid"
            ).fetchall()
        )
        pending = tuple(
            PendingSubmit(str(r[0]), float(r[1]), int(r[2]), str(r[3]))
            for r in self._db.execute(
                "SELECT task_id, next_attempt_at, attempts, last_error FROM pending ORDER BY rowid"
            ).fetchall()
        )
        self._indexed = {task_id for _, task_id in keys}
        return LedgerSnapshot(records, keys, pending)

    def apply(self, writes: Sequence[LedgerWrite]) -> None:
        """Perform the writes in one transaction (joining an open `batch`). If it fails,
        they are kept and performed first by the next call, so none is lost while the
        ledger in memory already holds them."""
        todo = [*self._unwritten, *writes]
        if not todo:
            return
        self._unwritten = todo
        indexed = set(self._indexed if self._open_indexed is None else self._open_indexed)
        with self._tx() as db:
            for write in todo:
                match write:
                    case PutRecord():
                        record = write.record
                        db.execute(
                            "INSERT INTO tasks (task_id, state, created_at, updated_at, record) "
                            "VALUES (?, ?, ?, ?, ?) ON CONFLICT(task_id) DO UPDATE SET "
                            "state=excluded.state, updated_at=excluded.updated_at, "
                            "record=excluded.record",
                            (
                                record.task_id,
                                record.state.value,
                                record.created_at,
                                record.updated_at,
                                _pack(record),
                            ),
                        )
                        if record.task_id not in indexed:
                            db.execute(
                                "INSERT OR IGNORE INTO idem_keys (idem_key, task_id) VALUES (?, ?)",
                                (record.idempotency_key, record.task_id),
                            )
                            indexed.add(record.task_id)
                    case PutPending():
                        e = write.entry
                        db.execute(
                            "INSERT OR REPLACE INTO pending "
                            "(task_id, next_attempt_at, attempts, last_error) VALUES (?, ?, ?, ?)",
                            (e.task_id, e.next_attempt_at, e.attempts, e.last_error),
                        )
                    case DeletePending():
                        db.execute("DELETE FROM pending WHERE task_id=?", (write.task_id,))
                    case _:
                        assert_never(write)
            # staged: the end of the transaction (here, or the caller's batch) settles them
            self._open_writes.extend(todo)
            self._open_indexed = indexed
            self._unwritten = []

    def get(self, task_id: str) -> TaskRecord | None:
        """The stored record of a task (tools and tests; the ledger reads its memory)."""
        row = self._db.execute("SELECT record FROM tasks WHERE task_id=?", (task_id,)).fetchone()
        return _unpack(row[0]) if row is not None else None

    # ---------------------------------------------------------------- queries

    def __len__(self) -> int:
        row = self._db.execute("SELECT COUNT(*) FROM tasks").fetchone()
        return int(row[0])

    def recent(self, limit: int, states: Iterable[str] | None = None) -> list[TaskRecord]:
        """Newest first (by creation time), at most `limit`, optionally only these states."""
        if states is None:
            rows = self._db.execute(
                "SELECT record FROM tasks ORDER BY created_at DESC, task_id LIMIT ?", (limit,)
            ).fetchall()
        else:
            wanted = list(states)
            marks = ",".join("?" * len(wanted))
            rows = self._db.execute(
                f"SELECT record FROM tasks WHERE state IN ({marks}) "  # noqa: S608 - only '?' placeholders are formatted in; values are bound
                "ORDER BY created_at DESC, task_id LIMIT ?",
                (*wanted, limit),
            ).fetchall()
        return [_unpack(r[0]) for r in rows]

    def count_by_state(self) -> dict[str, int]:
        rows = self._db.execute("SELECT state, COUNT(*) FROM tasks GROUP BY state").fetchall()
        return {str(r[0]): int(r[1]) for r in rows}

    # ---------------------------------------------------------------- aliases

    def put_alias(self, alias: str, task_id: str) -> str:
        """Map a client task id to a ledger task id; returns the id it maps to (first wins)."""
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO aliases (alias, task_id) VALUES (?, ?)", (alias, task_id)
            )
        return self.resolve_alias(alias) or task_id

    def put_aliases(self, pairs: Iterable[tuple[str, str]]) -> None:
        with self._tx() as db:
            db.executemany("INSERT OR IGNORE INTO aliases (alias, task_id) VALUES (?, ?)", pairs)

    def resolve_alias(self, alias: str) -> str | None:
        row = self._db.execute("SELECT task_id FROM aliases WHERE alias=?", (alias,)).fetchone()
        return str(row[0]) if row is not None else None

    def aliases_of(self, task_id: str) -> list[str]:
        rows = self._db.execute(
            "SELECT alias FROM aliases WHERE task_id=? ORDER BY alias", (task_id,)
        ).fetchall()
        return [str(r[0]) for r in rows]

    # ---------------------------------------------------------------- per-task info

    def get_info(self, task_id: str) -> dict[str, Any]:
        row = self._db.execute("SELECT data FROM task_info WHERE task_id=?", (task_id,)).fetchone()
        if row is None:
            return {}
        value = json.loads(row[0])
        return value if isinstance(value, dict) else {}

    def put_info(self, task_id: str, data: dict[str, Any]) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO task_info (task_id, data) VALUES (?, ?)",
                (task_id, json.dumps(data, separators=(",", ":"), default=str)),
            )

    def put_infos(self, items: Iterable[tuple[str, dict[str, Any]]]) -> None:
        rows = [(t, json.dumps(d, separators=(",", ":"), default=str)) for t, d in items]
        with self._tx() as db:
            db.executemany("INSERT OR REPLACE INTO task_info (task_id, data) VALUES (?, ?)", rows)

    def update_info(self, task_id: str, **changes: Any) -> dict[str, Any]:
        """Merge `changes` into the task's info object (read-modify-write, one transaction)."""
        with self._tx():
            data = self.get_info(task_id)
            data.update(changes)
            self.put_info(task_id, data)
        return data

    # ---------------------------------------------------------------- history

    def add_history(
        self,
        task_id: str,
        at: float,
        peer: str,
        action: str,
        epoch: int | None = None,
        detail: str = "",
    ) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO history (task_id, at, peer, action, epoch, detail) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (task_id, at, peer, action, epoch, detail[:2000]),
            )

    def add_history_many(self, rows: Iterable[HistoryRow]) -> None:
        with self._tx() as db:
            db.executemany(
                "INSERT INTO history (task_id, at, peer, action, epoch, detail) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(r.task_id, r.at, r.peer, r.action, r.epoch, r.detail[:2000]) for r in rows],
            )

    def history(self, task_id: str, limit: int = 500) -> list[HistoryRow]:
        rows = self._db.execute(
            "SELECT task_id, at, peer, action, epoch, detail FROM history WHERE task_id=? "
            "ORDER BY seq LIMIT ?",
            (task_id, limit),
        ).fetchall()
        return [
            HistoryRow(str(r[0]), float(r[1]), str(r[2]), str(r[3]), r[4], str(r[5])) for r in rows
        ]

    # ---------------------------------------------------------------- kv, blobs

    def get_value(self, key: str, default: str | None = None) -> str | None:
        row = self._db.execute("SELECT value FROM kv WHERE key=?", (key,)).fetchone()
        return str(row[0]) if row is not None else default

    def set_value(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (key, value))

    def get_int(self, key: str, default: int = 0) -> int:
        raw = self.get_value(key)
        try:
            return int(raw) if raw is not None else default
        except ValueError:
            return default

    def add_int(self, key: str, delta: int = 1) -> int:
        """Atomically add to a durable counter; returns the new value."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
                "value=CAST(CAST(value AS INTEGER) + ? AS TEXT)",
                (key, str(delta), delta),
            )
        return self.get_int(key)

    def get_blob(self, name: str) -> bytes | None:
        row = self._db.execute("SELECT value FROM blobs WHERE name=?", (name,)).fetchone()
        return bytes(row[0]) if row is not None else None

    def put_blob(self, name: str, value: bytes) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO blobs (name, value) VALUES (?, ?)", (name, value))

    def delete_blob(self, name: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM blobs WHERE name=?", (name,))

    def blobs_with_prefix(self, prefix: str) -> list[tuple[str, bytes]]:
        rows = self._db.execute(
            "SELECT name, value FROM blobs WHERE name >= ? AND name < ? ORDER BY name",
            (prefix, prefix + "\U0010ffff"),
        ).fetchall()
        return [(str(r[0]), bytes(r[1])) for r in rows]


__all__ = ["DB_FILENAME", "HistoryRow", "SqliteLedgerStore", "Synchronous"]
