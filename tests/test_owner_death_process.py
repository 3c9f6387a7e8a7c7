"""Issue 8, point 1, with real processes: 3 `kowalski-node start` nodes; a task submitted
at C; its owner is SIGKILLed mid-task and never restarted. A survivor (an acceptor of the
task) takes it over and commits it once, with the right answer, and both survivors answer
its key with the stored result."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from kowalski_node.testing.node_cluster import ClusterError, NodeCluster, NodeProc, write_script

TURNS = [
    "```repl\nk = int(context)\nacc = k * k\nprint(acc)\n```",
    "```repl\nacc = acc + 1000 * k\nprint(acc)\n```",
    "```repl\nacc = acc + 7\nprint(acc)\n```",
    "FINAL_VAR(acc)",
]


def _submit(node: NodeProc, body: dict[str, Any]) -> dict[str, Any] | None:
    try:
        resp = httpx.post(node.api + "/v1/tasks", json=body, timeout=5)
    except httpx.HTTPError:
        return None
    return dict(resp.json()) if resp.status_code < 400 else None


def test_owner_killed_for_good_is_taken_over(tmp_path: Path) -> None:
    script = write_script(tmp_path / "script.json", TURNS, latency_ms={"root": 700})
    with NodeCluster(tmp_path) as cluster:
        nodes = cluster.start_mesh(3, backend=f"scripted:{script}")
        cluster.wait_converged(nodes, timeout=30)
        _a, _b, c = nodes
        k = 17
        body = {"prompt": "owner death", "context": str(k), "idempotency_key": "owner-death-17"}
        acc = c.post("/v1/tasks", body)
        task_id = acc["task_id"]
        deadline = time.monotonic() + 30
        view: dict[str, Any] = {}
        while time.monotonic() < deadline:
            view = c.task(task_id)
            if view.get("iteration", 0) >= 1 and view["status"] == "running":
                break
            time.sleep(0.05)
        assert view.get("status") == "running", view
        owner = next(n for n in nodes if n.peer_id == view["owner"])
        survivors = [n for n in nodes if n is not owner]
        cluster.kill(owner)  # never restarted
        killed = time.monotonic()
        done: dict[str, Any] | None = None
        while time.monotonic() < killed + 90:
            got = _submit(survivors[0], body)
            if got is not None and got.get("status") in ("done", "failed"):
                done = got
                break
            time.sleep(0.1)
        if done is None:
            raise ClusterError(f"the task stalled with its owner dead\n{survivors[0].log_tail(40)}")
        assert done["status"] == "done" and done["result"]["content"] == str(k * k + 1000 * k + 7)
        assert done["owner"] != owner.peer_id
        for node in survivors:  # every survivor answers the key with the stored result
            again = _submit(node, body)
            assert again is not None and again["status"] == "done" and not again["created"]
            assert again["result"]["content"] == done["result"]["content"]
            view = node.task(task_id)
            assert view["commits"] == 1
