"""Any OpenAI-compatible server (exo, llama-server, vLLM, LM Studio) over plain httpx.

Only `/chat/completions` (JSON and SSE streaming) and `/models` are used, so the backend
works with servers that implement nothing else. Failures map onto the shared error types:
a refused or timed-out connect is `BackendUnavailable` naming the URL, a 404 about the
model is `ModelNotFound`, anything else is an `LlmError` carrying the status and the start
of the body, so the user sees what the server said.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any, Generic, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

import httpx
import trio

from kowalski_node.config import DEFAULT_OPENAI_BASE_URL
from kowalski_node.errors import BackendUnavailable, LlmError, ModelNotFound
from kowalski_node.llm.base import LlmRequest, LlmResponse
from kowalski_node.sse import sse_events

BODY_EXCERPT_CHARS = 300

C = TypeVar("C")


class RunBoundClient(Generic[C]):
    """One async HTTP client per trio run.

    httpx's connection pool binds locks and sockets to the event loop that first used
    them; a client reused by a later `trio.run` (the synchronous API helper calls
    `trio.run` per task) would fail. So the client is recreated when the run changes.
    """

    def __init__(self, make: Callable[[], C]) -> None:
        self._make = make
        self._client: C | None = None
        self._token: object = None

    def get(self) -> C:
        token = trio.lowlevel.current_trio_token()
        if self._client is None or self._token is not token:
            self._client = self._make()
            self._token = token
        return self._client

    def take_current(self) -> C | None:
        """Detach and return the client if it belongs to the current run (for closing)."""
        client, self._client = self._client, None
        try:
            same_run = self._token is trio.lowlevel.current_trio_token()
        except RuntimeError:
            same_run = False
        return client if same_run else None


def excerpt(text: str, limit: int = BODY_EXCERPT_CHARS) -> str:
    """A one-line start of a response body for error messages."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit] + "..."


def normalise_base_url(url: str) -> str:
    """Add a scheme when missing and `/v1` when the URL has no path; drop trailing slashes."""
    raw = url.strip()
    if "://" not in raw:
        raw = "http://" + raw
    parts = urlsplit(raw)
    if not parts.netloc:
        raise ValueError(f"not a URL: {url!r}")
    path = parts.path.rstrip("/")
    if not path:
        path = "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


