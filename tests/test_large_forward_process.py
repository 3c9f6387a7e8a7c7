"""Issue 8, point 1, for large submissions, with real processes: a keyed submission with
a context over the 4 MiB frame limit, received by a node outside the key's home acceptor
set, is still forwarded to the home (as a context blob reference; the home fetches the
verified blob), so a client's retry of the same key at another node while the first
node is paused finds the same task: one task id, one commit, the right answer.

Before the fix such a submission (> 3 MiB) was owned by whichever node received it."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx

from kowalski_node.election.hashing import home_acceptors
from kowalski_node.testing.node_cluster import ClusterError, NodeCluster, NodeProc, write_script

TURNS = [
    "```repl\nn = len(context)\nprint(n)\n```",
    "```repl\nacc = n * 3 + 1\nprint(acc)\n```",
    "FINAL_VAR(acc)",
]
SIZE = (4 << 20) + 123_457  # over the 4 MiB frame limit


def _context(size: int) -> str:
    unit = "kowalski forwards large contexts as blobs 0123456789\n"
    return (unit * (size // len(unit) + 1))[:size]


def _post(node: NodeProc, body: dict[str, Any], timeout: float) -> tuple[int, dict[str, Any]]:
    try:
        resp = httpx.post(node.api + "/v1/tasks", json=body, timeout=timeout)
    except httpx.HTTPError as exc:
        return 0, {"error": repr(exc)}
    return resp.status_code, dict(resp.json())


def _key_outside(nodes: list[NodeProc], outsider: NodeProc) -> str:
    """An idempotency key whose home acceptor set (over these members) excludes `outsider`."""
    members = [n.peer_id for n in nodes]
    for i in range(1000):
        key = f"large-forward-{i}"
        if outsider.peer_id not in home_acceptors(key, members):
            return key
    raise ClusterError("no key outside the node's home set")


def test_large_submission_retried_elsewhere_is_one_task(tmp_path: Path) -> None:
    script = write_script(tmp_path / "script.json", TURNS, latency_ms={"root": 300})
    with NodeCluster(tmp_path) as cluster:
        nodes = cluster.start_mesh(4, backend=f"scripted:{script}")
        cluster.wait_converged(nodes, timeout=40)
        first = nodes[0]
        key = _key_outside(nodes, first)
        home = home_acceptors(key, [n.peer_id for n in nodes])
        retry_at = next(n for n in nodes if n is not first)
        body = {"prompt": "how long is the context, times 3, plus 1?", "context": _context(SIZE)}
        body["idempotency_key"] = key

        # the first attempt goes to `first`, which is paused while it handles it (the
        # client times out), and the client retries the same key at another node
        answers: dict[str, tuple[int, dict[str, Any]]] = {}

        def first_attempt() -> None:
            # A client whose connection the paused node dropped sends the same key again,
            # as any client would (seen once in CI: "Server disconnected without sending a
            # response" right after SIGCONT). Bounded: 3 tries.
            for _ in range(3):
                answers["first"] = _post(first, body, timeout=180)
                if answers["first"][0] != 0:
                    return
                time.sleep(1.0)

        thread = threading.Thread(target=first_attempt, daemon=True)
        thread.start()
        time.sleep(0.5)  # the body is on its way (or being handled)
        first.pause()
        try:
            deadline = time.monotonic() + 120
            retry: tuple[int, dict[str, Any]] = (0, {})
            while time.monotonic() < deadline:
                retry = _post(retry_at, body, timeout=120)
                if 200 <= retry[0] < 300:
                    break
                time.sleep(0.5)  # 503 no_quorum / context_not_replicated: retry, as told
            assert 200 <= retry[0] < 300, retry
        finally:
            first.resume()
        thread.join(timeout=200)
        assert "first" in answers, "the first attempt never answered"
        code, got = answers["first"]
        assert 200 <= code < 300, got
        task_id = retry[1]["task_id"]
        assert got["task_id"] == task_id
        assert retry[1]["owner"] in home and got["owner"] in home  # never owned by `first`
        # both may say `created` (two home members each stored the key before hearing
        # of the other: two proposers of one task id, one of which yields); what counts
        # is one task id and one committed result

        expected = str(SIZE * 3 + 1)
        done = retry_at.wait_task(task_id, timeout=180)
        assert done["status"] == "done", done
        assert done["result"]["content"] == expected
        committed_by = set()
        for node in nodes:  # every node answers the key with the one stored result
            again_code, again = _post(node, body, timeout=120)
            assert 200 <= again_code < 300, (node.name, again)
            assert again["task_id"] == task_id and not again["created"]
            assert again["status"] == "done" and again["result"]["content"] == expected
            view = _view(node, task_id)
            if view is None:
                continue  # `first` holds no copy: it only forwarded the key
            assert view["commits"] <= 1, (node.name, view)
            assert view["owner"] != first.peer_id, view
            if view["commits"]:
                committed_by.add(view["owner"])
        assert len(committed_by) == 1, committed_by  # one owner committed it


def _view(node: NodeProc, task_id: str) -> dict[str, Any] | None:
    resp = httpx.get(f"{node.api}/v1/tasks/{task_id}", timeout=10)
    return None if resp.status_code == 404 else dict(resp.json())
