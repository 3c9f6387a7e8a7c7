"""The Node runtime in one process: real cores and effect mapping, fake network, MockClock.

Nodes talk over `FakeTransport`s on a `FakeHub` (the seeded FakeNetwork from
kowalski_node/testing) and trio's MockClock drives every timer (membership probes,
leases, heartbeats, checkpoint acks), so these tests cover what the runtime itself does:
membership over direct messages, capability adverts, discovery through a bootstrap
address, owner/leader/replica coordination, RLM runs gated by acknowledged checkpoints,
failover after a leader dies, fencing of a paused leader, and the NodeService views.
"""

from __future__ import annotations

import json
import random
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.lowlevel
import trio.testing

from kowalski_node.adapters.sqlite_store import SqliteLedgerStore
from kowalski_node.config import load_settings
from kowalski_node.errors import TaskError
from kowalski_node.repl.base import ReplExecutor
from kowalski_node.runtime.execution import ExecutionEnv
from kowalski_node.runtime.node import Node, NodeOptions
from kowalski_node.runtime.node_service import NodeServiceImpl
from kowalski_node.runtime.profiles import node_profile
from kowalski_node.runtime.service import TaskStatus, TaskSubmission
from kowalski_node.tasks import TaskRecord
from kowalski_node.testing.fake_transport import FakeHub, FakeTransport
from kowalski_node.testing.network import FakeNetwork, LinkProfile
from tests.rlm_fake_repl import FakeRepl


@dataclass
class Running:
    name: str
    node: Node
    transport: FakeTransport
    service: NodeServiceImpl
    scope: trio.CancelScope
    store: SqliteLedgerStore


