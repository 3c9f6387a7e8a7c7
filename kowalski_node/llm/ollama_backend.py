"""Ollama through its official client (`ollama.AsyncClient`), running under trio.

The client is built on `httpx.AsyncClient`, which runs on trio through anyio, so no thread
hop is needed (tests drive it against a fake server under trio). The host comes from
settings, else `$OLLAMA_HOST`, else http://127.0.0.1:11434. Errors are translated so the
user is told what to do: start Ollama (naming the address tried) or `ollama pull MODEL`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import ollama
import pydantic

from kowalski_node.config import DEFAULT_OLLAMA_HOST
from kowalski_node.errors import BackendUnavailable, ConfigError, LlmError, ModelNotFound
from kowalski_node.llm.base import LlmRequest, LlmResponse
from kowalski_node.llm.openai_backend import RunBoundClient, excerpt

OLLAMA_DEFAULT_PORT = 11434
_CONNECT_ERRORS = (ConnectionError, httpx.ConnectError, httpx.ConnectTimeout)


def normalise_host(host: str) -> str:
    """`host`, `host:port` or a URL to `scheme://host:port` (default port 11434)."""
    raw = host.strip()
    if "://" not in raw:
        raw = "http://" + raw
    parts = urlsplit(raw)
    if not parts.hostname:
        raise ValueError(f"not a host: {host!r}")
    netloc = parts.netloc if parts.port is not None else f"{parts.netloc}:{OLLAMA_DEFAULT_PORT}"
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


class OllamaBackend:
    """Chat with models served by a local or LAN Ollama."""

    name = "ollama"

    def __init__(
        self,
        host: str | None = None,
        model: str | None = None,
        *,
        connect_timeout_s: float = 5.0,
        timeout_s: float = 600.0,
        keep_alive: str | float | None = None,
    ) -> None:
        raw = host or os.environ.get("OLLAMA_HOST") or DEFAULT_OLLAMA_HOST
        try:
            self.host = normalise_host(raw)
        except ValueError as exc:
            raise ConfigError(f"llm.ollama_host: {exc}") from None
        self.default_model = model
        self.keep_alive = keep_alive
        self.timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self._clients: RunBoundClient[ollama.AsyncClient] = RunBoundClient(
            lambda: ollama.AsyncClient(host=self.host, timeout=self.timeout)
        )

    def _model(self, request: LlmRequest) -> str:
        model = request.model or self.default_model
        if not model:
            raise ConfigError(
                "the ollama backend needs a model: pass --model / with_model(...) or set "
                "llm.model (e.g. `ollama:llama3.2`); `ollama list` shows what is pulled"
            )
        return model

    def _chat_args(self, request: LlmRequest, model: str) -> dict[str, Any]:
        options: dict[str, Any] = {
            "temperature": request.temperature,
            "top_p": request.top_p,
            "num_predict": request.max_tokens,
        }
        if request.stop:
            options["stop"] = list(request.stop)
        if request.seed is not None:
            options["seed"] = request.seed
        args: dict[str, Any] = {
            "model": model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "options": options,
        }
        if self.keep_alive is not None:
            args["keep_alive"] = self.keep_alive
        return args

    def _translate(self, exc: BaseException, model: str | None) -> LlmError:
        """Map client/transport exceptions onto the shared error types."""
        if isinstance(exc, _CONNECT_ERRORS):
            detail = "connection failed" if isinstance(exc, ConnectionError) else str(exc)
            return BackendUnavailable(
                self.name,
                self.host,
                f"{detail or type(exc).__name__}; is `ollama serve` running? "
                "(set llm.ollama_host or OLLAMA_HOST for another address)",
            )
        if isinstance(exc, ollama.ResponseError):
            message = str(exc.error)
            missing = exc.status_code == 404 or (
                "model" in message.lower() and "not found" in message
            )
            if missing and model is not None:
                return ModelNotFound(
                    f"ollama at {self.host} has no model {model!r} ({excerpt(message)}); "
                    f"run `ollama pull {model}`"
                )
            status = f"HTTP {exc.status_code}" if exc.status_code > 0 else "error"
            return LlmError(f"ollama at {self.host}: {status}: {excerpt(message)}")
        if isinstance(exc, httpx.TimeoutException):
            return LlmError(f"ollama at {self.host} timed out ({type(exc).__name__})")
        if isinstance(exc, json.JSONDecodeError | pydantic.ValidationError | TypeError):
            return LlmError(f"ollama at {self.host} sent a malformed response: {excerpt(str(exc))}")
        if isinstance(exc, httpx.HTTPError):
            return LlmError(f"ollama at {self.host}: {type(exc).__name__}: {excerpt(str(exc))}")
        return LlmError(f"ollama at {self.host}: {type(exc).__name__}: {excerpt(str(exc))}")

    async def complete(self, request: LlmRequest) -> LlmResponse:
        model = self._model(request)
        started = time.perf_counter()
        try:
            resp = await self._clients.get().chat(**self._chat_args(request, model))
        except (
            *_CONNECT_ERRORS,
            ollama.ResponseError,
            httpx.HTTPError,
            json.JSONDecodeError,
            pydantic.ValidationError,
            TypeError,
        ) as exc:
            raise self._translate(exc, model) from exc
        latency_ms = (time.perf_counter() - started) * 1000.0
        text = resp.message.content or ""
        extra: dict[str, object] = {"host": self.host}
        if resp.total_duration:
            extra["server_total_ms"] = round(resp.total_duration / 1e6, 2)
        if resp.eval_count and resp.eval_duration:
            extra["decode_tok_s"] = round(resp.eval_count / (resp.eval_duration / 1e9), 2)
        return LlmResponse(
            text=text,
            model=resp.model or model,
            backend=self.name,
            tokens_in=int(resp.prompt_eval_count or 0),
            tokens_out=int(resp.eval_count or 0),
            latency_ms=latency_ms,
            finish_reason="length" if resp.done_reason == "length" else "stop",
            extra=extra,
        )

    async def stream(self, request: LlmRequest) -> AsyncIterator[str]:
        model = self._model(request)
        try:
            parts = await self._clients.get().chat(stream=True, **self._chat_args(request, model))
            async with aclosing(parts) as chunks:  # type: ignore[type-var]
                async for chunk in chunks:
                    piece = chunk.message.content
                    if piece:
                        yield piece
        except (
            *_CONNECT_ERRORS,
            ollama.ResponseError,
            httpx.HTTPError,
            json.JSONDecodeError,
            pydantic.ValidationError,
            TypeError,
        ) as exc:
            raise self._translate(exc, model) from exc

    async def list_models(self) -> list[str]:
        try:
            listing = await self._clients.get().list()
        except (
            *_CONNECT_ERRORS,
            ollama.ResponseError,
            httpx.HTTPError,
            json.JSONDecodeError,
            pydantic.ValidationError,
            TypeError,
        ) as exc:
            raise self._translate(exc, None) from exc
        return [m.model for m in listing.models if m.model]

    async def aclose(self) -> None:
        client = self._clients.take_current()
        if client is not None:
            await client.close()
