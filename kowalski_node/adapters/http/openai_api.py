"""OpenAI-compatible endpoints on every node: `/v1/chat/completions` and `/v1/models`.

Any OpenAI client (the official `openai` package included) can use the cluster: plain
model ids run where the `CompletionRouter` places them (the best peer that holds the
model, or a layer pipeline), and `rlm:<model>` ids run the request as an RLM task
through the node's own task submission (`NodeService`). Reference: docs/openai.md.

Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the
status codes OpenAI uses (400 bad input, 401 token, 404 unknown model, 503 unavailable).
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import trio
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from kowalski_node.errors import BackendUnavailable, LlmError, NoCapableDevice, TaskError
from kowalski_node.llm.base import ChatMessage, LlmRequest, LlmResponse
from kowalski_node.remote.completions import CompletionRouter, ModelNotFound, ModelUnavailable
from kowalski_node.runtime.service import NodeService, TaskStatus, TaskSubmission, TaskView

log = logging.getLogger("kowalski_node.http.openai")
T = TypeVar("T")

RLM_PREFIX = "rlm:"
DEFAULT_MAX_TOKENS = 512
MAX_STOP_SEQUENCES = 4
RLM_POLL_S = 0.5
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class OpenAIError(Exception):
    """An error answer in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def openai_error_response(exc: OpenAIError) -> Response:
    return Response(
        json.dumps(exc.body(), ensure_ascii=False),
        status_code=exc.status,
        media_type="application/json",
    )


# ============================================================================ request


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[_Part] | None = None
    name: str | None = None


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The body of `POST /v1/chat/completions`; unknown fields are refused, never ignored."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=512)
    messages: list[_Message] = Field(min_length=1)
    stream: bool = False
    stream_options: _StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(default=None, ge=1, le=128)
    # Accepted when they ask for nothing this server does not do.
    user: str | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # kowalski-node extensions (send them with the openai client's `extra_body=`)
    context: Any = None
    """`rlm:` models: the REPL's `context` (any JSON value); replaces the earlier messages."""
    rlm: dict[str, Any] | None = None
    """`rlm:` models: per-task RLM limits, e.g. {"max_iterations": 8} (config.RlmSettings keys)."""

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def refuse_unsupported(self) -> None:
        """A clear 400 for what this server cannot honour (instead of silently ignoring it)."""
        if self.n is not None and self.n > 1:
            raise OpenAIError(
                400,
                f"n={self.n} is not supported: this server generates one choice per request "
                "(send n=1, or several requests)",
                code="unsupported_parameter",
                param="n",
            )
        refusals = [
            ("tools", bool(self.tools), "tool calling is not supported"),
            ("tool_choice", self.tool_choice not in (None, "none"), "tool calling is not supported"),
            ("logprobs", bool(self.logprobs), "logprobs are not supported"),
            ("top_logprobs", bool(self.top_logprobs), "logprobs are not supported"),
            ("logit_bias", bool(self.logit_bias), "logit_bias is not supported"),
            ("presence_penalty", bool(self.presence_penalty), "presence_penalty is not supported (use 0)"),
            ("frequency_penalty", bool(self.frequency_penalty), "frequency_penalty is not supported (use 0)"),
            (
                "response_format",
                self.response_format is not None and self.response_format.get("type") != "text",
                "only response_format {'type': 'text'} is supported",
            ),
        ]  # fmt: skip
        for param, refused, why in refusals:
            if refused:
                raise OpenAIError(400, why, code="unsupported_parameter", param=param)
        if not self.model.startswith(RLM_PREFIX) and (
            self.context is not None or self.rlm is not None
        ):
            param = "context" if self.context is not None else "rlm"
            raise OpenAIError(
                400,
                f"{param} applies only to rlm:<model> ids (got model {self.model!r})",
                code="invalid_value",
                param=param,
            )

    def chat_messages(self) -> tuple[ChatMessage, ...]:
        out: list[ChatMessage] = []
        for i, message in enumerate(self.messages):
            if message.role in ("tool", "function"):
                raise OpenAIError(
                    400,
                    f"messages[{i}]: role {message.role!r} is not supported (no tool calling)",
                    code="unsupported_parameter",
                    param=f"messages[{i}].role",
                )
            role: Literal["system", "user", "assistant"] = (
                "user" if message.role == "user"
                else "assistant" if message.role == "assistant"
                else "system"
            )  # fmt: skip
            out.append(ChatMessage(role, _text_of(message, i)))
        return tuple(out)

    def llm_request(self) -> LlmRequest:
        return LlmRequest(
            messages=self.chat_messages(),
            model=self.model,
            max_tokens=self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS,
            temperature=0.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            stop=self.stop_sequences(),
            seed=self.seed,
            purpose="root",
        )