class Mesh:
    """N in-process nodes on one fake network."""

    def __init__(self, tmp: Path, nursery: trio.Nursery, script: dict[str, Any]) -> None:
        self.tmp = tmp
        self.nursery = nursery
        self.network = FakeNetwork(random.Random(7), LinkProfile(latency=0.0005, jitter=0.0003))
        self.hub = FakeHub(self.network)
        self.script_path = tmp / "script.json"
        self.script_path.write_text(json.dumps(script))
        self.nodes: dict[str, Running] = {}

    async def start(self, name: str, bootstrap: list[str] | None = None) -> Running:
        settings = load_settings(
            env={},
            overrides={
                "paths.home": str(self.tmp / "home"),
                "llm.backend": f"scripted:{self.script_path}",
            },
        )
        profile = node_profile("desktop", settings)
        store = SqliteLedgerStore(self.tmp / name)
        transport = self.hub.transport(name)
        if not self.network.is_up(name):
            self.network.restart(name)

        async def fake_repl(_settings: object) -> ReplExecutor:
            return FakeRepl()

        env = ExecutionEnv(settings, repl_factory=fake_repl)
        options = NodeOptions(
            data_dir=self.tmp / name,
            settings=settings,
            profile=profile,
            bootstrap=[f"/memory/{b}/p2p/{b}" for b in (bootstrap or [])],
            api_host=None,
        )
        node = Node(
            name, transport, store, options, metadata=store, execution=env, rng=random.Random(name)
        )
        scope = trio.CancelScope()

        async def serve(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                async with transport.running(), trio.open_nursery() as inner:
                    await inner.start(node.run)
                    task_status.started()
                    await node.stopped.wait()

        await self.nursery.start(serve)
        running = Running(name, node, transport, NodeServiceImpl(node.tasks, node), scope, store)
        self.nodes[name] = running
        return running

    def kill(self, name: str) -> None:
        self.network.kill(name)
        self.nodes[name].scope.cancel()

    def ids(self) -> set[str]:
        return set(self.nodes)


@asynccontextmanager
async def mesh_of(
    tmp: Path, script: dict[str, Any], names: tuple[str, ...] = ("a", "b", "c")
) -> AsyncIterator[Mesh]:
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        mesh = Mesh(tmp, nursery, script)
        nursery.start_soon(mesh.hub.run)
        first = await mesh.start(names[0])
        for name in names[1:]:
            await mesh.start(name, bootstrap=[first.name])
        try:
            yield mesh
        finally:
            nursery.cancel_scope.cancel()


def check_messages_leave_after_their_writes(mesh: Mesh) -> tuple[list[int], list[str]]:
    """Wrap every node's task sender: when a message about a task leaves, that node's
    SQLite file, read on a second connection (which sees only committed transactions),
    must hold the task's record exactly as the node's ledger in memory does. Returns a
    one-element list counting the checked messages, and the messages that left early."""
    checked = [0]
    early: list[str] = []
    for running in mesh.nodes.values():
        engine = running.node.tasks
        reader = sqlite3.connect(str(running.store.path))
        original = engine.sender.send

        def send(
            peer: str,
            type_: str,
            payload: Any,
            *,
            engine: Any = engine,
            reader: sqlite3.Connection = reader,
            original: Callable[[str, str, Any], bool] = original,
        ) -> bool:
            task_id = payload.get("k") if isinstance(payload, dict) else None
            if isinstance(task_id, str):
                row = reader.execute(
                    "SELECT record FROM tasks WHERE task_id=?", (task_id,)
                ).fetchone()
                durable = (
                    TaskRecord.from_wire(msgpack.unpackb(row[0], raw=False, strict_map_key=False))
                    if row is not None
                    else None
                )
                if durable != engine.ledger.get(task_id):
                    early.append(f"{type_} for {task_id}")  # (raising here would be logged)
                checked[0] += 1
            return original(peer, type_, payload)

        engine.sender.send = send  # type: ignore[method-assign]  # a checking wrapper
    return checked, early


async def wait_for(cond: Callable[[], bool | Awaitable[bool]], limit: float, what: str) -> float:
    """Poll in virtual time; returns how long it took."""
    started = trio.current_time()
    while trio.current_time() - started < limit:
        got = cond()
        if not isinstance(got, bool):
            got = await got
        if got:
            return trio.current_time() - started
        await trio.sleep(0.005)
    raise AssertionError(f"{what} not reached within {limit}s (virtual)")


async def all_alive(mesh: Mesh, names: set[str]) -> bool:
    for name in names:
        peers = await mesh.nodes[name].service.peers()
        alive = {p.peer_id for p in peers if p.state == "alive" and p.cores}
        if not names <= alive:
            return False
    return True


async def test_membership_converges_and_detects_a_dead_peer(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with mesh_of(tmp_path, {"responses": ["FINAL(1)"]}) as mesh:
        took = await wait_for(lambda: all_alive(mesh, mesh.ids()), 2.0, "convergence")
        assert took < 0.5
        status = await mesh.nodes["a"].service.status()
        assert status.peers_by_state == {"alive": 3}
        await trio.sleep(2.0)
        mesh.kill("c")

        async def c_dead() -> bool:
            for name in ("a", "b"):
                peers = {p.peer_id: p.state for p in await mesh.nodes[name].service.peers()}
                if peers.get("c") not in ("dead", None):
                    return False
            return True

        detected = await wait_for(c_dead, 3.0, "c declared dead")
        assert detected < 1.0, detected


SLOW_SCRIPT = {
    "responses": [
        "Let me think about it first.",
        "```repl\nx = len(context)\nprint(x)\n```",
        "Still checking.",
        "FINAL(done after thinking)",
    ],
    "latency_ms": 400,
}


async def test_task_led_by_a_peer_completes_once_with_progress(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with mesh_of(tmp_path, SLOW_SCRIPT) as mesh:
        await wait_for(lambda: all_alive(mesh, mesh.ids()), 2.0, "convergence")
        checked, early = check_messages_leave_after_their_writes(mesh)
        c = mesh.nodes["c"].service
        acc = await c.submit(TaskSubmission(prompt="think", context="abc", task_id="job-1"))
        assert acc.task_id == "job-1" and acc.created and acc.owner == "c"
        events = []

        async def collect() -> None:
            async for ev in c.task_events("job-1"):
                events.append(ev)

        async with trio.open_nursery() as n:
            n.start_soon(collect)
            with trio.fail_after(20):
                while True:
                    view = await c.get_task("job-1")
                    assert view is not None
                    if view.status.final:
                        break
                    await trio.sleep(0.05)
        assert view.status is TaskStatus.DONE, view
        assert view.result is not None and view.result.content == "done after thinking"
        assert view.commits == 1 and view.executions == 1 and view.epoch == 1
        assert view.leader in mesh.ids()
        assert events and events[-1].iteration >= 3
        assert all(e.peer == view.leader and e.epoch == 1 for e in events)
        assert all(e.active_devices >= 1 for e in events)
        # the leader's and a replica's ledgers hold the committed record
        leader = mesh.nodes[view.leader or ""]
        assert leader.node.tasks.ledger.get(view.ledger_id).commits == 1  # type: ignore[attr-defined,union-attr]
        # same key again: the stored result, nothing runs again
        again = await c.submit(TaskSubmission(prompt="think", context="abc", task_id="job-1"))
        assert not again.created and again.result is not None
        assert (await c.get_task("job-1")).executions == 1  # type: ignore[union-attr]
        assert early == [] and checked[0] >= 10  # offers, leases, checkpoints, the commit


async def test_leader_killed_mid_task_fails_over_from_the_checkpoint(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with mesh_of(tmp_path, SLOW_SCRIPT) as mesh:
        await wait_for(lambda: all_alive(mesh, mesh.ids()), 2.0, "convergence")
        # submit at each node until one task is led by another peer
        owner_name, task_id = "", ""
        for i in range(12):
            owner_name = "abc"[i % 3]
            acc = await mesh.nodes[owner_name].service.submit(
                TaskSubmission(prompt=f"failover {i}", context="xyz")
            )
            await trio.sleep(0.01)
            view = await mesh.nodes[owner_name].service.get_task(acc.task_id)
            assert view is not None
            if view.leader and view.leader != owner_name:
                task_id = acc.task_id
                break
        assert task_id, "no task was led away from its owner"
        owner = mesh.nodes[owner_name].service
        view = await owner.get_task(task_id)
        assert view is not None and view.leader is not None
        first_leader = view.leader
        # wait for a checkpoint past the first step, then kill the leader
        await wait_for(
            lambda: (mesh.nodes[owner_name].node.tasks.ledger.get(task_id).checkpoint or 0) != 0,  # type: ignore[union-attr]
            5.0,
            "first checkpoint",
        )
        mesh.kill(first_leader)
        killed_at = trio.current_time()
        with trio.fail_after(30):
            while True:
                view = await owner.get_task(task_id)
                assert view is not None
                if view.status.final:
                    break
                await trio.sleep(0.05)
        assert view.status is TaskStatus.DONE, view
        assert view.commits == 1
        assert view.epoch >= 2 and view.leader != first_leader
        assert view.executions == 2 and view.failovers >= 1
        assert view.result is not None and view.result.content == "done after thinking"
        assert trio.current_time() - killed_at < 10
        actions = [h.action for h in view.history]
        assert "failover" in actions and actions[-1] == "committed"


async def test_paused_leader_is_fenced_after_failover(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with mesh_of(tmp_path, SLOW_SCRIPT) as mesh:
        await wait_for(lambda: all_alive(mesh, mesh.ids()), 2.0, "convergence")
        owner_name, task_id = "", ""
        for i in range(12):
            owner_name = "abc"[i % 3]
            acc = await mesh.nodes[owner_name].service.submit(
                TaskSubmission(prompt=f"fence {i}", context="xyz")
            )
            await trio.sleep(0.01)
            view = await mesh.nodes[owner_name].service.get_task(acc.task_id)
            if view is not None and view.leader and view.leader != owner_name:
                task_id = acc.task_id
                break
        assert task_id
        owner = mesh.nodes[owner_name]
        view = await owner.service.get_task(task_id)
        assert view is not None and view.leader is not None
        old = view.leader
        await trio.sleep(0.5)
        mesh.network.pause(old)  # its messages are dropped, it hears nothing
        await wait_for(
            lambda: (owner.node.tasks.ledger.get(task_id).epoch or 0) >= 2,  # type: ignore[union-attr]
            10.0,
            "failover to epoch 2",
        )
        mesh.network.resume(old, trio.current_time())
        with trio.fail_after(30):
            while True:
                view = await owner.service.get_task(task_id)
                assert view is not None
                if view.status.final:
                    break
                await trio.sleep(0.05)
        await trio.sleep(2.0)
        assert view.status is TaskStatus.DONE and view.commits == 1
        assert view.leader != old
        old_node = mesh.nodes[old].node
        # the old leader no longer runs (or leads) the task: fenced or replaced
        assert not old_node.tasks.runs.leads(task_id)
        assert old_node.tasks.coord.led(task_id) is None


async def test_drain_refuses_new_tasks(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with mesh_of(tmp_path, {"responses": ["FINAL(1)"]}, names=("a", "b")) as mesh:
        await wait_for(lambda: all_alive(mesh, mesh.ids()), 2.0, "convergence")
        a = mesh.nodes["a"]
        a.node.request_stop()
        await trio.lowlevel.checkpoint()
        with pytest.raises(TaskError, match="shutting down"):
            await a.service.submit(TaskSubmission(prompt="too late"))
        with trio.fail_after(15):
            await a.node.stopped.wait()

        async def a_left() -> bool:
            states = {p.peer_id: p.state for p in await mesh.nodes["b"].service.peers()}
            return states.get("a") in ("left", None)

        await wait_for(a_left, 3.0, "a announced as left")
