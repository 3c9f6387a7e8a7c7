"""Real `kowalski-node start` processes on 127.0.0.1 (kowalski_node/testing/node_cluster.py).

One 3-node mesh per module (starting processes costs ~1-2 s each); every wait is
bounded and the teardown checks that no process is left.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kowalski_node.identity import ClusterKey
from kowalski_node.testing.node_cluster import NodeCluster, NodeProc, write_script

SCRIPT = [
    "Let me look at the context.\n```repl\nprint(len(context))\n```",
    "FINAL(the answer is 42)",
]


@pytest.fixture(scope="module")
def module_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeCluster]:
    tmp = tmp_path_factory.mktemp("mesh")
    script = write_script(tmp / "script.json", SCRIPT)
    cluster = NodeCluster(tmp)
    try:
        nodes = cluster.start_mesh(3, backend=f"scripted:{script}")
        cluster.wait_converged(nodes, timeout=20)
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def mesh(module_cluster: NodeCluster) -> tuple[NodeCluster, list[NodeProc]]:
    """The module's 3 nodes, all alive and converged whatever the tests before did."""
    return module_cluster, module_cluster.heal(["a", "b", "c"])


def test_three_nodes_form_a_cluster(mesh: tuple[NodeCluster, list[NodeProc]]) -> None:
    _cluster, nodes = mesh
    for node in nodes:
        peers = {p["peer_id"]: p for p in node.peers()}
        assert set(peers) == {n.peer_id for n in nodes}
        assert peers[node.peer_id]["is_self"]
        for p in peers.values():
            assert p["state"] == "alive"
            assert p["languages"] == ["python"] and p["cores"] >= 1
        status = node.get("/v1/status")
        assert status["peer_id"] == node.peer_id
        assert status["peers_by_state"] == {"alive": 3}


def test_task_submitted_at_c_is_led_elsewhere_and_completes(
    mesh: tuple[NodeCluster, list[NodeProc]],
) -> None:
    _, (a, b, c) = mesh
    # leaders are chosen by weighted rendezvous hashing: with 3 peers, 8 tasks all landing
    # on the submitter has a chance of ~(1/3)^8. A peer that is suspected (a starved event
    # loop on a loaded CI machine) is not a candidate while the suspicion lasts (<= 2.5 s),
    # so the submissions are spread over ~3 s rather than sent in one burst.
    ids = []
    for i in range(8):
        acc = c.post("/v1/tasks", {"prompt": f"how long is it? #{i}", "context": "x" * (i + 1)})
        assert acc["owner"] == c.peer_id
        ids.append(acc["task_id"])
        time.sleep(0.4)
    views = [c.wait_task(t, timeout=60) for t in ids]
    for view in views:
        assert view["status"] == "done", view
        assert view["commits"] == 1 and view["executions"] >= 1
        assert view["result"]["content"] == "the answer is 42"
        # the owner is c unless a (false, on a loaded machine) "c is dead" verdict made an
        # acceptor take the task over; either way it is a member and the task is done once
        assert view["owner"] in (a.peer_id, b.peer_id, c.peer_id)
    elsewhere = [v for v in views if v["leader"] != c.peer_id]
    assert elsewhere, [v["leader"] for v in views]
    led = elsewhere[0]
    assert led["leader"] in (a.peer_id, b.peer_id)
    # code blocks ran on the best-scored peer (the leader itself or another member)
    assert led["repl_peers"] and set(led["repl_peers"]) <= {a.peer_id, b.peer_id, c.peer_id}
    actions = [h["action"] for h in led["history"]]
    assert actions[0] == "submitted" and "leased" in actions and actions[-1] == "committed"
    # the leader and the replicas hold the committed record too
    holder = a if led["leader"] == a.peer_id else b
    replica_view = holder.task(led["ledger_id"])
    assert replica_view["status"] == "done"


