"""The HTTP API over a fake NodeService: every endpoint, idempotency, batches, SSE, errors."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from kowalski_node.errors import TaskError
from kowalski_node.runtime.service import TaskStatus
from kowalski_node.sse import sse_events
from tests.http_fakes import OTHER_ID, SELF_ID, FakeNodeService, serve_fake


async def _post(client: httpx.AsyncClient, path: str, body: Any) -> httpx.Response:
    return await client.post(path, json=body)


def _error(resp: httpx.Response) -> dict[str, Any]:
    body = resp.json()
    assert set(body) == {"error"}, body
    err: dict[str, Any] = body["error"]
    assert err["code"] and err["message"]
    return err


async def test_submit_get_and_list() -> None:
    fake = FakeNodeService()
    async with serve_fake(fake) as ep, httpx.AsyncClient(base_url=ep.url) as client:
        resp = await _post(client, "/v1/tasks", {"prompt": "Summarise the reports"})
        assert resp.status_code == 202
        accepted = resp.json()
        task_id = accepted["task_id"]
        assert accepted["status"] == "queued" and accepted["created"] is True
        assert accepted["owner"] == SELF_ID
        assert resp.headers["location"] == f"/v1/tasks/{task_id}"

        view = (await client.get(f"/v1/tasks/{task_id}")).json()
        assert view["status"] == "queued" and view["prompt_preview"] == "Summarise the reports"
        assert view["history"][0]["action"] == "submitted"

        fake.start(task_id)
        fake.progress(task_id, 1)
        view = (await client.get(f"/v1/tasks/{task_id}")).json()
        assert view["status"] == "running" and view["leader"] == OTHER_ID and view["epoch"] == 1
        assert view["executions"] == 1 and view["iteration"] == 1

        await _post(client, "/v1/tasks", {"prompt": "second"})
        listing = (await client.get("/v1/tasks")).json()
        assert listing["count"] == 2
        assert [t["prompt_preview"] for t in listing["tasks"]] == [
            "second",
            "Summarise the reports",
        ]
        assert "result" not in listing["tasks"][0] and "history" not in listing["tasks"][0]
        running = (await client.get("/v1/tasks", params={"status": "running"})).json()
        assert [t["task_id"] for t in running["tasks"]] == [task_id]
        one = (await client.get("/v1/tasks", params={"limit": 1})).json()
        assert one["count"] == 1


async def test_resubmission_is_idempotent_and_returns_the_stored_result() -> None:
    fake = FakeNodeService()
    body = {"prompt": "count words", "idempotency_key": "job-42", "context": "a b c"}
    async with serve_fake(fake) as ep, httpx.AsyncClient(base_url=ep.url) as client:
        first = await _post(client, "/v1/tasks", body)
        assert first.status_code == 202
        task_id = first.json()["task_id"]
        again = await _post(client, "/v1/tasks", body)
        assert again.status_code == 200
        assert again.json()["task_id"] == task_id and again.json()["created"] is False
        fake.start(task_id)
        fake.finish(task_id, "3 words")
        done = (await _post(client, "/v1/tasks", body)).json()
        assert done["status"] == "done" and done["result"]["content"] == "3 words"
        assert len(fake.tasks) == 1 and fake.executions_total == 1 and fake.commits_total == 1

        conflict = await _post(client, "/v1/tasks", {**body, "prompt": "something else"})
        assert conflict.status_code == 409
        assert _error(conflict) | {} == {
            "code": "idempotency_conflict",
            "message": _error(conflict)["message"],
            "field": "idempotency_key",
        }
        assert task_id in _error(conflict)["message"]


async def test_client_task_id_doubles_as_idempotency_key() -> None:
    """docs/api.md: NodeExecutor retries with the same task_id must not start a second task."""
    fake = FakeNodeService()
    body = {"task_id": "task-3f2a9c1b7d4e", "prompt": "hi", "rlm": {"max_iterations": 7}}
    async with serve_fake(fake) as ep, httpx.AsyncClient(base_url=ep.url) as client:
        a = await _post(client, "/v1/tasks", body)
        b = await _post(client, "/v1/tasks", body)
        assert a.status_code == 202 and b.status_code == 200
        assert a.json()["task_id"] == b.json()["task_id"] == "task-3f2a9c1b7d4e"
        assert len(fake.tasks) == 1
        view = (await client.get("/v1/tasks/task-3f2a9c1b7d4e")).json()
        assert view["max_iterations"] == 7


async def test_batch_submission_in_order_with_duplicates() -> None:
    fake = FakeNodeService()
    tasks = [{"prompt": f"task {i}", "idempotency_key": f"k{i}"} for i in range(300)]
    tasks.append({"prompt": "task 7", "idempotency_key": "k7"})  # duplicate inside the batch
    async with serve_fake(fake) as ep, httpx.AsyncClient(base_url=ep.url) as client:
        resp = await _post(client, "/v1/tasks/batch", {"tasks": tasks})
        assert resp.status_code == 202
        body = resp.json()
        assert body["created"] == 300 and body["duplicates"] == 1
        ids = [a["task_id"] for a in body["accepted"]]
        assert len(ids) == 301 and ids[300] == ids[7] and len(set(ids)) == 300
        assert [fake.tasks[i].view.prompt_preview for i in ids[:3]] == [
            "task 0",
            "task 1",
            "task 2",
        ]

        alias = await _post(client, "/v1/tasks:batch", {"tasks": tasks[:2]})
        assert alias.status_code == 200 and alias.json()["duplicates"] == 2
        assert len(fake.tasks) == 300


async def test_batch_limits_and_bad_items() -> None:
    fake = FakeNodeService()
    async with serve_fake(fake, max_batch=5) as ep, httpx.AsyncClient(base_url=ep.url) as client:
        too_many = await _post(client, "/v1/tasks/batch", {"tasks": [{"prompt": "x"}] * 6})
        assert too_many.status_code == 413 and _error(too_many)["field"] == "tasks"
        bad = await _post(
            client, "/v1/tasks/batch", {"tasks": [{"prompt": "ok"}, {"prompt": 5}, {}]}
        )
        assert bad.status_code == 400
        err = _error(bad)
        assert err["field"] == "tasks[1].prompt" and "more problem" in err["message"]
        empty = await _post(client, "/v1/tasks/batch", {"tasks": []})
        assert empty.status_code == 400 and _error(empty)["field"] == "tasks"
        assert fake.tasks == {}


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        (b"{not json", "invalid_json", None),
        (b"", "invalid_json", None),
        (b"[1, 2]", "invalid_body", None),
        (b'{"context": "x"}', "missing_field", "prompt"),
        (b'{"prompt": 42}', "invalid_field", "prompt"),
        (b'{"prompt": "   "}', "invalid_field", "prompt"),
        (b'{"prompt": "x", "promt": "typo"}', "unknown_field", "promt"),
        (
            b'{"prompt": "x", "context": "@@@", "context_encoding": "base64"}',
            "invalid_field",
            "context",
        ),
        (b'{"prompt": "x", "context_encoding": "zip"}', "invalid_field", "context_encoding"),
        (b'{"prompt": "x", "rlm": {"max_iterations": 0}}', "invalid_field", "rlm"),
        (b'{"prompt": "x", "rlm": {"max_iteratons": 3}}', "invalid_field", "rlm"),
        (b'{"prompt": "x", "task_id": "../etc/passwd"}', "invalid_field", "task_id"),
        (b'{"prompt": "x", "priority": 5000}', "invalid_field", "priority"),
    ],
)
async def test_malformed_submissions_are_400_naming_the_field(
    body: bytes, code: str, field: str | None
) -> None:
    fake = FakeNodeService()
    async with serve_fake(fake) as ep, httpx.AsyncClient(base_url=ep.url) as client:
        resp = await client.post(
            "/v1/tasks", content=body, headers={"content-type": "application/json"}
        )
        assert resp.status_code == 400, resp.text
        err = _error(resp)
        assert err["code"] == code
        assert err.get("field") == field
        if field:
            assert field in err["message"]
        assert fake.tasks == {}


async def test_oversized_bodies_are_413_with_or_without_content_length() -> None:
    fake = FakeNodeService()
    big = json.dumps({"prompt": "x", "context": "y" * 5000}).encode()

    async def chunks() -> Any:
        for i in range(0, len(big), 512):
            yield big[i : i + 512]

    async with (
        serve_fake(fake, max_body_bytes=1000) as ep,
        httpx.AsyncClient(base_url=ep.url) as client,
    ):
        declared = await client.post("/v1/tasks", content=big)
        assert declared.status_code == 413 and _error(declared)["code"] == "body_too_large"
        streamed = await client.post("/v1/tasks", content=chunks())
        assert streamed.status_code == 413 and _error(streamed)["code"] == "body_too_large"
        small = await _post(client, "/v1/tasks", {"prompt": "fits"})
        assert small.status_code == 202
    assert len(fake.tasks) == 1


async def test_bytes_context_travels_base64() -> None:
    fake = FakeNodeService()
    raw = bytes(range(256))
    body = {"prompt": "x", "context": base64.b64encode(raw).decode(), "context_encoding": "base64"}
    async with serve_fake(fake) as ep, httpx.AsyncClient(base_url=ep.url) as client:
        assert (await _post(client, "/v1/tasks", body)).status_code == 202
    assert fake.submissions[0].context_value() == raw


async def test_unknown_and_invalid_task_ids_and_routes() -> None:
    fake = FakeNodeService()
    async with serve_fake(fake) as ep, httpx.AsyncClient(base_url=ep.url) as client:
        for path in ("/v1/tasks/task-nope", "/v1/tasks/task-nope/events"):
            resp = await client.get(path)
            assert resp.status_code == 404 and _error(resp)["code"] == "task_not_found"
        resp = await client.post("/v1/tasks/task-nope/cancel")
        assert resp.status_code == 404 and _error(resp)["code"] == "task_not_found"
        bad = await client.get("/v1/tasks/" + "x" * 200)
        assert bad.status_code == 400 and _error(bad)["field"] == "task_id"
        nothing = await client.get("/v1/nothing")
        assert nothing.status_code == 404 and _error(nothing)["code"] == "not_found"
        wrong = await client.delete("/v1/tasks")
        assert wrong.status_code == 405 and _error(wrong)["code"] == "method_not_allowed"
        for params, field in (
            ({"limit": "0"}, "limit"),
            ({"limit": "x"}, "limit"),
            ({"status": "zzz"}, "status"),
        ):
            resp = await client.get("/v1/tasks", params=params)
            assert resp.status_code == 400 and _error(resp)["field"] == field


async def _read_events(client: httpx.AsyncClient, path: str) -> list[tuple[str, Any]]:
    """Every event of the stream, read by the one SSE reader the clients use."""
    async with client.stream("GET", path) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        return [(name, json.loads(data)) async for name, data in sse_events(resp.aiter_lines())]


async def test_event_stream_follows_a_task_to_completion() -> None:
    fake = FakeNodeService()
    async with serve_fake(fake) as ep, httpx.AsyncClient(base_url=ep.url) as client:
        task_id = (await _post(client, "/v1/tasks", {"prompt": "go"})).json()["task_id"]
        got: list[tuple[str, Any]] = []

        async def reader() -> None:
            got.extend(await _read_events(client, f"/v1/tasks/{task_id}/events"))

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await trio.sleep(0.1)
                fake.start(task_id)
                fake.progress(task_id, 1, tokens=100)
                await trio.sleep(0.05)
                fake.progress(task_id, 2, tokens=200)
                await trio.sleep(0.05)
                fake.finish(task_id, "the answer")
        names = [n for n, _ in got]
        assert names == ["state", "progress", "progress", "done"]
        assert got[0][1]["status"] == "queued"
        assert got[1][1]["iteration"] == 1 and got[1][1]["active_devices"] == 2
        assert got[2][1]["tokens_in"] == 200 and got[2][1]["peer"] == OTHER_ID
        done = got[3][1]
        assert done["status"] == "done" and done["result"]["content"] == "the answer"
        assert done["commits"] == 1

        # A client arriving after the end gets `done` at once.
        late = await _read_events(client, f"/v1/tasks/{task_id}/events")
        assert [n for n, _ in late] == ["state", "done"]


async def test_event_stream_keepalive_and_client_disconnect() -> None:
    fake = FakeNodeService()
    async with (
        serve_fake(fake, keepalive_s=0.05) as ep,
        httpx.AsyncClient(base_url=ep.url) as client,
    ):
        task_id = (await _post(client, "/v1/tasks", {"prompt": "idle"})).json()["task_id"]
        comments = 0
        with trio.fail_after(10):
            async with client.stream("GET", f"/v1/tasks/{task_id}/events") as resp:
                async for line in resp.aiter_lines():
                    if line.startswith(": keepalive"):
                        comments += 1
                        if comments == 3:
                            break
        assert comments == 3
        # The server survived the disconnect and still answers.
        assert (await client.get(f"/v1/tasks/{task_id}")).status_code == 200


async def test_event_stream_reports_a_service_failure_as_an_error_event() -> None:
    fake = FakeNodeService()
    fake.event_error = RuntimeError("event log corrupted")
    async with serve_fake(fake) as ep, httpx.AsyncClient(base_url=ep.url) as client:
        task_id = (await _post(client, "/v1/tasks", {"prompt": "x"})).json()["task_id"]
        with trio.fail_after(10):
            events = await _read_events(client, f"/v1/tasks/{task_id}/events")
        assert [n for n, _ in events] == ["state", "error"]
        assert "event log corrupted" in events[1][1]["error"]["message"]


async def test_cancel() -> None:
    fake = FakeNodeService()
    async with serve_fake(fake) as ep, httpx.AsyncClient(base_url=ep.url) as client:
        a = (await _post(client, "/v1/tasks", {"prompt": "a"})).json()["task_id"]
        b = (await _post(client, "/v1/tasks", {"prompt": "b"})).json()["task_id"]
        c = (await _post(client, "/v1/tasks", {"prompt": "c"})).json()["task_id"]
        resp = await client.post(f"/v1/tasks/{a}/cancel")
        assert resp.status_code == 202 and resp.json()["status"] == "cancelled"
        fake.start(b)
        fake.slow_cancel = True
        resp = await client.post(f"/v1/tasks/{b}/cancel")
        assert resp.status_code == 202 and resp.json()["status"] == "cancelling"
        fake.start(c)
        fake.finish(c)
        resp = await client.post(f"/v1/tasks/{c}/cancel")
        assert resp.status_code == 200 and resp.json()["status"] == "done"


async def test_peers_status_health() -> None:
    fake = FakeNodeService()
    async with serve_fake(fake) as ep, httpx.AsyncClient(base_url=ep.url) as client:
        peers = (await client.get("/v1/peers")).json()["peers"]
        assert {p["state"] for p in peers} == {"alive", "suspect"}
        me = next(p for p in peers if p["is_self"])
        assert me["cores"] == 8 and me["models"] == ["smollm2-135m"] and me["tokens_per_s"] == 30.2
        status = (await client.get("/v1/status")).json()
        assert status["peer_id"] == SELF_ID and status["uptime_s"] >= 0
        for path in ("/healthz", "/v1/health"):
            health = await client.get(path)
            assert health.status_code == 200 and health.json()["ok"] is True


async def test_metrics_parse_and_count() -> None:
    fake = FakeNodeService()
    async with serve_fake(fake) as ep, httpx.AsyncClient(base_url=ep.url) as client:
        ids = [
            (await _post(client, "/v1/tasks", {"prompt": f"p{i}"})).json()["task_id"]
            for i in range(3)
        ]
        await _post(client, "/v1/tasks", {"prompt": "p0", "task_id": ids[0]})
        await _post(client, "/v1/tasks", {"prompt": "dup", "idempotency_key": "k"})
        await _post(client, "/v1/tasks", {"prompt": "dup", "idempotency_key": "k"})
        fake.start(ids[0])
        fake.finish(ids[0])
        resp = await client.get("/metrics")
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(resp.text)
            for s in fam.samples
        }
    assert samples[("kowalski_tasks", (("status", "done"),))] == 1
    assert samples[("kowalski_tasks", (("status", "queued"),))] == 3
    assert samples[("kowalski_task_commits_total", ())] == 1
    assert samples[("kowalski_task_executions_total", ())] == 1
    assert samples[("kowalski_peers", (("state", "suspect"),))] == 1
    assert samples[("kowalski_api_tasks_accepted_total", (("outcome", "created"),))] == 4
    assert samples[("kowalski_api_tasks_accepted_total", (("outcome", "duplicate"),))] == 2
    key = (
        "kowalski_http_request_duration_seconds_count",
        (("method", "POST"), ("route", "/v1/tasks"), ("status", "202")),
    )
    assert samples[key] == 4


@pytest.mark.parametrize(
    ("method", "path", "operation"),
    [
        ("POST", "/v1/tasks", "submit"),
        ("POST", "/v1/tasks/batch", "submit_many"),
        ("GET", "/v1/tasks", "list_tasks"),
        ("GET", "/v1/peers", "peers"),
        ("GET", "/v1/status", "status"),
    ],
)
async def test_a_service_exception_is_a_500_and_the_server_keeps_serving(
    method: str, path: str, operation: str
) -> None:
    fake = FakeNodeService()
    fake.fail_next[operation] = RuntimeError("disk on fire")
    body = {"tasks": [{"prompt": "x"}]} if "batch" in path else {"prompt": "x"}
    async with serve_fake(fake) as ep, httpx.AsyncClient(base_url=ep.url) as client:
        kwargs: dict[str, Any] = {"json": body} if method == "POST" else {}
        resp = await client.request(method, path, **kwargs)
        assert resp.status_code == 500
        err = _error(resp)
        assert err["code"] == "internal_error" and "disk on fire" in err["message"]
        again = await client.request(method, path, **kwargs)
        assert again.status_code < 300
        # /metrics still renders even when the status call fails.
        fake.fail_next["status"] = RuntimeError("again")
        assert (await client.get("/metrics")).status_code == 200


async def test_refusals_from_the_node_are_4xx_or_503() -> None:
    fake = FakeNodeService()
    async with serve_fake(fake) as ep, httpx.AsyncClient(base_url=ep.url) as client:
        fake.no_capable_device = True
        resp = await _post(client, "/v1/tasks", {"prompt": "x", "model": "huge-70b"})
        assert resp.status_code == 503 and _error(resp)["code"] == "no_capable_device"
        assert "huge-70b" in _error(resp)["message"]
        fake.no_capable_device = False
        fake.fail_next["submit"] = TaskError("node is draining")
        resp = await _post(client, "/v1/tasks", {"prompt": "x"})
        assert resp.status_code == 409 and _error(resp)["code"] == "task_rejected"


def test_task_status_final_flags() -> None:
    assert {s for s in TaskStatus if s.final} == {
        TaskStatus.DONE,
        TaskStatus.FAILED,
        TaskStatus.CANCELLED,
    }
