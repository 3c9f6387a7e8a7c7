"""DeviceFilter.NETWORK: the client side of the node HTTP task contract (docs/api.md),
against an in-test fake node on 127.0.0.1, and the clear error when no node answers."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kowalski_node import ClusterConfig, DeviceFilter, KowalskiRLM, ProgressUpdate
from kowalski_node.api import decode_context
from kowalski_node.errors import NodeUnreachable, TaskError


class FakeNode:
    """Implements POST /v1/tasks, GET /v1/tasks/{id}, SSE events, cancel, health."""

    def __init__(self, *, token: str | None = None, sse: bool = True, hold: bool = False) -> None:
        self.token = token
        self.sse = sse
        self.hold = hold  # tasks wait for cancel instead of finishing
        self.tasks: dict[str, dict[str, Any]] = {}
        self.cancel_events: dict[str, trio.Event] = {}
        self.app = Starlette(
            routes=[
                Route("/v1/health", self.health, methods=["GET"]),
                Route("/v1/tasks", self.submit, methods=["POST"]),
                Route("/v1/tasks/{task_id}", self.get, methods=["GET"]),
                Route("/v1/tasks/{task_id}/events", self.events, methods=["GET"]),
                Route("/v1/tasks/{task_id}/cancel", self.cancel, methods=["POST"]),
            ]
        )

    def _denied(self, req: Request) -> Response | None:
        if self.token and req.headers.get("authorization") != f"Bearer {self.token}":
            return JSONResponse(
                {"error": {"code": "unauthorized", "message": "bad token"}}, status_code=401
            )
        return None

    async def health(self, req: Request) -> Response:
        return JSONResponse({"ok": True})

    async def submit(self, req: Request) -> Response:
        if (denied := self._denied(req)) is not None:
            return denied
        body = await req.json()
        task_id = body["task_id"]
        context = decode_context(body)
        self.tasks[task_id] = {"body": body, "context": context, "status": "running"}
        self.cancel_events[task_id] = trio.Event()
        if not self.hold:
            self._finish(task_id)
        return JSONResponse(
            {"task_id": task_id, "status": "queued", "created": True}, status_code=202
        )

    def _finish(self, task_id: str, status: str = "done") -> None:
        task = self.tasks[task_id]
        task["status"] = status
        if status == "done":
            body = task["body"]
            task["result"] = {
                "task_id": task_id,
                "content": f"node answer to {body['prompt']} ({type(task['context']).__name__})",
                "iterations": 2,
                "stop_reason": "final",
                "final_via": "FINAL",
                "blocks": [
                    {"index": 0, "iteration": 1, "language": "python", "code": "print(1)",
                     "output": "1\n", "error": None, "error_kind": None, "exec_ms": 1.5,
                     "sub_calls": []},
                ],
                "tokens": {"in": 30, "out": 7, "total": 37},
                "sub_calls": 0,
                "timings": {"elapsed_ms": 12.0},
                "error": None,
            }  # fmt: skip

    def _view(self, task_id: str) -> dict[str, Any]:
        task = self.tasks[task_id]
        return {
            "task_id": task_id,
            "status": task["status"],
            "result": task.get("result"),
            "created_at": 0.0,
            "updated_at": 0.0,
        }

    async def get(self, req: Request) -> Response:
        if (denied := self._denied(req)) is not None:
            return denied
        task_id = req.path_params["task_id"]
        if task_id not in self.tasks:
            return JSONResponse({"error": {"code": "not_found", "message": "no task"}}, 404)
        return JSONResponse(self._view(task_id))

    async def events(self, req: Request) -> Response:
        if (denied := self._denied(req)) is not None:
            return denied
        task_id = req.path_params["task_id"]
        if not self.sse or task_id not in self.tasks:
            return JSONResponse({"error": {"code": "not_found", "message": "no events"}}, 404)
        max_it = self.tasks[task_id]["body"]["rlm"]["max_iterations"]

        async def stream() -> AsyncIterator[bytes]:
            for i in (1, 2):
                update = {"task_id": task_id, "stage": "model_response", "iteration": i,
                          "max_iterations": max_it, "active_devices": 3, "tokens_in": 10 * i}  # fmt: skip
                yield f"event: progress\ndata: {json.dumps(update)}\n\n".encode()
            if self.hold:
                await self.cancel_events[task_id].wait()
            yield b": comment lines are ignored\n\n"
            yield f"event: done\ndata: {json.dumps(self._view(task_id))}\n\n".encode()

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def cancel(self, req: Request) -> Response:
        if (denied := self._denied(req)) is not None:
            return denied
        task_id = req.path_params["task_id"]
        if task_id not in self.tasks:
            return JSONResponse({"error": {"code": "not_found", "message": "no task"}}, 404)
        self._finish(task_id, "cancelled")
        self.cancel_events[task_id].set()
        return JSONResponse(self._view(task_id), status_code=202)


@asynccontextmanager
async def running(node: FakeNode) -> AsyncIterator[str]:
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, node.app, config))  # type: ignore[arg-type]
        try:
            yield binds[0]
        finally:
            nursery.cancel_scope.cancel()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def network_rlm(tmp_path: Path, url: str, token: str | None = None) -> KowalskiRLM:
    return KowalskiRLM(
        cluster=ClusterConfig(device_filter="network", api_url=url, api_token=token),
        overrides={"paths.home": tmp_path, "rlm.max_iterations": 6},
    )


async def test_network_without_a_node_says_so(tmp_path: Path) -> None:
    port = closed_port()
    rlm = KowalskiRLM(
        cluster=ClusterConfig(device_filter=DeviceFilter.NETWORK),
        overrides={"paths.home": tmp_path, "node.api.port": port},
    )
    with pytest.raises(NodeUnreachable) as info:
        await rlm.execute("hello")
    message = str(info.value)
    assert f"http://127.0.0.1:{port}" in message
    assert "no local kowalski node is reachable" in message and "kowalski-node start" in message


async def test_network_runs_through_the_node_with_progress(tmp_path: Path) -> None:
    node = FakeNode()
    async with running(node) as url:
        rlm = network_rlm(tmp_path, url)
        seen: list[ProgressUpdate] = []
        result = await rlm.execute_with_progress(
            "summarise", b"\x00bytes", seen.append, task_id="task_001"
        )
    assert result.task_id == "task_001" and result.executed_on == "network"
    assert result.content == "node answer to summarise (bytes)"  # bytes survived base64
    assert result.blocks[0].exec_ms == 1.5 and result.tokens == 37
    assert [(u.iteration, u.max_iterations, u.active_devices) for u in seen] == [
        (1, 6, 3),
        (2, 6, 3),
    ]
    # Only the limits this client set travel; the node's own settings fill the rest.
    assert node.tasks["task_001"]["body"]["rlm"] == {"max_iterations": 6}


async def test_network_polls_when_events_are_unavailable(tmp_path: Path) -> None:
    node = FakeNode(sse=False)
    async with running(node) as url:
        rlm = network_rlm(tmp_path, url)
        rlm.network_executor().poll_interval_s = 0.01
        result = await rlm.execute("p", {"rows": [1, 2]})
    assert result.content == "node answer to p (dict)"


async def test_network_cancel(tmp_path: Path) -> None:
    node = FakeNode(hold=True)
    async with running(node) as url:
        rlm = network_rlm(tmp_path, url)
        results = []

        async def go() -> None:
            results.append(await rlm.execute("long", task_id="t9"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(go)
            while "t9" not in node.tasks:
                await trio.sleep(0.005)
            assert await rlm.cancel_task("t9") is True
    assert results[0].stop_reason == "cancelled" and not results[0].ok


async def test_network_token(tmp_path: Path) -> None:
    node = FakeNode(token="s3cret")
    async with running(node) as url:
        with pytest.raises(TaskError, match=r"rejected the API token .*HTTP 401"):
            await network_rlm(tmp_path, url).execute("p")
        result = await network_rlm(tmp_path, url, token="s3cret").execute("p")
    assert result.ok


async def test_all_prefers_a_reachable_node(tmp_path: Path) -> None:
    node = FakeNode()
    async with running(node) as url:
        rlm = KowalskiRLM(
            cluster=ClusterConfig(device_filter="all", api_url=url),
            overrides={"paths.home": tmp_path},
        )
        result = await rlm.execute("p")
    assert result.executed_on == "network"
