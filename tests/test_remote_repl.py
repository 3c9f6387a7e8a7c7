"""Remote REPL jobs between real libp2p hosts in one process (127.0.0.1).

Peers run blocks on an in-process stand-in executor (FakeRepl) so these stay fast; one
test uses the real subprocess sandbox.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from kowalski_node.adapters.libp2p import protocol_ids as P
from kowalski_node.adapters.libp2p.errors import RemoteError
from kowalski_node.errors import SandboxError
from kowalski_node.llm.scripted import ScriptedBackend
from kowalski_node.remote import RemoteReplConfig, RemoteReplExecutor, register_repl_service
from kowalski_node.remote.endpoint import ReplEndpoint
from kowalski_node.repl.base import ExecRequest, SubCallResult
from kowalski_node.rlm.config import RlmConfig
from kowalski_node.runtime.rlm_runner import run_rlm
from tests.remote_support import StaticMembership, mesh, profile
from tests.rlm_fake_repl import FakeRepl


class Answers:
    """A SubCallHandler that numbers prompts in arrival order, like the RLM machine."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.seq = 0

    async def __call__(self, prompts: list[str], model: str | None) -> list[SubCallResult]:
        self.calls.append(list(prompts))
        out = []
        for p in prompts:
            out.append(SubCallResult(text=f"{p}@{self.seq}"))
            self.seq += 1
        return out


def _cluster(ids: list[str], loads: list[float], **kw: Any) -> StaticMembership:
    m = StaticMembership(alive=set(ids))
    for peer, load in zip(ids, loads, strict=True):
        m.adverts[peer] = profile(peer, load=load, **kw)
    return m


async def test_block_runs_on_the_best_peer_with_sub_calls_answered_by_the_leader() -> None:
    async with mesh(3) as m:
        a, b, c = m.transports
        membership = _cluster(m.ids, [0.95, 0.05, 0.6])  # b is the least loaded
        repl_b, repl_c, local = FakeRepl(), FakeRepl(), FakeRepl()
        register_repl_service(b, repl_b)
        register_repl_service(c, repl_c)
        used: list[tuple[str, str]] = []
        remote = RemoteReplExecutor(
            a, membership.chooser(a.peer_id), local, on_usage=lambda s, p: used.append((s, p))
        )
        await remote.open_session("t1", "hello world")
        assert remote.session_peer("t1") == b.peer_id
        answers = Answers()
        first = await remote.execute(ExecRequest("t1", "n = len(context)\nprint(n)"), answers)
        assert first.ok and first.stdout.strip() == "11"
        second = await remote.execute(
            ExecRequest(
                "t1",
                "r = llm_query_batched(['x', 'y'])\ns = llm_query('z')\nprint(r, s, n)",
            ),
            answers,
        )
        assert second.ok, second.error
        assert second.stdout.strip() == "['x@0', 'y@1'] z@2 11"
        assert answers.calls == [["x", "y"], ["z"]]
        assert [code for _, code in repl_b.executed][-1].startswith("r = llm_query_batched")
        assert not repl_c.executed and not local.executed
        assert used == [("t1", b.peer_id), ("t1", b.peer_id)]
        runs = remote.runs("t1")
        assert [(r.block, r.peer, r.ok) for r in runs] == [
            (0, b.peer_id, True),
            (1, b.peer_id, True),
        ]
        assert remote.stats["blocks_remote"] == 2
        history = remote.session_history("t1")["blocks"]
        assert [len(h["sub_calls"]) for h in history] == [0, 2]
        await remote.close_session("t1")
        with trio.fail_after(2):
            await repl_b.wait_until(lambda repl: f"remote/{a.peer_id}/t1#1" in repl.closed)