class OpenAIBackend:
    """Chat completions against an OpenAI-compatible HTTP server."""

    name = "openai"

    def __init__(
        self,
        base_url: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        *,
        connect_timeout_s: float = 5.0,
        timeout_s: float = 600.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        url = base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_OPENAI_BASE_URL
        try:
            self.base_url = normalise_base_url(url)
        except ValueError as exc:
            raise LlmError(f"openai backend: {exc}") from None
        self.default_model = model
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self._transport = transport
        self._clients: RunBoundClient[httpx.AsyncClient] = RunBoundClient(self._new_client)
        self._discovered_model: str | None = None

    def _new_client(self) -> httpx.AsyncClient:
        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return httpx.AsyncClient(
            base_url=self.base_url + "/",
            timeout=self.timeout,
            headers=headers,
            transport=self._transport,
        )

    # -- errors ---------------------------------------------------------------

    def _unavailable(self, exc: Exception) -> BackendUnavailable:
        detail = str(exc) or type(exc).__name__
        return BackendUnavailable(self.name, self.base_url, detail)

    def _status_error(self, status: int, body: str, model: str | None) -> LlmError:
        message = _error_message(body)
        if status == 404 and "model" in message.lower():
            return ModelNotFound(
                f"openai backend at {self.base_url} has no model {model!r} ({excerpt(message)}); "
                f"check the names at {self.base_url}/models or set llm.model"
            )
        if status == 404:
            return LlmError(
                f"openai backend at {self.base_url}: HTTP 404 for the chat endpoint "
                f"({excerpt(message)}); is llm.openai_base_url right (usually ends in /v1)?"
            )
        if status in (401, 403):
            return LlmError(
                f"openai backend at {self.base_url} rejected the request (HTTP {status}: "
                f"{excerpt(message)}); check llm.openai_api_key / OPENAI_API_KEY"
            )
        return LlmError(f"openai backend at {self.base_url}: HTTP {status}: {excerpt(message)}")

    def _malformed(self, what: str, detail: str) -> LlmError:
        return LlmError(f"openai backend at {self.base_url} sent a malformed {what}: {detail}")

    # -- requests -------------------------------------------------------------

    async def _model_for(self, request: LlmRequest) -> str:
        model = request.model or self.default_model or self._discovered_model
        if model:
            return model
        # Single-model servers (llama-server, exo with one model) need no name: ask them.
        names = await self.list_models()
        if not names:
            raise ModelNotFound(
                f"openai backend at {self.base_url} lists no models; set llm.model / --model"
            )
        self._discovered_model = names[0]
        return names[0]

    def _payload(self, request: LlmRequest, model: str, stream: bool) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stream": stream,
        }
        if request.stop:
            payload["stop"] = list(request.stop)
        if request.seed is not None:
            payload["seed"] = request.seed
        return payload

    async def complete(self, request: LlmRequest) -> LlmResponse:
        model = await self._model_for(request)
        started = time.perf_counter()
        client = self._clients.get()
        try:
            resp = await client.post("chat/completions", json=self._payload(request, model, False))
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise self._unavailable(exc) from exc
        except httpx.TimeoutException as exc:
            raise LlmError(
                f"openai backend at {self.base_url} timed out ({type(exc).__name__})"
            ) from exc
        except httpx.HTTPError as exc:
            raise LlmError(
                f"openai backend at {self.base_url}: {type(exc).__name__}: {exc}"
            ) from exc
        if resp.status_code >= 400:
            raise self._status_error(resp.status_code, resp.text, model)
        try:
            body = resp.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise self._malformed(
                "JSON body", f"{exc}; body starts {excerpt(resp.text)!r}"
            ) from exc
        text, finish = _parse_completion(body, self._malformed)
        latency_ms = (time.perf_counter() - started) * 1000.0
        usage = body.get("usage") if isinstance(body, dict) else None
        tokens_in, tokens_out, estimated = _usage(usage, request, text)
        extra: dict[str, object] = {"base_url": self.base_url}
        if estimated:
            extra["tokens_estimated"] = True
        return LlmResponse(
            text=text,
            model=str(body.get("model") or model),
            backend=self.name,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            latency_ms=latency_ms,
            finish_reason=finish,
            extra=extra,
        )

    async def stream(self, request: LlmRequest) -> AsyncIterator[str]:
        model = await self._model_for(request)
        client = self._clients.get()
        payload = self._payload(request, model, True)
        try:
            async with client.stream("POST", "chat/completions", json=payload) as resp:
                if resp.status_code >= 400:
                    body = (await resp.aread()).decode("utf-8", "replace")
                    raise self._status_error(resp.status_code, body, model)
                # aiter_lines is an async generator; close it as soon as [DONE] arrives.
                lines = cast(AsyncGenerator[str, None], resp.aiter_lines())
                async with aclosing(lines), aclosing(sse_events(lines)) as events:
                    async for _event, data in events:
                        if data == "[DONE]":
                            return
                        piece = self._stream_piece(data)
                        if piece:
                            yield piece
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise self._unavailable(exc) from exc
        except httpx.TimeoutException as exc:
            raise LlmError(f"openai backend at {self.base_url} timed out while streaming") from exc
        except httpx.HTTPError as exc:
            raise LlmError(
                f"openai backend at {self.base_url}: {type(exc).__name__}: {exc}"
            ) from exc

    def _stream_piece(self, data: str) -> str:
        try:
            event = json.loads(data)
        except json.JSONDecodeError as exc:
            raise self._malformed("stream event", f"{exc}; data {excerpt(data)!r}") from exc
        if not isinstance(event, dict):
            raise self._malformed("stream event", f"expected an object, got {excerpt(data)!r}")
        if "error" in event:
            raise LlmError(
                f"openai backend at {self.base_url} failed mid-stream: "
                f"{excerpt(_error_message(json.dumps(event)))}"
            )
        choices = event.get("choices")
        if not isinstance(choices, list) or not choices:
            return ""  # usage-only or keep-alive events
        delta = choices[0].get("delta") if isinstance(choices[0], dict) else None
        content = delta.get("content") if isinstance(delta, dict) else None
        return content if isinstance(content, str) else ""

    async def list_models(self) -> list[str]:
        client = self._clients.get()
        try:
            resp = await client.get("models")
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise self._unavailable(exc) from exc
        except httpx.HTTPError as exc:
            raise LlmError(
                f"openai backend at {self.base_url}: {type(exc).__name__}: {exc}"
            ) from exc
        if resp.status_code >= 400:
            raise LlmError(
                f"openai backend at {self.base_url}: listing models gave HTTP "
                f"{resp.status_code}: {excerpt(_error_message(resp.text))}"
            )
        try:
            body = resp.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise self._malformed(
                "model list", f"{exc}; body starts {excerpt(resp.text)!r}"
            ) from exc
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise self._malformed("model list", f"no 'data' list in {excerpt(resp.text)!r}")
        return [str(item["id"]) for item in data if isinstance(item, dict) and "id" in item]

    async def aclose(self) -> None:
        client = self._clients.take_current()
        if client is not None:
            await client.aclose()


def _error_message(body: str) -> str:
    """The human part of an error body: `{"error": {"message": ...}}`, `{"error": "..."}`, or raw."""
    try:
        parsed = json.loads(body)
    except (json.JSONDecodeError, ValueError):
        return body
    if isinstance(parsed, dict):
        err = parsed.get("error", parsed.get("detail", parsed.get("message")))
        if isinstance(err, dict):
            return str(err.get("message") or err)
        if err is not None:
            return str(err)
    return body


def _parse_completion(body: Any, malformed: Callable[[str, str], LlmError]) -> tuple[str, Any]:
    if not isinstance(body, dict):
        raise malformed("completion", f"expected a JSON object, got {type(body).__name__}")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise malformed("completion", f"no choices in {excerpt(json.dumps(body))!r}")
    message = choices[0].get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if content is None:
        content = choices[0].get("text")  # legacy completion shape
    if not isinstance(content, str):
        raise malformed(
            "completion", f"choice has no text content: {excerpt(json.dumps(choices[0]))!r}"
        )
    reason = choices[0].get("finish_reason")
    finish = "length" if reason == "length" else "stop"
    return content, finish


def _usage(usage: Any, request: LlmRequest, text: str) -> tuple[int, int, bool]:
    """Token counts from `usage`; estimated at ~4 characters per token when a server omits it."""
    if isinstance(usage, dict):
        tin, tout = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(tin, int) and isinstance(tout, int):
            return tin, tout, False
    chars_in = sum(len(m.content) for m in request.messages)
    return max(1, chars_in // 4), max(1 if text else 0, len(text) // 4), True
