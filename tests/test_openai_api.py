"""The OpenAI-compatible API against real `kowalski-node start` processes, driven by the
official `openai` client (kowalski_node/testing/node_cluster.py starts the nodes on 127.0.0.1).

Two nodes with a bearer token: `a` serves model `alpha`, `b` serves `beta` (scripted
backends with different scripts), so a request sent to `b` for `alpha` must be placed on
`a`. Covers: the model list with where models run, non-streaming and streaming answers,
usage, stop sequences, n > 1, auth failures, an unknown model, malformed bodies, and
`rlm:` requests (the answer of an RLM task, with progress comments when streaming).
The `model`-marked test runs the builtin engine on SmolLM2 when it has been pulled.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kowalski_node.testing.node_cluster import NodeCluster, NodeProc, write_script

openai = pytest.importorskip("openai")

TOKEN = "openai-test-token-0123456789"
SCRIPT_A = ["alpha speaks. END of alpha", "FINAL(alpha final)"]
SCRIPT_B = [
    "Let me look at the context.\n```repl\nprint(len(context))\n```",
    "FINAL(the answer is 42)",
]


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProc, NodeProc]]:
    tmp = tmp_path_factory.mktemp("openai")
    env = {"KOWALSKI_NODE__API__TOKEN": TOKEN}
    cluster = NodeCluster(tmp)
    try:
        a = cluster.start(
            "a", backend=f"scripted:{write_script(tmp / 'a.json', SCRIPT_A)}",
            extra_args=["--model", "alpha"], env=env,
        )  # fmt: skip
        b = cluster.start(
            "b", backend=f"scripted:{write_script(tmp / 'b.json', SCRIPT_B)}",
            extra_args=["--model", "beta"], env=env, bootstrap=[a.addr],
        )  # fmt: skip
        wait_for_models(b, {"alpha", "beta"})
        yield a, b
    finally:
        cluster.close()


def wait_for_models(node: NodeProc, wanted: set[str], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    seen: set[str] = set()
    while time.monotonic() < deadline:
        reply = httpx.get(f"{node.api}/v1/models", headers=auth(), timeout=5)
        seen = {m["id"] for m in reply.json().get("data", [])}
        if wanted <= seen:
            return
        time.sleep(0.2)
    raise AssertionError(f"models {wanted} not advertised within {timeout}s (saw {seen})")


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def client(node: NodeProc, token: str = TOKEN) -> Any:
    return openai.OpenAI(base_url=f"{node.api}/v1", api_key=token, max_retries=0, timeout=30)


def ask(model: str, text: str = "hello") -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_models_lists_the_cluster_with_where_they_run(nodes: tuple[NodeProc, NodeProc]) -> None:
    a, b = nodes
    models = {m.id: m.model_extra["kowalski"] for m in client(b).models.list()}
    assert set(models) == {"alpha", "beta", "rlm:alpha", "rlm:beta"}
    assert models["alpha"]["holders"] == [a.peer_id] and models["alpha"]["route"] == "peer"
    assert models["beta"]["holders"] == [b.peer_id]
    assert models["rlm:alpha"] == {"route": "rlm", "base": "alpha"}
    assert client(a).models.retrieve("rlm:beta").id == "rlm:beta"


def test_a_completion_runs_on_the_peer_that_holds_the_model(
    nodes: tuple[NodeProc, NodeProc],
) -> None:
    a, b = nodes
    here = client(b).chat.completions.create(model="beta", messages=ask("beta"))
    assert here.choices[0].message.content == SCRIPT_B[0]
    assert here.choices[0].finish_reason == "stop"
    assert here.model_extra["kowalski"]["route"] == "local"
    assert here.usage.completion_tokens > 0
    assert here.usage.total_tokens == here.usage.prompt_tokens + here.usage.completion_tokens
    there = client(b).chat.completions.create(
        model="alpha", messages=ask("alpha"), max_tokens=50, temperature=0.7, top_p=0.9, seed=3
    )
    assert there.choices[0].message.content == SCRIPT_A[0]
    where = there.model_extra["kowalski"]
    assert (where["route"], where["peers"], where["backend"]) == ("peer", [a.peer_id], "scripted")
    # The scripted backend counts four characters per token.
    assert there.usage.completion_tokens == -(-len(SCRIPT_A[0]) // 4)


def test_streaming_ends_with_done_and_reports_usage(nodes: tuple[NodeProc, NodeProc]) -> None:
    _, b = nodes
    for model, script in (("beta", SCRIPT_B), ("alpha", SCRIPT_A)):
        chunks = list(
            client(b).chat.completions.create(
                model=model,
                messages=ask(model),
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == script[0]
        assert chunks[0].choices[0].delta.role == "assistant"
        finishes = [
            c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
        ]
        assert finishes == ["stop"]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    with httpx.stream(
        "POST", f"{b.api}/v1/chat/completions", headers=auth(), timeout=30,
        json={"model": "beta", "messages": ask("beta"), "stream": True},
    ) as raw:  # fmt: skip
        assert raw.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in raw.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[0][6:])["object"] == "chat.completion.chunk"


def test_stop_sequences_cut_the_answer(nodes: tuple[NodeProc, NodeProc]) -> None:
    _, b = nodes
    for model, stop, expected in (("alpha", ["END"], "alpha speaks. "),
                                  ("beta", "```", "Let me look at the context.\n")):  # fmt: skip
        full = client(b).chat.completions.create(model=model, messages=ask(model), stop=stop)
        assert full.choices[0].message.content == expected
        assert full.choices[0].finish_reason == "stop"
        streamed = client(b).chat.completions.create(
            model=model, messages=ask(model), stop=stop, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected


def test_bad_tokens_are_refused_like_the_rest_of_the_api(nodes: tuple[NodeProc, NodeProc]) -> None:
    _, b = nodes
    for token in ("wrong-token-wrong-token", TOKEN + "x"):
        with pytest.raises(openai.AuthenticationError) as caught:
            client(b, token).chat.completions.create(model="beta", messages=ask("beta"))
        assert caught.value.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client(b, "nope").models.list()
    bare = httpx.post(f"{b.api}/v1/chat/completions", json={"model": "beta", "messages": ask("x")})
    assert bare.status_code == 401 and "missing bearer token" in bare.json()["error"]["message"]
    assert bare.json()["error"]["type"] == "authentication_error"
    assert bare.headers["www-authenticate"].startswith("Bearer")


def test_unknown_model_is_a_404_naming_the_known_ones(nodes: tuple[NodeProc, NodeProc]) -> None:
    _, b = nodes
    for model in ("gpt-4o", "rlm:gpt-4o"):
        with pytest.raises(openai.NotFoundError) as caught:
            client(b).chat.completions.create(model=model, messages=ask(model))
        body = caught.value.body
        assert body["code"] == "model_not_found" and body["type"] == "invalid_request_error"
        assert "gpt-4o" in body["message"] and "alpha" in body["message"]
    with pytest.raises(openai.NotFoundError):
        client(b).models.retrieve("gpt-4o")


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"[1, 2]", None, "JSON object"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model", "required"),
        ({"model": "beta"}, "messages", "required"),
        ({"model": "beta", "messages": []}, "messages", "at least 1"),
        ({"model": "beta", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role", "'user'"),
        ({"model": "beta", "messages": ask("x"), "temperature": 5}, "temperature", "less than or equal to 2"),
        ({"model": "beta", "messages": ask("x"), "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"model": "beta", "messages": ask("x"), "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"model": "beta", "messages": ask("x"), "n": 2}, "n", "one choice per request"),
        ({"model": "beta", "messages": ask("x"), "tools": [{"type": "function"}]}, "tools", "tool calling"),
        ({"model": "beta", "messages": ask("x"), "temprature": 1}, "temprature", "unrecognized"),
        ({"model": "beta", "messages": ask("x"), "context": "c"}, "context", "only to rlm:"),
        ({"model": "beta", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content", "only text parts"),
        ({"model": "rlm:beta", "messages": [{"role": "assistant", "content": "x"}]}, "messages[0].role", "user's question"),
        ({"model": "rlm:beta", "messages": ask("x"), "rlm": {"max_iteratons": 3}}, "rlm", "max_iteratons"),
    ],
)  # fmt: skip
def test_malformed_bodies_get_openai_style_400s(
    nodes: tuple[NodeProc, NodeProc], body: Any, param: str | None, needle: str
) -> None:
    _, b = nodes
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply = httpx.post(
        f"{b.api}/v1/chat/completions", content=raw,
        headers={**auth(), "content-type": "application/json"}, timeout=10,
    )  # fmt: skip
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert needle in error["message"], error
    # The openai client surfaces the same as BadRequestError.
    if isinstance(body, dict) and "model" in body and "messages" in body and body["messages"]:
        extra = {k: v for k, v in body.items() if k not in ("model", "messages")}
        with pytest.raises(openai.BadRequestError):
            client(b).chat.completions.create(
                model=body["model"], messages=body["messages"], extra_body=extra
            )


def test_rlm_model_runs_an_rlm_task(nodes: tuple[NodeProc, NodeProc]) -> None:
    _, b = nodes
    answer = client(b).chat.completions.create(
        model="rlm:beta",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "line one\nline two"},
            {"role": "user", "content": "How long is the context?"},
        ],
    )
    assert answer.choices[0].message.content == "the answer is 42"
    extra = answer.model_extra["kowalski"]
    assert extra["route"] == "rlm" and extra["iterations"] == 2
    assert answer.usage.prompt_tokens > 0 and answer.usage.completion_tokens > 0
    task = httpx.get(f"{b.api}/v1/tasks/{extra['task_id']}", headers=auth(), timeout=10).json()
    assert task["status"] == "done"
    # The earlier user message became the REPL's context: the first block printed its length.
    outputs = [blk["output"] for blk in task["result"]["blocks"]]
    assert any(out.strip() == str(len("line one\nline two")) for out in outputs), outputs


def test_rlm_stream_sends_progress_comments_then_the_answer(
    nodes: tuple[NodeProc, NodeProc],
) -> None:
    _, b = nodes
    body = {"model": "rlm:beta", "stream": True, "messages": ask("q"),
            "context": {"rows": [1, 2, 3]}, "rlm": {"max_iterations": 5}}  # fmt: skip
    with httpx.stream(
        "POST", f"{b.api}/v1/chat/completions", headers=auth(), json=body, timeout=60
    ) as raw:
        task_id = raw.headers["x-kowalski-task-id"]
        lines = [line for line in raw.iter_lines() if line]
    progress = [
        json.loads(line[len(": progress ") :]) for line in lines if line.startswith(": progress ")
    ]
    assert lines[0] == f": kowalski task {task_id}"
    assert progress and progress[-1]["stage"] == "done" and progress[-1]["max_iterations"] == 5
    data = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert (
        "".join(d["choices"][0]["delta"].get("content") or "" for d in data) == "the answer is 42"
    )
    assert lines[-1] == "data: [DONE]"
    # The official client ignores the comments and yields the answer.
    stream = client(b).chat.completions.create(model="rlm:alpha", messages=ask("q"), stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) in (
        "the answer is 42",
        "alpha final",
    )  # the leader is chosen by the cluster: either script's final answer


@pytest.mark.model
@pytest.mark.slow  # about 20 s: loads SmolLM2 in a node process and decodes ~60 tokens
def test_builtin_engine_streams_the_same_greedy_text(tmp_path: Path) -> None:
    from kowalski_node.llm.models import DEFAULT_MODEL, find_spec, model_path, models_home

    spec = find_spec(DEFAULT_MODEL)
    assert spec is not None
    pulled = model_path(spec)
    if not pulled.exists():
        pytest.skip(f"{DEFAULT_MODEL} not pulled (kowalski-node models pull)")
    with NodeCluster(tmp_path) as cluster:
        node = cluster.start("solo", backend="builtin", extra_args=["--model", DEFAULT_MODEL],
                             env={"KOWALSKI_NODE__API__TOKEN": TOKEN,
                                  "KOWALSKI_PATHS__MODELS": str(models_home())})  # fmt: skip
        wait_for_models(node, {DEFAULT_MODEL})
        c = client(node)
        messages = ask("x", "What is the capital of France?")
        full = c.chat.completions.create(model=DEFAULT_MODEL, messages=messages, max_tokens=12)
        text = full.choices[0].message.content
        assert text and full.usage.completion_tokens <= 12 and full.usage.prompt_tokens > 5
        assert full.choices[0].finish_reason in ("stop", "length")
        streamed = c.chat.completions.create(
            model=DEFAULT_MODEL, messages=messages, max_tokens=12, stream=True
        )
        assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == text
        # seed makes sampling repeatable; a stop sequence cuts the text
        sampled = [
            c.chat.completions.create(model=DEFAULT_MODEL, messages=messages, max_tokens=8,
                                      temperature=0.9, top_p=0.95, seed=11).choices[0].message.content
            for _ in range(2)
        ]  # fmt: skip
        assert sampled[0] == sampled[1]
        word = text.split()[1] if len(text.split()) > 1 else text[:2]
        cut = c.chat.completions.create(
            model=DEFAULT_MODEL, messages=messages, max_tokens=12, stop=[word]
        )
        assert cut.choices[0].message.content == text[: text.index(word)]


def test_a_client_that_leaves_cancels_its_rlm_task(tmp_path: Path) -> None:
    slow = [{"text": "FINAL(too late)", "latency_ms": 60_000}]
    with NodeCluster(tmp_path) as cluster:
        node = cluster.start("slow", backend=f"scripted:{write_script(tmp_path / 's.json', slow)}",
                             extra_args=["--model", "slowpoke"])  # fmt: skip
        wait_for_models(node, {"slowpoke"})
        body = {"model": "rlm:slowpoke", "messages": ask("x", "streamed question")}
        with httpx.stream(
            "POST", f"{node.api}/v1/chat/completions", json={**body, "stream": True}, timeout=30
        ) as raw:
            streamed_id = raw.headers["x-kowalski-task-id"]
            assert next(raw.iter_lines()) == f": kowalski task {streamed_id}"
        # Non-streaming: the client gives up after 1.5 s.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{node.api}/v1/chat/completions",
                json={**body, "messages": ask("x", "plain question")},
                timeout=1.5,
            )
        deadline = time.monotonic() + 20
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            tasks = httpx.get(f"{node.api}/v1/tasks", timeout=5).json()["tasks"]
            states = {t["prompt_preview"]: t["status"] for t in tasks}
            if states.get("streamed question") == "cancelled" == states.get("plain question"):
                break
            time.sleep(0.2)
        assert states == {"streamed question": "cancelled", "plain question": "cancelled"}
        assert streamed_id in {t["task_id"] for t in tasks}