def test_resubmission_returns_the_stored_result(mesh: tuple[NodeCluster, list[NodeProc]]) -> None:
    _, (_, b, _) = mesh
    body = {"prompt": "idempotent please", "idempotency_key": "cluster-key-1"}
    first = b.post("/v1/tasks", body)
    done = b.wait_task(first["task_id"], timeout=60)
    again = b.post("/v1/tasks", body)
    assert again["created"] is False and again["task_id"] == first["task_id"]
    assert again["status"] == "done" and again["result"]["content"] == "the answer is 42"
    assert b.task(first["task_id"])["executions"] == done["executions"]
    conflict = b.post_raw("/v1/tasks", {**body, "prompt": "something else"})
    assert conflict.status_code == 409


def test_outsider_without_the_key_is_refused(
    mesh: tuple[NodeCluster, list[NodeProc]], tmp_path: Path
) -> None:
    _cluster, (a, b, c) = mesh
    outsider_cluster = NodeCluster(tmp_path, key=ClusterKey.generate())
    try:
        outsider = outsider_cluster.start("outsider", bootstrap=[a.addr])
        time.sleep(1.5)
        assert {p["peer_id"] for p in outsider.peers()} == {outsider.peer_id}
        for node in (a, b, c):
            assert outsider.peer_id not in {p["peer_id"] for p in node.peers()}
        assert "key_mismatch" in outsider.log_tail(200)
    finally:
        outsider_cluster.close()


def test_restarted_node_keeps_its_results(mesh: tuple[NodeCluster, list[NodeProc]]) -> None:
    cluster, (a, b, c) = mesh
    body = {"prompt": "remember me", "idempotency_key": "restart-key-1"}
    first = a.post("/v1/tasks", body)
    done = a.wait_task(first["task_id"], timeout=60)
    assert done["status"] == "done"
    assert a.terminate() == 0
    a2 = cluster.restart(a, bootstrap=[b.addr])
    assert a2.peer_id == a.peer_id
    view = a2.task(first["task_id"])
    assert view["status"] == "done" and view["executions"] == done["executions"]
    again = a2.post("/v1/tasks", body)
    assert again["created"] is False and again["result"]["content"] == "the answer is 42"
    assert a2.task(first["task_id"])["executions"] == done["executions"]
    cluster.wait_converged([a2, b, c], timeout=20)


def test_no_capable_device_is_a_clear_error(mesh: tuple[NodeCluster, list[NodeProc]]) -> None:
    _, (_, b, _) = mesh  # not a: the restart test replaced that process
    resp = b.post_raw("/v1/tasks", {"prompt": "needs a big model", "model": "no-such-model-70b"})
    assert resp.status_code == 503, resp.text
    error = resp.json()["error"]
    assert error["code"] == "no_capable_device"
    assert "lack model 'no-such-model-70b'" in error["message"] and "3" in error["message"]
    # a model the peers advertise is fine
    ok = b.post("/v1/tasks", {"prompt": "scripted is here", "model": "scripted"})
    assert b.wait_task(ok["task_id"], timeout=60)["status"] == "done"


@pytest.mark.slow  # 10-18 s of process starts for a rare path; CI time is at its limit
def test_mesh_starts_again_in_order_when_the_first_nodes_port_was_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """start_mesh starts every node at once on a port it chose for the first one; if
    another process took that port in the meantime, the first node cannot listen and
    exits, and the mesh is started again one node after another (on ports the nodes
    choose themselves)."""
    import socket

    from kowalski_node.testing import node_cluster

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        monkeypatch.setattr(node_cluster, "_free_tcp_port", lambda: taken)
        script = write_script(tmp_path / "script.json", SCRIPT)
        with NodeCluster(tmp_path) as cluster:
            nodes = cluster.start_mesh(2, backend=f"scripted:{script}")
            cluster.wait_converged(nodes, timeout=20)
            assert all(f"/tcp/{taken}/" not in n.addr for n in nodes)
            assert {p["peer_id"] for p in nodes[1].peers()} == {n.peer_id for n in nodes}
