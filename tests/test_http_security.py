"""Who may use the API: bearer tokens, loopback-only without one, clear start-up refusals."""

from __future__ import annotations

import socket

import httpx
import pytest
import trio

from kowalski_node.adapters.http import check_bind, is_loopback_host, parse_api_address, serve_api
from kowalski_node.adapters.http.auth import bearer_ok
from kowalski_node.errors import ConfigError
from tests.http_fakes import FakeNodeService, serve_fake

TOKEN = "s3cret-token-0123456789abcdef"


async def test_every_endpoint_but_health_needs_the_token() -> None:
    fake = FakeNodeService()
    async with serve_fake(fake, token=TOKEN) as ep:
        assert ep.token_required
        async with httpx.AsyncClient(base_url=ep.url) as anon:
            for method, path in (
                ("POST", "/v1/tasks"),
                ("POST", "/v1/tasks/batch"),
                ("GET", "/v1/tasks"),
                ("GET", "/v1/tasks/task-1"),
                ("GET", "/v1/tasks/task-1/events"),
                ("POST", "/v1/tasks/task-1/cancel"),
                ("GET", "/v1/peers"),
                ("GET", "/v1/status"),
                ("GET", "/metrics"),
                ("GET", "/v1/unknown"),
            ):
                resp = await anon.request(method, path, json={"prompt": "x"})
                assert resp.status_code == 401, (method, path)
                assert resp.json()["error"]["code"] == "unauthorized"
                assert "missing bearer token" in resp.json()["error"]["message"]
                assert resp.headers["www-authenticate"].startswith("Bearer")
            assert (await anon.get("/healthz")).status_code == 200
            assert (await anon.get("/v1/health")).status_code == 200
        wrong = {"Authorization": f"Bearer {TOKEN[:-1]}x"}
        async with httpx.AsyncClient(base_url=ep.url, headers=wrong) as bad:
            resp = await bad.post("/v1/tasks", json={"prompt": "x"})
            assert resp.status_code == 401
            assert "invalid bearer token" in resp.json()["error"]["message"]
        good = {"Authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(base_url=ep.url, headers=good) as ok:
            assert (await ok.post("/v1/tasks", json={"prompt": "x"})).status_code == 202
            assert (await ok.get("/metrics")).status_code == 200
    assert len(fake.tasks) == 1


def test_bearer_header_parsing() -> None:
    assert bearer_ok(f"Bearer {TOKEN}", TOKEN)
    assert bearer_ok(f"bearer {TOKEN}", TOKEN)
    assert not bearer_ok(None, TOKEN)
    assert not bearer_ok(TOKEN, TOKEN)
    assert not bearer_ok(f"Basic {TOKEN}", TOKEN)
    assert not bearer_ok("Bearer ", TOKEN)
    assert not bearer_ok(f"Bearer {TOKEN}extra", TOKEN)
    assert not bearer_ok("Bearer tökén", TOKEN)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.5.6.7", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.20", False),
        ("nas.local", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_bind_checks() -> None:
    check_bind("127.0.0.1", None)
    check_bind("127.0.0.1", "short")
    check_bind("0.0.0.0", TOKEN)
    with pytest.raises(
        ConfigError, match=r"refusing to serve the HTTP API on 0\.0\.0\.0 without a token"
    ):
        check_bind("0.0.0.0", None)
    with pytest.raises(ConfigError, match="too short"):
        check_bind("192.168.1.20", "abc")
    with pytest.raises(ConfigError, match="empty"):
        check_bind("127.0.0.1", "  ")


async def test_serve_refuses_a_wide_bind_without_a_token_before_binding() -> None:
    with pytest.raises(ConfigError, match=r"node\.api\.token"):
        await serve_api(FakeNodeService(), "0.0.0.0", 0, None)


async def test_a_busy_port_is_a_clear_error() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with trio.fail_after(10), pytest.raises(ConfigError, match="cannot serve the HTTP API"):
            await serve_api(FakeNodeService(), "127.0.0.1", port, None)


async def test_shutdown_trigger_stops_the_server() -> None:
    stop = trio.Event()
    fake = FakeNodeService()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            ep = await nursery.start(
                lambda task_status: serve_api(
                    fake, "127.0.0.1", 0, None, shutdown_trigger=stop.wait, task_status=task_status
                )
            )
            async with httpx.AsyncClient(base_url=ep.url) as client:
                assert (await client.get("/healthz")).status_code == 200
            stop.set()
        # serve_api returned on its own; the port no longer answers.
        async with httpx.AsyncClient(base_url=ep.url) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get("/healthz")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:7471", ("127.0.0.1", 7471)),
        ("0.0.0.0:8000", ("0.0.0.0", 8000)),
        (":9000", ("127.0.0.1", 9000)),
        ("9001", ("127.0.0.1", 9001)),
        ("[::1]:7471", ("::1", 7471)),
        ("http://localhost:7000", ("localhost", 7000)),
    ],
)
def test_parse_api_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_api_address(text) == expected


@pytest.mark.parametrize("text", ["host:port", "::1:7471", "[::1]7471", "1.2.3.4:70000", ""])
def test_parse_api_address_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="API address"):
        parse_api_address(text)
