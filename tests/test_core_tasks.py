"""Task ledger: idempotency, fenced writes, exactly-once commits, checkpoints, merge, retries."""

from __future__ import annotations

import random
from dataclasses import replace

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kowalski_node.tasks import (
    InMemoryLedgerStore,
    LedgerState,
    ReplicateAck,
    ReplicateRecord,
    RetryPolicy,
    SubmitQueue,
    TaskLedger,
    TaskRecord,
    TaskState,
    WriteOutcome,
    merge_records,
    replica_answer,
    task_id_for_key,
)
from kowalski_node.wire import WireError


def _ledger(node: str = "n1", seed: int = 0) -> TaskLedger:
    return TaskLedger(LedgerState(), node, random.Random(seed))


# --------------------------------------------------------------------------- idempotency


def test_resubmission_with_same_key_returns_stored_result_without_rerun() -> None:
    led = _ledger()
    first = led.submit(0.0, b"prompt", idempotency_key="k1")
    assert first.created and first.record.state is TaskState.QUEUED
    tid = first.record.task_id
    assert tid == task_id_for_key("k1")
    led.lease(0.1, tid, 1, "L")
    led.start_execution(0.2, tid, 1, "L")
    led.commit(0.3, tid, 1, "L", b"answer")
    again = led.submit(5.0, b"prompt", idempotency_key="k1")
    assert not again.created and again.record.result == b"answer"
    assert again.record.executions == 1 and again.record.commits == 1
    other = led.submit(5.0, b"different", idempotency_key="k1")
    assert not other.created and not other.payload_matches


def test_keys_are_validated_and_auto_keys_come_from_the_injected_rng() -> None:
    with pytest.raises(ValueError, match="idempotency key"):
        _ledger().submit(0.0, b"x", idempotency_key="")
    a = _ledger(seed=7).submit(0.0, b"x").record
    b = _ledger(seed=7).submit(0.0, b"x").record
    assert a.task_id == b.task_id  # deterministic under a seeded RNG
    assert _ledger(seed=8).submit(0.0, b"x").record.task_id != a.task_id


@given(st.lists(st.sampled_from(["a", "b", "c", "d"]), max_size=40))
@settings(max_examples=200, deadline=None)
def test_ledger_idempotency(keys: list[str]) -> None:
    led = _ledger()
    ids: dict[str, str] = {}
    for k in keys:
        res = led.submit(0.0, k.encode(), idempotency_key=k)
        assert res.created == (k not in ids)
        ids.setdefault(k, res.record.task_id)
        assert res.record.task_id == ids[k]
    assert len(led.state) == len(set(keys))
    assert led.stats.submitted == len(set(keys)) and led.stats.deduplicated == len(keys) - len(
        set(keys)
    )


# --------------------------------------------------------------------------- fencing & commit-once


def test_writes_are_fenced_by_epoch() -> None:
    led = _ledger()
    tid = led.submit(0.0, b"p", idempotency_key="k").record.task_id
    assert led.lease(0.0, tid, 1, "A").ok
    assert led.start_execution(0.0, tid, 1, "A").ok
    assert led.lease(1.0, tid, 2, "B").ok  # takeover
    stale = led.checkpoint(1.1, tid, 1, "A", 3, b"s3")
    assert stale.outcome is WriteOutcome.STALE_EPOCH and "refused" in stale.detail
    conflict = led.checkpoint(1.1, tid, 2, "C", 3, b"s3")
    assert conflict.outcome is WriteOutcome.CONFLICT
    assert led.start_execution(1.2, tid, 2, "B").record.executions == 2  # type: ignore[union-attr]
    old = led.commit(1.3, tid, 1, "A", b"old")
    assert old.outcome is WriteOutcome.STALE_EPOCH
    new = led.commit(1.4, tid, 2, "B", b"new")
    assert new.ok and new.record is not None and new.record.result == b"new"
    dup = led.commit(1.5, tid, 3, "C", b"newer")  # even a newer epoch cannot commit twice
    assert dup.outcome is WriteOutcome.DUPLICATE
    rec = led.get(tid)
    assert (
        rec is not None and rec.commits == 1 and rec.rejected_commits == 2 and rec.executions == 2
    )
    assert led.stats.commits == 1 and led.stats.rejected_commits == 2


