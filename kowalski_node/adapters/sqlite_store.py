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

Every call runs on the caller's thread and is quick (no fsync); `batch()` groups many
writes into one transaction (batch submissions: one commit for thousands of tasks).
Decoded records are kept in a write-through LRU cache (bounded by a byte budget), since
the ledger reads a record several times per write and decoding costs ~40 µs; records are
immutable, and writes of a rolled-back batch are dropped from the cache.
Not thread-safe: the node uses it from the trio thread only.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import msgpack

from kowalski_node.errors import ConfigError
from kowalski_node.runtime.ports import HistoryRow
from kowalski_node.tasks.model import TaskRecord
from kowalski_node.tasks.store import LedgerStore, PendingSubmit

DB_FILENAME = "node.db"
SCHEMA_VERSION = 1
CACHE_BYTES = 64 * 1024 * 1024
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


def _weight(record: TaskRecord) -> int:
    cp = record.checkpoint
    return (
        512
        + len(record.payload)
        + (len(record.result) if record.result is not None else 0)
        + (len(cp.snapshot) if cp is not None else 0)
    )


class SqliteLedgerStore(LedgerStore):
    """Durable `LedgerStore` on SQLite (WAL). Open with a data dir or a file path."""

    def __init__(
        self, path: Path, *, synchronous: Synchronous = "NORMAL", cache_bytes: int = CACHE_BYTES
    ) -> None:
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
        self._cache: OrderedDict[str, TaskRecord] = OrderedDict()
        self._cache_used = 0
        self._cache_bytes = cache_bytes
        self._written: set[str] = set()  # task ids written in the open batch

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
                written, self._written = self._written, set()
                if ok:
                    self._db.execute("COMMIT")
                else:
                    self._db.execute("ROLLBACK")
                    for task_id in written:
                        self._uncache(task_id)

    # ---------------------------------------------------------------- record cache

    def _cache_put(self, record: TaskRecord) -> None:
        self._uncache(record.task_id)
        weight = _weight(record)
        if weight > self._cache_bytes // 4:
            return
        self._cache[record.task_id] = record
        self._cache_used += weight
        while self._cache_used > self._cache_bytes and self._cache:
            _, old = self._cache.popitem(last=False)
            self._cache_used -= _weight(old)

    def _uncache(self, task_id: str) -> None:
        old = self._cache.pop(task_id, None)
        if old is not None:
            self._cache_used -= _weight(old)

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self.batch():
            yield self._db

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()

    # ---------------------------------------------------------------- LedgerStore

    def get(self, task_id: str) -> TaskRecord | None:
        cached = self._cache.get(task_id)
        if cached is not None:
            self._cache.move_to_end(task_id)
            return cached
        row = self._db.execute("SELECT record FROM tasks WHERE task_id=?", (task_id,)).fetchone()
        if row is None:
            return None
        record = _unpack(row[0])
        self._cache_put(record)
        return record

    def find_by_key(self, idempotency_key: str) -> str | None:
        row = self._db.execute(
            "SELECT task_id FROM idem_keys WHERE idem_key=?", (idempotency_key,)
        ).fetchone()
        return str(row[0]) if row is not None else None

    def put(self, record: TaskRecord) -> None:
        known = record.task_id in self._cache
        if self._depth or known:  # one statement: atomic on its own in autocommit mode
            self._put(self._db, record, known)
        else:
            with self._tx() as db:
                self._put(db, record, known)
        self._cache_put(record)

    def put_many(self, records: Iterable[TaskRecord]) -> None:
        """Upsert many records in one transaction (batch submissions)."""
        recs = list(records)
        rows = [(r.task_id, r.state.value, r.created_at, r.updated_at, _pack(r)) for r in recs]
        with self._tx() as db:
            db.executemany(
                "INSERT INTO tasks (task_id, state, created_at, updated_at, record) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT(task_id) DO UPDATE SET "
                "state=excluded.state, updated_at=excluded.updated_at, record=excluded.record",
                rows,
            )
            db.executemany(
                "INSERT OR IGNORE INTO idem_keys (idem_key, task_id) VALUES (?, ?)",
                [(r.idempotency_key, r.task_id) for r in recs],
            )
            if self._depth:
                self._written.update(r.task_id for r in recs)
        for r in recs:
            self._cache_put(r)

    def _put(self, db: sqlite3.Connection, record: TaskRecord, known: bool = False) -> None:
        """Upsert; the key index is only touched for records not already cached (new ones)."""
        if self._depth:
            self._written.add(record.task_id)
        db.execute(
            "INSERT INTO tasks (task_id, state, created_at, updated_at, record) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT(task_id) DO UPDATE SET "
            "state=excluded.state, updated_at=excluded.updated_at, record=excluded.record",
            (
                record.task_id,
                record.state.value,
                record.created_at,
                record.updated_at,
                _pack(record),
            ),
        )
        if not known:
            db.execute(
                "INSERT OR IGNORE INTO idem_keys (idem_key, task_id) VALUES (?, ?)",
                (record.idempotency_key, record.task_id),
            )

    def tasks(self) -> Iterator[TaskRecord]:
        rows = self._db.execute("SELECT record FROM tasks").fetchall()
        return iter([_unpack(r[0]) for r in rows])

    def put_pending(self, entry: PendingSubmit) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO pending (task_id, next_attempt_at, attempts, last_error) "
                "VALUES (?, ?, ?, ?)",
                (entry.task_id, entry.next_attempt_at, entry.attempts, entry.last_error),
            )

    def delete_pending(self, task_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM pending WHERE task_id=?", (task_id,))

    def pending(self) -> list[PendingSubmit]:
        rows = self._db.execute(
            "SELECT task_id, next_attempt_at, attempts, last_error FROM pending"
        ).fetchall()
        return [PendingSubmit(str(r[0]), float(r[1]), int(r[2]), str(r[3])) for r in rows]

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
