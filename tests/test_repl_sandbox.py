"""SubprocessReplExecutor: sessions, namespace semantics across the pipe, languages, concurrency."""

from __future__ import annotations

import os
import sys

import pytest
import trio

from kowalski_node.errors import ConfigError, SandboxError
from kowalski_node.repl.base import ExecRequest, ReplExecutor
from kowalski_node.repl.executor import SubprocessReplExecutor
from tests.repl_support import IS_ROOT, Handler, run, sandbox

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox tests need Linux")


async def test_implements_the_contract_and_reports_capabilities() -> None:
    async with sandbox() as ex:
        assert isinstance(ex, ReplExecutor)
        caps = ex.capabilities
        assert caps is not None
        assert "python" in ex.languages
        assert caps.languages == ex.languages
        summary = caps.summary()
        for name in ("memory", "network", "filesystem", "processes"):
            assert name in summary
        if IS_ROOT:
            # This project's machines run nodes as root with namespaces available.
            assert caps.missing() == [], summary


@pytest.mark.parametrize(
    "context",
    ["a string", b"\x00\xffraw", [1, "two", {"three": 3}], {"doc": ["x", "y"], "n": 2}],
    ids=["str", "bytes", "list", "dict"],
)
async def test_context_arrives_with_its_type(context: object) -> None:
    async with sandbox() as ex:
        await ex.open_session("s", context)
        result = await run(ex, "print(type(context).__name__)\nprint(repr(context))")
        assert result.ok, result.error
        assert result.stdout == f"{type(context).__name__}\n{context!r}\n"


async def test_persistence_variables_and_last_expression() -> None:
    async with sandbox() as ex:
        await ex.open_session("s", "ctx")
        first = await run(ex, "import json\ntotal = 40\ndef bump(n):\n    return n + 2")
        assert first.ok and first.stdout == ""
        assert first.variables["total"] == "int"
        assert first.variables["bump"] == "function"
        assert first.variables["json"] == "module"
        second = await run(ex, "bump(total)")  # a last expression is shown, as in a REPL
        assert second.stdout == "42\n"
        third = await run(ex, "words = ['a'] * 3\nlen(words)")
        assert third.stdout == "3\n" and third.variables["words"] == "list (3 items)"
        assert "context" not in third.variables


async def test_final_final_var_show_vars_and_answer_dict() -> None:
    async with sandbox() as ex:
        await ex.open_session("s", "ctx")
        assert (await run(ex, "FINAL('done')")).final_answer == "done"
        result = await run(ex, "result = 6 * 7\nFINAL_VAR('result')")
        assert result.final_answer == "42"
        missing = await run(ex, "FINAL_VAR('nothing_here')\nprint('after')")
        assert missing.ok and missing.final_answer is None
        assert "no variable named 'nothing_here'" in missing.stderr
        assert missing.stdout == "after\n"
        shown = await run(ex, "SHOW_VARS()")
        assert "result" in shown.stdout and "int" in shown.stdout
        draft = await run(ex, "answer['content'] = 'via dict'")
        assert draft.final_answer is None
        ready = await run(ex, "answer['ready'] = True")
        assert ready.final_answer == "via dict"


async def test_reserved_names_restored_and_reported() -> None:
    async with sandbox() as ex:
        await ex.open_session("s", "the context")
        broken = await run(ex, "context = 1\nllm_query = None\nFINAL = print")
        assert broken.ok
        assert any("restored" in note for note in broken.notes)
        assert "restored" in broken.stderr
        handler = Handler()
        fixed = await run(ex, "print(context)\nprint(llm_query('q'))\nFINAL('ok')", handler=handler)
        assert fixed.stdout == "the context\nre:q\n"
        assert fixed.final_answer == "ok"


async def test_sub_calls_reach_the_handler_and_a_failed_slot_fails_alone() -> None:
    async with sandbox() as ex:
        await ex.open_session("s", "ctx")
        handler = Handler()
        result = await run(
            ex,
            "one = llm_query('hello', model='small')\n"
            "many = llm_query_batched(['a', 'please fail', 'c'])\n"
            "print(one)\nprint(many)",
            handler=handler,
        )
        assert result.ok, result.error
        assert result.stdout.splitlines() == [
            "re:hello",
            "['re:a', 'Error: model unavailable', 're:c']",
        ]
        assert handler.calls == [(["hello"], "small"), (["a", "please fail", "c"], None)]
        assert result.sub_calls == 4


async def test_a_handler_that_raises_fails_only_that_call() -> None:
    async def broken(prompts: list[str], model: str | None) -> list[object]:
        raise RuntimeError("backend exploded")

    async with sandbox() as ex:
        await ex.open_session("s", "ctx")
        result = await ex.execute(
            ExecRequest("s", "r = llm_query_batched(['a', 'b'])\nprint(r)"),
            broken,  # type: ignore[arg-type]
        )
        assert result.ok
        assert "Error: RuntimeError: backend exploded" in result.stdout


async def test_errors_are_reported_with_a_useful_traceback() -> None:
    async with sandbox() as ex:
        await ex.open_session("s", "ctx")
        syntax = await run(ex, "def broken(:\n    pass")
        assert syntax.error_kind == "syntax" and "SyntaxError" in (syntax.error or "")
        raised = await run(ex, "x = 1\ndef f():\n    return 1 / 0\nf()")
        assert raised.error_kind == "exception"
        assert "ZeroDivisionError" in (raised.error or "") and "<block" in (raised.error or "")
        assert "return 1 / 0" in (raised.error or "")  # the source line is shown
        exited = await run(ex, "import sys\nsys.exit(3)")
        assert exited.error_kind == "exception" and "not allowed" in (exited.error or "")
        after = await run(ex, "print(x)")  # state survives all of it
        assert after.stdout == "1\n"


