"""The RLM namespace on its own (no processes): helpers, reserved names, termination conventions."""

from __future__ import annotations

import contextlib
import io

import pytest

from kowalski_node.repl.namespace import (
    RECURSIVE_MODEL_PREFIX,
    RESERVED_NAMES,
    SUBCALL_ERROR_PREFIX,
    ReplNamespace,
    describe,
)


class EchoSubCalls:
    """The namespace's sub-call transport (`SubCallTransport`): answers each prompt with
    "re:<prompt>" and fails any prompt containing "fail"."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], str | None]] = []

    def __call__(
        self, prompts: list[str], model: str | None
    ) -> list[tuple[str | None, str | None]]:
        self.calls.append((list(prompts), model))
        return [(None, "backend down") if "fail" in p else (f"re:{p}", None) for p in prompts]


def run(ns: ReplNamespace, code: str) -> tuple[str, str, str | None, list[str]]:
    out, err = io.StringIO(), io.StringIO()
    ns.begin_block()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        exec(compile(code, "<test>", "exec"), ns.globals)
        outcome = ns.end_block()  # inside: the worker captures what end_block prints too
    return out.getvalue(), err.getvalue(), outcome.final_answer, outcome.restored


@pytest.mark.parametrize(
    "context", ["text", b"\x00bytes", [1, "two", [3]], {"k": {"nested": [1, 2]}}, None]
)
def test_context_is_given_as_is(context: object) -> None:
    ns = ReplNamespace(context, EchoSubCalls())
    out, _, _, _ = run(ns, "print(repr(context), type(context).__name__)")
    assert out == f"{context!r} {type(context).__name__}\n"


def test_final_and_final_var() -> None:
    ns = ReplNamespace("c", EchoSubCalls())
    assert run(ns, "FINAL(42)")[2] == "42"
    assert run(ns, "x = 'the answer'\nFINAL_VAR('x')")[2] == "the answer"
    assert run(ns, "FINAL(b'caf\\xc3\\xa9')")[2] == "café"
    # The value itself instead of its name: taken as the answer rather than failing.
    assert run(ns, "FINAL_VAR(['a'])")[2] == "['a']"
    # A later block without FINAL has no answer: FINAL does not stick.
    assert run(ns, "y = 1")[2] is None


def test_final_var_missing_variable_is_an_error_message_not_a_crash() -> None:
    ns = ReplNamespace("c", EchoSubCalls())
    out, err, final, _ = run(ns, "z = 3\nFINAL_VAR('nope')\nprint('still running')")
    assert final is None
    assert "still running" in out
    assert "no variable named 'nope'" in err and "z" in err


def test_show_vars_returns_a_str_naming_user_variables_with_types() -> None:
    ns = ReplNamespace("c", EchoSubCalls())
    first = run(ns, "v = SHOW_VARS()\nprint(type(v).__name__, v)")[0]
    assert first == "str Available variables: answer (dict (2 items))\n"
    out, _, _, _ = run(
        ns, "import math\nname = 'abc'\nitems = [1, 2]\ndef f(): pass\nlisted = SHOW_VARS()"
    )
    assert out == ""  # rlms: it returns the listing and prints nothing
    listed = ns.globals["listed"]
    assert isinstance(listed, str)
    assert "name (str (3 chars))" in listed and "items (list (2 items))" in listed
    assert "math (module)" in listed and "f (function)" in listed
    assert "context" not in listed and "llm_query" not in listed


@pytest.mark.parametrize(
    "code",
    [
        "FINAL(answer)",  # the untouched answer dict
        "FINAL_VAR('answer')",
        "FINAL('')",
        "FINAL('your final answer here')",
        "FINAL('...')",
        "SUBMIT()",
        "SUBMIT(answer='')",
        "answer['ready'] = True",  # ready, but no content
    ],
)
def test_empty_or_placeholder_final_is_refused_with_how_to_answer(code: str) -> None:
    ns = ReplNamespace("c", EchoSubCalls())
    out, err, final, _ = run(ns, code + "\nprint('went on')")
    assert final is None
    assert out == "went on\n"
    assert "refused" in err and ("FINAL(" in err or "SUBMIT(" in err)


def test_submit_dspy_style() -> None:
    ns = ReplNamespace("c", EchoSubCalls())
    assert run(ns, "SUBMIT(31)")[2] == "31"
    assert run(ns, "SUBMIT(answer='Paris')")[2] == "Paris"
    assert run(ns, "SUBMIT(count=4)")[2] == "4"  # one output field, whatever its name
    assert run(ns, "SUBMIT(answer='a', reasoning='b')")[2] == "a"
    assert run(ns, "SUBMIT(city='Oslo', n=2)")[2] == "{'city': 'Oslo', 'n': 2}"


def test_rlm_query_asks_for_a_recursive_sub_call() -> None:
    transport = EchoSubCalls()
    ns = ReplNamespace("c", transport)
    out, _, _, _ = run(
        ns, "print(rlm_query('q1'))\nprint(rlm_query_batched(['a', 'b'], model='m'))"
    )
    assert out.splitlines() == ["re:q1", "['re:a', 're:b']"]
    assert transport.calls == [
        (["q1"], RECURSIVE_MODEL_PREFIX),
        (["a", "b"], RECURSIVE_MODEL_PREFIX + "m"),
    ]
    with pytest.raises(TypeError, match="list of prompts"):
        run(ns, "rlm_query_batched('abc')")


def test_reserved_names_are_restored_after_every_block() -> None:
    transport = EchoSubCalls()
    ns = ReplNamespace("ctx", transport)
    code = "\n".join(f"{name} = None" for name in RESERVED_NAMES)
    _, _, _, restored = run(ns, code)
    assert set(restored) == set(RESERVED_NAMES)
    out, _, _, restored = run(ns, "print(context)\nprint(llm_query('q'))")
    assert out == "ctx\nre:q\n"
    assert restored == []
    # Deleting works the same way.
    _, _, _, restored = run(ns, "del context")
    assert restored == ["context"]
    assert run(ns, "print(context)")[0] == "ctx\n"


def test_answer_dict_convention() -> None:
    ns = ReplNamespace("c", EchoSubCalls())
    assert run(ns, "answer['content'] = 'draft'")[2] is None  # not ready yet
    assert run(ns, "answer['ready'] = True")[2] == "draft"
    # Already ready and unchanged: a later block does not re-report it.
    assert run(ns, "x = 1")[2] is None
    assert run(ns, "answer = {'content': 7, 'ready': True}")[2] == "7"
    # FINAL wins over the dict within the same block.
    assert run(ns, "answer = {'content': 'dict', 'ready': True}\nFINAL('final')")[2] == "final"


def test_sub_calls_single_and_batched_with_one_failing_slot() -> None:
    transport = EchoSubCalls()
    ns = ReplNamespace("c", transport)
    out, _, _, _ = run(
        ns,
        "a = llm_query('one', model='small')\n"
        "b = llm_query_batched(['x', 'fail me', 'y'])\n"
        "print(a); print(b)",
    )
    assert out.splitlines() == [
        "re:one",
        f"['re:x', '{SUBCALL_ERROR_PREFIX}backend down', 're:y']",
    ]
    assert transport.calls == [(["one"], "small"), (["x", "fail me", "y"], None)]
    assert run(ns, "print(llm_query_batched([]))")[0] == "[]\n"


def test_batched_rejects_a_bare_string_with_a_clear_error() -> None:
    ns = ReplNamespace("c", EchoSubCalls())
    with pytest.raises(TypeError, match="list of prompts"):
        run(ns, "llm_query_batched('abc')")
    with pytest.raises(TypeError, match="model must be a string"):
        run(ns, "llm_query('abc', model=3)")


def test_describe_never_calls_user_code() -> None:
    class Evil:
        def __len__(self) -> int:
            raise AssertionError("called")

        def __repr__(self) -> str:
            raise AssertionError("called")

    assert describe(Evil()).endswith("Evil")
    assert describe(b"abc") == "bytes (3 bytes)"
    assert describe({"a": 1}) == "dict (1 items)"