def test_checkpoints_reject_older_epoch_and_regressing_step() -> None:
    led = _ledger()
    tid = led.submit(0.0, b"p", idempotency_key="k").record.task_id
    led.lease(0.0, tid, 1, "A")
    assert led.checkpoint(0.1, tid, 1, "A", 1, b"s1").ok
    assert led.checkpoint(0.2, tid, 1, "A", 2, b"s2").ok
    assert led.checkpoint(0.2, tid, 1, "A", 2, b"s2").outcome is WriteOutcome.DUPLICATE
    assert led.checkpoint(0.2, tid, 1, "A", 2, b"other").outcome is WriteOutcome.CONFLICT
    assert led.checkpoint(0.3, tid, 1, "A", 1, b"s1").outcome is WriteOutcome.REGRESSED
    # new leader re-does step 2 at epoch 2 (it resumed from step 2's snapshot and re-ran it)
    led.lease(1.0, tid, 2, "B")
    assert led.checkpoint(1.1, tid, 2, "B", 2, b"s2'").ok
    assert led.checkpoint(1.2, tid, 1, "A", 3, b"s3").outcome is WriteOutcome.STALE_EPOCH
    rec = led.get(tid)
    assert rec is not None and rec.checkpoint is not None
    assert (rec.checkpoint.step, rec.checkpoint.epoch, rec.checkpoint.snapshot) == (2, 2, b"s2'")
    with pytest.raises(ValueError, match="step must be >= 0"):
        led.checkpoint(1.3, tid, 2, "B", -1, b"")


def test_terminal_states_refuse_further_writes() -> None:
    led = _ledger()
    tid = led.submit(0.0, b"p", idempotency_key="k").record.task_id
    assert led.cancel(0.1, tid).ok
    assert led.lease(0.2, tid, 1, "A").outcome is WriteOutcome.TERMINAL
    assert led.commit(0.2, tid, 1, "A", b"r").outcome is WriteOutcome.TERMINAL
    assert led.commit(0.2, "nope", 1, "A", b"r").outcome is WriteOutcome.UNKNOWN_TASK
    other = led.submit(0.0, b"q", idempotency_key="k2").record.task_id
    with pytest.raises(ValueError, match="epoch >= 1"):
        led.lease(0.3, other, 0, "A")


ops = st.lists(
    st.one_of(
        st.tuples(st.just("lease"), st.integers(1, 5), st.sampled_from("ABC")),
        st.tuples(st.just("commit"), st.integers(1, 5), st.sampled_from("ABC")),
    ),
    min_size=1,
    max_size=30,
)


@given(ops, st.randoms(use_true_random=False))
@settings(max_examples=300, deadline=None)
def test_exactly_once_under_duplicated_and_reordered_commits(
    seq: list[tuple[str, int, str]], rnd: random.Random
) -> None:
    led = _ledger()
    tid = led.submit(0.0, b"p", idempotency_key="k").record.task_id
    deliveries = seq + [rnd.choice(seq) for _ in range(len(seq))]  # duplicates
    rnd.shuffle(deliveries)  # reordering
    commits_tried = 0
    for i, (op, epoch, leader) in enumerate(deliveries):
        before = led.get(tid)
        assert before is not None
        if op == "lease":
            led.lease(float(i), tid, epoch, leader)
        else:
            commits_tried += 1
            res = led.commit(float(i), tid, epoch, leader, f"{leader}{epoch}".encode())
            if res.ok:
                # only the fence holder (or a newer epoch) can commit, and only once
                assert before.state is not TaskState.COMMITTED
                assert epoch > before.epoch or (
                    epoch == before.epoch and leader in (before.leader, "")
                )
    rec = led.get(tid)
    assert rec is not None
    assert rec.commits <= 1
    assert led.stats.commits == rec.commits
    assert led.stats.commits + led.stats.rejected_commits == commits_tried


# --------------------------------------------------------------------------- replication merge


def _history(seed: int) -> list[TaskRecord]:
    """Snapshots of one task's record as two leaders (one fenced off) work on it."""
    rnd = random.Random(seed)
    led = _ledger(seed=seed)
    tid = led.submit(0.0, b"p", idempotency_key=f"k{seed}").record.task_id
    snaps: list[TaskRecord] = []
    t = 0.0
    epoch, leader, step = 0, "", 0
    for _ in range(rnd.randint(3, 12)):
        t += 0.1
        r = rnd.random()
        if r < 0.25:
            epoch += 1
            leader = rnd.choice("ABC")
            led.lease(t, tid, epoch, leader)
        elif r < 0.45 and epoch:
            led.start_execution(t, tid, epoch, leader)
        elif r < 0.85 and epoch:
            step += rnd.choice([0, 1, 1, 2])
            led.checkpoint(t, tid, epoch, leader, step, rnd.randbytes(4))
        elif epoch:
            led.commit(t, tid, epoch, leader, b"R%d" % epoch)
        rec = led.get(tid)
        assert rec is not None
        snaps.append(rec)
    return snaps


