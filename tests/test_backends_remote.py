"""Ollama and OpenAI-compatible backends against fake servers on 127.0.0.1 (hypercorn + trio)."""

from __future__ import annotations

import json
import queue
import socket
import threading
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kowalski_node.errors import BackendUnavailable, ConfigError, LlmError, ModelNotFound
from kowalski_node.llm.base import ChatMessage, LlmRequest
from kowalski_node.llm.ollama_backend import OllamaBackend, normalise_host
from kowalski_node.llm.openai_backend import OpenAIBackend, normalise_base_url


@asynccontextmanager
async def running(app: Starlette) -> AsyncIterator[str]:
    """Serve `app` on an ephemeral loopback port; yields the base URL."""
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, app, config))  # type: ignore[arg-type]
        try:
            yield binds[0]
        finally:
            nursery.cancel_scope.cancel()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def request(text: str = "hi", model: str | None = None, **kw: Any) -> LlmRequest:
    return LlmRequest(messages=(ChatMessage("user", text),), model=model, **kw)


async def collect(stream: AsyncIterator[str]) -> str:
    out = []
    async with aclosing(stream) as pieces:  # type: ignore[type-var]
        async for piece in pieces:
            out.append(piece)
    return "".join(out)


# -- fake Ollama ---------------------------------------------------------------

SEEN: list[dict[str, Any]] = []


async def ollama_chat(req: Request) -> Response:
    body = await req.json()
    SEEN.append(body)
    model = body["model"]
    if model == "garbage":
        return Response("{not json", media_type="application/json")
    if model == "wrongshape":
        return JSONResponse({"unexpected": True})
    if model == "crash":
        return JSONResponse({"error": "out of memory"}, status_code=500)
    if model not in ("tiny", "tiny:latest"):
        return JSONResponse({"error": f"model '{model}' not found"}, status_code=404)
    user = body["messages"][-1]["content"]
    reply = f"echo: {user}"
    final = {
        "model": model,
        "created_at": "2025-01-01T00:00:00Z",
        "message": {"role": "assistant", "content": "" if body.get("stream") else reply},
        "done": True,
        "done_reason": "stop",
        "total_duration": 5_000_000,
        "prompt_eval_count": 11,
        "eval_count": 3,
        "eval_duration": 3_000_000,
    }
    if not body.get("stream", False):
        return JSONResponse(final)

    async def lines() -> AsyncIterator[bytes]:
        for word in reply.split(" "):
            part = {
                "model": model,
                "message": {"role": "assistant", "content": word + " "},
                "done": False,
            }
            yield (json.dumps(part) + "\n").encode()
        yield (json.dumps(final) + "\n").encode()

    return StreamingResponse(lines(), media_type="application/x-ndjson")


async def ollama_tags(req: Request) -> Response:
    return JSONResponse({"models": [{"model": "tiny:latest", "name": "tiny:latest"}]})


OLLAMA_APP = Starlette(
    routes=[
        Route("/api/chat", ollama_chat, methods=["POST"]),
        Route("/api/tags", ollama_tags, methods=["GET"]),
    ]
)


async def test_ollama_complete_maps_tokens_and_options() -> None:
    SEEN.clear()
    async with running(OLLAMA_APP) as url:
        backend = OllamaBackend(host=url, model="tiny")
        resp = await backend.complete(request("hello", max_tokens=7, stop=("X",), seed=3))
        await backend.aclose()
    assert resp.text == "echo: hello"
    assert (resp.tokens_in, resp.tokens_out) == (11, 3)
    assert resp.backend == "ollama" and resp.model == "tiny"
    assert resp.extra["decode_tok_s"] == 1000.0
    opts = SEEN[-1]["options"]
    assert opts["num_predict"] == 7 and opts["stop"] == ["X"] and opts["seed"] == 3


async def test_ollama_stream_and_list_models() -> None:
    async with running(OLLAMA_APP) as url:
        backend = OllamaBackend(host=url, model="tiny")
        text = await collect(backend.stream(request("a b")))
        names = await backend.list_models()
        await backend.aclose()
    assert text == "echo: a b "
    assert names == ["tiny:latest"]


async def test_ollama_missing_model_suggests_pull() -> None:
    async with running(OLLAMA_APP) as url:
        backend = OllamaBackend(host=url)
        with pytest.raises(ModelNotFound, match=r"ollama pull llama9"):
            await backend.complete(request(model="llama9"))
        with pytest.raises(ModelNotFound, match="ollama pull llama9"):
            await collect(backend.stream(request(model="llama9")))


