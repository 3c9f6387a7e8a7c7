"""`install_remote` on real runtime Nodes (fake network, MockClock): a task's code blocks run
on another peer, and the task view says which one.

Nodes are wired the way `kowalski-node start` should wire them: `install_remote(node)`
before `node.run`. The leader is made to prefer peers (`local_weight`), since on one
machine every advert is alike and running locally would otherwise win on latency.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
import trio.testing

from kowalski_node.adapters.sqlite_store import SqliteLedgerStore
from kowalski_node.config import load_settings
from kowalski_node.remote import RemoteConfig, RemoteServices, install_remote
from kowalski_node.repl.base import ReplExecutor
from kowalski_node.runtime.execution import ExecutionEnv
from kowalski_node.runtime.node import Node, NodeOptions
from kowalski_node.runtime.node_service import NodeServiceImpl
from kowalski_node.runtime.profiles import node_profile
from kowalski_node.runtime.service import TaskSubmission
from kowalski_node.testing.fake_transport import FakeHub
from kowalski_node.testing.network import FakeNetwork, LinkProfile
from tests.rlm_fake_repl import FakeRepl

SCRIPT = {
    "responses": [
        "```repl\nn = len(context)\nsub = llm_query('summarise ' + context)\nprint(n, sub)\n```",
        "```repl\nout = f'{n} chars, {sub}'\n```",
        "FINAL_VAR(out)",
    ],
    "sub_responses": ["a summary"],
    "latency_ms": 50,
}


@asynccontextmanager
async def three_nodes(
    tmp: Path,
) -> AsyncIterator[
    tuple[dict[str, NodeServiceImpl], dict[str, RemoteServices], dict[str, FakeRepl]]
]:
    network = FakeNetwork(random.Random(3), LinkProfile(latency=0.0005, jitter=0.0002))
    hub = FakeHub(network)
    script = tmp / "script.json"
    script.write_text(json.dumps(SCRIPT))
    services: dict[str, NodeServiceImpl] = {}
    remotes: dict[str, RemoteServices] = {}
    repls: dict[str, FakeRepl] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.run)
        for name in ("a", "b", "c"):
            settings = load_settings(
                env={},
                overrides={"paths.home": str(tmp / "home"), "llm.backend": f"scripted:{script}"},
            )
            repl = repls[name] = FakeRepl()

            async def factory(_s: object, repl: FakeRepl = repl) -> ReplExecutor:
                return repl

            store = SqliteLedgerStore(tmp / name)
            node = Node(
                name,
                hub.transport(name),
                store,
                NodeOptions(
                    data_dir=tmp / name,
                    settings=settings,
                    profile=node_profile("desktop", settings),
                    bootstrap=[] if name == "a" else ["/memory/a/p2p/a"],
                    api_host=None,
                ),
                metadata=store,
                execution=ExecutionEnv(settings, repl_factory=factory),
                rng=random.Random(name),
            )
            remotes[name] = install_remote(node, RemoteConfig(local_weight=0.2))
            services[name] = NodeServiceImpl(node.tasks, node)

            async def serve(node: Node = node, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                async with node.transport.running(), trio.open_nursery() as inner:  # type: ignore[attr-defined]
                    await inner.start(node.run)
                    task_status.started()
                    await node.stopped.wait()

            await nursery.start(serve)
        try:
            yield services, remotes, repls
        finally:
            nursery.cancel_scope.cancel()


async def test_code_blocks_of_a_task_run_on_another_peer(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with three_nodes(tmp_path) as (services, remotes, repls):
        c = services["c"]
        with trio.fail_after(10):
            while True:
                peers = await c.peers()
                if sum(1 for p in peers if p.state == "alive" and p.cores) == 3:
                    break
                await trio.sleep(0.05)
        accepted = await c.submit(TaskSubmission(prompt="count it", context="abcdef", task_id="r1"))
        with trio.fail_after(30):
            while True:
                view = await c.get_task(accepted.task_id)
                assert view is not None
                if view.status.final:
                    break
                await trio.sleep(0.05)
        assert view.status == "done", view
        assert view.result is not None and view.result.content == "6 chars, a summary"
        leader = view.leader
        assert leader is not None
        extra = view.model_extra or {}
        repl_peers = extra.get("repl_peers", [])
        assert repl_peers and leader not in repl_peers, (leader, repl_peers)
        worker = repl_peers[0]
        # the peer's sandbox ran the blocks, under the leader's session
        ran = [code for sid, code in repls[worker].executed if sid.startswith(f"remote/{leader}/")]
        assert any("llm_query" in code for code in ran)
        remote = remotes[leader].remote_repl
        assert remote is not None and remote.stats["blocks_remote"] >= 2
        assert remotes[worker].repl_service.stats["sub_calls_forwarded"] == 1
