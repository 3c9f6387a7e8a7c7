"""LedgerJournal: the core's ledger writes are recorded as data and performed by the runtime.

Checks that a ledger over the journal gives the same answers as one over the store
directly, that nothing reaches the durable store until the writes are performed, and
that performing them leaves the durable store exactly as direct writes would.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from kowalski_node.adapters.sqlite_store import SqliteLedgerStore
from kowalski_node.runtime.ledger_journal import (
    DeletePending,
    LedgerJournal,
    PutPending,
    PutRecord,
    perform_write,
)
from kowalski_node.tasks import InMemoryLedgerStore, SubmitQueue, TaskLedger


def _story(ledger: TaskLedger, queue: SubmitQueue, flush: Callable[[], None]) -> list[object]:
    """Submit, queue, lease, checkpoint, commit and resubmit; returns what the ledger said."""
    said: list[object] = []
    first = ledger.submit(0.0, b"p1", submitter="n1", idempotency_key="k1")
    said.append((first.created, first.record.task_id))
    tid = first.record.task_id
    queue.enqueue(0.0, tid)
    flush()
    said.append(ledger.lease(0.1, tid, 1, "L").outcome)
    said.append(ledger.start_execution(0.2, tid, 1, "L").outcome)
    queue.accepted(tid)
    said.append(ledger.checkpoint(0.3, tid, 1, "L", 1, b"snap").outcome)
    said.append(ledger.commit(0.4, tid, 1, "L", b"answer").outcome)
    said.append(ledger.commit(0.5, tid, 2, "M", b"other").outcome)  # refused: commit-once
    flush()
    again = ledger.submit(1.0, b"p1", submitter="n1", idempotency_key="k1")
    said.append((again.created, again.record.result))
    return said


def test_the_journal_answers_like_the_store_and_writes_nothing_until_performed() -> None:
    direct_store = InMemoryLedgerStore()
    direct = _story(
        TaskLedger(direct_store, "n1", random.Random(1)),
        SubmitQueue(direct_store, random.Random(1)),
        lambda: None,
    )

    durable = InMemoryLedgerStore()
    journal = LedgerJournal(durable)
    seen_before_flush: list[int] = []

    def flush() -> None:
        seen_before_flush.append(len(durable))
        for write in journal.writes():
            perform_write(durable, write)
        journal.performed()

    journaled = _story(
        TaskLedger(journal, "n1", random.Random(1)), SubmitQueue(journal, random.Random(1)), flush
    )
    assert journaled == direct
    assert seen_before_flush[0] == 0  # the first submit was only recorded
    assert journal.writes() == []  # a resubmission of a known key writes nothing
    assert {r.task_id: r for r in durable.tasks()} == {r.task_id: r for r in direct_store.tasks()}
    assert durable.pending() == direct_store.pending() == []


def test_pending_deletes_and_key_index_follow_the_recorded_order() -> None:
    durable = InMemoryLedgerStore()
    journal = LedgerJournal(durable)
    queue = SubmitQueue(journal, random.Random(0))
    queue.enqueue(0.0, "t1")
    queue.enqueue(0.0, "t2")
    queue.accepted("t1")
    assert [e.task_id for e in journal.pending()] == ["t2"]
    assert [type(w) for w in journal.writes()] == [PutPending, PutPending, DeletePending]
    assert durable.pending() == []
    for write in journal.writes():
        perform_write(durable, write)
    journal.performed()
    assert journal.writes() == [] and [e.task_id for e in durable.pending()] == ["t2"]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=12))
def test_the_first_writer_of_a_key_wins_as_in_the_store(keys: list[str]) -> None:
    durable = InMemoryLedgerStore()
    journal = LedgerJournal(durable)
    direct = InMemoryLedgerStore()
    for i, key in enumerate(keys):
        for store in (journal, direct):
            TaskLedger(store, "n1", random.Random(i)).submit(float(i), b"x", idempotency_key=key)
        if i % 3 == 0:  # perform part of the way through, like a driver between core calls
            for write in journal.writes():
                perform_write(durable, write)
            journal.performed()
        for key_seen in set(keys[: i + 1]):
            assert journal.find_by_key(key_seen) == direct.find_by_key(key_seen)
    assert all(isinstance(w, PutRecord) for w in journal.writes())


def test_performed_writes_land_in_sqlite_in_one_batch(tmp_path: Path) -> None:
    sqlite = SqliteLedgerStore(tmp_path)
    journal = LedgerJournal(sqlite)
    ledger = TaskLedger(journal, "n1", random.Random(3))
    tids = [ledger.submit(0.0, b"p", idempotency_key=f"k{i}").record.task_id for i in range(5)]
    assert all(sqlite.get(t) is None for t in tids)
    with sqlite.batch():
        for write in journal.writes():
            perform_write(sqlite, write)
    journal.performed()
    reopened = SqliteLedgerStore(tmp_path)
    assert all(reopened.get(t) is not None for t in tids)
    assert ledger.get(tids[0]) == reopened.get(tids[0])