async def test_ollama_unreachable_names_backend_and_address() -> None:
    port = closed_port()
    backend = OllamaBackend(host=f"127.0.0.1:{port}", model="tiny")
    with pytest.raises(BackendUnavailable) as info:
        await backend.complete(request())
    assert info.value.backend == "ollama"
    assert info.value.address == f"http://127.0.0.1:{port}"
    assert f"127.0.0.1:{port}" in str(info.value) and "ollama serve" in str(info.value)
    with pytest.raises(BackendUnavailable):
        await collect(backend.stream(request()))
    with pytest.raises(BackendUnavailable):
        await backend.list_models()


async def test_ollama_malformed_and_server_errors_are_llm_errors() -> None:
    async with running(OLLAMA_APP) as url:
        backend = OllamaBackend(host=url)
        with pytest.raises(LlmError, match="malformed"):
            await backend.complete(request(model="garbage"))
        with pytest.raises(LlmError, match="malformed"):
            await backend.complete(request(model="wrongshape"))
        with pytest.raises(LlmError, match=r"HTTP 500: out of memory"):
            await backend.complete(request(model="crash"))


async def test_ollama_needs_a_model() -> None:
    with pytest.raises(ConfigError, match="needs a model"):
        await OllamaBackend(host="127.0.0.1:1").complete(request())


def test_ollama_host_normalisation(monkeypatch: pytest.MonkeyPatch) -> None:
    assert normalise_host("10.0.0.2") == "http://10.0.0.2:11434"
    assert normalise_host("https://box:9999/") == "https://box:9999"
    monkeypatch.setenv("OLLAMA_HOST", "127.0.0.9:1234")
    assert OllamaBackend().host == "http://127.0.0.9:1234"
    assert OllamaBackend(host="127.0.0.2").host == "http://127.0.0.2:11434"
    monkeypatch.delenv("OLLAMA_HOST")
    assert OllamaBackend().host == "http://127.0.0.1:11434"


def test_clients_are_rebuilt_across_trio_runs() -> None:
    """The sync API calls trio.run per task; a backend must not reuse a dead loop's pool."""
    ready: queue.Queue[str] = queue.Queue()
    stop = threading.Event()

    async def server() -> None:
        async with running(OLLAMA_APP) as url:
            ready.put(url)
            while not stop.is_set():
                await trio.sleep(0.01)

    thread = threading.Thread(target=trio.run, args=(server,), daemon=True)
    thread.start()
    try:
        url = ready.get(timeout=10)
        backend = OllamaBackend(host=url, model="tiny")

        async def once(text: str) -> str:
            return (await backend.complete(request(text))).text

        assert trio.run(once, "one") == "echo: one"
        assert trio.run(once, "two") == "echo: two"
    finally:
        stop.set()
        thread.join(timeout=10)


# -- fake OpenAI-compatible server ----------------------------------------------

OPENAI_SEEN: list[dict[str, Any]] = []


async def openai_chat(req: Request) -> Response:
    body = await req.json()
    OPENAI_SEEN.append({"body": body, "auth": req.headers.get("authorization")})
    model = body["model"]
    if model == "garbage":
        return Response("{nope", media_type="application/json")
    if model == "nochoices":
        return JSONResponse({"id": "x", "choices": []})
    if model == "teapot":
        return JSONResponse({"error": {"message": "short and stout"}}, status_code=418)
    if model != "small":
        return JSONResponse(
            {
                "error": {
                    "message": f"The model `{model}` does not exist",
                    "code": "model_not_found",
                }
            },
            status_code=404,
        )
    reply = "answer: " + body["messages"][-1]["content"]
    if not body.get("stream"):
        usage = None if body.get("seed") == 99 else {"prompt_tokens": 9, "completion_tokens": 2}
        return JSONResponse(
            {
                "model": "small",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": reply},
                        "finish_reason": "length" if body["max_tokens"] < 5 else "stop",
                    }
                ],
                "usage": usage,
            }
        )
    broken = body.get("seed") == 13

    async def events() -> AsyncIterator[bytes]:
        yield b": keep-alive\n\n"
        for word in reply.split(" "):
            chunk = {"choices": [{"index": 0, "delta": {"content": word + " "}}]}
            yield f"data: {json.dumps(chunk)}\n\n".encode()
        if broken:
            yield b"data: {truncated\n\n"
        yield b'data: {"choices": [], "usage": {"prompt_tokens": 9}}\n\n'
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def openai_models(req: Request) -> Response:
    return JSONResponse({"object": "list", "data": [{"id": "small"}, {"id": "other"}]})


