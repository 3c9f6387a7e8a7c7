"""SIGTERM drains a real node: its led tasks move to another peer, it exits 0, nothing is lost."""

from __future__ import annotations

import time
from pathlib import Path

from kowalski_node.testing.node_cluster import NodeCluster, write_script

SLOW = {
    "responses": [
        {"text": "Thinking, step 1.", "latency_ms": 400},
        {"text": "Thinking, step 2.", "latency_ms": 400},
        {"text": "Thinking, step 3.", "latency_ms": 400},
        {"text": "Thinking, step 4.", "latency_ms": 400},
        {"text": "FINAL(finished after a handover)", "latency_ms": 400},
    ]
}


def test_sigterm_hands_over_leadership_and_exits_zero(tmp_path: Path) -> None:
    script = write_script(tmp_path / "slow.json", SLOW["responses"])
    with NodeCluster(tmp_path) as cluster:
        a, b, c = cluster.start_mesh(3, backend=f"scripted:{script}")
        cluster.wait_converged([a, b, c], timeout=20)
        # find a task owned by C and led by A (rendezvous ranking decides; try a few)
        task_id = ""
        for i in range(15):
            acc = c.post("/v1/tasks", {"prompt": f"long job {i}"})
            deadline = time.monotonic() + 5
            view = c.task(acc["task_id"])
            while not view.get("leader") and time.monotonic() < deadline:
                time.sleep(0.02)
                view = c.task(acc["task_id"])
            if view.get("leader") == a.peer_id:
                task_id = acc["task_id"]
                break
        assert task_id, "no task landed on A"
        # let it checkpoint a step or two, then SIGTERM its leader
        deadline = time.monotonic() + 10
        while (c.task(task_id).get("checkpoint_step") or 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        started = time.monotonic()
        assert a.terminate(timeout=20) == 0
        drain_s = time.monotonic() - started
        assert drain_s < 12, drain_s
        log = a.log_tail(400)
        assert "event=run_handed_over" in log and "event=drain_finished" in log
        view = c.wait_task(task_id, timeout=60)
        assert view["status"] == "done", view
        assert view["result"]["content"] == "finished after a handover"
        assert view["commits"] == 1 and view["epoch"] >= 2
        assert view["leader"] in (b.peer_id, c.peer_id)
        assert view["executions"] == 2
        assert "failover" in [h["action"] for h in view["history"]]
        # the survivors see A as having left (a graceful leave, not a failure)
        states = {p["peer_id"]: p["state"] for p in b.peers()}
        assert states.get(a.peer_id, "left") in ("left", "dead")
