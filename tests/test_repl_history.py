"""Session history: recorded blocks + sub-call answers, replayed to rebuild a namespace
after a worker is replaced or on another node after a failover, without new model calls."""

from __future__ import annotations

import json
import sys

import pytest

from kowalski_node.errors import SandboxError
from kowalski_node.repl.executor import SubprocessReplExecutor
from kowalski_node.repl.history import FORMAT, history_from_plain
from tests.repl_support import Handler, run, sandbox

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox tests need Linux")

BLOCKS = [
    "notes = llm_query_batched(['chunk 1', 'chunk 2 fail'])",
    "total = len(context)\nimport math",
    "broken = 1\nraise ValueError('recorded too: its partial effects count')",
    "def (",  # a syntax error changes nothing and is not recorded
]


async def _session_with_history(ex: SubprocessReplExecutor, handler: Handler, sid: str) -> None:
    for code in BLOCKS:
        await run(ex, code, handler=handler, session=sid)


async def test_history_is_plain_data_with_recorded_answers() -> None:
    async with sandbox() as ex:
        await ex.open_session("s", "abcdef")
        handler = Handler()
        await _session_with_history(ex, handler, "s")
        history = ex.session_history("s")
        assert json.loads(json.dumps(history)) == history  # plain, JSON-safe
        assert history["format"] == FORMAT
        codes = [b["code"] for b in history["blocks"]]
        assert codes == BLOCKS[:3]
        batch = history["blocks"][0]["sub_calls"][0]
        assert batch["results"] == [{"text": "re:chunk 1"}, {"error": "model unavailable"}]
        assert len(batch["prompt_digests"]) == 2
        timed_out = await run(ex, "while True:\n    pass", timeout_s=0.3)
        assert timed_out.error_kind == "timeout"
        assert len(ex.session_history("s")["blocks"]) == 3  # not recorded either


async def test_restore_on_another_executor_replays_without_calling_models() -> None:
    async with sandbox() as first:
        await first.open_session("task", "abcdef")
        handler = Handler()
        await _session_with_history(first, handler, "task")
        await run(
            first, "open('made.txt', 'w').write('file state')", handler=handler, session="task"
        )
        history = json.loads(json.dumps(first.session_history("task")))  # as sent over a wire
        calls_before = len(handler.calls)

    async with sandbox() as second:  # "another node"
        await second.restore_session("task", "abcdef", history)
        result = await run(
            second,
            "print(notes)\nprint(total, broken, math.pi > 3)\nprint(open('made.txt').read())",
            session="task",
            handler=handler,
        )
        assert result.ok, result.error
        assert result.stdout.splitlines() == [
            "['re:chunk 1', 'Error: model unavailable']",
            "6 1 True",
            "file state",
        ]
        assert result.namespace_rebuilt
        assert any("replaying 4 block(s)" in note for note in result.notes)
        assert len(handler.calls) == calls_before  # nothing was asked again
        # The restored session keeps recording, so it can move on again.
        assert len(second.session_history("task")["blocks"]) == 5


async def test_rebuild_after_a_kill_uses_recorded_answers() -> None:
    async with sandbox() as ex:
        await ex.open_session("s", [1, 2, 3])
        handler = Handler()
        await run(ex, "first = llm_query('expensive question')", handler=handler)
        assert len(handler.calls) == 1
        killed = await run(ex, "import os\nos._exit(1)", handler=handler)
        assert killed.error_kind == "killed"
        result = await run(ex, "print(first, sum(context))", handler=handler)
        assert result.stdout == "re:expensive question 6\n"
        assert result.namespace_rebuilt
        assert len(handler.calls) == 1


async def test_a_diverging_replay_is_reported() -> None:
    async with sandbox() as ex:
        await ex.open_session("s", "ctx")
        await run(ex, "a = llm_query('original prompt')")
        history = ex.session_history("s")
        history["blocks"][0]["code"] = "a = llm_query('a different prompt')"
        await ex.restore_session("moved", "ctx", history)
        result = await run(ex, "print(a)", session="moved")
        assert result.namespace_rebuilt
        assert "replay diverged" in result.stdout
        assert any("different sub-calls" in note for note in result.notes)


async def test_a_replay_that_fails_falls_back_to_a_fresh_namespace() -> None:
    history = {
        "format": FORMAT,
        "blocks": [
            {"code": "x = 1", "language": "python", "timeout_s": 5.0, "sub_calls": []},
            {"code": "while True:\n    pass", "language": "python", "timeout_s": 0.3},
        ],
    }
    async with sandbox() as ex:
        await ex.restore_session("s", "ctx", history)
        result = await run(ex, "print(context)\nprint('x' in dir())")
        assert result.stdout == "ctx\nFalse\n"
        assert any("could not be rebuilt" in note for note in result.notes)
        assert ex.session_history("s")["blocks"][-1]["code"].startswith("print(context)")


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("nope", "must be a dict"),
        ({"format": "other/9", "blocks": []}, "unsupported REPL history format"),
        ({"blocks": [{"language": "python"}]}, "needs a 'code' string"),
        ({"blocks": [{"code": "1", "timeout_s": -1}]}, "timeout_s"),
        (
            {"blocks": [{"code": "1", "sub_calls": [{"prompt_digests": ["a"], "results": []}]}]},
            "as long as",
        ),
        (
            {"blocks": [{"code": "1", "sub_calls": [{"prompt_digests": ["a"], "results": [{}]}]}]},
            "'text' or an 'error'",
        ),
    ],
)
def test_malformed_history_is_a_clear_error(bad: object, message: str) -> None:
    with pytest.raises(SandboxError, match=message):
        history_from_plain(bad)


async def test_restore_rejects_bad_history_before_starting_anything() -> None:
    async with sandbox() as ex:
        with pytest.raises(SandboxError, match="blocks"):
            await ex.restore_session("s", "ctx", {"format": FORMAT})
        assert ex.session_ids() == []