OPENAI_APP = Starlette(
    routes=[
        Route("/v1/chat/completions", openai_chat, methods=["POST"]),
        Route("/v1/models", openai_models, methods=["GET"]),
    ]
)


async def test_openai_complete_with_usage_and_api_key() -> None:
    OPENAI_SEEN.clear()
    async with running(OPENAI_APP) as url:
        backend = OpenAIBackend(base_url=url, model="small", api_key="sk-test")
        resp = await backend.complete(request("q", stop=("END",)))
        short = await backend.complete(request("q", max_tokens=2))
        await backend.aclose()
    assert resp.text == "answer: q" and resp.model == "small"
    assert (resp.tokens_in, resp.tokens_out) == (9, 2)
    assert "tokens_estimated" not in resp.extra
    assert short.finish_reason == "length"
    assert OPENAI_SEEN[0]["auth"] == "Bearer sk-test"
    assert OPENAI_SEEN[0]["body"]["stop"] == ["END"]


async def test_openai_estimates_tokens_when_usage_missing() -> None:
    async with running(OPENAI_APP) as url:
        backend = OpenAIBackend(base_url=url + "/v1/", model="small", api_key="")
        resp = await backend.complete(request("x" * 40, seed=99))
    assert resp.extra["tokens_estimated"] is True
    assert resp.tokens_in == 10 and resp.tokens_out >= 1


async def test_openai_stream_sse() -> None:
    async with running(OPENAI_APP) as url:
        backend = OpenAIBackend(base_url=url, model="small")
        text = await collect(backend.stream(request("s t")))
        with pytest.raises(LlmError, match="malformed stream event"):
            await collect(backend.stream(request("s", seed=13)))
        await backend.aclose()
    assert text == "answer: s t "


async def test_openai_discovers_model_and_lists() -> None:
    async with running(OPENAI_APP) as url:
        backend = OpenAIBackend(base_url=url)
        assert await backend.list_models() == ["small", "other"]
        resp = await backend.complete(request("d"))
    assert resp.text == "answer: d"


async def test_openai_missing_model_and_http_errors() -> None:
    async with running(OPENAI_APP) as url:
        backend = OpenAIBackend(base_url=url)
        with pytest.raises(ModelNotFound, match=r"no model 'gpt-9'.*does not exist"):
            await backend.complete(request(model="gpt-9"))
        with pytest.raises(ModelNotFound, match="gpt-9"):
            await collect(backend.stream(request(model="gpt-9")))
        with pytest.raises(LlmError, match=r"HTTP 418: short and stout"):
            await backend.complete(request(model="teapot"))
        with pytest.raises(LlmError, match="malformed JSON body"):
            await backend.complete(request(model="garbage"))
        with pytest.raises(LlmError, match="no choices"):
            await backend.complete(request(model="nochoices"))
        wrong_path = OpenAIBackend(base_url=url + "/api", model="small")
        with pytest.raises(LlmError, match="HTTP 404 for the chat endpoint") as info:
            await wrong_path.complete(request())
        assert not isinstance(info.value, ModelNotFound)


async def test_openai_unreachable_names_backend_and_address() -> None:
    port = closed_port()
    backend = OpenAIBackend(base_url=f"http://127.0.0.1:{port}", model="small")
    with pytest.raises(BackendUnavailable) as info:
        await backend.complete(request())
    assert info.value.backend == "openai"
    assert info.value.address == f"http://127.0.0.1:{port}/v1"
    with pytest.raises(BackendUnavailable):
        await collect(backend.stream(request()))
    with pytest.raises(BackendUnavailable):
        await backend.list_models()


def test_openai_base_url_normalisation(monkeypatch: pytest.MonkeyPatch) -> None:
    assert normalise_base_url("localhost:8080") == "http://localhost:8080/v1"
    assert normalise_base_url("http://h:1/v1/") == "http://h:1/v1"
    assert normalise_base_url("https://h/openai/v1") == "https://h/openai/v1"
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.5:9000")
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    backend = OpenAIBackend()
    assert backend.base_url == "http://127.0.0.5:9000/v1" and backend.api_key == "from-env"
