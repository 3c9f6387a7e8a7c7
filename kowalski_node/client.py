"""A small client for the node's HTTP API (docs/http.md), async with a sync wrapper.

The CLI (`kowalski-node submit | status | peers`) and scripts use it; answers come back
as the same pydantic views the server renders (`kowalski_node.runtime.service`).

    async with NodeClient() as node:                  # KOWALSKI_API or node.api settings
        accepted = await node.submit("Summarise", context=text)
        view = await node.wait(accepted.task_id, timeout=300)
        print(view.result.content if view.result else view.error)

    SyncNodeClient().peers()                          # the same, outside async code
"""

from __future__ import annotations

import argparse
import base64
import json
import os
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing, asynccontextmanager
from typing import Any, TypeVar, cast

import httpx
import trio
from pydantic import BaseModel, ValidationError

from kowalski_node.addresses import api_url
from kowalski_node.config import Settings, load_settings
from kowalski_node.errors import KowalskiError, NodeUnreachable, TaskError
from kowalski_node.rlm.types import ProgressEvent
from kowalski_node.runtime.service import (
    BatchAccepted,
    NodeStatus,
    PeerList,
    PeerView,
    TaskAccepted,
    TaskList,
    TaskStatus,
    TaskSubmission,
    TaskView,
)
from kowalski_node.sse import sse_events

ENV_API = "KOWALSKI_API"
ENV_TOKEN = "KOWALSKI_API_TOKEN"  # noqa: S105 - the name of an environment variable, not a secret
DEFAULT_BATCH_CHUNK = 5000

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
ProgressHandler = Callable[[ProgressEvent], Awaitable[None] | None]


class ApiUnreachable(NodeUnreachable):
    """Nothing answers at the API address (connection refused, timed out, bad host)."""

    def __init__(self, address: str, detail: str) -> None:
        super().__init__(address, detail)
        self.args = (
            f"no kowalski node API is reachable at {address} ({detail}); start a node with "
            f"`kowalski-node start`, or point --api / {ENV_API} at a running one",
        )


class ApiError(KowalskiError):
    """The node answered with an error (`{"error": {"code", "message", "field"}}`)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(f"{message} (HTTP {status} {code})")
        self.status = status
        self.code = code
        self.message = message
        self.field = field


class TaskNotFound(ApiError):
    """The node does not know the task id."""


class Unauthorized(ApiError):
    """The node wants a (different) bearer token."""


# ---------------------------------------------------------------------------------------
# Defaults
# ---------------------------------------------------------------------------------------


def _load_settings() -> Settings:
    """The user's settings; a broken config file is an error here too, never ignored."""
    return load_settings()


def default_api_url(settings: Settings | None = None) -> str:
    """$KOWALSKI_API, else http://<node.api.host>:<node.api.port> (wildcard -> 127.0.0.1)."""
    env = os.environ.get(ENV_API, "").strip()
    if env:
        return api_url(env)
    api = (settings if settings is not None else _load_settings()).node.api
    host, port = api.host, api.port
    if host in ("0.0.0.0", "::", "[::]", ""):  # noqa: S104 - a comparison: a wildcard host is mapped to loopback for clients
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def default_api_token(settings: Settings | None = None) -> str | None:
    """$KOWALSKI_API_TOKEN, else node.api.token from settings."""
    env = os.environ.get(ENV_TOKEN, "").strip()
    if env:
        return env
    return (settings if settings is not None else _load_settings()).node.api.token


def encode_context(context: Any) -> dict[str, Any]:
    """bytes travel base64-encoded; everything else as JSON."""
    if isinstance(context, bytes | bytearray | memoryview):
        return {
            "context": base64.b64encode(bytes(context)).decode("ascii"),
            "context_encoding": "base64",
        }
    return {"context": context, "context_encoding": "json"}


# ---------------------------------------------------------------------------------------
# Async client
# ---------------------------------------------------------------------------------------