async def test_peer_dies_mid_block_falls_back_and_rebuilds_the_session() -> None:
    async with mesh(3) as m:
        a, b, c = m.transports
        membership = _cluster(m.ids, [0.95, 0.05, 0.5])
        repl_b, repl_c = FakeRepl(), FakeRepl()
        register_repl_service(b, repl_b)
        register_repl_service(c, repl_c)
        remote = RemoteReplExecutor(a, membership.chooser(a.peer_id), FakeRepl())
        await remote.open_session("t2", [1, 2, 3])
        answers = Answers()
        first = await remote.execute(
            ExecRequest("t2", "total = sum(context)\nprint(total)"), answers
        )
        assert first.stdout.strip() == "6" and remote.session_peer("t2") == b.peer_id
        code = (
            "import time\nq = llm_query('ask')\nprint('answered')\n"
            "time.sleep(1.5)\nprint(q, total * 2)"
        )

        async def kill_b_mid_block() -> None:
            with trio.fail_after(10):
                # b has the answer and its block has begun the 1.5 s sleep
                await repl_b.wait_until(lambda repl: "answered\n" in repl.printed)
            membership.alive.discard(b.peer_id)
            await m.kill(1)
            printed_before_the_kill.extend(repl_b.printed)

        printed_before_the_kill: list[str] = []

        async with trio.open_nursery() as nursery:
            nursery.start_soon(kill_b_mid_block)
            with trio.fail_after(20):
                result = await remote.execute(ExecRequest("t2", code, timeout_s=5.0), answers)
        assert result.ok, (result.error, result.stderr)
        # the sub-call asked before the peer died is answered again from the record:
        # one call at the leader, one sequence number, same answer
        assert answers.calls == [["ask"]]
        assert result.stdout.splitlines() == ["answered", "ask@0 12"]  # c's run alone
        assert printed_before_the_kill == ["6\n", "answered\n"]  # b died mid-block
        assert result.namespace_rebuilt
        assert any("moved" in n for n in result.notes) and any(
            "failed on" in n for n in result.notes
        )
        assert remote.session_peer("t2") == c.peer_id
        # c replayed the first block, then ran the interrupted one
        assert [code for _, code in repl_c.executed] == ["total = sum(context)\nprint(total)", code]
        runs = remote.runs("t2")
        assert [(r.block, r.peer, r.ok) for r in runs] == [
            (0, b.peer_id, True), (1, b.peer_id, False), (1, c.peer_id, True)
        ]  # fmt: skip
        assert remote.stats["block_retries"] == 1 and remote.stats["blocks_replayed"] == 1


async def test_no_qualifying_peer_runs_locally_and_says_why() -> None:
    async with mesh(2) as m:
        a, b = m.transports
        membership = StaticMembership(alive=set(m.ids))
        membership.adverts[b.peer_id] = profile(b.peer_id, languages=())  # cannot run python
        register_repl_service(b, FakeRepl())
        local = FakeRepl()
        remote = RemoteReplExecutor(a, membership.chooser(a.peer_id), local)
        await remote.open_session("t3", "ctx")
        result = await remote.execute(ExecRequest("t3", "print(context)"), Answers())
        assert result.stdout.strip() == "ctx"
        assert local.executed and remote.session_peer("t3") == a.peer_id
        assert remote.stats == {**remote.stats, "blocks_local": 1, "blocks_remote": 0}


async def test_a_peer_that_refuses_is_skipped_and_penalised() -> None:
    async with mesh(3) as m:
        a, b, c = m.transports
        membership = _cluster(m.ids, [0.95, 0.05, 0.5])
        repl_c = FakeRepl()
        register_repl_service(c, repl_c)  # b serves no REPL jobs
        chooser = membership.chooser(a.peer_id)
        remote = RemoteReplExecutor(a, chooser, FakeRepl())
        await remote.open_session("t4", "x")
        assert remote.session_peer("t4") == c.peer_id
        assert chooser.outcomes[b.peer_id].failures == 1
        result = await remote.execute(ExecRequest("t4", "print(1)"), Answers())
        assert result.stdout.strip() == "1" and repl_c.executed


async def test_large_context_travels_as_a_verified_blob(tmp_path: Path) -> None:
    async with mesh(2, tmp_path) as m:
        a, b = m.transports
        membership = _cluster(m.ids, [0.95, 0.05])
        repl_b = FakeRepl()
        register_repl_service(b, repl_b)
        remote = RemoteReplExecutor(
            a, membership.chooser(a.peer_id), FakeRepl(),
            RemoteReplConfig(inline_limit_bytes=64 * 1024),
        )  # fmt: skip
        big = "line of context\n" * 100_000  # 1.6 MB
        await remote.open_session("t5", big)
        assert remote.stats["blobs_sent"] == 1
        result = await remote.execute(ExecRequest("t5", "print(len(context))"), Answers())
        assert result.stdout.strip() == str(len(big))
        blobs = list((tmp_path / "blobs1").glob("*"))
        assert len(blobs) == 1 and blobs[0].stat().st_size > len(big)
        await remote.close_session("t5")
        with trio.fail_after(2):
            while list((tmp_path / "blobs1").glob("*")):
                await trio.sleep(0.01)


