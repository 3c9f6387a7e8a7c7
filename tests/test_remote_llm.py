"""Sub-call fan-out and folding between real libp2p hosts in one process (127.0.0.1)."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from kowalski_node.adapters.libp2p import protocol_ids as P
from kowalski_node.adapters.libp2p.errors import RemoteError
from kowalski_node.errors import LlmError
from kowalski_node.llm.base import ChatMessage, LlmRequest, LlmResponse
from kowalski_node.llm.scripted import ScriptedBackend
from kowalski_node.remote import (
    FanoutBackend,
    FanoutConfig,
    FoldClient,
    LlmServiceConfig,
    register_fold_service,
    register_llm_service,
)
from kowalski_node.rlm.config import RlmConfig
from kowalski_node.runtime.rlm_runner import run_rlm
from tests.remote_support import StaticMembership, mesh, profile
from tests.rlm_fake_repl import FakeRepl

SUBS: list[Any] = [f"s{i}" for i in range(12)]
SUBS[3] = {"error": "the model refused prompt 3"}


def script(latency_ms: float = 0.0) -> ScriptedBackend:
    return ScriptedBackend(
        responses=["unused"],
        sub_responses=SUBS,
        fold_responses=["the short version"],
        latency_ms={"sub": latency_ms, "fold": 0.0},
    )


def sub_request(i: int) -> LlmRequest:
    return LlmRequest(
        messages=(ChatMessage("user", f"prompt {i}"),), task_id="fan", purpose="sub", sequence=i
    )


def _cluster(ids: list[str], loads: list[float]) -> StaticMembership:
    m = StaticMembership(alive=set(ids))
    for peer, load in zip(ids, loads, strict=True):
        m.adverts[peer] = profile(peer, load=load)
    return m


PEERS_ONLY = FanoutConfig(include_local=False)


async def test_batch_spreads_over_two_peers_and_a_failing_slot_fails_alone() -> None:
    async with mesh(3) as m:
        a, b, c = m.transports
        membership = _cluster(m.ids, [0.9, 0.1, 0.1])
        register_llm_service(b, script(20))
        register_llm_service(c, script(20))
        used: list[tuple[str, str]] = []
        fan = FanoutBackend(
            a, membership.chooser(a.peer_id), script(), PEERS_ONLY,
            on_usage=lambda t, p: used.append((t, p)),
        )  # fmt: skip
        outcomes = await fan.complete_many([sub_request(i) for i in range(8)])
        for i, outcome in enumerate(outcomes):
            if i == 3:
                assert isinstance(outcome, LlmError)
                assert "refused prompt 3" in str(outcome) and "2 peers" in str(outcome)
            else:
                assert isinstance(outcome, LlmResponse) and outcome.text == f"s{i}"
        assert fan.per_peer[b.peer_id] >= 3 and fan.per_peer[c.peer_id] >= 3
        assert fan.stats["slot_retries"] == 1 and fan.stats["slot_failures"] == 1
        assert {p for _, p in used} == {b.peer_id, c.peer_id}
        with pytest.raises(LlmError):
            await fan.complete(sub_request(3))
        assert (await fan.complete(sub_request(5))).text == "s5"


async def test_a_peer_dying_mid_batch_has_its_slots_retried_elsewhere() -> None:
    async with mesh(3) as m:
        a, b, c = m.transports
        membership = _cluster(m.ids, [0.9, 0.1, 0.1])
        register_llm_service(b, script(10), LlmServiceConfig(max_concurrent=4))
        register_llm_service(c, script(3000))  # slow: still busy when it dies
        fan = FanoutBackend(a, membership.chooser(a.peer_id), script(), PEERS_ONLY)

        async def kill_c() -> None:
            await trio.sleep(0.4)
            membership.alive.discard(c.peer_id)
            await m.kill(2)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(kill_c)
            with trio.fail_after(10):
                outcomes = await fan.complete_many([sub_request(i) for i in (0, 1, 2, 4, 5, 6)])
        assert [o.text for o in outcomes if isinstance(o, LlmResponse)] == [
            "s0", "s1", "s2", "s4", "s5", "s6"
        ]  # fmt: skip
        assert fan.per_peer == {b.peer_id: 6}
        assert fan.stats["slot_retries"] == 3


async def test_no_capable_peer_means_the_local_backend() -> None:
    async with mesh(2) as m:
        a, b = m.transports
        membership = StaticMembership(alive=set(m.ids))
        membership.adverts[b.peer_id] = profile(b.peer_id, backends=("ollama",))
        register_llm_service(b, script())
        fan = FanoutBackend(a, membership.chooser(a.peer_id), script())
        out = await fan.complete(sub_request(1))
        assert out.text == "s1" and fan.per_peer == {a.peer_id: 1}
        root = LlmRequest(messages=(ChatMessage("user", "x"),), purpose="root", sequence=0)
        assert (await fan.complete(root)).text == "unused"  # root turns never leave the leader


async def test_two_peers_give_about_twice_the_throughput_of_one() -> None:
    async with mesh(3) as m:
        a, b, c = m.transports
        register_llm_service(b, script(100))  # one request at a time, like one core
        register_llm_service(c, script(100))
        one = _cluster(m.ids, [0.9, 0.1, 0.1])
        one.alive.discard(c.peer_id)
        two = _cluster(m.ids, [0.9, 0.1, 0.1])
        timings = []
        for membership in (one, two):
            fan = FanoutBackend(a, membership.chooser(a.peer_id), script(), PEERS_ONLY)
            started = trio.current_time()
            outs = await fan.complete_many([sub_request(i) for i in (0, 1, 2, 4, 5, 6, 7, 8)])
            timings.append(trio.current_time() - started)
            assert all(isinstance(o, LlmResponse) for o in outs)
        assert timings[0] >= 0.8  # 8 x 100 ms on one peer
        assert timings[1] < 0.7 * timings[0], timings


async def test_rlm_sub_calls_fan_out_and_keep_their_sequence_numbers() -> None:
    root = ScriptedBackend(
        responses=[
            "```repl\nr = llm_query_batched(['p0', 'p1', 'p2'])\nprint(r)\n```",
            "```repl\nout = ' '.join(r + [llm_query('p3b')])\n```",
            "FINAL_VAR(out)",
        ],
    )
    async with mesh(3) as m:
        a, b, c = m.transports
        membership = _cluster(m.ids, [0.9, 0.1, 0.1])
        subs = ScriptedBackend(
            responses=["x"], sub_responses=["t0", "t1", "t2", "t3"], latency_ms=30
        )
        register_llm_service(b, subs)
        register_llm_service(c, subs)
        fan = FanoutBackend(a, membership.chooser(a.peer_id), subs, PEERS_ONLY)
        with trio.fail_after(20):
            result = await run_rlm(
                "go", "ctx", root=root, sub=fan, repl=FakeRepl(),
                config=RlmConfig(max_iterations=5), task_id="fan-task",
            )  # fmt: skip
        assert result.content == "t0 t1 t2 t3"
        assert set(fan.per_peer) == {b.peer_id, c.peer_id}


async def test_malformed_llm_requests_get_errors_and_the_service_keeps_running() -> None:
    async with mesh(2) as m:
        a, b = m.transports
        service = register_llm_service(b, script(), LlmServiceConfig(max_queued=2))
        msg = {"messages": [{"role": "user", "content": "hi"}], "sequence": 0}
        bad = [
            ("llm.batch", {"requests": []}, "bad_request"),
            (
                "llm.batch",
                {"requests": [{"messages": [{"role": "robot", "content": "x"}]}]},
                "bad_request",
            ),
            ("llm.batch", {"requests": [{**msg, "max_tokens": 0}]}, "bad_request"),
            ("llm.batch", [1, 2, 3], "bad_request"),
            ("llm.batch", {"requests": [msg, msg, msg]}, "overloaded"),
            ("llm.generate", {}, "unknown_type"),
        ]
        for type_, payload, code in bad:
            with pytest.raises(RemoteError) as info:
                await a.request(b.peer_id, P.LLM, type_, payload)
            assert info.value.code == code, (type_, info.value)
        reply = await a.request(
            b.peer_id, P.LLM, "llm.batch", {"requests": [msg, {**msg, "sequence": 3}]}
        )
        assert reply["results"][0]["text"] == "s0"
        assert "refused prompt 3" in reply["results"][1]["error"]
        assert service.stats["refused"] == 1 and service.stats["errors"] == 1


async def test_fold_runs_on_the_nearest_other_peer_else_locally() -> None:
    async with mesh(3) as m:
        a, b, c = m.transports
        membership = _cluster(m.ids, [0.5, 0.1, 0.1])
        register_fold_service(b, script())
        register_fold_service(c, script())
        chooser = membership.chooser(a.peer_id)
        chooser.record_success(b.peer_id, 1.0)
        chooser.record_success(c.peer_id, 40.0)  # c is farther away
        client = FoldClient(a, chooser, script())
        out = await client.fold("a long text " * 100, task_id="fold-task")
        assert out.text == "the short version" and client.last_peer == b.peer_id
        with pytest.raises(RemoteError):
            await a.request(b.peer_id, P.FOLD, "fold.summarise", {"text": 5})
        membership.alive -= {b.peer_id, c.peer_id}
        out = await client.fold("x", task_id="fold-task")
        assert out.text == "the short version" and client.last_peer == a.peer_id