class NodeClient:
    """Async client over one pooled httpx connection; use it as an async context manager."""

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = api_url(base_url) if base_url else default_api_url()
        self.token = token if token is not None else default_api_token()
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            transport=transport,
        )

    async def __aenter__(self) -> NodeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- plumbing -------------------------------------------------------------------

    def _transport_error(self, exc: httpx.HTTPError) -> KowalskiError:
        detail = str(exc) or type(exc).__name__
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.UnsupportedProtocol):
            return ApiUnreachable(self.base_url, detail)
        if isinstance(exc, httpx.TimeoutException):
            return KowalskiError(
                f"the node API at {self.base_url} did not answer in time ({detail})"
            )
        return KowalskiError(f"talking to the node API at {self.base_url} failed: {detail}")

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            resp = await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from exc
        if resp.status_code >= 400:
            raise _api_error(resp)
        return resp

    async def _get_model(self, path: str, model: type[M], **kwargs: Any) -> M:
        return _parse(await self._request("GET", path, **kwargs), model)

    # -- endpoints ------------------------------------------------------------------

    async def answers(self) -> bool:
        """True when anything answers HTTP at the address (any status): is a node there?"""
        try:
            await self._http.get("/healthz")
        except httpx.HTTPError:
            return False
        return True

    async def health(self) -> bool:
        """True when a node answers /healthz (no token needed)."""
        await self._request("GET", "/healthz")
        return True

    async def submit(
        self,
        prompt: str,
        context: Any = None,
        *,
        task_id: str | None = None,
        idempotency_key: str | None = None,
        model: str | None = None,
        sub_model: str | None = None,
        rlm: Mapping[str, Any] | None = None,
        priority: int = 0,
    ) -> TaskAccepted:
        """POST /v1/tasks. `created` is False when the key matched an earlier task."""
        payload: dict[str, Any] = {
            "prompt": prompt,
            **encode_context(context),
            "priority": priority,
        }
        for key, value in (
            ("task_id", task_id),
            ("idempotency_key", idempotency_key),
            ("model", model),
            ("sub_model", sub_model),
            ("rlm", dict(rlm) if rlm is not None else None),
        ):
            if value is not None:
                payload[key] = value
        return _parse(await self._request("POST", "/v1/tasks", json=payload), TaskAccepted)

    async def submit_many(
        self,
        items: Sequence[TaskSubmission | Mapping[str, Any] | str],
        *,
        chunk: int = DEFAULT_BATCH_CHUNK,
    ) -> list[TaskAccepted]:
        """POST /v1/tasks/batch, in chunks of `chunk` items; answers in input order."""
        bodies = [_submission_json(item) for item in items]
        accepted: list[TaskAccepted] = []
        for start in range(0, len(bodies), max(1, chunk)):
            part = bodies[start : start + max(1, chunk)]
            content = b'{"tasks":[' + b",".join(part) + b"]}"
            resp = await self._request(
                "POST",
                "/v1/tasks/batch",
                content=content,
                headers={"Content-Type": "application/json"},
            )
            accepted.extend(_parse(resp, BatchAccepted).accepted)
        return accepted

    async def get_task(self, task_id: str) -> TaskView:
        """GET /v1/tasks/{id}; `TaskNotFound` when the node does not know it."""
        return await self._get_model(f"/v1/tasks/{task_id}", TaskView)

    async def list_tasks(
        self, limit: int = 100, status: TaskStatus | str | None = None
    ) -> list[TaskView]:
        params: dict[str, Any] = {"limit": limit}
        if status is not None:
            params["status"] = str(TaskStatus(status).value)
        return (await self._get_model("/v1/tasks", TaskList, params=params)).tasks

    async def cancel(self, task_id: str) -> TaskView:
        return _parse(await self._request("POST", f"/v1/tasks/{task_id}/cancel"), TaskView)

    async def peers(self) -> list[PeerView]:
        return (await self._get_model("/v1/peers", PeerList)).peers

    async def status(self) -> NodeStatus:
        return await self._get_model("/v1/status", NodeStatus)

    async def metrics_text(self) -> str:
        return (await self._request("GET", "/metrics")).text

    @asynccontextmanager
    async def events(
        self, task_id: str
    ) -> AsyncIterator[trio.MemoryReceiveChannel[tuple[str, dict[str, Any]]]]:
        """The task's SSE stream as (event, JSON body) pairs: state, progress..., done.

            async with node.events(task_id) as stream:
                async for event, body in stream: ...

        Errors (unknown task, node gone) surface when the block exits.
        """
        send, receive = trio.open_memory_channel[tuple[str, dict[str, Any]]](0)

        async def relay(event: str, body: dict[str, Any]) -> bool:
            try:
                await send.send((event, body))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return True  # the reader left
            return False

        async def pump() -> None:
            try:
                await self.stream_events(task_id, relay)
            finally:
                # Synchronous close: an `aclose()` checkpoint here could be cancelled and
                # swallow the error being raised.
                send.close()

        try:
            async with trio.open_nursery() as nursery, receive:
                nursery.start_soon(pump)
                try:
                    yield receive
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
                raise group.exceptions[0] from None
            raise

    async def stream_events(
        self, task_id: str, handle: Callable[[str, dict[str, Any]], Awaitable[bool]]
    ) -> None:
        """Read the SSE stream, calling `handle(event, body)` until it returns True.

        `api.NodeExecutor` uses it too; the stream is read by the one SSE reader
        (`kowalski_node.sse`), and events whose data is not a JSON object are skipped.
        """
        try:
            async with self._http.stream(
                "GET", f"/v1/tasks/{task_id}/events", timeout=httpx.Timeout(None, connect=5.0)
            ) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    raise _api_error(resp)
                lines = cast(AsyncGenerator[str, None], resp.aiter_lines())
                async with aclosing(lines), aclosing(sse_events(lines)) as events:
                    async for event, data in events:
                        try:
                            body = json.loads(data)
                        except json.JSONDecodeError:
                            body = None
                        if isinstance(body, dict) and await handle(event, body):
                            return
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from exc

    async def wait(
        self,
        task_id: str,
        timeout: float | None = None,
        *,
        on_progress: ProgressHandler | None = None,
        poll_interval: float = 0.5,
    ) -> TaskView:
        """The task's final view. Follows the event stream; polls if the stream breaks.

        Raises `TaskError` when `timeout` seconds pass first (the task keeps running).
        """
        with trio.move_on_after(timeout if timeout is not None else float("inf")):
            view = await self._follow(task_id, on_progress)
            if view is not None:
                return view
            delay = poll_interval
            while True:
                view = await self.get_task(task_id)
                if view.status.final:
                    return view
                await trio.sleep(delay)
                delay = min(delay * 1.5, 5.0)
        raise TaskError(
            f"task {task_id} did not finish within {timeout:g} s; it keeps running "
            f"(see `kowalski-node status --task {task_id}`)"
        )

    async def _follow(self, task_id: str, on_progress: ProgressHandler | None) -> TaskView | None:
        """The final view from the event stream, or None when the stream ended without one."""
        final: list[TaskView] = []

        async def handle(event: str, body: dict[str, Any]) -> bool:
            if event == "done":
                final.append(TaskView.model_validate(body))
                return True
            if event == "error":
                return True
            if event == "progress" and on_progress is not None:
                try:
                    update = ProgressEvent.from_dict(body)
                except ValueError:
                    return False
                out = on_progress(update)
                if out is not None:
                    await out
            return False

        try:
            await self.stream_events(task_id, handle)
        except (ApiError, ApiUnreachable):
            raise
        except KowalskiError:
            return None  # the stream broke mid-way: poll instead
        return final[0] if final else None