@given(st.integers(0, 10_000), st.randoms(use_true_random=False))
@settings(max_examples=200, deadline=None)
def test_replicas_converge_whatever_the_order_or_duplication(seed: int, rnd: random.Random) -> None:
    snaps = _history(seed)
    replicas = [_ledger(f"r{i}") for i in range(3)]
    for rep in replicas:
        deliveries = snaps + [rnd.choice(snaps) for _ in range(len(snaps))]
        rnd.shuffle(deliveries)
        for rec in deliveries:
            rep.apply_replica(0.0, rec)
    finals = [rep.get(snaps[0].task_id) for rep in replicas]
    assert finals[0] == finals[1] == finals[2]
    final = finals[0]
    assert final is not None
    # the merge never loses a commit and never loses executions
    if any(s.state is TaskState.COMMITTED for s in snaps):
        assert final.state is TaskState.COMMITTED and final.commits == 1
    assert final.executions == max(s.executions for s in snaps)


@given(st.integers(0, 10_000), st.integers(0, 10_000), st.integers(0, 10_000))
@settings(max_examples=200, deadline=None)
def test_merge_is_a_join(s1: int, s2: int, s3: int) -> None:
    pool = _history(1)
    rnd = random.Random(s1 ^ s2 ^ s3)
    a, b, c = (rnd.choice(pool) for _ in range(3))
    assert merge_records(a, b) == merge_records(b, a)
    assert merge_records(merge_records(a, b), c) == merge_records(a, merge_records(b, c))
    assert merge_records(a, a) == a


def test_conflicting_commits_are_detected_on_merge() -> None:
    base = _ledger().submit(0.0, b"p", idempotency_key="k").record
    c1 = replace(base, state=TaskState.COMMITTED, epoch=1, leader="A", commits=1, result=b"x")
    c2 = replace(base, state=TaskState.COMMITTED, epoch=2, leader="B", commits=1, result=b"y")
    led = _ledger()
    led.apply_replica(0.0, c1)
    led.apply_replica(0.0, c2)
    assert led.stats.conflicting_commits_seen == 1
    with pytest.raises(ValueError, match="different tasks"):
        merge_records(c1, replace(c2, task_id="other"))


def test_replica_answer_fences_old_leaders_and_reports_commits() -> None:
    led = _ledger("replica")
    rec = led.submit(0.0, b"p", idempotency_key="k").record
    led.lease(0.0, rec.task_id, 2, "B")
    old = replace(rec, epoch=1, leader="A", version=4, state=TaskState.RUNNING)
    stored = led.apply_replica(0.1, old)
    ans = replica_answer(old, stored)
    assert not ans.ok and ans.epoch == 2 and ans.leader == "B"
    led.commit(0.2, rec.task_id, 2, "B", b"done")
    newer = replace(rec, epoch=3, leader="C", version=1, state=TaskState.LEASED)
    ans = replica_answer(newer, led.apply_replica(0.3, newer))
    assert ans.ok and ans.committed  # the new leader must adopt the result, not rerun
    cancelled = _ledger("r2")
    rec2 = cancelled.submit(0.0, b"p", idempotency_key="k2").record
    cancelled.cancel(0.1, rec2.task_id)
    lease2 = replace(rec2, epoch=1, leader="C", version=1, state=TaskState.LEASED)
    ans2 = replica_answer(lease2, cancelled.apply_replica(0.2, lease2))
    assert ans2.ok and ans2.terminal and not ans2.committed  # cancelled: the leader stops too


def test_record_and_replication_messages_roundtrip() -> None:
    led = _ledger()
    tid = led.submit(0.0, b"p", idempotency_key="k").record.task_id
    led.lease(0.0, tid, 1, "A")
    led.checkpoint(0.0, tid, 1, "A", 1, b"\x00snap")
    rec = led.commit(0.0, tid, 1, "A", b"res").record
    assert rec is not None
    for msg in (ReplicateRecord(rec), ReplicateAck(tid, 1, 3, True, "A", TaskState.COMMITTED)):
        raw = msgpack.unpackb(msgpack.packb(msg.to_wire(), use_bin_type=True), raw=False)
        assert type(msg).from_wire(raw) == msg
    bad = rec.to_wire()
    bad["st"] = "exploded"
    with pytest.raises(WireError, match="unknown task state"):
        TaskRecord.from_wire(bad)
    bad = rec.to_wire()
    bad["n"] = 0
    with pytest.raises(WireError, match="commits=1"):
        TaskRecord.from_wire(bad)


