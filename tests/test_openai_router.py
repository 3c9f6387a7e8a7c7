"""The routing port behind the OpenAI-compatible API, without processes.

`ClusterCompletionRouter` over a hand-driven membership view, a scheduler chooser and a
fake transport: placement on the best full holder, retry on the next one, partial
holders without a pipeline, and the `LayerPipeline` port taking over when it says so.
Also the stop-sequence scanner used for streamed answers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any, cast

import pytest

from kowalski_node.adapters.http.openai_api import StopScanner, apply_stop
from kowalski_node.adapters.libp2p.api import TransportPort
from kowalski_node.adapters.libp2p.errors import TransportError
from kowalski_node.capabilities.profile import ServedModel
from kowalski_node.errors import LlmError
from kowalski_node.llm.base import ChatMessage, LlmRequest, LlmResponse
from kowalski_node.remote import wire
from kowalski_node.remote.completions import (
    ClusterCompletionRouter,
    CompletionRouter,
    LayerPipeline,
    ModelNotFound,
    ModelUnavailable,
)
from tests.remote_support import StaticMembership, profile


class ScriptedBatchPeers:
    """Answers llm.batch per peer from a table; peers in `down` fail like a dead host."""

    def __init__(self) -> None:
        self.answers: dict[str, str] = {}
        self.down: set[str] = set()
        self.asked: list[tuple[str, dict[str, Any]]] = []

    async def request(
        self, peer: str, protocol: str, kind: str, payload: Any, timeout: float
    ) -> Any:
        assert kind == wire.LLM_BATCH
        self.asked.append((peer, payload))
        if peer in self.down:
            raise TransportError(f"connection to {peer} reset")
        rows = []
        for _ in payload["requests"]:
            text = self.answers[peer]
            rows.append({"text": text, "model": "m", "backend": "scripted", "tokens_in": 3,
                         "tokens_out": len(text.split()), "latency_ms": 1.0})  # fmt: skip
        return {"results": rows}


class LocalBackend:
    name = "scripted"

    def __init__(self, text: str) -> None:
        self.text = text
        self.requests: list[LlmRequest] = []

    async def complete(self, request: LlmRequest) -> LlmResponse:
        self.requests.append(request)
        return LlmResponse(self.text, "m", "scripted", 2, 4, 0.5)

    async def stream(self, request: LlmRequest) -> AsyncIterator[str]:
        self.requests.append(request)
        for word in self.text.split(" "):
            yield word + " "

    async def list_models(self) -> list[str]:
        return ["m"]

    async def aclose(self) -> None:
        pass


class FakePipeline:
    def __init__(self, always: bool = False) -> None:
        self.always = always
        self.ran: list[LlmRequest] = []

    def route(self, model: str, holders: Sequence[str]) -> bool:
        return self.always or not holders

    async def complete(self, request: LlmRequest) -> LlmResponse:
        self.ran.append(request)
        return LlmResponse("from the pipeline", request.model or "", "pipeline", 5, 3, 9.0)

    async def stream(self, request: LlmRequest) -> AsyncIterator[str]:
        self.ran.append(request)
        for piece in ("from ", "the ", "pipeline"):
            yield piece

    def stage_peers(self, model: str) -> tuple[str, ...]:
        return ("p1", "p2")


def request(model: str) -> LlmRequest:
    return LlmRequest(messages=(ChatMessage("user", "hi"),), model=model)


def cluster(
    models: dict[str, tuple[ServedModel, ...]], me: str = "me"
) -> tuple[ClusterCompletionRouter, ScriptedBatchPeers, LocalBackend, StaticMembership]:
    view = StaticMembership()
    for peer, infos in models.items():
        view.alive.add(peer)
        view.adverts[peer] = replace(profile(peer), models=infos)
    transport = ScriptedBatchPeers()
    local = LocalBackend("local answer here")
    router = ClusterCompletionRouter(
        me,
        cast(TransportPort, transport),  # a duck-typed fake of the two calls the router makes
        view.chooser(me),
        view.profiles,
        view.live,
        lambda: local,
    )
    return router, transport, local, view


def full(name: str, layers: int = 30) -> ServedModel:
    return ServedModel(name, layers)


async def test_the_router_implements_the_port() -> None:
    router, *_ = cluster({"me": (full("m"),)})
    assert isinstance(router, CompletionRouter)
    assert isinstance(FakePipeline(), LayerPipeline)


async def test_models_list_holders_and_layer_ranges() -> None:
    router, *_ = cluster({
        "me": (full("small"),),
        "a": (full("small"), ServedModel("big", 30, 0, 15)),
        "b": (ServedModel("big", 30, 15, 30),),
    })  # fmt: skip
    cards = {c.id: c for c in await router.models()}
    assert set(cards) == {"small", "big"}
    assert set(cards["small"].holders) == {"me", "a"} and cards["small"].route == "peer"
    assert cards["big"].holders == () and cards["big"].route == "unavailable"
    assert [(h.peer, h.start, h.end) for h in cards["big"].partial] == [("a", 0, 15), ("b", 15, 30)]


async def test_a_model_only_a_peer_holds_runs_there() -> None:
    router, transport, local, _ = cluster({"me": (full("small"),), "a": (full("big"),)})
    transport.answers["a"] = "big answer"
    done = await router.complete(request("big"))
    assert (done.route, done.peers, done.response.text) == ("peer", ("a",), "big answer")
    assert transport.asked[0][1]["requests"][0]["model"] == "big"
    assert local.requests == []
    here = await router.complete(request("small"))
    assert (here.route, here.peers, here.response.text) == ("local", ("me",), "local answer here")


async def test_a_dead_holder_is_skipped_for_the_next_one() -> None:
    router, transport, _, _ = cluster({"me": (), "a": (full("big"),), "b": (full("big"),)})
    transport.answers.update(a="from a", b="from b")
    first = (await router.complete(request("big"))).peers[0]
    transport.down.add(first)
    done = await router.complete(request("big"))
    assert done.peers[0] != first and done.response.text == f"from {done.peers[0]}"
    assert router.stats.retries >= 1
    transport.down.update({"a", "b"})
    with pytest.raises(LlmError, match="failed on 2 peer"):
        await router.complete(request("big"))


async def test_unknown_and_partial_models_are_refused_clearly() -> None:
    router, *_ = cluster(
        {"me": (ServedModel("big", 30, 0, 10),), "a": (ServedModel("big", 30, 10, 30),)}
    )
    with pytest.raises(ModelNotFound, match=r"'nope'.*models: big"):
        await router.complete(request("nope"))
    with pytest.raises(
        ModelUnavailable, match=r"no live peer holds all of it .*\[0:10\].*\[10:30\]"
    ):
        await router.complete(request("big"))


async def test_the_pipeline_port_takes_models_no_single_peer_holds() -> None:
    router, transport, local, _ = cluster(
        {
            "me": (full("small"), ServedModel("big", 30, 0, 10)),
            "a": (ServedModel("big", 30, 10, 30),),
        }
    )
    pipeline = FakePipeline()
    router.set_pipeline(pipeline)
    cards = {c.id: c.route for c in await router.models()}
    assert cards == {"small": "peer", "big": "pipeline"}
    done = await router.complete(request("big"))
    assert (done.route, done.peers, done.response.text) == (
        "pipeline",
        ("p1", "p2"),
        "from the pipeline",
    )
    stream = await router.open_stream(request("big"))
    assert "".join([p async for p in stream.pieces]) == "from the pipeline"
    # A model a peer holds whole stays on that peer unless the pipeline insists.
    assert (await router.complete(request("small"))).route == "local"
    router.set_pipeline(FakePipeline(always=True))
    assert (await router.complete(request("small"))).route == "pipeline"
    assert transport.asked == [] and len(local.requests) == 1


async def test_streams_from_this_node_are_live_and_remote_ones_arrive_whole() -> None:
    router, transport, _, _ = cluster({"me": (full("small"),), "a": (full("big"),)})
    transport.answers["a"] = "one two three"
    stream = await router.open_stream(request("small"))
    pieces = [p async for p in stream.pieces]
    assert pieces == ["local ", "answer ", "here "] and stream.result is None
    remote = await router.open_stream(request("big"))
    assert [p async for p in remote.pieces] == ["one two three"]
    assert remote.result is not None and remote.result.tokens_out == 3


def test_backend_name_ids_mean_the_backend_default_model() -> None:
    router, *_ = cluster({"me": (full("scripted"),)})
    assert router.task_model("scripted") is None
    assert router.task_model("qwen") == "qwen"


@pytest.mark.parametrize(
    ("pieces", "stops", "expected", "stopped"),
    [
        (["Hel", "lo W", "orld"], (), "Hello World", False),
        (["Hello ", "EN", "D tail"], ("END",), "Hello ", True),
        (["abc", "d"], ("cd", "zz"), "ab", True),
        (["a", "b", "c"], ("bd",), "abc", False),
        (["xx###", "yy"], ("###",), "xx", True),
    ],
)
def test_stop_scanner_cuts_across_pieces(
    pieces: list[str], stops: tuple[str, ...], expected: str, stopped: bool
) -> None:
    scanner = StopScanner(stops)
    out = "".join(scanner.feed(p) for p in pieces) + scanner.finish()
    assert (out, scanner.stopped) == (expected, stopped)
    assert apply_stop("".join(pieces), stops) == (expected, stopped)