async def test_malformed_and_foreign_requests_get_errors_and_the_service_keeps_running() -> None:
    async with mesh(3) as m:
        a, b, c = m.transports
        service = register_repl_service(b, FakeRepl())
        bad = [
            ("repl.open", {"session": 5}, "bad_request"),
            ("repl.open", "not a map", "bad_request"),
            ("repl.open", {"session": "s", "context_blob": "ab" * 32}, "missing_blob"),
            ("repl.exec", {"session": "nope", "exec_id": "e1", "code": "1"}, "unknown_session"),
            ("repl.exec", {"session": "s", "exec_id": "e1", "code": 7}, "bad_request"),
            (
                "repl.exec",
                {"session": "s", "exec_id": "e", "code": "1", "timeout_s": -1},
                "bad_request",
            ),
            ("repl.launch", {}, "unknown_type"),
            ("repl.sub", {"exec_id": "e9", "index": 0, "prompts": ["x"]}, "bad_request"),
        ]
        for type_, payload, code in bad:
            with pytest.raises(RemoteError) as info:
                await a.request(b.peer_id, P.REPL, type_, payload)
            assert info.value.code == code, (type_, payload, info.value)
        assert service.stats["bad_requests"] >= 5
        # sessions belong to the leader that opened them
        await a.request(b.peer_id, P.REPL, "repl.open", {"session": "mine", "context": "x"})
        with pytest.raises(RemoteError) as info:
            await c.request(
                b.peer_id, P.REPL, "repl.exec", {"session": "mine", "exec_id": "e", "code": "1"}
            )
        assert info.value.code == "unknown_session"
        # and the service still works
        reply = await a.request(
            b.peer_id,
            P.REPL,
            "repl.exec",
            {"session": "mine", "exec_id": "e2", "code": "print(context)"},
        )
        assert reply["stdout"].strip() == "x"
        # a peer cannot answer into another peer's block
        assert ReplEndpoint.of(b).rejected_sub_calls == 1


async def test_open_fails_with_a_clear_error_when_nothing_can_hold_the_session() -> None:
    class Broken(FakeRepl):
        async def open_session(self, session_id: str, context: Any) -> None:
            raise SandboxError("no sandbox on this machine")

    async with mesh(2) as m:
        a, b = m.transports
        membership = _cluster(m.ids, [0.9, 0.1])
        register_repl_service(b, Broken())
        remote = RemoteReplExecutor(a, membership.chooser(a.peer_id), Broken())
        with pytest.raises(SandboxError) as info:
            await remote.open_session("t6", "x")
        assert "no peer could hold" in str(info.value) and "no sandbox" in str(info.value)


async def test_rlm_run_on_a_remote_peer_keeps_sub_call_sequence_numbers() -> None:
    """The whole loop: root turns at the leader, code on a peer, llm_query back at the leader."""
    script = ScriptedBackend(
        responses=[
            "```repl\nparts = llm_query_batched(['a', 'b'])\nthird = llm_query('c')\n"
            "print(parts, third)\n```",
            "```repl\nfourth = llm_query('d')\nout = ' '.join(parts + [third, fourth])\n```",
            "FINAL_VAR(out)",
        ],
        sub_responses=["s0", "s1", "s2", "s3"],
    )
    async with mesh(2) as m:
        a, b = m.transports
        membership = _cluster(m.ids, [0.95, 0.05])
        repl_b = FakeRepl()
        register_repl_service(b, repl_b)
        remote = RemoteReplExecutor(a, membership.chooser(a.peer_id), FakeRepl())
        with trio.fail_after(20):
            result = await run_rlm(
                "join the parts", "ctx", root=script, repl=remote,
                config=RlmConfig(max_iterations=5), task_id="seq-task",
            )  # fmt: skip
        assert result.content == "s0 s1 s2 s3"
        # both blocks (and the FINAL_VAR lookup) ran on the peer
        assert len(repl_b.executed) == 3 and "FINAL_VAR" in repl_b.executed[-1][1]
        assert remote.stats["blocks_remote"] == 3 and remote.stats["blocks_local"] == 0


async def test_real_sandbox_on_the_peer() -> None:
    from kowalski_node.repl.executor import SubprocessReplExecutor

    async with mesh(2) as m, SubprocessReplExecutor(pool_size=1) as sandbox:
        a, b = m.transports
        membership = _cluster(m.ids, [0.95, 0.05])
        register_repl_service(b, sandbox)
        remote = RemoteReplExecutor(a, membership.chooser(a.peer_id), FakeRepl())
        await remote.open_session("t7", {"words": ["alpha", "beta"]})
        answers = Answers()
        result = await remote.execute(
            ExecRequest("t7", "w = context['words']\nprint(llm_query(w[0]), len(w))"), answers
        )
        assert result.ok, result.error
        assert result.stdout.strip() == "alpha@0 2"
        assert sandbox.session_ids() == [f"remote/{a.peer_id}/t7#1"]
        await remote.close_session("t7")
        with trio.fail_after(3):
            while sandbox.session_ids():
                await trio.sleep(0.02)


async def test_a_block_longer_than_the_stream_idle_timeout_survives() -> None:
    """Streams idle for idle_timeout are closed, but not one with a block in progress."""
    async with mesh(2, idle_timeout_s=1.0) as m:
        a, b = m.transports
        membership = _cluster(m.ids, [0.95, 0.05])
        register_repl_service(b, FakeRepl())
        remote = RemoteReplExecutor(
            a, membership.chooser(a.peer_id), FakeRepl(), RemoteReplConfig(keepalive_s=0.3)
        )
        await remote.open_session("t8", "x")
        result = await remote.execute(
            ExecRequest("t8", "import time\ntime.sleep(2.5)\nprint('done')", timeout_s=5), Answers()
        )
        assert result.ok and result.stdout.strip() == "done", (result.error, result.notes)
        assert remote.stats["block_retries"] == 0