def _parse(resp: httpx.Response, model: type[M]) -> M:
    try:
        return model.model_validate_json(resp.content)
    except ValidationError as exc:
        raise KowalskiError(
            f"the node answered {resp.request.method} {resp.request.url.path} with an "
            f"unexpected body: {exc.errors()[0]['msg']}"
        ) from None


def _api_error(resp: httpx.Response) -> ApiError:
    code, message, field = "http_error", resp.text.strip()[:300] or resp.reason_phrase, None
    try:
        body = resp.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        code = str(err.get("code", code))
        message = str(err.get("message", message))
        field = err.get("field")
    if resp.status_code == 401:
        return Unauthorized(401, code, message, field)
    if resp.status_code == 404 and code == "task_not_found":
        return TaskNotFound(404, code, message, field)
    return ApiError(resp.status_code, code, message, field)


def _submission_json(item: TaskSubmission | Mapping[str, Any] | str) -> bytes:
    if isinstance(item, TaskSubmission):
        return item.model_dump_json(exclude_none=True).encode("utf-8")
    if isinstance(item, str):
        return json.dumps({"prompt": item}, ensure_ascii=False).encode("utf-8")
    if isinstance(item, Mapping):
        return json.dumps(dict(item), ensure_ascii=False).encode("utf-8")
    raise TypeError(f"batch items are TaskSubmission, dict or str, not {type(item).__name__}")