# --------------------------------------------------------------------------- durable queue


def test_submit_queue_backs_off_never_drops_and_survives_restart() -> None:
    store = InMemoryLedgerStore()
    state = LedgerState()
    q = SubmitQueue(state, random.Random(1), RetryPolicy(base_delay=0.2, max_delay=5.0, jitter=0.0))
    q.enqueue(0.0, "t1")
    assert q.due(0.0) == ["t1"]
    now = 0.0
    delays = []
    for _ in range(12):
        nxt = q.attempt_failed(now, "t1", "no leader reachable")
        delays.append(nxt - now)
        now = nxt
    assert delays[:4] == pytest.approx([0.2, 0.4, 0.8, 1.6])
    assert max(delays) == pytest.approx(5.0)  # capped, and still queued after 12 failures
    assert "t1" in q and q.entry("t1").attempts == 12  # type: ignore[union-attr]
    # every change is a recorded write; made durable, a restart rebuilds the queue from it
    store.apply(state.take_writes())
    state2 = LedgerState(store.load())
    q2 = SubmitQueue(state2, random.Random(2))
    assert "t1" in q2 and q2.next_deadline() == pytest.approx(now)
    q2.kick(now - 3.0)
    assert q2.due(now - 3.0) == ["t1"]
    q2.accepted("t1")
    store.apply(state2.take_writes())
    assert len(q2) == 0 and store.pending() == [] and state2.pending() == []


def test_retry_jitter_is_bounded_and_seeded() -> None:
    pol = RetryPolicy(base_delay=1.0, max_delay=1.0, jitter=0.2)
    rng = random.Random(3)
    ds = [pol.delay(1, rng) for _ in range(200)]
    assert all(0.8 <= d <= 1.2 for d in ds) and len(set(ds)) > 100
    rng2 = random.Random(3)
    assert ds == [pol.delay(1, rng2) for _ in range(200)]  # same seed, same retry schedule


# --------------------------------------------------------------------------- failover story


def test_failover_story_exactly_once_with_fenced_old_leader() -> None:
    """A leads, checkpoints, pauses; B takes over at epoch 2 from the checkpoint and commits;
    A wakes up and everything it writes is refused by every replica."""
    submitter = _ledger("S")
    replicas = {n: _ledger(n) for n in ("A", "B", "C")}
    rec = submitter.submit(0.0, b"task", idempotency_key="story").record
    for led in replicas.values():
        led.apply_replica(0.0, rec)
    everyone = [submitter, *replicas.values()]
    tid = rec.task_id

    def replicate(record: TaskRecord | None) -> list[bool]:
        assert record is not None
        return [replica_answer(record, led.apply_replica(0.0, record)).ok for led in everyone]

    a = replicas["A"]
    assert all(replicate(a.lease(0.1, tid, 1, "A").record))
    assert all(replicate(a.start_execution(0.2, tid, 1, "A").record))
    assert all(replicate(a.checkpoint(0.3, tid, 1, "A", 1, b"s1").record))
    # A pauses. B claims epoch 2 and resumes from the replicated checkpoint.
    b = replicas["B"]
    assert all(replicate(b.lease(1.0, tid, 2, "B").record))
    resumed = b.get(tid)
    assert resumed is not None and resumed.checkpoint is not None and resumed.checkpoint.step == 1
    assert all(replicate(b.start_execution(1.1, tid, 2, "B").record))
    assert all(replicate(b.checkpoint(1.2, tid, 2, "B", 2, b"s2").record))
    assert all(replicate(b.commit(1.3, tid, 2, "B", b"answer").record))
    # A wakes up: its own ledger already holds B's commit and refuses a second one ...
    assert a.commit(2.0, tid, 1, "A", b"stale").outcome is WriteOutcome.DUPLICATE
    # ... and a record it managed to send anyway is refused by every replica.
    late = replace(
        resumed,
        epoch=1,
        leader="A",
        state=TaskState.COMMITTED,
        commits=1,
        result=b"stale",
        version=99,
    )
    answers = replicate(late)
    assert not any(answers)
    for led in everyone:
        final = led.get(tid)
        assert (
            final is not None
            and final.result == b"answer"
            and final.commits == 1
            and final.executions == 2
        )
    assert submitter.submit(9.0, b"task", idempotency_key="story").record.result == b"answer"
