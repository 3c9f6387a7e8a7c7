"""The node's HTTP API as a Starlette app over a `NodeService` (reference: docs/http.md).

Everything here is request parsing, auth and rendering; the node's behaviour lives
behind `NodeService`. Client mistakes become 4xx JSON errors naming the field; a
failing service call becomes a 500 JSON error and the server keeps serving.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar, cast

import trio
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kowalski_node.config import DEFAULT_MAX_BODY_BYTES
from kowalski_node.inference.http import generate_routes
from kowalski_node.remote.completions import CompletionRouter
from kowalski_node.runtime.context_blob import (
    SLICE,
    check_base64,
    decode_json_string,
    top_level_string_span,
)
from kowalski_node.runtime.service import (
    BatchAccepted,
    BatchSubmission,
    NodeService,
    PeerList,
    TaskList,
    TaskStatus,
    TaskSubmission,
    TaskView,
    valid_task_id,
)

from .auth import OPEN_PATHS, bearer_ok
from .errors import HandlerError, error_body, error_response, service_error, validation_error
from .metrics import ApiMetrics
from .openai_api import OpenAIError, OpenAIHandlers, openai_error_response
from .sse import TaskEventStream

SPOOL_ABOVE = 1024 * 1024  # bodies larger than this go to a temp file, parsed off the loop
BODY_SETTING = "node.api.max_body_bytes (env KOWALSKI_NODE__API__MAX_BODY_BYTES)"
DEFAULT_MAX_BATCH = 10_000
DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 1000
DEFAULT_KEEPALIVE_S = 15.0
LIST_EXCLUDE: dict[str, Any] = {"tasks": {"__all__": {"result", "history"}}}

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class ApiOptions:
    """Knobs of one API app."""

    token: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_batch: int = DEFAULT_MAX_BATCH
    keepalive_s: float = DEFAULT_KEEPALIVE_S
    spool_dir: Path | None = None  # where large bodies are streamed (None: the system temp dir)


def json_response(
    model: BaseModel,
    status: int = 200,
    *,
    headers: dict[str, str] | None = None,
    exclude: dict[str, Any] | None = None,
) -> Response:
    return Response(
        model.model_dump_json(exclude=exclude),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


class _Guard:
    """Pure ASGI middleware: bearer-token check, then request latency by route template."""

    def __init__(self, app: ASGIApp, token: str | None, metrics: ApiMetrics) -> None:
        self.app = app
        self.token = token
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            if self.token is not None and scope["path"] not in OPEN_PATHS:
                header = _header(scope, b"authorization")
                if not bearer_ok(header, self.token):
                    await _send_unauthorized(recording_send, header is not None, scope["path"])
                    return
            await self.app(scope, receive, recording_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            if not route.endswith("/events"):
                self.metrics.request_seconds.labels(scope["method"], route, str(status)).observe(
                    time.perf_counter() - started
                )


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


async def _send_unauthorized(send: Send, had_header: bool, path: str) -> None:
    reason = "invalid bearer token" if had_header else "missing bearer token"
    message = (
        f"{reason}: send 'Authorization: Bearer <token>' with the node's API token "
        "(node.api.token; the CLI reads --token or KOWALSKI_API_TOKEN)"
    )
    if path == "/v1/chat/completions" or path.startswith("/v1/models"):
        # OpenAI's shape for OpenAI clients (the api_key is the node's token).
        body = json.dumps(
            OpenAIError(401, message, type="authentication_error", code="unauthorized").body()
        ).encode()
    else:
        body = error_body("unauthorized", message)
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b'Bearer realm="kowalski-node"'),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _Handlers:
    """One method per endpoint; each talks to the service through `_call`."""

    def __init__(self, service: NodeService, options: ApiOptions, metrics: ApiMetrics) -> None:
        self.service = service
        self.options = options
        self.metrics = metrics

    async def _call(self, operation: str, awaitable: Awaitable[T]) -> T:
        try:
            return await awaitable
        except HandlerError:
            raise
        except Exception as exc:
            raise service_error(exc, operation) from exc

    async def _body(self, request: Request) -> bytes | Path:
        """The request body: bytes when small, else a temp file (removed by `_parse`).

        A large body is written to disk as it arrives (1 MiB at a time, in a worker
        thread), so a slow 50 MB upload holds neither the event loop nor 50 MB of chunks.
        """
        limit = self.options.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise HandlerError(
                    400, "invalid_header", "Content-Length is not a number"
                ) from None
            if size > limit:
                raise _too_large(size, limit)
        chunks: list[bytes] = []
        buffered = 0
        received = 0
        spool: BinaryIO | None = None
        try:
            stream = request.stream()
            async for chunk in stream:
                received += len(chunk)
                if received > limit:
                    await _drain_briefly(stream)
                    raise _too_large(received, limit)
                chunks.append(chunk)
                buffered += len(chunk)
                if buffered >= SPOOL_ABOVE:
                    if spool is None:
                        spool = await trio.to_thread.run_sync(self._open_spool)
                    await trio.to_thread.run_sync(_write_all, spool, chunks)
                    chunks, buffered = [], 0
            if spool is None:
                return b"".join(chunks)
            await trio.to_thread.run_sync(_write_all, spool, chunks)
            await trio.to_thread.run_sync(spool.close)
            path = Path(spool.name)
            spool = None
            return path
        finally:
            if spool is not None:  # refused or failed half-way: drop the partial file
                await trio.to_thread.run_sync(_discard, spool)

    def _open_spool(self) -> BinaryIO:
        directory = self.options.spool_dir
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed by _body / _discard)
            mode="wb", prefix="body-", suffix=".json", dir=directory, delete=False
        )
        return cast(BinaryIO, handle)

    async def _parse(self, body: bytes | Path, model: type[M]) -> M:
        """Validate a body; a spooled one is read and parsed in a worker thread."""
        try:
            if isinstance(body, bytes):
                return model.model_validate_json(body)
            return await trio.to_thread.run_sync(_parse_file, body, model)
        except ValidationError as exc:
            raise validation_error(exc) from None
        finally:
            if isinstance(body, Path):
                body.unlink(missing_ok=True)  # noqa: ASYNC240 - removing a spooled temp file is one quick syscall

    async def body_bytes(self, request: Request) -> bytes:
        """The whole body as bytes, for handlers that parse it themselves (OpenAI API);
        a spooled body is read back in a worker thread and its file removed."""
        body = await self._body(request)
        if isinstance(body, bytes):
            return body
        try:
            return await trio.to_thread.run_sync(body.read_bytes)
        finally:
            body.unlink(missing_ok=True)

    def _task_id(self, request: Request) -> str:
        task_id = str(request.path_params["task_id"])
        if not valid_task_id(task_id):
            raise HandlerError(
                400,
                "invalid_task_id",
                f"task_id {task_id[:80]!r} is not a task id (letters, digits, '.', '_', ':', "
                "'-'; at most 128 characters)",
                field="task_id",
            )
        return task_id

    async def _known_task(self, task_id: str) -> TaskView:
        view = await self._call(f"report task {task_id}", self.service.get_task(task_id))
        if view is None:
            raise HandlerError(
                404, "task_not_found", f"no task {task_id} on this node", field="task_id"
            )
        return view

    async def submit(self, request: Request) -> Response:
        submission = await self._parse(await self._body(request), TaskSubmission)
        accepted = await self._call("accept the task", self.service.submit(submission))
        self.metrics.tasks_accepted.labels("created" if accepted.created else "duplicate").inc()
        return json_response(
            accepted,
            202 if accepted.created else 200,
            headers={"location": f"/v1/tasks/{accepted.task_id}"},
        )

    async def submit_batch(self, request: Request) -> Response:
        batch = await self._parse(await self._body(request), BatchSubmission)
        if len(batch.tasks) > self.options.max_batch:
            raise HandlerError(
                413,
                "batch_too_large",
                f"tasks: {len(batch.tasks)} items, at most {self.options.max_batch} per request",
                field="tasks",
            )
        accepted = await self._call("accept the batch", self.service.submit_many(batch.tasks))
        if len(accepted) != len(batch.tasks):
            raise HandlerError(
                500,
                "internal_error",
                f"the node answered {len(accepted)} of {len(batch.tasks)} batch items",
            )
        created = sum(1 for a in accepted if a.created)
        self.metrics.tasks_accepted.labels("created").inc(created)
        self.metrics.tasks_accepted.labels("duplicate").inc(len(accepted) - created)
        result = BatchAccepted(
            accepted=accepted, created=created, duplicates=len(accepted) - created
        )
        return json_response(result, 202 if created else 200)

    async def list_tasks(self, request: Request) -> Response:
        limit = _int_param(request, "limit", DEFAULT_LIST_LIMIT, 1, MAX_LIST_LIMIT)
        raw_status = request.query_params.get("status")
        status: TaskStatus | None = None
        if raw_status:
            try:
                status = TaskStatus(raw_status)
            except ValueError:
                choices = ", ".join(s.value for s in TaskStatus)
                raise HandlerError(
                    400, "invalid_query", f"status must be one of {choices}", field="status"
                ) from None
        tasks = await self._call("list tasks", self.service.list_tasks(limit, status))
        return json_response(TaskList(tasks=tasks, count=len(tasks)), exclude=LIST_EXCLUDE)

    async def get_task(self, request: Request) -> Response:
        return json_response(await self._known_task(self._task_id(request)))

    async def task_events(self, request: Request) -> Response:
        task_id = self._task_id(request)
        first = await self._known_task(task_id)
        return TaskEventStream(
            task_id,
            first,
            events=lambda: self.service.task_events(task_id),
            final_view=lambda: self.service.get_task(task_id),
            keepalive_s=self.options.keepalive_s,
        )

    async def cancel(self, request: Request) -> Response:
        task_id = self._task_id(request)
        view = await self._call(f"cancel task {task_id}", self.service.cancel(task_id))
        if view is None:
            raise HandlerError(
                404, "task_not_found", f"no task {task_id} on this node", field="task_id"
            )
        finished = view.status in (TaskStatus.DONE, TaskStatus.FAILED)
        return json_response(view, 200 if finished else 202)

    async def peers(self, request: Request) -> Response:
        peers = await self._call("list peers", self.service.peers())
        return json_response(PeerList(peers=peers))

    async def status(self, request: Request) -> Response:
        return json_response(await self._call("report its status", self.service.status()))

    async def health(self, request: Request) -> Response:
        return Response(b'{"ok":true,"status":"ok"}', media_type="application/json")

    async def metrics_text(self, request: Request) -> Response:
        try:
            status = await self.service.status()
        except Exception:  # noqa: BLE001 - a failing status read must not fail the metrics scrape; counted
            self.metrics.scrape_errors.inc()
            status = None
        return Response(self.metrics.render(status), media_type=CONTENT_TYPE_LATEST)


def _too_large(size: int, limit: int) -> HandlerError:
    return HandlerError(
        413,
        "body_too_large",
        f"request body is {size} bytes; this node accepts at most {limit} "
        f"(raise it with {BODY_SETTING}, or pass a smaller context)",
        # The rest of the body is never read, so the connection cannot be reused.
        headers={"connection": "close"},
    )


def _write_all(handle: BinaryIO, chunks: list[bytes]) -> None:
    for chunk in chunks:
        handle.write(chunk)


def _discard(handle: BinaryIO) -> None:
    handle.close()
    Path(handle.name).unlink(missing_ok=True)


DRAIN_MAX_BYTES = 16 * 1024 * 1024
DRAIN_MAX_S = 2.0


async def _drain_briefly(stream: AsyncIterator[bytes]) -> None:
    """Read and drop a little more of a refused body, so a client that sends the whole
    body before reading the answer (as HTTP/1.1 clients do) gets the 413 instead of a
    write that blocks until its timeout. Bounded in bytes and time: a huge or endless
    body is cut off and its connection closed."""
    dropped = 0
    with trio.move_on_after(DRAIN_MAX_S):
        async for chunk in stream:
            dropped += len(chunk)
            if dropped > DRAIN_MAX_BYTES:
                return


def _parse_file(path: Path, model: type[M]) -> M:
    data = path.read_bytes()
    if model is TaskSubmission:
        return cast(M, parse_large_submission(data))
    return model.model_validate_json(data)


def parse_large_submission(data: bytes) -> TaskSubmission:
    """A task body whose context is a long JSON string, parsed without ever holding the
    GIL for the whole body: the context string is found by a structural scan, decoded in
    1 MiB slices (`SlicedText`), and only the rest of the body (the context replaced by
    an empty string) goes through pydantic. Any other shape is parsed the ordinary way."""
    span = top_level_string_span(data, "context")
    if span is None or span[1] - span[0] <= SLICE:
        return TaskSubmission.model_validate_json(data)
    start, end = span
    try:
        text = decode_json_string(data, start + 1, end)
    except ValueError:
        text = None
    if text is None:  # cannot be cut safely, or invalid: let the parser say what is wrong
        return TaskSubmission.model_validate_json(data)
    rest = data[:start] + b'""' + data[end + 1 :]  # "" passes both encodings
    submission = TaskSubmission.model_validate_json(rest)
    if submission.context_encoding == "base64":
        for chunk in text.aligned(4 * (SLICE // 4)):
            try:
                check_base64(chunk)
            except ValueError:
                # the same 400 answer as the ordinary parse gives (field: context)
                TaskSubmission.model_validate(
                    {"prompt": "x", "context_encoding": "base64", "context": chunk}
                )
                raise
    return submission.model_copy(update={"context": text})


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise HandlerError(400, "invalid_query", f"{name} must be an integer", field=name) from None
    if not low <= value <= high:
        raise HandlerError(
            400, "invalid_query", f"{name} must be between {low} and {high}", field=name
        )
    return value


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HandlerError)
    return error_response(exc)


async def _openai_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, OpenAIError)
    return openai_error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        err = HandlerError(
            404, "not_found", f"no such endpoint: {request.method} {request.url.path}"
        )
    elif exc.status_code == 405:
        err = HandlerError(
            405,
            "method_not_allowed",
            f"{request.method} is not allowed on {request.url.path}",
            headers=dict(exc.headers or {}),
        )
    else:
        err = HandlerError(exc.status_code, "http_error", str(exc.detail))
    return error_response(err)


async def _unexpected(request: Request, exc: Exception) -> Response:
    return error_response(service_error(exc, f"answer {request.method} {request.url.path}"))


def create_app(
    service: NodeService,
    *,
    token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_batch: int = DEFAULT_MAX_BATCH,
    keepalive_s: float = DEFAULT_KEEPALIVE_S,
    spool_dir: Path | None = None,
    completions: CompletionRouter | None = None,
) -> Starlette:
    """The ASGI app; `app.state.metrics` is its `ApiMetrics`. No bind checks here (see
    `serve_api`), so tests can mount it on any transport. `completions` places the
    OpenAI-compatible endpoints' requests (docs/openai.md); without it they answer 503."""
    if max_body_bytes < 1 or max_batch < 1:
        raise ValueError("max_body_bytes and max_batch must be positive")
    options = ApiOptions(token, max_body_bytes, max_batch, keepalive_s, spool_dir)
    metrics = ApiMetrics()
    h = _Handlers(service, options, metrics)
    oa = OpenAIHandlers(service, completions, h.body_bytes, keepalive_s=keepalive_s)
    routes = [
        Route("/v1/chat/completions", oa.chat_completions, methods=["POST"]),
        Route("/v1/models", oa.list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", oa.get_model, methods=["GET"]),
        Route("/v1/tasks", h.submit, methods=["POST"]),
        Route("/v1/tasks", h.list_tasks, methods=["GET"]),
        Route("/v1/tasks/batch", h.submit_batch, methods=["POST"]),
        Route("/v1/tasks:batch", h.submit_batch, methods=["POST"]),
        Route("/v1/tasks/{task_id}", h.get_task, methods=["GET"]),
        Route("/v1/tasks/{task_id}/events", h.task_events, methods=["GET"]),
        Route("/v1/tasks/{task_id}/cancel", h.cancel, methods=["POST"]),
        Route("/v1/peers", h.peers, methods=["GET"]),
        Route("/v1/status", h.status, methods=["GET"]),
        Route("/healthz", h.health, methods=["GET"]),
        Route("/v1/health", h.health, methods=["GET"]),
        Route("/metrics", h.metrics_text, methods=["GET"]),
        *generate_routes(service),  # pipelined inference (docs/inference.md)
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(_Guard, token=token, metrics=metrics)],
        exception_handlers={
            HandlerError: _api_error,
            OpenAIError: _openai_error,
            HTTPException: _http_error,
            Exception: _unexpected,
        },
    )
    app.state.metrics = metrics
    app.state.options = options
    return app
