"""SqliteLedgerStore: the LedgerStore port (load once, apply writes), durability across
reopen, batches, speed."""

from __future__ import annotations

import random
import sqlite3
import time
from dataclasses import replace
from pathlib import Path

import pytest

from kowalski_node.adapters.sqlite_store import SqliteLedgerStore
from kowalski_node.errors import ConfigError
from kowalski_node.tasks import (
    LedgerState,
    PendingSubmit,
    PutPending,
    PutRecord,
    TaskLedger,
    TaskState,
    WriteOutcome,
)


def _ledger(store: SqliteLedgerStore, node: str = "me", seed: int = 1) -> TaskLedger:
    """A ledger over what `store` holds (as the node starts one)."""
    return TaskLedger(LedgerState(store.load()), node, random.Random(seed))


def _persist(store: SqliteLedgerStore, ledger: TaskLedger) -> None:
    """Make the ledger's recorded writes durable (what the glue does after a core call)."""
    store.apply(ledger.state.take_writes())


def test_ledger_over_sqlite_survives_reopen(tmp_path: Path) -> None:
    store = SqliteLedgerStore(tmp_path)
    ledger = _ledger(store)
    sub = ledger.submit(1.0, b"payload", idempotency_key="k1")
    assert sub.created
    tid = sub.record.task_id
    assert ledger.lease(2.0, tid, 1, "leader-a").ok
    assert ledger.start_execution(2.1, tid, 1, "leader-a").ok
    assert ledger.checkpoint(2.2, tid, 1, "leader-a", 1, b"snap-1").ok
    assert ledger.commit(3.0, tid, 1, "leader-a", b"answer").ok
    ledger.state.put_pending(PendingSubmit("other", 5.0, 2, "no leader"))
    _persist(store, ledger)
    store.put_alias("client-id", tid)
    store.update_info(tid, fingerprint="abc", priority=3)
    store.add_history(tid, 1.0, "me", "submitted")
    store.add_int("commits_total")
    store.close()

    again = SqliteLedgerStore(tmp_path)
    ledger2 = _ledger(again, seed=2)
    rec = ledger2.get(tid)
    assert rec == again.get(tid)
    assert rec is not None and rec.state is TaskState.COMMITTED
    assert rec.result == b"answer" and rec.executions == 1 and rec.commits == 1
    assert rec.checkpoint is not None and rec.checkpoint.snapshot == b"snap-1"
    # resubmission with the same key returns the stored result, nothing new
    dup = ledger2.submit(9.0, b"payload", idempotency_key="k1")
    assert not dup.created and dup.record.result == b"answer"
    # a second commit is refused and counted, durably
    assert ledger2.commit(9.1, tid, 2, "leader-b", b"other").outcome is WriteOutcome.DUPLICATE
    _persist(again, ledger2)
    assert ledger2.state.pending() == [PendingSubmit("other", 5.0, 2, "no leader")]
    assert again.resolve_alias("client-id") == tid
    assert again.get_info(tid) == {"fingerprint": "abc", "priority": 3}
    assert [h.action for h in again.history(tid)] == ["submitted"]
    assert again.get_int("commits_total") == 1
    again.close()
    third = SqliteLedgerStore(tmp_path)
    rec3 = third.get(tid)
    assert rec3 is not None and rec3.rejected_commits == 1
    third.close()


def test_first_key_owner_wins_and_aliases_are_stable(tmp_path: Path) -> None:
    store = SqliteLedgerStore(tmp_path / "x.db")
    ledger = _ledger(store)
    a = ledger.submit(1.0, b"a", idempotency_key="same")
    _persist(store, ledger)
    rec = replace(a.record, task_id="tother")
    store.apply(
        [PutRecord(rec)]
    )  # a replica under another id with the same key must not steal the key
    assert dict(store.load().keys)["same"] == a.record.task_id
    assert _ledger(store).find("same") == a.record
    assert store.put_alias("c1", "t1") == "t1"
    assert store.put_alias("c1", "t2") == "t1"
    store.close()


def test_batch_is_one_transaction_and_rolls_back(tmp_path: Path) -> None:
    store = SqliteLedgerStore(tmp_path)
    ledger = _ledger(store)
    with pytest.raises(RuntimeError), store.batch():
        ledger.submit(1.0, b"x", idempotency_key="k")
        _persist(store, ledger)
        raise RuntimeError("boom")
    assert len(store) == 0 and store.load().keys == ()
    with store.batch():
        for i in range(10):
            ledger.submit(1.0, b"x", idempotency_key=f"k{i}")
        _persist(store, ledger)  # the rolled-back write of "k" goes first, this time durably
    assert len(store) == 11
    assert store.count_by_state() == {"queued": 11}
    assert len(store.recent(3)) == 3
    store.close()


def test_batched_acceptance_is_fast(tmp_path: Path) -> None:
    """Thousands of submissions in one batch: well above the 2,000 tasks/s goal."""
    store = SqliteLedgerStore(tmp_path)
    ledger = _ledger(store)
    n = 3000
    started = time.perf_counter()
    with store.batch():
        for i in range(n):
            ledger.submit(float(i), b"p" * 200, idempotency_key=f"key-{i}")
        _persist(store, ledger)
    rate = n / (time.perf_counter() - started)
    assert len(store) == n
    assert rate > 2000, f"{rate:.0f} tasks/s"
    store.close()


def test_bad_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "node.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ConfigError, match="cannot open the task store"):
        SqliteLedgerStore(tmp_path)
    with pytest.raises(ConfigError, match="synchronous"):
        SqliteLedgerStore(tmp_path / "y.db", synchronous="OFF")  # type: ignore[arg-type]


def test_full_sync_mode_works(tmp_path: Path) -> None:
    store = SqliteLedgerStore(tmp_path, synchronous="FULL")
    ledger = _ledger(store)
    assert ledger.submit(1.0, b"x", idempotency_key="k").created
    _persist(store, ledger)
    assert len(store) == 1
    store.put_blob("coord/t1", b"\x00\x01")
    assert store.blobs_with_prefix("coord/") == [("coord/t1", b"\x00\x01")]
    store.delete_blob("coord/t1")
    assert store.get_blob("coord/t1") is None
    store.close()


def test_a_failed_transaction_keeps_its_writes_for_the_next_apply(tmp_path: Path) -> None:
    """The ledger in memory already holds the writes: a failed commit must not lose them."""
    store = SqliteLedgerStore(tmp_path)
    ledger = _ledger(store)
    tid = ledger.submit(1.0, b"x", idempotency_key="k1").record.task_id
    first = ledger.state.take_writes()
    store._db.execute(
        "CREATE TRIGGER no_pending BEFORE INSERT ON pending BEGIN SELECT RAISE(ABORT, 'disk full'); END"
    )
    with pytest.raises(sqlite3.IntegrityError):
        store.apply([*first, PutPending(PendingSubmit(tid, 2.0))])
    assert store.get(tid) is None  # rolled back whole: the record did not land either
    store._db.execute("DROP TRIGGER no_pending")
    store.apply([])  # the next call performs the kept writes first
    snapshot = store.load()
    assert [r.task_id for r in snapshot.records] == [tid]
    assert snapshot.pending == (PendingSubmit(tid, 2.0),)
    store.close()
