"""Real-process faults: SIGKILL and SIGSTOP of a task's leader (3 `kowalski-node start`
processes on 127.0.0.1, scripted backend with latency so a task takes a few seconds).

* SIGKILL mid-task: the task completes exactly once, its result is at the submitter,
  commits = 1, executions >= 2.
* SIGSTOP, failover, SIGCONT: the old leader's late writes are refused by epoch and
  counted (`stale_rejections_total` at the owner), commits = 1.

One cluster serves the module; before each test the harness resumes paused nodes and
restarts killed ones (`NodeCluster.heal`), so the tests pass in any order. Every wait is
bounded.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from kowalski_node.testing.node_cluster import ClusterError, NodeCluster, NodeProc, write_script

# Five root turns of ~0.7 s, each running a small block: a task takes ~4-5 s.
TURNS = [
    "```repl\nacc = [len(context)]\nprint(acc)\n```",
    "```repl\nacc.append(acc[-1] * 2)\nprint(acc)\n```",
    "```repl\nacc.append(acc[-1] + acc[-1])\nprint(acc)\n```",  # an identical block is not re-run
    "```repl\nacc.append(sum(acc))\nprint(acc)\n```",
    "FINAL_VAR(acc)",
]
EXPECTED = "[3, 6, 12, 21]"
ROOT_LATENCY_MS = 700


@pytest.fixture(scope="module")
def module_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeCluster]:
    tmp_path = tmp_path_factory.mktemp("faults")
    script = write_script(tmp_path / "script.json", TURNS, latency_ms={"root": ROOT_LATENCY_MS})
    with NodeCluster(tmp_path) as cluster:
        nodes = cluster.start_mesh(3, backend=f"scripted:{script}")
        cluster.wait_converged(nodes, timeout=20)
        yield cluster


@pytest.fixture
def cluster(module_cluster: NodeCluster) -> tuple[NodeCluster, list[NodeProc]]:
    """The module's 3 nodes, alive and converged: a test's kill or pause does not leak."""
    return module_cluster, module_cluster.heal(["a", "b", "c"])


def _led_elsewhere(submitter: NodeProc, prefix: str, tries: int = 12) -> dict[str, Any]:
    """Submit until a task is led by another peer (weighted rendezvous hashing decides)."""
    for i in range(tries):
        acc = submitter.post("/v1/tasks", {"prompt": f"{prefix} {i}", "context": "abc"})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            view = submitter.task(acc["task_id"])
            if view.get("leader"):
                break
            time.sleep(0.02)
        if view.get("leader") and view["leader"] != submitter.peer_id:
            return view
    raise ClusterError(f"none of {tries} tasks was led away from {submitter.name}")


def _wait_progress(node: NodeProc, task_id: str, iteration: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    view: dict[str, Any] = {}
    while time.monotonic() < deadline:
        view = node.task(task_id)
        if view.get("iteration", 0) >= iteration and view["status"] == "running":
            return
        time.sleep(0.02)
    raise ClusterError(f"task {task_id} never reached iteration {iteration}: {view}")


def _by_peer(nodes: list[NodeProc], peer_id: str) -> NodeProc:
    return next(n for n in nodes if n.peer_id == peer_id)


def test_sigstop_of_the_leader_then_sigcont_is_fenced(
    cluster: tuple[NodeCluster, list[NodeProc]],
) -> None:
    harness, nodes = cluster
    c = nodes[2]
    view = _led_elsewhere(c, "pause the leader")
    task_id, leader = view["task_id"], _by_peer(nodes, view["leader"])
    _wait_progress(c, task_id, 1)
    time.sleep(ROOT_LATENCY_MS / 2000)  # freeze it in the middle of a model call

    # every node is an acceptor of a 3-node cluster's tasks: the refusal may come from the
    # owner, a replica, or the old leader's own ledger (which learned the new ballot)
    def stale_total() -> int:
        return sum(n.get("/v1/status")["stale_rejections_total"] for n in nodes)

    stale_before = stale_total()
    leader.pause()
    try:
        # another peer takes over with a higher epoch while the old leader is frozen
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and c.task(task_id)["epoch"] < 2:
            time.sleep(0.02)
        assert c.task(task_id)["epoch"] >= 2, c.task(task_id)
    finally:
        leader.resume()
    # the resumed leader goes on from where it was paused: its next heartbeat,
    # checkpoint or commit carries the old epoch and is refused by the owner
    deadline = time.monotonic() + 20
    stale = stale_before
    while time.monotonic() < deadline:
        stale = stale_total()
        if stale > stale_before:
            break
        time.sleep(0.05)
    assert stale > stale_before, f"no stale write was refused\n{leader.log_tail(40)}"
    done = c.wait_task(task_id, timeout=60)
    assert done["status"] == "done" and done["result"]["content"] == EXPECTED, done
    assert done["epoch"] >= 2 and done["leader"] != leader.peer_id
    # a late write can only come from the old leader's run: wait (bounded) until it stopped
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and leader.get("/v1/status")["diagnostics"]["runs_active"]:
        time.sleep(0.05)
    final = c.task(task_id)
    assert final["commits"] == 1 and final["status"] == "done"
    assert final["result"]["content"] == EXPECTED
    actions = [h["action"] for h in final["history"]]
    assert actions.count("committed") == 1
    assert leader.alive()
    # the old leader is back in the cluster (it refuted its suspected death)
    harness.wait_converged(nodes, timeout=20)


def test_sigkill_of_the_leader_mid_task_completes_exactly_once(
    cluster: tuple[NodeCluster, list[NodeProc]],
) -> None:
    harness, nodes = cluster
    c = nodes[2]
    view = _led_elsewhere(c, "kill the leader")
    task_id, leader = view["task_id"], _by_peer(nodes, view["leader"])
    _wait_progress(c, task_id, 2)
    killed_at = time.monotonic()
    harness.kill(leader)
    done = c.wait_task(task_id, timeout=60)
    took = time.monotonic() - killed_at
    assert done["status"] == "done", done
    assert done["result"]["content"] == EXPECTED
    assert done["commits"] == 1 and done["executions"] >= 2, done
    assert done["epoch"] >= 2 and done["leader"] != leader.peer_id
    assert done["owner"] == c.peer_id and done["failovers"] >= 1
    actions = [h["action"] for h in done["history"]]
    assert actions.count("committed") == 1 and actions[-1] == "committed"
    assert took < 30, f"failover + finishing took {took:.1f}s"
    # the other survivor (the new leader, a replica) holds the committed record too
    survivor = next(n for n in nodes if n is not leader and n is not c)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and survivor.task(done["ledger_id"])["status"] != "done":
        time.sleep(0.05)
    assert survivor.task(done["ledger_id"])["commits"] == 1
    status = c.get("/v1/status")
    assert status["commits_total"] >= 1 and status["failovers_total"] >= 1