async def test_output_is_captured_from_python_and_child_processes() -> None:
    async with sandbox() as ex:
        await ex.open_session("s", "ctx")
        result = await run(
            ex,
            "import sys, subprocess\nprint('out')\nprint('err', file=sys.stderr)\n"
            "sys.stdout.flush()\n_ = subprocess.run(['echo', 'from child'])",
        )
        assert result.ok, result.error
        assert result.stdout == "out\nfrom child\n"
        assert result.stderr == "err\n"


async def test_shell_blocks_when_available() -> None:
    async with sandbox() as ex:
        if "shell" not in ex.languages:
            pytest.skip("no shell installed")
        await ex.open_session("s", "ctx")
        made = await run(ex, "echo hello > note.txt; echo done", language="bash")
        assert made.ok and made.stdout == "done\n"
        seen = await run(ex, "print(open('note.txt').read().strip())")
        assert seen.stdout == "hello\n"  # blocks share the working directory
        failed = await run(ex, "exit 4", language="sh")
        assert failed.error_kind == "exception" and "status 4" in (failed.error or "")


async def test_unsupported_language_does_not_touch_a_worker() -> None:
    async with sandbox() as ex:
        result = await ex.execute(
            ExecRequest("no-such-session", "console.log(1)", "javascript"), Handler()
        )
        assert result.error_kind == "unsupported_language"
        assert "javascript" in (result.error or "") and "python" in (result.error or "")
        assert ex.session_ids() == []


async def test_bad_input_gets_clear_errors() -> None:
    async with sandbox() as ex:
        with pytest.raises(SandboxError, match="no REPL session"):
            await run(ex, "1", session="missing")
        with pytest.raises(SandboxError, match="context must be"):
            await ex.open_session("s", object())
        with pytest.raises(SandboxError, match="cannot receive"):
            await ex.open_session("s", {"bad": {1, 2}})
    with pytest.raises(ConfigError, match="memory_mb"):
        SubprocessReplExecutor(memory_mb=0)
    with pytest.raises(ConfigError, match="unknown sandbox option"):
        SubprocessReplExecutor(memory=5)


async def test_open_is_idempotent_and_close_drops_the_namespace() -> None:
    async with sandbox() as ex:
        await ex.open_session("s", "ctx")
        await run(ex, "kept = 1")
        await ex.open_session("s", "other")  # idempotent: same namespace
        assert (await run(ex, "print(kept, context)")).stdout == "1 ctx\n"
        await ex.close_session("s")
        await ex.close_session("s")  # closing twice is harmless
        await ex.open_session("s", "fresh")
        result = await run(ex, "print(kept)")
        assert result.error_kind == "exception" and "NameError" in (result.error or "")


async def test_sessions_run_concurrently_without_blocking_trio() -> None:
    async with sandbox(pool_size=2) as ex:
        ids = [f"t{i}" for i in range(4)]
        for sid in ids:
            await ex.open_session(sid, sid)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await trio.sleep(0.02)
                ticks += 1

        results: dict[str, str] = {}

        async def one(sid: str) -> None:
            res = await run(ex, "import time\ntime.sleep(0.4)\nprint(context)", session=sid)
            results[sid] = res.stdout

        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            async with trio.open_nursery() as inner:
                for sid in ids:
                    inner.start_soon(one, sid)
            nursery.cancel_scope.cancel()
        elapsed = trio.current_time() - started
        assert results == {sid: f"{sid}\n" for sid in ids}
        assert elapsed < 1.5, f"4 x 0.4 s blocks took {elapsed:.2f} s: not concurrent"
        assert ticks >= 8, "the trio loop was blocked while blocks ran"


async def test_cancelling_a_block_replaces_the_worker_and_keeps_the_session() -> None:
    async with sandbox() as ex:
        await ex.open_session("s", "ctx")
        await run(ex, "value = 'kept'")
        with trio.move_on_after(0.3):
            await run(ex, "import time\ntime.sleep(30)")
        result = await run(ex, "print(value)")
        assert result.stdout == "value\n".replace("value", "kept")
        assert result.namespace_rebuilt


async def test_environment_is_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOWALSKI_TEST_SECRET", "hunter2")
    async with sandbox(env={"VISIBLE_ON_PURPOSE": "yes"}) as ex:
        await ex.open_session("s", "ctx")
        result = await run(
            ex, "import os\nprint(sorted(os.environ))\nprint(os.environ['HOME'] == os.getcwd())"
        )
        names = eval(result.stdout.splitlines()[0])
        assert "KOWALSKI_TEST_SECRET" not in names
        assert "VISIBLE_ON_PURPOSE" in names
        assert set(names) <= {
            "PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "PYTHONDONTWRITEBYTECODE",
            "PYTHONIOENCODING", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
            "VISIBLE_ON_PURPOSE",
        }  # fmt: skip
        assert result.stdout.splitlines()[1] == "True"
        assert "hunter2" not in (await run(ex, "print(open('/proc/self/environ').read())")).stdout


async def test_aclose_is_final() -> None:
    async with sandbox() as ex:
        await ex.open_session("s", "ctx")
    with pytest.raises(SandboxError, match="closed"):
        await ex.open_session("t", "ctx")
    assert os.getpid() > 0  # the node process is obviously still here
