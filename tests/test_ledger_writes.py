"""Ledger writes are effects: the coordination core keeps its ledger in memory, never calls
storage, and returns each write at the head of the call's effects; the glue makes them
durable (one `apply`) before any message of that call leaves; a restart rebuilds the
ledger from what the store holds (SQLite in the node, `InMemoryLedgerStore` in the
simulator and the test drivers)."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import msgpack
import pytest

from kowalski_node import glue
from kowalski_node.adapters.sqlite_store import SqliteLedgerStore
from kowalski_node.coordination import Coordinator, SendMessage, StartRun
from kowalski_node.coordination.effects import CoordEffect
from kowalski_node.glue import CoordDriver, perform_ledger_writes
from kowalski_node.tasks import (
    LEDGER_WRITE_TYPES,
    LedgerSnapshot,
    LedgerState,
    LedgerStore,
    LedgerWrite,
    PutRecord,
    TaskLedger,
    TaskRecord,
    TaskState,
)
from kowalski_node.testing import coord_cluster
from kowalski_node.testing.coord_cluster import CoordCluster, scripted_result
from kowalski_node.testing.network import LinkProfile


def _coordinator(me: str, state: LedgerState, peers: Sequence[str]) -> Coordinator:
    core = Coordinator(me, TaskLedger(state, me, random.Random(1)), rng=random.Random(2))
    for peer in peers:
        perform_ledger_writes(_Refuse(), core.peer_up(0.0, peer))
    return core


class _Refuse(LedgerStore):
    """A store that must not be written (the call under test writes nothing)."""

    def load(self) -> LedgerSnapshot:
        raise AssertionError("not loaded")

    def apply(self, writes: Sequence[LedgerWrite]) -> None:
        raise AssertionError(f"unexpected writes {writes}")


def test_a_submission_returns_its_record_write_before_the_copies_it_sends() -> None:
    core = _coordinator("a", LedgerState(), ["b", "c"])
    out, effects = core.submit(1.0, b"steps=2", idempotency_key="k1", acceptors=("a", "b", "c"))
    kinds = [isinstance(e, LEDGER_WRITE_TYPES) for e in effects]
    assert kinds[0] and False in kinds
    assert kinds == sorted(kinds, reverse=True)  # every write before every other effect
    assert effects[0] == PutRecord(out.record)
    sends = [e for e in effects if isinstance(e, SendMessage)]
    assert {s.to for s in sends} == {"b", "c"}  # the new task's copies to its acceptors
    # the write was taken: the next call does not repeat it
    assert not any(isinstance(e, LEDGER_WRITE_TYPES) for e in core.tick(1.0))


def test_a_resubmitted_key_writes_nothing() -> None:
    state = LedgerState()
    core = _coordinator("a", state, [])
    memory = _Memory()
    perform_ledger_writes(memory, core.submit(1.0, b"x", idempotency_key="k", acceptors=())[1])
    assert [type(w) for w in memory.calls[0]][:1] == [PutRecord]
    out, effects = core.submit(2.0, b"x", idempotency_key="k", acceptors=())
    assert not out.created and effects == []


class _Memory(LedgerStore):
    """An in-memory store that remembers every apply call."""

    def __init__(self) -> None:
        self.calls: list[list[LedgerWrite]] = []

    def load(self) -> LedgerSnapshot:
        raise AssertionError("not loaded")

    def apply(self, writes: Sequence[LedgerWrite]) -> None:
        self.calls.append(list(writes))


def _checked_cluster(monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], list[str]]:
    """Check every core call a CoordCluster performs: writes come first; when a message
    about a task leaves, the node's durable store holds that task's record exactly as its
    ledger in memory does; after the call the store holds exactly the ledger."""
    calls = [0]
    problems: list[str] = []
    real = glue.perform_coord_effects

    def checked(driver: CoordDriver, store: LedgerStore, effects: Sequence[CoordEffect]) -> None:
        calls[0] += 1
        kinds = [isinstance(e, LEDGER_WRITE_TYPES) for e in effects]
        if kinds != sorted(kinds, reverse=True):
            problems.append(f"a write after a message: {effects}")
        node = driver.node  # type: ignore[attr-defined]
        state = node.core.ledger.state
        send = driver.send_message

        def send_after_durable(eff: SendMessage) -> None:
            task_id = getattr(eff.message, "task_id", None)
            if isinstance(task_id, str) and node.store.get(task_id) != state.get(task_id):
                problems.append(f"{node.name} sent {eff.message.TAG} for {task_id} early")
            send(eff)

        driver.send_message = send_after_durable  # type: ignore[method-assign]
        real(driver, store, effects)
        if node.store.load() != state.snapshot():
            problems.append(f"{node.name}: the store and the ledger differ after a call")

    monkeypatch.setattr(coord_cluster, "perform_coord_effects", checked)
    return calls, problems


def test_every_call_of_a_lossy_cluster_with_restarts_writes_before_it_sends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls, problems = _checked_cluster(monkeypatch)
    link = LinkProfile(latency=0.001, jitter=0.001, loss=0.05, duplicate=0.05, reorder=0.1)
    c = CoordCluster(5, seed=4, link=link)
    keys = {f"w{i}": f"steps={1 + i % 4}".encode() for i in range(8)}
    ids = {
        key: c.submit(f"n0{i % 5}", payload, key=key).task_id
        for i, (key, payload) in enumerate(keys.items())
    }
    c.run_for(0.2)
    victims = sorted({lc.leader for _, lc in c.leader_changes})[:2]
    for name in victims:
        c.kill(name)
    c.run_for(1.0)
    for name in victims:
        c.restart(name)  # the new core loads its ledger from the store that survived
    c.run_for(10.0)
    assert problems == []
    assert calls[0] > 200
    for key, task_id in ids.items():
        held = [n.core.ledger.get(task_id) for n in c.nodes.values()]
        done = [r for r in held if r is not None and r.state is TaskState.COMMITTED]
        assert done and all(r.result == scripted_result(keys[key]) for r in done)
    for n in c.nodes.values():  # a restarted node's ledger is what its store held
        assert n.store.load() == n.core.ledger.state.snapshot()


def _committed_rows(path: Path) -> dict[str, TaskRecord]:
    """Read the SQLite file on a second connection: it sees only committed transactions."""
    db = sqlite3.connect(str(path))
    try:
        rows = db.execute("SELECT task_id, record FROM tasks").fetchall()
    finally:
        db.close()
    return {
        str(t): TaskRecord.from_wire(msgpack.unpackb(r, raw=False, strict_map_key=False))
        for t, r in rows
    }


def test_a_node_restarted_on_its_sqlite_file_recovers_its_ledger(tmp_path: Path) -> None:
    store = SqliteLedgerStore(tmp_path)
    core = _coordinator("a", LedgerState(store.load()), [])
    memory = core.ledger.state
    out, effects = core.submit(1.0, b"steps=1", idempotency_key="k1", acceptors=())
    actions = perform_ledger_writes(store, effects)
    assert _committed_rows(store.path) == {out.task_id: memory.get(out.task_id)}
    starts = [a for a in actions if isinstance(a, StartRun)]
    assert starts, actions  # a lone node leads its own task
    epoch = starts[0].epoch
    perform_ledger_writes(store, core.step_finished(2.0, out.task_id, epoch, 1, b"snap"))
    perform_ledger_writes(store, core.run_finished(3.0, out.task_id, epoch, b"answer"))
    before = memory.snapshot()
    assert memory.get(out.task_id).state is TaskState.COMMITTED  # type: ignore[union-attr]
    store.close()

    reopened = SqliteLedgerStore(tmp_path)
    again = _coordinator("a", LedgerState(reopened.load()), [])
    assert again.ledger.state.snapshot() == before
    assert perform_ledger_writes(reopened, again.recover(4.0)) == []  # nothing left to do
    dup, effects = again.submit(5.0, b"steps=1", idempotency_key="k1", acceptors=())
    assert not dup.created and dup.result == b"answer" and effects == []
    reopened.close()


def test_the_core_and_its_ledger_never_name_the_storage_port() -> None:
    """Only drivers and the glue hold a `LedgerStore`: the coordination core, the ledger
    and its queue work on `LedgerState` and return writes as data."""
    import ast

    import kowalski_node

    root = Path(kowalski_node.__file__).parent
    paths = sorted((root / "coordination").glob("*.py"))
    paths += [root / "tasks" / f"{m}.py" for m in ("ledger", "queue", "model", "replication")]
    offenders = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [node.id] if isinstance(node, ast.Name) else []
            if isinstance(node, ast.ImportFrom):
                names = [a.name for a in node.names]
            offenders += [
                f"{path.name}:{node.lineno} {n}"  # type: ignore[attr-defined]
                for n in names
                if n in ("LedgerStore", "InMemoryLedgerStore", "SqliteLedgerStore")
            ]
    assert offenders == []
