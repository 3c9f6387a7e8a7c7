"""The trio runner end to end: scripted models, an in-process fake REPL, real trio."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.lowlevel
from rlm_fake_repl import FakeRepl

from kowalski_node.errors import BackendUnavailable, LlmError, SandboxError, ScriptExhausted
from kowalski_node.llm.base import LlmRequest, LlmResponse
from kowalski_node.llm.scripted import ScriptedBackend
from kowalski_node.repl.base import ExecRequest, ExecResult, SubCallHandler
from kowalski_node.rlm import ExecutionResult, ProgressEvent, RlmConfig
from kowalski_node.runtime.rlm_runner import TaskControl, run_rlm, session_task_id
from kowalski_node.runtime.trajectory import read_trajectory

DATA = Path(__file__).parent / "data"
SALES_CONTEXT = [
    f"Branch report {i}\nCity: {city}\nUnits sold: {units}\nNotes: " + "steady week. " * 15
    for i, (city, units) in enumerate(
        [("Oslo", 120), ("Bergen", 340), ("Trondheim", 90), ("Oslo", 300), ("Trondheim", 90)]
    )
]
FAST = RlmConfig(retry_backoff_s=0.01, retry_backoff_max_s=0.02)


def sales_backend() -> ScriptedBackend:
    return ScriptedBackend.from_file(DATA / "rlm_sales.json")


def essentials(result: ExecutionResult) -> tuple[Any, ...]:
    return (
        result.content,
        result.stop_reason,
        result.final_via,
        result.iterations,
        [
            (b.code, b.output, b.error, [(s.sequence, s.text, s.error) for s in b.sub_call_records])
            for b in result.blocks
        ],
        result.sub_calls,
    )


# ----------------------------------------------------------------------------- happy paths


async def test_sales_trajectory_end_to_end(tmp_path: Path) -> None:
    events: list[ProgressEvent] = []
    repl = FakeRepl()
    result = await run_rlm(
        "Which city sold the most units?",
        SALES_CONTEXT,
        root=sales_backend(),
        repl=repl,
        config=FAST,
        task_id="sales-1",
        on_progress=events.append,
        trajectory_dir=tmp_path,
    )
    assert result.content == "Oslo sold the most units (420)"
    assert (result.stop_reason, result.final_via, result.iterations) == ("final", "FINAL_VAR", 5)
    assert [b.language for b in result.blocks] == ["python"] * 4
    assert all(b.exec_ms >= 0 for b in result.blocks)
    # llm_query_batched: five slots, the third failed alone; the fourth block retried it.
    batch = result.blocks[2]
    assert [(s.sequence, s.error is None) for s in batch.sub_call_records] == [
        (0, True), (1, True), (2, False), (3, True), (4, True)
    ]  # fmt: skip
    assert "Error: " in batch.output and "model overloaded" in batch.output
    assert [s.sequence for s in result.blocks[3].sub_call_records] == [5]
    assert result.sub_calls == 6 and result.tokens_in > 0 and result.tokens_out > 0
    # The session was opened with the context and closed at the end.
    assert [session_task_id(s) for s in repl.closed] == ["sales-1"]
    # Progress: every stage, monotonic elapsed time, the final 'done'.
    stages = [e.stage for e in events]
    assert stages[0] == "start" and stages[-1] == "done"
    assert {
        "model_call",
        "model_response",
        "exec_start",
        "exec_done",
        "sub_calls",
        "sub_calls_done",
    } <= set(stages)
    assert all(e.max_iterations == 20 for e in events)
    assert [e.elapsed_ms for e in events] == sorted(e.elapsed_ms for e in events)
    assert any(e.exec_ms is not None for e in events if e.stage == "exec_done")
    assert any(e.model_latency_ms is not None for e in events if e.stage == "model_response")
    # Trajectory on disk.
    assert result.trajectory_path == str(tmp_path / "sales-1.jsonl")
    records = read_trajectory(result.trajectory_path)
    kinds = [r["type"] for r in records]
    assert kinds[0] == "task_start" and kinds[-1] == "final"
    assert kinds.count("model_response") == 5 and kinds.count("block") == 4
    # Metadata and a 400-character preview (the first two reports), never the whole context.
    assert len(records[0]["context_meta"]["preview"]) <= 400
    assert "Trondheim" not in json.dumps(records[0])
    assert records[-1]["content"] == result.content


async def test_progress_as_an_async_iterator() -> None:
    control = TaskControl()
    seen: list[str] = []

    channel = control.subscribe()  # subscribe before the task starts to see every event

    async def watch() -> None:
        async for event in channel:
            seen.append(event.stage)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        result = await run_rlm(
            "q", SALES_CONTEXT, root=sales_backend(), repl=FakeRepl(), control=control
        )
    assert result.stop_reason == "final"
    assert seen[0] == "start" and seen[-1] == "done"  # the iterator ended by itself
    assert control.last_event is not None and control.last_event.stage == "done"
    late = control.subscribe()  # after the end: an already-closed channel, not a hang
    assert [event async for event in late] == []


async def test_final_outside_code_and_answer_dict() -> None:
    backend = ScriptedBackend(
        [
            "```repl\ncount = len(context)\nprint(count)\n```",
            "There are five reports.\nFINAL(5 reports)",
        ]
    )
    result = await run_rlm("How many reports?", SALES_CONTEXT, root=backend, repl=FakeRepl())
    assert (result.content, result.final_via, result.iterations) == ("5 reports", "FINAL", 2)
    assert result.blocks[0].output.strip() == "5"

    backend = ScriptedBackend(['```repl\nanswer = {"content": str(len(context)), "ready": False}\n```',
                               '```repl\nanswer["ready"] = True\n```'])  # fmt: skip
    result = await run_rlm("How many?", SALES_CONTEXT, root=backend, repl=FakeRepl())
    assert (result.content, result.final_via, result.iterations) == ("5", "code", 2)


async def test_repl_session_is_opened_only_when_a_block_runs() -> None:
    repl = FakeRepl()
    answered = await run_rlm(
        "2+2?", SALES_CONTEXT, root=ScriptedBackend(["FINAL(4)"]), repl=repl, task_id="no-code"
    )
    assert (answered.content, repl.open_calls, repl.closed) == ("4", 0, [])

    backend = ScriptedBackend(["```repl\nprint(len(context))\n```", "FINAL(done)"])
    result = await run_rlm("Count", SALES_CONTEXT, root=backend, repl=repl, task_id="with-code")
    assert (result.content, repl.open_calls) == ("done", 1)
    assert [session_task_id(s) for s in repl.closed] == ["with-code"]


async def test_final_var_of_missing_variable_is_sent_back() -> None:
    root_requests: list[LlmRequest] = []

    class Spy(ScriptedBackend):
        async def complete(self, request: LlmRequest) -> LlmResponse:
            root_requests.append(request)
            return await super().complete(request)

    spy = Spy(
        ["FINAL_VAR(total)", "```repl\ntotal = sum(1 for _ in context)\n```\nFINAL_VAR(total)"]
    )
    result = await run_rlm("How many?", SALES_CONTEXT, root=spy, repl=FakeRepl())
    assert (result.content, result.iterations) == ("5", 2)
    assert "no variable named 'total'" in root_requests[1].messages[-1].content


async def test_separate_sub_model_backend() -> None:
    root = ScriptedBackend(
        ['```repl\nprint(llm_query("summarise " + context[0][:20], model="tiny"))\nprint(llm_query("x"))\n```',
         "FINAL(ok)"],
        sub_responses=["root backend must not serve sub-calls"],
    )  # fmt: skip
    seen: list[LlmRequest] = []

    class SubSpy(ScriptedBackend):
        async def complete(self, request: LlmRequest) -> LlmResponse:
            seen.append(request)
            return await super().complete(request)

    sub = SubSpy([], sub_responses=["summary A", "summary B"])
    result = await run_rlm(
        "q", SALES_CONTEXT, root=root, sub=sub, repl=FakeRepl(), config=RlmConfig(sub_model="small")
    )
    assert result.blocks[0].output == "summary A\nsummary B\n"
    assert [(r.purpose, r.sequence, r.model) for r in seen] == [
        ("sub", 0, "tiny"),
        ("sub", 1, "small"),
    ]


async def test_batched_sub_calls_run_concurrently_with_a_bound() -> None:
    active = 0
    peak = 0

    class Slow(ScriptedBackend):
        async def complete(self, request: LlmRequest) -> LlmResponse:
            nonlocal active, peak
            if request.purpose == "sub":
                active += 1
                peak = max(peak, active)
                try:
                    await trio.sleep(0.05)
                finally:
                    active -= 1
            return await super().complete(request)

    backend = Slow(
        [
            "```repl\nr = llm_query_batched([f'item {i}' for i in range(6)])\nprint(len(r))\n```",
            "FINAL(done)",
        ],
        sub_responses=[f"answer {i}" for i in range(6)],
    )
    started = time.perf_counter()
    result = await run_rlm(
        "q", "ctx", root=backend, repl=FakeRepl(), config=RlmConfig(sub_concurrency=3)
    )
    elapsed = time.perf_counter() - started
    assert result.blocks[0].output.strip() == "6"
    assert peak == 3  # concurrent, and never more than the bound
    assert elapsed < 6 * 0.05 + 1.0
    assert [s.text for s in result.blocks[0].sub_call_records] == [f"answer {i}" for i in range(6)]


async def test_recursive_sub_calls_with_max_depth_2(tmp_path: Path) -> None:
    root = ScriptedBackend(
        [
            "```repl\nparts = rlm_query_batched(['alpha beta', 'gamma'])\nprint(parts)\n```",
            "FINAL_VAR(parts)",
        ]
    )
    # The sub backend's root turns drive each child RLM (its context is the sub-call prompt).
    child = ScriptedBackend(["```repl\nFINAL(str(len(context.split())))\n```"])
    result = await run_rlm(
        "q", "ctx", root=root, sub=child, repl=FakeRepl(), config=RlmConfig(max_depth=2),
        task_id="parent", trajectory_dir=tmp_path,
    )  # fmt: skip
    assert [s.text for s in result.blocks[0].sub_call_records] == ["2", "1"]
    assert result.content == "['2', '1']"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "parent.jsonl",
        "parent.sub0.jsonl",
        "parent.sub1.jsonl",
    ]


# ----------------------------------------------------------------------------- limits and faults


async def test_block_timeout_is_reported_and_the_loop_goes_on() -> None:
    backend = ScriptedBackend(
        [
            "```repl\nimport time\ntime.sleep(1.0)\n```",
            "```repl\nprint('after')\n```",
            "FINAL(recovered)",
        ]
    )
    result = await run_rlm(
        "q", "ctx", root=backend, repl=FakeRepl(), config=RlmConfig(block_timeout_s=0.2)
    )
    assert result.content == "recovered" and result.stop_reason == "final"
    assert result.blocks[0].error_kind == "timeout" and result.blocks[1].output == "after\n"


async def test_iteration_exhaustion_asks_once_and_says_so() -> None:
    backend = ScriptedBackend(
        [f"```repl\nprint({i})\n```" for i in range(3)] + ["I ran out of steps; my answer is 3."]
    )
    result = await run_rlm(
        "q", "ctx", root=backend, repl=FakeRepl(), config=RlmConfig(max_iterations=3)
    )
    assert (result.stop_reason, result.iterations, result.final_via) == (
        "max_iterations",
        3,
        "text",
    )
    assert result.content == "I ran out of steps; my answer is 3."


async def test_max_errors_and_unsupported_language() -> None:
    backend = ScriptedBackend(
        ["```javascript\nconsole.log(1)\n```", "```repl\n1/0\n```", "FINAL(stopped)"]
    )
    result = await run_rlm(
        "q", "ctx", root=backend, repl=FakeRepl(), config=RlmConfig(max_errors=2)
    )
    assert result.stop_reason == "max_errors" and result.content == "stopped"
    assert [b.error_kind for b in result.blocks] == ["unsupported_language", "exception"]
    assert "ZeroDivisionError" in (result.blocks[1].error or "")


async def test_token_budget() -> None:
    first = {"text": "```repl\nprint(1)\n```", "tokens_out": 400}
    second = {"text": "```repl\nprint(2)\n```", "tokens_out": 400}
    backend = ScriptedBackend([first, second, "FINAL(cheap)", first])
    config = RlmConfig(token_budget=1000, worked_examples=0)  # a short prompt: ~350 tokens
    result = await run_rlm("q", "ctx", root=backend, repl=FakeRepl(), config=config)
    # Turn 1: ~500 in + 400 out; turn 2 crosses 1,000, so turn 3 is the one final ask.
    assert (result.stop_reason, result.content, result.iterations) == ("token_budget", "cheap", 2)
    assert result.tokens >= 1000


async def test_cancellation_stops_a_running_task_quickly() -> None:
    backend = ScriptedBackend(
        ["```repl\nprint('step')\n```", {"text": "FINAL(too late)", "latency_ms": 20000}]
    )
    control = TaskControl()
    started = time.perf_counter()

    def on_progress(event: ProgressEvent) -> None:
        if event.stage == "model_call" and event.iteration == 1:
            control.cancel()

    result = await run_rlm(
        "q", "ctx", root=backend, repl=FakeRepl(), control=control, on_progress=on_progress
    )
    assert (result.stop_reason, result.content, result.final_via) == ("cancelled", "", "none")
    assert result.iterations == 1
    assert time.perf_counter() - started < 5.0


async def test_time_budget_ends_a_slow_model_turn_and_bounds_the_final_ask() -> None:
    slow = {"text": "FINAL(never seen)", "latency_ms": 20000}
    backend = ScriptedBackend(["```repl\nprint(1)\n```", slow])
    started = time.perf_counter()
    config = RlmConfig(time_budget_s=0.5, final_grace_s=0.3)
    result = await run_rlm("q", "ctx", root=backend, repl=FakeRepl(), config=config)
    # Turn 1 is abandoned at the budget; the final ask (same turn number, same slow
    # reply) gets only the grace period, then the run ends naming the limit.
    assert (result.stop_reason, result.content, result.iterations) == ("time_budget", "", 1)
    assert "did not answer within 0.3 s" in (result.error or "")
    assert time.perf_counter() - started < 3.0


async def test_time_budget_final_ask_answered_in_time() -> None:
    backend = ScriptedBackend(
        ["```repl\nimport time\ntime.sleep(0.6)\n```", "FINAL(partial answer)"]
    )
    config = RlmConfig(time_budget_s=0.3, block_timeout_s=5.0)
    result = await run_rlm("q", "ctx", root=backend, repl=FakeRepl(), config=config)
    assert (result.stop_reason, result.content) == ("time_budget", "partial answer")
    assert result.blocks[0].error == "aborted: time budget reached"


async def test_unreachable_model_retries_then_fails_clearly() -> None:
    from kowalski_node.llm.ollama_backend import OllamaBackend

    with socket.socket() as probe:  # a loopback port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = OllamaBackend(
        host=f"http://127.0.0.1:{port}", model="llama3.2", connect_timeout_s=1.0
    )
    with pytest.raises(BackendUnavailable) as caught:
        await run_rlm("q", "ctx", root=backend, repl=FakeRepl(), config=RlmConfig(llm_retries=2,
                      retry_backoff_s=0.01))  # fmt: skip
    message = str(caught.value)
    assert "ollama" in message and f"127.0.0.1:{port}" in message
    assert "gave up after 3 attempts" in message


async def test_retry_with_backoff_recovers_from_a_blip() -> None:
    attempts: list[float] = []

    class Flaky(ScriptedBackend):
        async def complete(self, request: LlmRequest) -> LlmResponse:
            attempts.append(trio.current_time())
            if len(attempts) <= 2:
                raise BackendUnavailable("flaky", "http://127.0.0.1:9", "connection refused")
            return await super().complete(request)

    result = await run_rlm("q", "ctx", root=Flaky(["FINAL(ok)"]), repl=FakeRepl(),
                           config=RlmConfig(llm_retries=3, retry_backoff_s=0.02))  # fmt: skip
    assert result.content == "ok" and len(attempts) == 3
    assert attempts[2] - attempts[1] >= attempts[1] - attempts[0] >= 0.02  # backoff grows


async def test_retries_are_bounded() -> None:
    calls = 0

    class Down(ScriptedBackend):
        async def complete(self, request: LlmRequest) -> LlmResponse:
            nonlocal calls
            calls += 1
            raise BackendUnavailable("down", "http://127.0.0.1:9", "connection refused")

    with pytest.raises(BackendUnavailable, match=r"down backend at http://127.0.0.1:9"):
        await run_rlm(
            "q",
            "ctx",
            root=Down([]),
            repl=FakeRepl(),
            config=RlmConfig(llm_retries=2, retry_backoff_s=0.0),
        )
    assert calls == 3


async def test_exhausted_script_fails_with_a_clear_error(tmp_path: Path) -> None:
    backend = ScriptedBackend(["```repl\nprint(1)\n```"])
    with pytest.raises(ScriptExhausted, match="root turn #2"):
        await run_rlm(
            "q", "ctx", root=backend, repl=FakeRepl(), task_id="t-ex", trajectory_dir=tmp_path
        )
    kinds = [r["type"] for r in read_trajectory(tmp_path / "t-ex.jsonl")]
    assert kinds[-2:] == ["model_error", "final"]


async def test_a_broken_backend_becomes_an_llm_error() -> None:
    class Broken(ScriptedBackend):
        async def complete(self, request: LlmRequest) -> LlmResponse:
            raise RuntimeError("bug in backend")

    with pytest.raises(LlmError, match="scripted backend failed: RuntimeError: bug in backend"):
        await run_rlm("q", "ctx", root=Broken([]), repl=FakeRepl())


async def test_a_setup_error_of_the_backend_is_reported_as_is() -> None:
    from kowalski_node.errors import ConfigError

    class NoModel(ScriptedBackend):
        async def complete(self, request: LlmRequest) -> LlmResponse:
            raise ConfigError("the ollama backend needs a model: pass --model")

    with pytest.raises(LlmError) as caught:
        await run_rlm("q", "ctx", root=NoModel([]), repl=FakeRepl())
    assert str(caught.value) == "the ollama backend needs a model: pass --model"


class Trickle(ScriptedBackend):
    """Streams its final-turn answer one word every 0.1 s (a slow local model)."""

    async def stream(self, request: LlmRequest) -> AsyncIterator[str]:
        response = await self.complete(request)
        for word in response.text.split(" "):
            await trio.sleep(0.1)
            yield word + " "


async def test_final_ask_cut_by_its_bound_keeps_the_partial_answer() -> None:
    backend = Trickle(
        ["```repl\nprint(1)\n```", "The answer is probably seventeen but let me think " * 20]
    )
    # The bound is what is left of the budget (at least the grace period): under 2 s, so
    # the 200-word answer (0.1 s a word) is cut short. The budget leaves the first turn
    # room on a busy machine (at 0.6 s a loaded CI machine stopped on the budget instead).
    config = RlmConfig(max_iterations=1, time_budget_s=2.0, final_grace_s=0.45)
    started = time.perf_counter()
    result = await run_rlm("q", "ctx", root=backend, repl=FakeRepl(), config=config)
    assert time.perf_counter() - started < 6.0
    assert result.stop_reason == "max_iterations" and result.error is None
    assert result.content.startswith("The answer is probably")
    assert len(result.content.split()) < 40  # cut off, not the whole 200 words


async def test_final_ask_retries_an_unreachable_backend_within_its_bound() -> None:
    class Flaky(ScriptedBackend):
        calls = 0

        async def stream(self, request: LlmRequest) -> AsyncIterator[str]:
            if request.sequence == 1:
                Flaky.calls += 1
                if Flaky.calls == 1:
                    raise BackendUnavailable("scripted", "127.0.0.1:9", "blip")
            yield (await self.complete(request)).text

    backend = Flaky(["```repl\nprint(1)\n```", "FINAL(42)"])
    config = RlmConfig(max_iterations=1, retry_backoff_s=0.01)
    result = await run_rlm("q", "ctx", root=backend, repl=FakeRepl(), config=config)
    assert (result.content, result.stop_reason, Flaky.calls) == ("42", "max_iterations", 2)


async def test_a_broken_progress_callback_does_not_break_the_task() -> None:
    def explode(event: ProgressEvent) -> None:
        raise ValueError("observer bug")

    result = await run_rlm(
        "q", "ctx", root=ScriptedBackend(["FINAL(fine)"]), repl=FakeRepl(), on_progress=explode
    )
    assert result.content == "fine"


# ----------------------------------------------------------------------------- checkpoints


async def test_resume_from_any_checkpoint_gives_the_same_result(tmp_path: Path) -> None:
    snapshots: list[dict[str, Any]] = []
    straight = await run_rlm(
        "Which city sold the most units?", SALES_CONTEXT, root=sales_backend(), repl=FakeRepl(),
        task_id="sales-r", on_checkpoint=snapshots.append,
    )  # fmt: skip
    assert straight.content == "Oslo sold the most units (420)"
    phases = {s["phase"] for s in snapshots}
    assert {"awaiting_llm", "executing", "done"} <= phases  # incl. mid-block, after sub-calls
    for index, snapshot in enumerate(snapshots):
        wire = msgpack.unpackb(msgpack.packb(snapshot), raw=False)  # what the mesh ships
        repl = FakeRepl()  # a fresh node: empty namespace
        resumed = await run_rlm(
            "ignored on resume", SALES_CONTEXT, root=sales_backend(), repl=repl, resume=wire,
            trajectory_dir=tmp_path,
        )  # fmt: skip
        assert essentials(resumed) == essentials(straight), (
            f"checkpoint {index} ({snapshot['phase']})"
        )
        assert resumed.task_id == "sales-r"


async def test_resume_rebuilds_the_namespace_with_recorded_sub_answers() -> None:
    snapshots: list[dict[str, Any]] = []
    await run_rlm(
        "q", SALES_CONTEXT, root=sales_backend(), repl=FakeRepl(), on_checkpoint=snapshots.append
    )
    # The first checkpoint after the batched block finished: the model has not answered turn 4.
    snap = next(s for s in snapshots if s["phase"] == "awaiting_llm" and s["root_sequence"] == 3)
    sub_calls_made: list[LlmRequest] = []

    class Counting(ScriptedBackend):
        async def complete(self, request: LlmRequest) -> LlmResponse:
            if request.purpose == "sub":
                sub_calls_made.append(request)
            return await super().complete(request)

    script = json.loads((DATA / "rlm_sales.json").read_text())
    backend = Counting(script["responses"], script["sub_responses"])
    repl = FakeRepl()
    result = await run_rlm("q", SALES_CONTEXT, root=backend, repl=repl, resume=snap)
    assert result.content == "Oslo sold the most units (420)"
    # Replayed blocks got recorded answers; only the retry in the last block asked the model.
    assert [r.sequence for r in sub_calls_made] == [5]
    assert len(repl.executed) == 3 + 1 + 1  # 3 replayed, 1 new block, 1 FINAL_VAR lookup


async def test_async_checkpoint_hook_is_awaited() -> None:
    seen: list[int] = []

    async def hook(snapshot: dict[str, Any]) -> None:
        await trio.lowlevel.checkpoint()
        seen.append(snapshot["root_sequence"])

    await run_rlm("q", "ctx", root=ScriptedBackend(["```repl\nx = 1\n```", "FINAL(1)"]), repl=FakeRepl(),
                  on_checkpoint=hook)  # fmt: skip
    assert seen and seen[-1] == 2


def service_log(lines: int = 200) -> str:
    services = ["db", "auth", "cache", "api"]
    out = []
    for i in range(lines):
        level = "ERROR" if i % 17 == 0 else "INFO"
        out.append(
            f"2026-01-01T00:{i // 60:02d}:{i % 60:02d}Z {services[i % 4]:<5} {level} request {i} handled"
        )
    return "\n".join(out)


async def test_string_context_raw_code_reply_and_final_inside_code(tmp_path: Path) -> None:
    result = await run_rlm(
        "Which service logged errors in the most parts of the log?", service_log(),
        root=ScriptedBackend.from_file(DATA / "rlm_log_errors.json"), repl=FakeRepl(),
        trajectory_dir=tmp_path, task_id="log-1",
    )  # fmt: skip
    assert (result.content, result.final_via, result.iterations) == (
        "db logged errors in 3 of 4 chunks",
        "code",
        4,
    )
    assert result.blocks[1].output.startswith("4 [")  # the raw-code reply ran
    start = read_trajectory(tmp_path / "log-1.jsonl")[0]
    assert start["context_meta"]["type"] == "str" and start["context_meta"]["lines"] == 200


# ----------------------------------------------------------------------------- session lifetime


class StrictRepl(FakeRepl):
    """Like the real executors: a block for a session that is not open fails (SandboxError).

    `lose_before` drops a session just before the given execute call (1-based), as a dead
    worker or peer would; `kill_once` answers that call with a dead worker instead.
    """

    def __init__(self, lose_before: set[int] | None = None, kill_once: set[int] | None = None):
        super().__init__()
        self.missing: list[str] = []
        self.calls = 0
        self.lose_before = lose_before or set()
        self.kill_once = kill_once or set()

    async def execute(self, request: ExecRequest, sub_calls: SubCallHandler) -> ExecResult:
        self.calls += 1
        if self.calls in self.lose_before:
            self.sessions.pop(request.session_id, None)
        if self.calls in self.kill_once:
            return ExecResult(error="the sandbox worker died", error_kind="killed")
        if request.session_id not in self.sessions:
            self.missing.append(request.session_id)
            raise SandboxError(f"no REPL session {request.session_id!r} (call open_session first)")
        return await super().execute(request, sub_calls)


COUNTER_SCRIPT = [
    "```repl\nx = 41\nprint('set')\n```",
    "```repl\nx += 1\nprint(x)\n```",
    "FINAL_VAR(x)",
]


async def test_an_aborted_run_never_closes_the_session_of_a_newer_run() -> None:
    # A re-offer starts a new run of the same task while the old one is still going; the
    # old run is then aborted. Its cleanup must leave the new run's REPL session alone.
    repl = StrictRepl()
    backend = ScriptedBackend(COUNTER_SCRIPT, latency_ms=30)
    old_scope = trio.CancelScope()
    results: list[ExecutionResult] = []

    async def old_run() -> None:
        with old_scope:
            await run_rlm("q", "ctx", root=backend, repl=repl, task_id="t", config=FAST)

    async def new_run() -> None:
        results.append(await run_rlm("q", "ctx", root=backend, repl=repl, task_id="t", config=FAST))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(old_run)
        with trio.fail_after(5):
            while len(repl.executed) < 1:  # the old run has its session and ran block 1
                await trio.sleep(0.005)
        nursery.start_soon(new_run)
        with trio.fail_after(5):
            while len({s for s, _ in repl.executed}) < 2:  # the new run has its own session
                await trio.sleep(0.005)
        old_scope.cancel()  # fenced / replaced: its cleanup closes its session now
    old_session = repl.executed[0][0]
    new_session = next(s for s, _ in repl.executed if s != old_session)
    assert old_session != new_session
    assert session_task_id(old_session) == session_task_id(new_session) == "t"
    assert repl.closed[0] == old_session  # the aborted run closed only its own
    assert repl.missing == []  # the new run never met a closed session
    assert results[0].content == "42" and all(b.ok for b in results[0].blocks)


async def test_a_lost_session_is_rebuilt_by_replay_and_never_shown_to_the_model() -> None:
    repl = StrictRepl(lose_before={2})  # the session is gone when block 2 runs
    backend = ScriptedBackend(COUNTER_SCRIPT)
    result = await run_rlm("q", "ctx", root=backend, repl=repl, task_id="lost", config=FAST)
    assert result.content == "42" and result.stop_reason == "final"
    assert [b.ok for b in result.blocks] == [True, True] and len(result.blocks) == 2
    # Block 2 ran again in a fresh session after block 1 was replayed into it.
    codes = [code for _, code in repl.executed]
    assert codes == [COUNTER_SCRIPT[0][8:-4], COUNTER_SCRIPT[0][8:-4], COUNTER_SCRIPT[1][8:-4],
                     "FINAL_VAR('x')"]  # fmt: skip
    assert len({session for session, _ in repl.executed[1:]}) == 1
    assert repl.executed[0][0] != repl.executed[1][0]
    assert all("session" not in b.output for b in result.blocks)


async def test_a_worker_death_is_retried_once_before_the_model_hears_of_it() -> None:
    repl = StrictRepl(kill_once={2})
    backend = ScriptedBackend(COUNTER_SCRIPT)
    result = await run_rlm("q", "ctx", root=backend, repl=repl, task_id="died", config=FAST)
    assert result.content == "42" and [b.error_kind for b in result.blocks] == [None, None]


async def test_infrastructure_that_keeps_failing_fails_the_run_instead_of_answering() -> None:
    repl = StrictRepl(lose_before=set(range(2, 50)))
    backend = ScriptedBackend(COUNTER_SCRIPT)
    with pytest.raises(SandboxError, match="infrastructure"):
        await run_rlm(
            "q", "ctx", root=backend, repl=repl, task_id="down",
            config=RlmConfig(retry_backoff_s=0.01, infra_retries=2),
        )  # fmt: skip
