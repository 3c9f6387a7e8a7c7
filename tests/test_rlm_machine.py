"""The pure RLM state machine, driven by hand: no trio, no subprocess, a fake clock."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack
import pytest

from kowalski_node.llm.base import LlmResponse
from kowalski_node.repl.base import ExecResult
from kowalski_node.repl.namespace import RECURSIVE_MODEL_PREFIX
from kowalski_node.rlm import effects as fx
from kowalski_node.rlm import prompts
from kowalski_node.rlm.config import RlmConfig
from kowalski_node.rlm.machine import RlmMachine, SnapshotError
from kowalski_node.rlm.prompts import context_metadata
from kowalski_node.rlm.types import ExecutionResult

CONTEXT = ["alpha report: 3 apples", "beta report: 5 apples", "gamma report: 9 apples"]


def reply(text: str, tokens_in: int = 10, tokens_out: int = 5) -> LlmResponse:
    return LlmResponse(text, "m", "test", tokens_in, tokens_out, 1.0)


def machine(**config: object) -> RlmMachine:
    return RlmMachine(
        task_id="t",
        prompt="How many apples in total?",
        context_meta=context_metadata(CONTEXT),
        config=RlmConfig(**config),  # type: ignore[arg-type]
    )


def only(effects: list[fx.Effect], kind: type) -> list:
    return [e for e in effects if isinstance(e, kind)]


def one(effects: list[fx.Effect], kind: type):  # type: ignore[no-untyped-def]
    found = only(effects, kind)
    assert len(found) == 1, f"expected one {kind.__name__} in {effects}"
    return found[0]


@dataclass
class Driver:
    """Feeds a machine scripted replies and a code-runner; records what it was asked."""

    m: RlmMachine
    replies: list[str]
    run: Callable[[fx.NeedExec], ExecResult]
    now: float = 0.0
    requests: list[fx.NeedLlm] = field(default_factory=list)
    execs: list[fx.NeedExec] = field(default_factory=list)
    steps: int = 0

    def start(self) -> list[fx.Effect]:
        return self.m.start(self.now)

    def step(self, effects: list[fx.Effect]) -> list[fx.Effect]:
        self.steps += 1
        self.now += 0.5
        llm = only(effects, fx.NeedLlm)
        if llm:
            self.requests.append(llm[0])
            seq = llm[0].request.sequence
            return self.m.on_llm_response(llm[0].call_id, reply(self.replies[seq]), self.now)
        ex = one(effects, fx.NeedExec)
        self.execs.append(ex)
        return self.m.on_exec_result(ex.call_id, self.run(ex), self.now)

    def finish(
        self, effects: list[fx.Effect] | None = None, max_steps: int = 100
    ) -> ExecutionResult:
        effects = self.start() if effects is None else effects
        while not only(effects, fx.Final):
            assert self.steps < max_steps, "machine did not finish"
            effects = self.step(effects)
        return one(effects, fx.Final).result


def ok(stdout: str = "", **kw: object) -> ExecResult:
    return ExecResult(stdout=stdout, **kw)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- basics


def test_start_asks_the_root_model_with_metadata_only() -> None:
    m = machine()
    effects = m.start(0.0)
    need = one(effects, fx.NeedLlm)
    request = need.request
    assert (request.purpose, request.sequence, request.task_id) == ("root", 0, "t")
    assert request.messages[0].role == "system" and "```repl" in request.messages[0].content
    assert "llm_query_batched" in request.messages[0].content
    user = request.messages[1].content
    assert "How many apples" in user and "3 items" in user
    assert all(
        "apples" not in msg.content.replace("How many apples", "") for msg in request.messages
    )
    assert only(effects, fx.Trace)[0].record["type"] == "task_start"
    assert [p.event.stage for p in only(effects, fx.Progress)] == ["start", "model_call"]


def test_multi_step_inspection_then_final_outside_code() -> None:
    replies = [
        "```repl\nprint(len(context))\n```",
        "```repl\nprint(context[0])\n```",
        "```repl\ntotal = 17\nprint(total)\n```",
        "All three reports are summed.\nFINAL(17 apples)",
    ]
    outputs = iter(["3", "alpha report: 3 apples", "17"])
    driver = Driver(machine(), replies, lambda ex: ok(next(outputs)))
    result = driver.finish()
    assert (result.content, result.stop_reason, result.final_via) == ("17 apples", "final", "FINAL")
    assert result.iterations == 4
    assert [r.request.sequence for r in driver.requests] == [0, 1, 2, 3]
    assert [b.output for b in result.blocks] == ["3", "alpha report: 3 apples", "17"]
    # Each turn's output is fed back to the model in the next request.
    last_user = driver.requests[3].request.messages[-1].content
    assert "Block 3 (python" in last_user and "17" in last_user and "iteration 3/20" in last_user
    assert result.tokens_in == 40 and result.tokens_out == 20


def test_blocks_run_in_order_within_one_turn() -> None:
    replies = ["```repl\na = 1\n```\ntext\n```repl\nb = 2\n```\n```repl\nc = 3\n```", "FINAL(done)"]
    driver = Driver(machine(), replies, lambda ex: ok())
    result = driver.finish()
    assert [e.code for e in driver.execs] == ["a = 1", "b = 2", "c = 3"]
    assert [e.block_index for e in driver.execs] == [0, 1, 2]
    assert result.iterations == 2


def test_output_is_truncated_before_the_model_sees_it() -> None:
    big = "x" * 5000 + "THE-END"
    driver = Driver(
        machine(max_output_chars=300), ["```repl\nprint(big)\n```", "FINAL(ok)"], lambda ex: ok(big)
    )
    result = driver.finish()
    fed_back = driver.requests[1].request.messages[-1].content
    assert "characters truncated" in fed_back and "THE-END" in fed_back  # head and tail kept
    assert len(result.blocks[0].output) < 400


def test_no_code_and_no_final_nudges_the_model() -> None:
    driver = Driver(machine(), ["I think I should look first.", "FINAL(x)"], lambda ex: ok())
    driver.finish()
    assert "no code block and no final answer" in driver.requests[1].request.messages[-1].content


# ----------------------------------------------------------------------------- termination


def test_final_inside_code_ends_the_run_and_skips_later_blocks() -> None:
    replies = ["```repl\nFINAL(total)\n```\n```repl\nprint('never')\n```"]
    driver = Driver(machine(), replies, lambda ex: ok(final_answer="17"))
    result = driver.finish()
    assert (result.content, result.final_via, result.stop_reason) == ("17", "code", "final")
    assert len(driver.execs) == 1


def test_answer_dict_convention_arrives_as_final_answer() -> None:
    # The REPL turns `answer = {"content": ..., "ready": True}` into ExecResult.final_answer.
    replies = ['```repl\nanswer = {"content": "17", "ready": True}\n```']
    result = Driver(machine(), replies, lambda ex: ok(final_answer="17")).finish()
    assert (result.content, result.final_via) == ("17", "code")


def test_final_var_is_resolved_in_the_repl_after_the_turns_blocks() -> None:
    replies = ["```repl\nresult = 6 * 7\n```\nFINAL_VAR(result)"]

    def run(ex: fx.NeedExec) -> ExecResult:
        if ex.purpose == "resolve":
            assert ex.code == "FINAL_VAR('result')" and ex.language == "python"
            return ok(final_answer="42")
        return ok(variables={"result": "int"})

    driver = Driver(machine(), replies, run)
    result = driver.finish()
    assert [e.purpose for e in driver.execs] == ["block", "resolve"]
    assert (result.content, result.final_via, result.stop_reason) == ("42", "FINAL_VAR", "final")
    assert len(result.blocks) == 1  # the lookup is not a model block


def test_final_var_of_a_missing_variable_goes_back_to_the_model() -> None:
    replies = ["FINAL_VAR(summary)", "```repl\nsummary = 'ok'\n```\nFINAL_VAR(summary)"]
    resolved = iter([ok(error="NameError: summary", error_kind="exception"), ok(final_answer="ok")])

    def run(ex: fx.NeedExec) -> ExecResult:
        return next(resolved) if ex.purpose == "resolve" else ok(variables={"summary": "str"})

    driver = Driver(machine(), replies, run)
    result = driver.finish()
    message = driver.requests[1].request.messages[-1].content
    assert "FINAL_VAR(summary) failed" in message and "no variable named 'summary'" in message
    assert (result.content, result.iterations) == ("ok", 2)


def test_final_var_with_an_invalid_name_is_refused_without_running_code() -> None:
    driver = Driver(machine(), ["FINAL_VAR(a b)", "FINAL(x)"], lambda ex: ok())
    result = driver.finish()
    assert driver.execs == [] and result.content == "x"
    assert "not a valid variable name" in driver.requests[1].request.messages[-1].content


# ----------------------------------------------------------------------------- faults fed back


def test_unsupported_language_is_reported_and_the_loop_goes_on() -> None:
    replies = [
        "```javascript\nconsole.log(context.length)\n```",
        "```repl\nprint(3)\n```",
        "FINAL(3)",
    ]
    driver = Driver(machine(), replies, lambda ex: ok("3"))
    result = driver.finish()
    assert [e.code for e in driver.execs] == ["print(3)"]  # the JS block never reached an executor
    message = driver.requests[1].request.messages[-1].content
    assert "cannot run javascript" in message and "```repl" in message
    assert result.blocks[0].error_kind == "unsupported_language" and not result.blocks[0].replayable


def test_languages_none_sends_everything_to_the_executor() -> None:
    m = RlmMachine(task_id="t", prompt="q", context_meta={}, languages=None)
    effects = m.on_llm_response(
        one(m.start(0.0), fx.NeedLlm).call_id, reply("```ruby\nputs 1\n```"), 1.0
    )
    assert one(effects, fx.NeedExec).language == "ruby"


def test_untagged_unknown_block_is_explained_but_not_counted_as_an_error() -> None:
    replies = ["```\nHello there, general\n```", "```\nSome imagined output here\n```", "FINAL(x)"]
    driver = Driver(machine(max_errors=1), replies, lambda ex: ok())
    result = driver.finish()
    assert driver.execs == []
    assert "Could not tell which language" in driver.requests[1].request.messages[-1].content
    assert result.stop_reason == "final"


def test_block_timeout_is_reported_and_the_loop_goes_on() -> None:
    replies = ["```repl\nwhile True: pass\n```", "```repl\nprint(1)\n```", "FINAL(1)"]
    results = iter([ok(error="timed out after 2 s", error_kind="timeout", exec_ms=2000.0), ok("1")])
    driver = Driver(machine(block_timeout_s=2.0), replies, lambda ex: next(results))
    result = driver.finish()
    assert driver.execs[0].timeout_s == 2.0
    assert "stopped at its time limit" in driver.requests[1].request.messages[-1].content
    assert result.stop_reason == "final" and result.blocks[0].error_kind == "timeout"
    assert not result.blocks[0].replayable


def test_block_timeout_is_capped_by_the_remaining_time_budget() -> None:
    m = machine(block_timeout_s=30.0, time_budget_s=10.0)
    call = one(m.start(0.0), fx.NeedLlm).call_id
    ex = one(m.on_llm_response(call, reply("```repl\nx=1\n```"), 6.0), fx.NeedExec)
    assert ex.timeout_s == pytest.approx(4.0)


# ----------------------------------------------------------------------------- limits


def test_iteration_limit_asks_once_for_a_final_answer() -> None:
    replies = [f"```repl\nprint({i})\n```" for i in range(3)] + ["Best guess so far:\nFINAL(17)"]
    driver = Driver(machine(max_iterations=3), replies, lambda ex: ok("1"))
    result = driver.finish()
    assert (result.stop_reason, result.content, result.final_via) == (
        "max_iterations",
        "17",
        "FINAL",
    )
    assert result.iterations == 3 and len(driver.requests) == 4
    final_ask = driver.requests[3].request.messages[-1].content
    assert "maximum number of iterations" in final_ask and "FINAL(" in final_ask


def test_iteration_limit_without_a_marker_extracts_the_value() -> None:
    replies = ["```repl\nprint(n)\n```", "The total is probably 17 apples.", "Answer: 17."]
    driver = Driver(machine(max_iterations=1), replies, lambda ex: ok("17\n"))
    result = driver.finish()
    assert (result.stop_reason, result.final_via, result.content) == (
        "max_iterations",
        "extract",
        "17",
    )
    extract = driver.requests[-1].request
    assert len(extract.messages) == 2  # a short request, not the whole conversation
    asked = extract.messages[-1].content
    assert "How many apples" in asked and "17" in asked and "value only" in asked
    assert extract.sequence == 2 and extract.max_tokens == RlmConfig().extract_max_tokens


def test_failed_extraction_falls_back_to_the_reply_text() -> None:
    replies = ["```repl\nprint(1)\n```", "The total is probably 17 apples.", "UNKNOWN"]
    result = Driver(machine(max_iterations=1), replies, lambda ex: ok("1")).finish()
    assert (result.final_via, result.content) == ("text", "The total is probably 17 apples.")


def test_the_final_ask_never_returns_its_own_instruction() -> None:
    echo = prompts.final_ask_message("max_iterations")
    replies = ["```repl\nprint(1)\n```", echo, echo]
    result = Driver(machine(max_iterations=1), replies, lambda ex: ok("1")).finish()
    assert result.stop_reason == "max_iterations"
    assert result.content == ""  # neither the echo nor the extraction's echo is an answer
    assert "stopped because" not in result.content


def test_an_identical_block_gets_a_nudge_instead_of_a_rerun() -> None:
    replies = [
        "```repl\nprint(SHOW_VARS())\n```",
        "```repl\n  print(SHOW_VARS())\n\n```",  # the same code, other whitespace
        "```repl\nprint(len(context))\n```",
        "FINAL(3)",
    ]
    driver = Driver(machine(), replies, lambda ex: ok("x"))
    result = driver.finish()
    assert [e.code for e in driver.execs] == ["print(SHOW_VARS())", "print(len(context))"]
    assert [b.error_kind for b in result.blocks] == [None, "duplicate", None]
    # A greedy model would repeat itself again: the turn after a repeat is sampled.
    temperatures = [r.request.temperature for r in driver.requests]
    assert temperatures == [0.0, 0.0, 0.7, 0.0]
    nudge = driver.requests[2].request.messages[-1].content
    assert "same code as block 1" in nudge and "FINAL(answer)" in nudge
    assert result.content == "3"


def test_repeating_a_block_counts_towards_max_errors() -> None:
    replies = ["```repl\nprint(1)\n```"] * 3 + ["Answer: 1"] * 2
    driver = Driver(machine(max_errors=2, max_repeats=5), replies, lambda ex: ok("1"))
    result = driver.finish()
    assert len(driver.execs) == 1 and result.stop_reason == "max_errors"


def test_a_model_that_keeps_repeating_is_stalled_and_its_output_extracted() -> None:
    # Seen with Qwen2.5-Coder-0.5B: block 1 printed the right count, then the model sent
    # the same block turn after turn and never wrote FINAL.
    block = "```repl\nERROR_lines = context.count('ERROR')\nprint(ERROR_lines)\n```"
    replies = [block, block, block]
    driver = Driver(machine(), replies, lambda ex: ok("34\n"))
    result = driver.finish()
    # The block it re-runs read the context and printed one line: that line, at the first
    # repeat (the model ignored a nudge offering FINAL(34) in every traced demo run).
    assert (result.stop_reason, result.final_via, result.content) == ("stalled", "output", "34")
    assert len(driver.execs) == 1 and len(driver.requests) == 2  # no further model call
    assert [b.error_kind for b in result.blocks] == [None, "duplicate"]


def test_a_repeat_of_a_block_that_did_not_read_context_gets_a_search_not_a_stall() -> None:
    # Seen on the dev set: the model printed a made-up access code, then sent it again.
    block = '```repl\ncode = "1234567890"\nprint(code)\n```'
    replies = [block, block, "```repl\nprint(len(context))\n```", "FINAL(7)"]
    driver = Driver(machine(), replies, lambda ex: ok("1234567890\n"))
    result = driver.finish()
    nudge = driver.requests[2].request.messages[-1].content
    assert "same code as block 1" in nudge and "FINAL(1234567890)" not in nudge
    assert "no code has read `context`" in nudge
    assert (result.stop_reason, result.content) == ("final", "7")


def test_the_search_example_uses_a_word_of_the_query() -> None:
    assert prompts.search_word("What is the access code for vault seven?") == "access"
    assert prompts.search_word("How many ERROR lines did the auth service write?") == "service"
    assert prompts.search_word("How many are there?") == "word"
    block = '```repl\nx = "G1"\nprint(x)\n```'
    driver = Driver(machine(), [block, "FINAL(x)", "FINAL(x)"], lambda ex: ok("G1\n"))
    driver.finish()
    feedback = driver.requests[1].request.messages[-1].content
    assert 'if "apples" in ln.lower()' in feedback  # the query: "How many apples in total?"


def test_a_stalled_run_with_a_longer_output_asks_the_extractor() -> None:
    block = "```repl\nprint(context)\n```"
    replies = [block, block, block, "Answer: gamma"]
    driver = Driver(machine(), replies, lambda ex: ok("alpha 3\nbeta 5\ngamma 9\n"))
    result = driver.finish()
    assert (result.stop_reason, result.final_via, result.content) == ("stalled", "extract", "gamma")
    extract = driver.requests[3].request
    assert len(extract.messages) == 2 and "gamma 9" in extract.messages[-1].content


def test_an_extractor_that_gives_up_falls_back_to_a_one_line_output() -> None:
    replies = ["```repl\nprint(context.count('a'))\n```", "I am not sure.", "UNKNOWN"]
    result = Driver(machine(max_iterations=1), replies, lambda ex: ok("34\n")).finish()
    assert (result.final_via, result.content) == ("output", "34")


@pytest.mark.parametrize(
    "marker", ["FINAL(your final answer here)", "FINAL()", "FINAL(...)", 'FINAL("")']
)
def test_placeholder_final_is_refused_and_says_how_to_answer(marker: str) -> None:
    replies = ["```repl\nprint(3)\n```", marker, "FINAL(3)"]
    driver = Driver(machine(), replies, lambda ex: ok("3"))
    result = driver.finish()
    assert (result.stop_reason, result.content) == ("final", "3")
    feedback = driver.requests[2].request.messages[-1].content
    assert "was refused" in feedback and "FINAL(value)" in feedback


def test_final_var_refused_by_the_repl_is_explained() -> None:
    replies = ["FINAL_VAR(answer)", "FINAL(2)"]
    refused = ExecResult(
        stderr="Error: FINAL_VAR('answer') was refused: that is the `answer` dict."
    )
    driver = Driver(machine(), replies, lambda ex: refused)
    result = driver.finish()
    assert result.content == "2"
    feedback = driver.requests[1].request.messages[-1].content
    assert "was refused" in feedback and "no variable named" not in feedback


def test_first_turn_shows_a_preview_and_the_query_comes_back_every_turn() -> None:
    m = RlmMachine(
        task_id="t", prompt="How many apples?", config=RlmConfig(),
        context_meta=context_metadata(CONTEXT, preview_chars=400),
    )  # fmt: skip
    need = one(m.start(0.0), fx.NeedLlm)
    assert "The context begins" in need.request.messages[1].content
    effects = m.on_llm_response(need.call_id, reply("```repl\nprint(1)\n```"), 1.0)
    effects = m.on_exec_result(one(effects, fx.NeedExec).call_id, ok("1"), 1.5)
    assert "Query: How many apples" in one(effects, fx.NeedLlm).request.messages[-1].content


def test_custom_system_prompt_and_worked_examples() -> None:
    m = machine(
        system_prompt="Be brief. Context is {context_type}; {keep} braces.", worked_examples=0
    )
    system = one(m.start(0.0), fx.NeedLlm).request.messages[0].content
    assert system == "Be brief. Context is list; {keep} braces."
    with_examples = (
        one(machine(worked_examples=4).start(0.0), fx.NeedLlm).request.messages[0].content
    )
    assert with_examples.count("Example ") == 4
    assert "context[:2000]" not in with_examples


def test_final_turn_may_compute_the_answer_in_code() -> None:
    replies = ["```repl\nx = 1\n```", "```repl\nFINAL_VAR('x')\n```"]
    results = iter([ok(), ok(final_answer="1")])
    driver = Driver(machine(max_iterations=1, final_grace_s=3.0), replies, lambda ex: next(results))
    result = driver.finish()
    assert driver.execs[1].timeout_s == 3.0
    assert (result.stop_reason, result.content, result.final_via) == ("max_iterations", "1", "code")


def test_final_ask_after_any_limit_is_bounded_by_the_time_budget() -> None:
    # Regular turns use the runner's own bound; the final ask after max_iterations gets
    # what is left of the budget (here 100 - 1.0 s), never less than the grace period.
    replies = ["```repl\nprint(1)\n```", "FINAL(1)"]
    driver = Driver(
        machine(max_iterations=1, time_budget_s=100.0, final_grace_s=7.0), replies, lambda ex: ok()
    )
    driver.finish()
    assert driver.requests[0].timeout_s is None
    assert driver.requests[1].timeout_s == pytest.approx(99.0)
    late = Driver(
        machine(max_iterations=1, time_budget_s=2.0, final_grace_s=7.0), replies, lambda ex: ok()
    )
    late.finish()
    assert late.requests[1].timeout_s == 7.0  # budget nearly spent: the grace period
    unbounded = Driver(machine(max_iterations=1, time_budget_s=None), replies, lambda ex: ok())
    unbounded.finish()
    assert unbounded.requests[1].timeout_s is None


def test_no_context_tells_the_model_to_answer_directly() -> None:
    m = RlmMachine(
        task_id="t", prompt="What is 2+2?", context_meta=context_metadata(None),
        config=RlmConfig(), languages=("python",),
    )  # fmt: skip
    user = one(m.start(0.0), fx.NeedLlm).request.messages[1].content
    assert "no context" in user and "NoneType" not in user and "FINAL(" in user
    assert "examining it" not in user


def test_max_errors_counts_consecutive_failures() -> None:
    replies = (
        [f"```repl\nboom({i})\n```" for i in range(2)]
        + ["```repl\nprint(1)\n```"]
        + [f"```repl\nboom({i})\n```" for i in range(2, 5)]
        + ["FINAL(gave up)"]
    )

    def run(ex: fx.NeedExec) -> ExecResult:
        return (
            ok("1") if "print" in ex.code else ok(error="NameError: boom", error_kind="exception")
        )

    result = Driver(machine(max_errors=3), replies, run).finish()
    assert result.stop_reason == "max_errors" and result.content == "gave up"
    assert result.iterations == 6  # the success in turn 3 reset the count


def test_max_errors_skips_the_rest_of_the_turn() -> None:
    replies = ["```repl\nboom()\n```\n```repl\nprint('skipped')\n```", "FINAL(no apples)"]
    driver = Driver(
        machine(max_errors=1), replies, lambda ex: ok(error="x", error_kind="exception")
    )
    result = driver.finish()
    assert len(driver.execs) == 1 and result.stop_reason == "max_errors"
    assert (
        "1 remaining block(s) of this turn were not run"
        in driver.requests[1].request.messages[-1].content
    )


def test_token_budget_ends_the_run_and_names_the_limit() -> None:
    m = machine(token_budget=40)
    effects = m.start(0.0)
    effects = m.on_llm_response(
        one(effects, fx.NeedLlm).call_id, reply("```repl\nprint(1)\n```", 20, 10), 1.0
    )
    effects = m.on_exec_result(one(effects, fx.NeedExec).call_id, ok("1"), 1.5)
    assert one(effects, fx.NeedLlm).request.sequence == 1  # 30 of 40 used: go on
    effects = m.on_llm_response(
        one(effects, fx.NeedLlm).call_id, reply("```repl\nprint(2)\n```", 20, 10), 2.0
    )
    effects = m.on_exec_result(one(effects, fx.NeedExec).call_id, ok("2"), 2.5)
    final_ask = one(effects, fx.NeedLlm)
    assert "token budget" in final_ask.request.messages[-1].content
    result = one(m.on_llm_response(final_ask.call_id, reply("FINAL(2)"), 3.0), fx.Final).result
    assert (result.stop_reason, result.content) == ("token_budget", "2")


def test_sub_calls_are_refused_once_the_token_budget_is_spent() -> None:
    m = machine(token_budget=10)
    effects = m.on_llm_response(
        one(m.start(0.0), fx.NeedLlm).call_id, reply("```repl\nllm_query('x')\n```", 8, 4), 1.0
    )
    ex = one(effects, fx.NeedExec)
    need = one(m.on_sub_calls(ex.call_id, ["a", "b"], None, 1.1), fx.NeedSubCalls)
    assert all(
        a is not None and a.error and "token budget exhausted" in a.error for a in need.answered
    )


def test_time_budget_aborts_the_running_block_and_asks_for_an_answer() -> None:
    m = machine(time_budget_s=10.0)
    effects = m.start(0.0)
    assert m.next_deadline() == 10.0
    effects = m.on_llm_response(
        one(effects, fx.NeedLlm).call_id, reply("```repl\nslow()\n```\n```repl\nmore()\n```"), 1.0
    )
    ex = one(effects, fx.NeedExec)
    assert m.tick(5.0) == []
    effects = m.tick(10.0)
    assert one(effects, fx.Abort).call_id == ex.call_id
    final_ask = one(effects, fx.NeedLlm)
    content = final_ask.request.messages[-1].content
    assert "time budget" in content and "1 remaining block(s)" in content and "aborted" in content
    assert m.next_deadline() is None  # asked once: no second deadline
    assert m.on_exec_result(ex.call_id, ok("late"), 11.0) == []  # stale result ignored
    result = one(
        m.on_llm_response(final_ask.call_id, reply("FINAL(partial)"), 12.0), fx.Final
    ).result
    assert (result.stop_reason, result.content) == ("time_budget", "partial")
    assert result.blocks[0].error == "aborted: time budget reached"


def test_time_budget_while_waiting_for_the_model() -> None:
    m = machine(time_budget_s=5.0)
    first = one(m.start(0.0), fx.NeedLlm)
    effects = m.tick(6.0)
    assert one(effects, fx.Abort).call_id == first.call_id
    final_ask = one(effects, fx.NeedLlm)
    assert final_ask.request.sequence == 0  # the abandoned call's number is reused
    assert final_ask.request.messages[-1].role == "user"
    assert [msg.role for msg in final_ask.request.messages] == ["system", "user"]


def test_cancel_stops_at_once() -> None:
    m = machine()
    first = one(m.start(0.0), fx.NeedLlm)
    effects = m.cancel(1.0)
    assert one(effects, fx.Abort).call_id == first.call_id
    result = one(effects, fx.Final).result
    assert (result.stop_reason, result.final_via, result.content) == ("cancelled", "none", "")
    assert m.cancel(2.0) == [] and m.on_llm_response(first.call_id, reply("FINAL(x)"), 2.0) == []


def test_graceful_cancel_asks_once() -> None:
    m = machine()
    effects = m.on_llm_response(
        one(m.start(0.0), fx.NeedLlm).call_id, reply("```repl\nx=1\n```"), 1.0
    )
    ex = one(effects, fx.NeedExec)
    effects = m.cancel(2.0, graceful=True)
    assert one(effects, fx.Abort).call_id == ex.call_id
    final_ask = one(effects, fx.NeedLlm)
    assert "cancellation" in final_ask.request.messages[-1].content
    result = one(m.on_llm_response(final_ask.call_id, reply("FINAL(early)"), 3.0), fx.Final).result
    assert (result.stop_reason, result.content) == ("cancelled", "early")


def test_root_model_error_ends_the_run() -> None:
    m = machine()
    call = one(m.start(0.0), fx.NeedLlm).call_id
    result = one(
        m.on_llm_error(call, "ollama backend at http://127.0.0.1:1 is unreachable", 1.0), fx.Final
    ).result
    assert result.stop_reason == "error" and "unreachable" in (result.error or "")


def test_unknown_call_ids_are_ignored() -> None:
    m = machine()
    m.start(0.0)
    assert m.on_llm_response(999, reply("FINAL(x)"), 1.0) == []
    assert m.on_exec_result(999, ok(), 1.0) == []
    assert m.on_sub_results(999, [], 1.0) == []


# ----------------------------------------------------------------------------- sub-calls


def test_sub_calls_are_numbered_per_task_and_recorded_with_the_block() -> None:
    m = machine(sub_model="small")
    effects = m.on_llm_response(
        one(m.start(0.0), fx.NeedLlm).call_id, reply("```repl\nllm_query_batched(p)\n```"), 1.0
    )
    ex = one(effects, fx.NeedExec)
    need = one(m.on_sub_calls(ex.call_id, ["p0", "p1", "p2"], None, 1.1), fx.NeedSubCalls)
    assert [r.sequence for r in need.requests] == [0, 1, 2]
    assert {(r.purpose, r.model, r.task_id) for r in need.requests} == {("sub", "small", "t")}
    assert need.answered == (None, None, None) and not need.recursive
    m.on_sub_results(need.call_id, [fx.SubCallOutcome("a", tokens_in=3, tokens_out=1),
                                    fx.SubCallOutcome(error="overloaded"),
                                    fx.SubCallOutcome("c", tokens_in=3, tokens_out=1)], 1.2)  # fmt: skip
    need2 = one(m.on_sub_calls(ex.call_id, ["p3"], "other", 1.3), fx.NeedSubCalls)
    assert need2.requests[0].sequence == 3 and need2.requests[0].model == "other"
    m.on_sub_results(need2.call_id, [fx.SubCallOutcome("d")], 1.4)
    effects = m.on_exec_result(ex.call_id, ok("done"), 1.5)
    block = m.blocks[0]
    assert [(s.sequence, s.text, s.error) for s in block.sub_call_records] == [
        (0, "a", None), (1, None, "overloaded"), (2, "c", None), (3, "d", None)
    ]  # fmt: skip
    assert m.tokens_in == 10 + 6 and m.sub_calls == 4


def test_recursive_flag_follows_max_depth() -> None:
    m = RlmMachine(task_id="t", prompt="q", context_meta={}, config=RlmConfig(max_depth=2))
    ex = one(
        m.on_llm_response(one(m.start(0.0), fx.NeedLlm).call_id, reply("```repl\nx\n```"), 1.0),
        fx.NeedExec,
    )
    # rlm_query asks for a child run; llm_query is always a plain call (as in rlms).
    need = one(m.on_sub_calls(ex.call_id, ["p"], RECURSIVE_MODEL_PREFIX, 1.0), fx.NeedSubCalls)
    assert need.recursive and need.depth == 1 and need.requests[0].model is None
    named = one(
        m.on_sub_calls(ex.call_id, ["p"], RECURSIVE_MODEL_PREFIX + "m", 1.0), fx.NeedSubCalls
    )
    assert named.recursive and named.requests[0].model == "m"
    assert not one(m.on_sub_calls(ex.call_id, ["p"], None, 1.0), fx.NeedSubCalls).recursive
    child = RlmMachine(
        task_id="c", prompt="q", context_meta={}, config=RlmConfig(max_depth=2), depth=1
    )
    ex = one(
        child.on_llm_response(
            one(child.start(0.0), fx.NeedLlm).call_id, reply("```repl\nx\n```"), 1.0
        ),
        fx.NeedExec,
    )
    # At max depth rlm_query falls back to a plain llm_query.
    plain = one(child.on_sub_calls(ex.call_id, ["p"], RECURSIVE_MODEL_PREFIX, 1.0), fx.NeedSubCalls)
    assert not plain.recursive and plain.requests[0].model is None


def test_infrastructure_failure_reruns_the_block_with_recorded_sub_answers() -> None:
    m = machine(infra_retries=2)
    effects = m.on_llm_response(
        one(m.start(0.0), fx.NeedLlm).call_id, reply("```repl\nr = llm_query('a')\n```"), 1.0
    )
    ex = one(effects, fx.NeedExec)
    assert not ex.rebuild and ex.attempt == 0
    need = one(m.on_sub_calls(ex.call_id, ["a"], None, 1.1), fx.NeedSubCalls)
    m.on_sub_results(need.call_id, [fx.SubCallOutcome(text="A", tokens_in=3)], 1.2)
    before = m.tokens_in - 3
    effects = m.on_exec_lost(ex.call_id, "no REPL session 't'", 1.3)
    again = one(effects, fx.NeedExec)
    assert again.rebuild and again.attempt == 1 and again.code == ex.code
    assert m.on_exec_result(ex.call_id, ok("stale"), 1.4) == []  # the lost attempt is ignored
    # The rerun's sub-call gets the same number and the recorded answer; nobody is asked again.
    rerun = one(m.on_sub_calls(again.call_id, ["a"], None, 1.5), fx.NeedSubCalls)
    assert rerun.answered[0] is not None and rerun.answered[0].text == "A"
    assert rerun.requests[0].sequence == need.requests[0].sequence
    m.on_sub_results(rerun.call_id, [None], 1.6)
    effects = m.on_exec_result(again.call_id, ok("done"), 1.7)
    assert m.blocks[0].error is None and m.blocks[0].output == "done"
    assert m.blocks[0].sub_calls == len(m.blocks[0].sub_call_records) == 1 and m.sub_calls == 1
    assert m.tokens_in == before + 3  # the reused answer is not counted twice
    # The model was never told about the lost session.
    assert "REPL session" not in one(effects, fx.NeedLlm).request.messages[-1].content


def test_infrastructure_failures_past_the_retries_end_the_run_without_an_answer() -> None:
    m = machine(infra_retries=1)
    effects = m.on_llm_response(
        one(m.start(0.0), fx.NeedLlm).call_id, reply("```repl\nx=1\n```"), 1.0
    )
    ex = one(effects, fx.NeedExec)
    ex = one(m.on_exec_lost(ex.call_id, "worker died", 1.1), fx.NeedExec)
    result = one(m.on_exec_lost(ex.call_id, "worker died", 1.2), fx.Final).result
    assert (result.stop_reason, result.content) == ("error", "")
    assert m.infra_failed and "infrastructure" in (result.error or "")
    assert m.blocks == []  # nothing of the failed attempts is recorded as the model's block


def test_infrastructure_failure_of_a_final_var_lookup_is_retried() -> None:
    m = machine()
    effects = m.on_llm_response(
        one(m.start(0.0), fx.NeedLlm).call_id, reply("FINAL_VAR(total)"), 1.0
    )
    lookup = one(effects, fx.NeedExec)
    assert lookup.purpose == "resolve"
    again = one(m.on_exec_lost(lookup.call_id, "peer gone", 1.1), fx.NeedExec)
    assert again.purpose == "resolve" and again.rebuild
    result = one(m.on_exec_result(again.call_id, ok(final_answer="9"), 1.2), fx.Final).result
    assert (result.content, result.final_via) == ("9", "FINAL_VAR")


def test_sub_calls_from_a_finished_block_are_refused() -> None:
    m = machine()
    ex = one(
        m.on_llm_response(
            one(m.start(0.0), fx.NeedLlm).call_id, reply("```repl\nx\n```\n```repl\ny\n```"), 1.0
        ),
        fx.NeedExec,
    )
    m.on_exec_result(ex.call_id, ok(), 1.1)
    need = one(m.on_sub_calls(ex.call_id, ["late"], None, 1.2), fx.NeedSubCalls)
    assert (
        need.answered[0] is not None
        and need.answered[0].error == "the code block is no longer running"
    )
    assert m.sub_sequence == 0


# ----------------------------------------------------------------------------- snapshots


SALES_REPLIES = [
    "```repl\nprint(len(context))\n```",
    "```repl\nparts = llm_query_batched([c for c in context])\nprint(parts)\n```",
    "```repl\nresult = sum(int(p) for p in parts if p.isdigit())\nprint(result)\n```\nFINAL_VAR(result)",
]


class SalesWorld:
    """A deterministic 'REPL + sub-model' for the pure machine: answers by code and sequence."""

    sub_answers = ("3", "5", "9")

    def __init__(self) -> None:
        self.sub_asked: list[int] = []

    def run(self, m: RlmMachine, ex: fx.NeedExec, now: float) -> list[fx.Effect]:
        if ex.purpose == "resolve":
            return m.on_exec_result(ex.call_id, ok(final_answer="17"), now)
        if "llm_query_batched" in ex.code:
            need = one(m.on_sub_calls(ex.call_id, list(CONTEXT), None, now), fx.NeedSubCalls)
            outcomes: list[fx.SubCallOutcome | None] = []
            for request, pre in zip(need.requests, need.answered, strict=True):
                if pre is None:
                    self.sub_asked.append(request.sequence)
                    outcomes.append(
                        fx.SubCallOutcome(
                            self.sub_answers[request.sequence], tokens_in=4, tokens_out=1
                        )
                    )
                else:
                    outcomes.append(None)
            m.on_sub_results(need.call_id, outcomes, now)
            return m.on_exec_result(ex.call_id, ok("['3', '5', '9']"), now)
        return m.on_exec_result(ex.call_id, ok("3" if "len" in ex.code else "17"), now)


def run_world(m: RlmMachine, effects: list[fx.Effect], world: SalesWorld, now: float,
              stop_after: int | None = None) -> tuple[list[fx.Effect], float, int]:  # fmt: skip
    steps = 0
    while not only(effects, fx.Final):
        if stop_after is not None and steps >= stop_after:
            break
        now += 1.0
        llm = only(effects, fx.NeedLlm)
        if llm:
            effects = m.on_llm_response(
                llm[0].call_id, reply(SALES_REPLIES[llm[0].request.sequence]), now
            )
        else:
            effects = world.run(m, one(effects, fx.NeedExec), now)
        steps += 1
    return effects, now, steps


def comparable(result: ExecutionResult) -> tuple:
    return (result.content, result.stop_reason, result.final_via, result.iterations,
            [(b.code, b.output, [(s.sequence, s.text) for s in b.sub_call_records]) for b in result.blocks],
            result.tokens_in, result.tokens_out, result.sub_calls)  # fmt: skip


def test_snapshot_is_plain_msgpack_data() -> None:
    m = machine()
    effects = m.start(0.0)
    effects, _, _ = run_world(m, effects, SalesWorld(), 0.0, stop_after=3)
    snap = m.snapshot()
    assert msgpack.unpackb(msgpack.packb(snap), raw=False) == snap


def test_resume_after_every_step_gives_the_uninterrupted_result() -> None:
    straight = machine()
    effects, _, total_steps = run_world(straight, straight.start(0.0), SalesWorld(), 0.0)
    expected = comparable(one(effects, fx.Final).result)
    assert expected[0] == "17" and expected[1] == "final"
    for cut in range(total_steps):
        first = machine()
        _, _, _ = run_world(first, first.start(0.0), SalesWorld(), 0.0, stop_after=cut)
        snap = msgpack.unpackb(msgpack.packb(first.snapshot()), raw=False)
        # Another node, another clock.
        second = RlmMachine.restore(snap, 5000.0)
        assert (second.iteration, second.root_sequence) == (first.iteration, first.root_sequence)
        world = SalesWorld()
        effects, _, _ = run_world(second, second.resume(5000.0), world, 5000.0)
        assert comparable(one(effects, fx.Final).result) == expected, f"cut after step {cut}"


def test_resume_mid_block_reuses_recorded_sub_answers() -> None:
    m = machine()
    effects = m.start(0.0)
    effects = m.on_llm_response(one(effects, fx.NeedLlm).call_id, reply(SALES_REPLIES[1]), 1.0)
    ex = one(effects, fx.NeedExec)
    need = one(m.on_sub_calls(ex.call_id, list(CONTEXT), None, 1.1), fx.NeedSubCalls)
    m.on_sub_results(need.call_id, [fx.SubCallOutcome("3", tokens_in=4), fx.SubCallOutcome("5", tokens_in=4),
                                    fx.SubCallOutcome("9", tokens_in=4)], 1.2)  # fmt: skip
    snap = m.snapshot()  # the leader dies here, before the block returns
    assert snap["phase"] == "executing"
    other = RlmMachine.restore(snap, 100.0)
    effects = other.resume(100.0)
    assert one(effects, fx.NeedExec).code == ex.code
    assert only(effects, fx.Progress)[0].event.stage == "resumed"
    again = one(
        other.on_sub_calls(one(effects, fx.NeedExec).call_id, list(CONTEXT), None, 100.1),
        fx.NeedSubCalls,
    )
    assert [r.sequence for r in again.requests] == [0, 1, 2]
    assert [a.text if a else None for a in again.answered] == ["3", "5", "9"]
    assert other.tokens_in == m.tokens_in and other.sub_calls == 3  # not counted twice


def test_resume_awaiting_the_model_reissues_the_same_turn() -> None:
    m = machine()
    effects = m.start(0.0)
    effects = m.on_llm_response(one(effects, fx.NeedLlm).call_id, reply(SALES_REPLIES[0]), 1.0)
    effects = m.on_exec_result(one(effects, fx.NeedExec).call_id, ok("3"), 2.0)
    pending = one(effects, fx.NeedLlm)
    other = RlmMachine.restore(m.snapshot(), 50.0)
    again = one(other.resume(50.0), fx.NeedLlm)
    assert again.request.sequence == pending.request.sequence == 1
    assert again.request.messages == pending.request.messages


def test_restore_keeps_elapsed_time_not_timestamps() -> None:
    m = machine(time_budget_s=100.0)
    m.start(1000.0)
    m.tick(1030.0)
    other = RlmMachine.restore(m.snapshot(), 7.0)
    assert other.next_deadline() == pytest.approx(7.0 + 70.0)


def test_replay_plan_lists_only_rebuildable_blocks() -> None:
    replies = [
        "```repl\na = 1\n```\n```repl\nwhile True: pass\n```\n```js\nx\n```\n```repl\nb = 2\n```",
        "FINAL(x)",
    ]
    results = iter([ok(), ok(error="t", error_kind="timeout"), ok()])
    driver = Driver(machine(), replies, lambda ex: next(results))
    driver.finish()
    assert [b.code for b in driver.m.replay_blocks()] == ["a = 1", "b = 2"]


def test_finished_machine_snapshot_restores_its_result() -> None:
    driver = Driver(machine(), ["FINAL(done)"], lambda ex: ok())
    result = driver.finish()
    other = RlmMachine.restore(driver.m.snapshot(), 0.0)
    assert other.done and one(other.resume(0.0), fx.Final).result.content == result.content


def test_bad_snapshots_are_rejected_clearly() -> None:
    snap = machine().snapshot()
    with pytest.raises(SnapshotError, match="version"):
        RlmMachine.restore({**snap, "version": 99}, 0.0)
    broken = dict(snap)
    del broken["messages"]
    with pytest.raises(SnapshotError, match="malformed"):
        RlmMachine.restore(broken, 0.0)


def test_a_time_limit_during_the_next_turn_does_not_repeat_delivered_outputs() -> None:
    m = machine(time_budget_s=10.0)
    effects = m.on_llm_response(
        one(m.start(0.0), fx.NeedLlm).call_id, reply("```repl\nx=1\n```"), 1.0
    )
    effects = m.on_exec_result(one(effects, fx.NeedExec).call_id, ok("unique-output"), 2.0)
    one(effects, fx.NeedLlm)
    final_ask = one(m.tick(11.0), fx.NeedLlm)
    assert "".join(msg.content for msg in final_ask.request.messages).count("unique-output") == 1


def test_output_of_code_that_never_read_the_context_is_flagged_and_not_extracted() -> None:
    # Qwen2.5-Coder-0.5B "answered" a needle task with access_code = "1234567890".
    replies = [
        "```repl\naccess_code = '1234567890'\nprint(access_code)\n```",
        "The code is 1234567890.",
        "1234567890",
    ]
    driver = Driver(machine(max_iterations=1), replies, lambda ex: ok("1234567890\n"))
    assert driver.finish().final_via == "extract"
    assert "no code has read `context` yet" in driver.requests[1].request.messages[-1].content
    extract = driver.requests[2].request.messages[-1].content
    assert "What the code printed last:\n(no output)" in extract  # the literal is no evidence
    # Once code has read the context, its outputs count again.
    replies = ["```repl\nlines = context\nprint(len(lines))\n```", "FINAL(3)"]
    driver = Driver(machine(), replies, lambda ex: ok("3\n"))
    assert driver.finish().content == "3"
    assert "no code has read" not in driver.requests[1].request.messages[-1].content


def test_a_final_before_any_code_read_the_context_is_refused() -> None:
    # Qwen2.5-Coder-0.5B answered FINAL(1000) to a CSV sum on its first turn.
    replies = ["FINAL(1000)", "```repl\nprint(sum(len(c) for c in context))\n```", "FINAL(66)"]
    driver = Driver(machine(answer_after_code=True), replies, lambda ex: ok("66\n"))
    result = driver.finish()
    assert (result.content, result.stop_reason) == ("66", "final")
    feedback = driver.requests[1].request.messages[-1].content
    assert "FINAL(1000) was refused" in feedback and "no code has read `context`" in feedback
    # A task without a context may answer at once.
    m = RlmMachine(
        task_id="t", prompt="2+2?", context_meta=context_metadata(None),
        config=RlmConfig(answer_after_code=True),
    )  # fmt: skip
    result = one(
        m.on_llm_response(one(m.start(0.0), fx.NeedLlm).call_id, reply("FINAL(4)"), 1.0), fx.Final
    )
    assert result.result.content == "4"


# ----------------------------------------------------------------------------- code prefill


def test_code_prefill_opens_the_reply_until_code_has_read_context() -> None:
    # Seen on the dev set: a 0.5B model answered FINAL(1000) before any code, then echoed
    # the refusal for five turns. Its reply now starts inside a code fence instead.
    replies = [
        'x = "1000"\nprint(x)\n```',  # continues the opened fence: a block, not a FINAL
        "print(sum(int(w) for ln in context for w in ln.split() if w.isdigit()))\n```",
        "The total is 17.\nFINAL(17)",
    ]
    driver = Driver(machine(code_prefill=True), replies, lambda ex: ok("17\n"))
    result = driver.finish()
    first, second, third = (r.request.messages[-1] for r in driver.requests)
    assert (first.role, first.content) == ("assistant", "```repl\n")
    assert (second.role, second.content) == ("assistant", "```repl\n")  # block 1 never read it
    assert third.role == "user"  # context has been read: the model writes freely
    assert [e.code for e in driver.execs] == ['x = "1000"\nprint(x)', replies[1][:-4]]
    assert (result.stop_reason, result.content) == ("final", "17")
    # The conversation keeps the whole reply, fence included, for the next turns.
    history = driver.requests[2].request.messages
    assert history[2].role == "assistant" and history[2].content.startswith("```repl\nx = ")


def test_code_prefill_is_off_by_default_and_in_the_final_ask() -> None:
    driver = Driver(machine(), ["FINAL(3)"], lambda ex: ok(""))
    driver.finish()
    assert driver.requests[0].request.messages[-1].role == "user"
    replies = ['x = "1"\nprint(x)\n```', "FINAL(1)"]
    driver = Driver(machine(code_prefill=True, max_iterations=1), replies, lambda ex: ok("1\n"))
    driver.finish()
    assert driver.requests[0].request.messages[-1].role == "assistant"
    assert driver.requests[1].request.messages[-1].role == "user"  # the final ask


def str_machine(**config: object) -> RlmMachine:
    log = "\n".join(f"09:00:{i:02d} {'ERROR' if i % 3 else 'INFO'} x" for i in range(9))
    return RlmMachine(
        task_id="t", prompt="How many ERROR lines?", context_meta=context_metadata(log),
        config=RlmConfig(**config),  # type: ignore[arg-type]
    )  # fmt: skip


def test_after_a_block_that_did_not_read_a_str_context_the_reply_starts_by_reading_it() -> None:
    replies = [
        'n = "7"\nprint(n)\n```',
        'print(len([ln for ln in lines if "ERROR" in ln]))\n```',
        "FINAL(6)",
    ]
    driver = Driver(str_machine(code_prefill=True), replies, lambda ex: ok("6\n"))
    result = driver.finish()
    second = driver.requests[1].request.messages[-1]
    assert second.content == "```repl\nlines = context.splitlines()\n"
    assert driver.execs[1].code.startswith("lines = context.splitlines()\nprint(len(")
    assert (result.stop_reason, result.content) == ("final", "6")


def test_an_empty_result_gets_a_look_at_the_data_hint_and_does_not_settle() -> None:
    block = '```repl\nprint(sum(1 for ln in context.splitlines() if "error" in ln))\n```'
    replies = [block, block, "```repl\nprint(context.count('ERROR'))\n```", "FINAL(6)"]
    outputs = iter(["0\n", "6\n"])
    driver = Driver(str_machine(), replies, lambda ex: ok(next(outputs)))
    result = driver.finish()
    feedback = driver.requests[1].request.messages[-1].content
    assert "matched nothing" in feedback and "print(context.splitlines()[:3])" in feedback
    # The repeat of a block that printed 0 is nudged, not taken as the answer.
    nudge = driver.requests[2].request.messages[-1].content
    assert "same code as block 1" in nudge and "FINAL(0)" not in nudge
    assert "matched nothing" in nudge
    assert result.content == "6" and result.stop_reason == "final"