# ---------------------------------------------------------------------------------------
# Sync wrapper
# ---------------------------------------------------------------------------------------


class SyncNodeClient:
    """Blocking twin of `NodeClient` for scripts; each call runs its own trio loop."""

    def __init__(
        self, base_url: str | None = None, token: str | None = None, *, timeout: float = 30.0
    ) -> None:
        self.base_url = api_url(base_url) if base_url else default_api_url()
        self.token = token if token is not None else default_api_token()
        self.timeout = timeout

    def _run(self, call: Callable[[NodeClient], Awaitable[T]]) -> T:
        async def main() -> T:
            async with NodeClient(self.base_url, self.token, timeout=self.timeout) as client:
                return await call(client)

        try:
            trio.lowlevel.current_trio_token()
        except RuntimeError:
            return trio.run(main)
        raise RuntimeError("SyncNodeClient blocks; inside async code use NodeClient")

    def health(self) -> bool:
        return self._run(lambda c: c.health())

    def submit(self, prompt: str, context: Any = None, **kwargs: Any) -> TaskAccepted:
        return self._run(lambda c: c.submit(prompt, context, **kwargs))

    def submit_many(
        self, items: Sequence[TaskSubmission | Mapping[str, Any] | str]
    ) -> list[TaskAccepted]:
        return self._run(lambda c: c.submit_many(items))

    def get_task(self, task_id: str) -> TaskView:
        return self._run(lambda c: c.get_task(task_id))

    def list_tasks(
        self, limit: int = 100, status: TaskStatus | str | None = None
    ) -> list[TaskView]:
        return self._run(lambda c: c.list_tasks(limit, status))

    def wait(self, task_id: str, timeout: float | None = None) -> TaskView:
        return self._run(lambda c: c.wait(task_id, timeout))

    def cancel(self, task_id: str) -> TaskView:
        return self._run(lambda c: c.cancel(task_id))

    def peers(self) -> list[PeerView]:
        return self._run(lambda c: c.peers())

    def status(self) -> NodeStatus:
        return self._run(lambda c: c.status())


# ---------------------------------------------------------------------------------------
# CLI helpers (shared by the submit/status/peers commands)
# ---------------------------------------------------------------------------------------


def add_api_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api",
        metavar="HOST:PORT|URL",
        help=f"the node's HTTP API, e.g. 127.0.0.1:7471 or http://127.0.0.1:7471 "
        f"(default ${ENV_API} or node.api settings)",
    )
    parser.add_argument(
        "--token", help=f"API bearer token (default ${ENV_TOKEN} or node.api.token)"
    )
    parser.add_argument(
        "--api-timeout", type=float, default=30.0, metavar="S", help="seconds per API request"
    )


def client_from_args(args: argparse.Namespace) -> NodeClient:
    return NodeClient(args.api, args.token, timeout=args.api_timeout)


__all__ = [
    "ENV_API",
    "ENV_TOKEN",
    "ApiError",
    "ApiUnreachable",
    "NodeClient",
    "SyncNodeClient",
    "TaskNotFound",
    "Unauthorized",
    "add_api_arguments",
    "client_from_args",
    "default_api_token",
    "default_api_url",
    "encode_context",
]