def _text_of(message: _Message, index: int) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts: list[str] = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise OpenAIError(
                400,
                f"messages[{index}].content[{j}]: only text parts are supported, got {part.type!r}",
                code="unsupported_parameter",
                param=f"messages[{index}].content",
            )
        texts.append(part.text)
    return "".join(texts)


def _validation_error(exc: ValidationError) -> OpenAIError:
    errors = exc.errors()
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"])
    kind = first["type"]
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error", first["msg"])
        return OpenAIError(400, f"request body is not valid JSON: {detail}", code="invalid_json")
    if kind == "model_type" and not loc:
        return OpenAIError(400, "request body must be a JSON object", code="invalid_body")
    if kind == "missing":
        message, code = f"{loc}: required field is missing", "missing_required_parameter"
    elif kind == "extra_forbidden":
        message, code = f"{loc}: unrecognized request argument", "unknown_parameter"
    else:
        msg = first["msg"].removeprefix("Value error, ")
        message, code = f"{loc}: {msg}", "invalid_value"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return OpenAIError(400, message, code=code, param=loc or None)


# ============================================================================ stop sequences


class StopScanner:
    """Cuts streamed text at the first stop sequence, holding back a possible partial match."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The text that is safe to emit after `piece` (empty once stopped)."""
        if self.stopped:
            return ""
        self.pending += piece
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out
        if len(self.pending) <= self.hold:
            return ""
        out = self.pending[: len(self.pending) - self.hold]
        self.pending = self.pending[len(out) :]
        return out

    def finish(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


def apply_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """(text cut at the earliest stop sequence, whether one was found)."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


# ============================================================================ responses


def _completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _estimate_tokens(text: str) -> int:
    """About four characters per token: for streamed usage when the route reports none."""
    return max(1, math.ceil(len(text) / 4)) if text else 0


def _chunk(
    cid: str, created: int, model: str, delta: dict[str, Any], finish: str | None
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def _data(obj: dict[str, Any] | str) -> bytes:
    payload = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {payload}\n\n".encode()


def _comment(text: str) -> bytes:
    return (": " + text.replace("\n", " ").replace("\r", " ") + "\n\n").encode()


Emit = Callable[[bytes], Awaitable[None]]


class _ClientGone(Exception):
    """The connection closed while a chunk was being written."""


class SseProducer(Response):
    """A raw ASGI event stream: `producer(emit)` writes frames; a disconnect cancels it."""

    def __init__(
        self,
        producer: Callable[[Emit], Awaitable[None]],
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status_code=200, media_type="text/event-stream")
        self.producer = producer
        self.extra_headers = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": SSE_HEADERS + self.extra_headers,
            }
        )

        async def emit(frame: bytes) -> None:
            try:
                await send({"type": "http.response.body", "body": frame, "more_body": True})
            except OSError as exc:
                raise _ClientGone from exc

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_disconnect, receive, nursery.cancel_scope)
                await self.producer(emit)
                nursery.cancel_scope.cancel()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except* _ClientGone:
            log.debug("chat completion stream: client went away")


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """`await work`, cancelled (None) if the client disconnects first (a long model call
    or RLM task should not outlive the request that wanted it)."""
    result: list[T] = []
    failure: list[Exception] = []

    async def run(scope: trio.CancelScope) -> None:
        try:
            result.append(await work)
        except Exception as exc:  # noqa: BLE001 - re-raised bare below, not wrapped in an exception group
            failure.append(exc)
        scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, nursery.cancel_scope)
        await _watch_disconnect(request.receive, nursery.cancel_scope)
    if failure:
        raise failure[0]
    return result[0] if result else None


async def _watch_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


# ============================================================================ handlers


class OpenAIHandlers:
    """`/v1/chat/completions`, `/v1/models`, `/v1/models/{id}` over a router and a service."""

    def __init__(
        self,
        service: NodeService,
        router: CompletionRouter | None,
        read_body: Callable[[Request], Awaitable[bytes]],
        *,
        keepalive_s: float = 15.0,
        rlm_timeout_s: float = 24 * 3600.0,
    ) -> None:
        self.service = service
        self.router = router
        self.read_body = read_body
        self.keepalive_s = keepalive_s
        self.rlm_timeout_s = rlm_timeout_s

    def _router(self) -> CompletionRouter:
        if self.router is None:
            raise OpenAIError(
                503,
                "this node has no model router (it runs without the mesh's remote services)",
                type="server_error",
                code="model_unavailable",
            )
        return self.router

    # ------------------------------------------------------------------ models

    async def list_models(self, request: Request) -> Response:
        cards = await self._router().models()
        data: list[dict[str, Any]] = []
        for card in cards:
            where = {
                "route": card.route,
                "holders": list(card.holders),
                "layer_ranges": [
                    {"peer": h.peer, "start": h.start, "end": h.end, "n_layers": h.n_layers}
                    for h in card.partial
                ],
            }
            data.append(_model_entry(card.id, where))
            data.append(_model_entry(RLM_PREFIX + card.id, {"route": "rlm", "base": card.id}))
        return _json({"object": "list", "data": data})

    async def get_model(self, request: Request) -> Response:
        model_id = str(request.path_params["model_id"])
        base = model_id.removeprefix(RLM_PREFIX)
        try:
            card = await self._card(base)
        except OpenAIError:
            raise _model_not_found(model_id, None) from None
        if model_id.startswith(RLM_PREFIX):
            return _json(_model_entry(model_id, {"route": "rlm", "base": card.id}))
        return _json(_model_entry(card.id, {"route": card.route, "holders": list(card.holders)}))

    async def _card(self, model: str) -> Any:
        card_of = getattr(self._router(), "card", None)
        if card_of is not None:
            try:
                return await card_of(model)
            except ModelNotFound as exc:
                raise _model_not_found(model, str(exc)) from None
        for card in await self._router().models():
            if card.id == model:
                return card
        raise _model_not_found(model, None)

    # ------------------------------------------------------------------ completions

    async def chat_completions(self, request: Request) -> Response:
        body = await self.read_body(request)
        try:
            chat = ChatCompletionRequest.model_validate_json(body)
        except ValidationError as exc:
            raise _validation_error(exc) from None
        chat.refuse_unsupported()
        if chat.model.startswith(RLM_PREFIX):
            return await self._rlm(chat, request)
        llm_request = chat.llm_request()
        router = self._router()
        if chat.stream:
            return await self._stream(chat, llm_request, router)
        try:
            done = await _unless_disconnected(request, router.complete(llm_request))
        except LlmError as exc:
            raise _llm_error(exc, chat.model) from None
        if done is None:  # the client went away; the model call was cancelled
            return Response(status_code=499)
        text, hit = apply_stop(done.response.text, llm_request.stop)
        finish = "stop" if hit else _finish(done.response)
        return _json(
            {
                "id": _completion_id(),
                "object": "chat.completion",
                "created": int(time.time()),
                "model": chat.model,
                "system_fingerprint": None,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ],
                "usage": _usage(done.response.tokens_in, done.response.tokens_out),
                "kowalski": {
                    "route": done.route,
                    "peers": list(done.peers),
                    "backend": done.response.backend,
                    "latency_ms": round(done.response.latency_ms, 1),
                },
            }
        )

    async def _stream(
        self, chat: ChatCompletionRequest, llm_request: LlmRequest, router: CompletionRouter
    ) -> Response:
        try:
            stream = await router.open_stream(llm_request)
            pieces = stream.pieces.__aiter__()
            # The first piece before the headers: a failure to start is a proper error status.
            first: str | None
            try:
                first = await pieces.__anext__()
            except StopAsyncIteration:
                first = None
        except LlmError as exc:
            raise _llm_error(exc, chat.model) from None
        include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
        cid, created, model = _completion_id(), int(time.time()), chat.model
        scanner = StopScanner(llm_request.stop)
        prompt_text = "".join(m.content for m in llm_request.messages)

        async def produce(emit: Emit) -> None:
            await emit(
                _data(_chunk(cid, created, model, {"role": "assistant", "content": ""}, None))
            )
            pieces_seen = 0
            finish = "stop"
            try:
                if first is not None:
                    pieces_seen += 1
                    out = scanner.feed(first)
                    if out:
                        await emit(_data(_chunk(cid, created, model, {"content": out}, None)))
                while not scanner.stopped:
                    try:
                        piece = await pieces.__anext__()
                    except StopAsyncIteration:
                        break
                    pieces_seen += 1
                    out = scanner.feed(piece)
                    if out:
                        await emit(_data(_chunk(cid, created, model, {"content": out}, None)))
            except LlmError as exc:
                await emit(_data(_llm_error(exc, chat.model).body()))
                return
            finally:
                aclose = getattr(pieces, "aclose", None)
                if aclose is not None:
                    with trio.CancelScope(shield=True):
                        await aclose()
            rest = scanner.finish()
            if rest:
                await emit(_data(_chunk(cid, created, model, {"content": rest}, None)))
            result = stream.result
            if not scanner.stopped and result is not None:
                finish = _finish(result)
            elif not scanner.stopped and pieces_seen >= llm_request.max_tokens:
                finish = "length"
            await emit(_data(_chunk(cid, created, model, {}, finish)))
            if include_usage:
                if result is not None:
                    usage = _usage(result.tokens_in, result.tokens_out)
                else:  # streamed by a local backend: pieces are tokens, the prompt is estimated
                    usage = _usage(_estimate_tokens(prompt_text), pieces_seen)
                usage_chunk = _chunk(cid, created, model, {}, None)
                usage_chunk["choices"] = []
                usage_chunk["usage"] = usage
                await emit(_data(usage_chunk))
            await emit(_data("[DONE]"))

        return SseProducer(produce, headers={"x-kowalski-route": stream.route})

    # ------------------------------------------------------------------ rlm:<model>

    async def _rlm(self, chat: ChatCompletionRequest, request: Request) -> Response:
        base = chat.model[len(RLM_PREFIX) :]
        if not base:
            raise OpenAIError(
                400, "rlm: needs a base model, e.g. rlm:<model id from /v1/models>",
                code="invalid_value", param="model",
            )  # fmt: skip
        card = await self._card(base)
        question, context = _rlm_inputs(chat)
        try:
            submission = TaskSubmission(
                prompt=question,
                context=context,
                model=_task_model(self._router(), card.id),
                rlm=chat.rlm,
            )
        except ValidationError as exc:
            detail = exc.errors()[0]["msg"].removeprefix("Value error, ")
            param = "rlm" if chat.rlm is not None else "context"
            raise OpenAIError(
                400, f"{param}: {detail}", code="invalid_value", param=param
            ) from None
        try:
            accepted = await self.service.submit(submission)
        except (NoCapableDevice, TaskError) as exc:
            raise OpenAIError(503, str(exc), type="server_error", code="task_rejected") from None
        except ValueError as exc:  # settings validation of `rlm`
            raise OpenAIError(400, f"rlm: {exc}", code="invalid_value", param="rlm") from None
        task_id = accepted.task_id
        headers = {"x-kowalski-task-id": task_id}
        if chat.stream:
            return SseProducer(self._rlm_stream(chat, task_id), headers=headers)
        view = await _unless_disconnected(request, self._await_task(task_id, None))
        if view is None:  # the client went away; _await_task cancelled the task
            return Response(status_code=499)
        text, finish, usage = _rlm_answer(view, chat.stop_sequences())
        response = _json(
            {
                "id": "chatcmpl-" + task_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": chat.model,
                "system_fingerprint": None,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ],
                "usage": usage,
                "kowalski": _rlm_extra(view),
            }
        )
        response.headers.update(headers)
        return response

    def _rlm_stream(
        self, chat: ChatCompletionRequest, task_id: str
    ) -> Callable[[Emit], Awaitable[None]]:
        async def produce(emit: Emit) -> None:
            cid, created = "chatcmpl-" + task_id, int(time.time())
            await emit(_comment(f"kowalski task {task_id}"))
            await emit(
                _data(_chunk(cid, created, chat.model, {"role": "assistant", "content": ""}, None))
            )
            try:
                view = await self._await_task(task_id, emit)
                text, finish, usage = _rlm_answer(view, chat.stop_sequences())
            except OpenAIError as exc:
                await emit(_data(exc.body()))
                return
            if text:
                await emit(_data(_chunk(cid, created, chat.model, {"content": text}, None)))
            await emit(_data(_chunk(cid, created, chat.model, {}, finish)))
            if chat.stream_options and chat.stream_options.include_usage:
                usage_chunk = _chunk(cid, created, chat.model, {}, None)
                usage_chunk["choices"] = []
                usage_chunk["usage"] = usage
                await emit(_data(usage_chunk))
            await emit(_data("[DONE]"))

        return produce

    async def _await_task(self, task_id: str, emit: Emit | None) -> TaskView:
        """Follow the task to its end (progress as SSE comments when streaming); a client
        that goes away cancels the task."""
        finished = False
        try:
            with trio.move_on_after(self.rlm_timeout_s):
                view = await self._follow(task_id, emit)
                finished = True
                return view
            raise OpenAIError(
                504,
                f"RLM task {task_id} did not finish within {self.rlm_timeout_s:g} s",
                type="server_error",
                code="timeout",
            )
        finally:
            if not finished:
                with trio.CancelScope(shield=True), trio.move_on_after(5.0):
                    try:
                        await self.service.cancel(task_id)
                    except Exception as exc:  # noqa: BLE001 - the task may already be gone
                        log.info("event=rlm_cancel_failed task=%s reason=%r", task_id, str(exc))

    async def _follow(self, task_id: str, emit: Emit | None) -> TaskView:
        events = self.service.task_events(task_id)
        try:
            async with trio.open_nursery() as nursery:
                send, receive = trio.open_memory_channel[Any](16)

                async def pump() -> None:
                    async with send:
                        async for event in events:
                            await send.send(event)

                nursery.start_soon(pump)
                async with receive:
                    while True:
                        with trio.move_on_after(self.keepalive_s) as idle:
                            try:
                                event = await receive.receive()
                            except trio.EndOfChannel:
                                break
                        if idle.cancelled_caught:
                            if emit is not None:
                                await emit(_comment("keepalive"))
                            continue
                        if emit is not None:
                            await emit(_comment("progress " + json.dumps(_progress(event))))
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                with trio.CancelScope(shield=True):
                    await aclose()
        # The events end when the task is final, or early (a draining node): poll then.
        while True:
            view = await self.service.get_task(task_id)
            if view is None:
                raise OpenAIError(
                    500, f"RLM task {task_id} vanished", type="server_error", code="task_lost"
                )
            if view.status.final:
                return view
            await trio.sleep(RLM_POLL_S)


def _progress(event: Any) -> dict[str, Any]:
    keys = ("stage", "iteration", "max_iterations", "tokens_in", "tokens_out", "sub_calls",
            "elapsed_ms", "message", "peer")  # fmt: skip
    if isinstance(event, BaseModel):
        raw = event.model_dump()
    elif hasattr(event, "to_dict"):  # rlm.types.ProgressEvent, the one progress type
        raw = event.to_dict()
    else:
        raw = dict(event)
    return {k: raw.get(k) for k in keys if raw.get(k) not in (None, "")}


def _rlm_inputs(chat: ChatCompletionRequest) -> tuple[str, Any]:
    """(question, context): the last user message, and the earlier non-system content
    (or the `context` extension field)."""
    messages = chat.chat_messages()
    last = len(messages) - 1
    if messages[last].role != "user":
        raise OpenAIError(
            400,
            "rlm: the last message must be the user's question",
            code="invalid_value",
            param=f"messages[{last}].role",
        )
    question = messages[last].content
    if not question.strip():
        raise OpenAIError(
            400, "rlm: the question (last user message) is empty",
            code="invalid_value", param=f"messages[{last}].content",
        )  # fmt: skip
    if chat.context is not None:
        return question, chat.context
    earlier = [m.content for m in messages[:last] if m.role != "system" and m.content]
    return question, "\n\n".join(earlier)


def _task_model(router: CompletionRouter, model: str) -> str | None:
    resolve = getattr(router, "task_model", None)
    return resolve(model) if resolve is not None else model


def _rlm_answer(view: TaskView, stops: tuple[str, ...]) -> tuple[str, str, dict[str, int]]:
    if view.status is not TaskStatus.DONE or view.result is None:
        reason = view.error or (view.result.error if view.result else None) or view.status.value
        raise OpenAIError(
            500, f"RLM task {view.task_id} {view.status.value}: {reason}",
            type="server_error", code="rlm_task_failed",
        )  # fmt: skip
    result = view.result
    if result.error:
        raise OpenAIError(
            500, f"RLM task {view.task_id} failed: {result.error}",
            type="server_error", code="rlm_task_failed",
        )  # fmt: skip
    text, hit = apply_stop(result.content, stops)
    finish = "stop" if hit or result.stop_reason == "final" else "length"
    return text, finish, _usage(result.tokens_in, result.tokens_out)


def _rlm_extra(view: TaskView) -> dict[str, Any]:
    result = view.result
    return {
        "route": "rlm",
        "task_id": view.task_id,
        "leader": view.leader,
        "iterations": result.iterations if result else 0,
        "stop_reason": result.stop_reason if result else None,
        "sub_calls": result.sub_calls if result else 0,
    }


def _finish(response: LlmResponse) -> str:
    return "length" if response.finish_reason == "length" else "stop"


def _model_entry(model_id: str, where: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": 0,
        "owned_by": "kowalski-node",
        "kowalski": where,
    }


def _model_not_found(model: str, detail: str | None) -> OpenAIError:
    return OpenAIError(
        404,
        detail or f"model {model!r} is not served by this cluster (GET /v1/models lists them)",
        code="model_not_found",
        param="model",
    )


def _llm_error(exc: LlmError, model: str) -> OpenAIError:
    if isinstance(exc, ModelNotFound):
        return _model_not_found(model, str(exc))
    if isinstance(exc, (ModelUnavailable, BackendUnavailable)):
        return OpenAIError(503, str(exc), type="server_error", code="model_unavailable")
    return OpenAIError(502, f"the model failed: {exc}", type="server_error", code="model_error")


def _json(payload: dict[str, Any], status: int = 200) -> Response:
    return Response(
        json.dumps(payload, ensure_ascii=False), status_code=status, media_type="application/json"
    )
