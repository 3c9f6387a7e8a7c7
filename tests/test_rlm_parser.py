"""Code-block detection, language inference and FINAL markers (kowalski_node.rlm.parser)."""

from __future__ import annotations

import pytest

from kowalski_node.rlm.languages import infer_language, normalize_language
from kowalski_node.rlm.parser import find_final, parse_response

# ----------------------------------------------------------------------------- fenced


@pytest.mark.parametrize("tag", ["repl", "python", "py", "python3", "Python", "{python}"])
def test_python_tags_fold_to_python(tag: str) -> None:
    parsed = parse_response(f"Look:\n```{tag}\nprint(len(context))\n```\n")
    assert [(b.language, b.kind, b.inferred) for b in parsed.blocks] == [
        ("python", "fenced", False)
    ]
    assert parsed.blocks[0].code == "print(len(context))"
    assert parsed.blocks[0].tag == tag


def test_other_language_tags_keep_their_language() -> None:
    text = "```javascript\nconsole.log(1)\n```\n```bash\nls -la\n```\n```rust\nfn main() {}\n```"
    assert [b.language for b in parse_response(text).blocks] == ["javascript", "shell", "rust"]


def test_several_blocks_in_order_with_prose_between() -> None:
    text = (
        "First the size.\n```repl\nn = len(context)\n```\nThen a peek.\n"
        "```repl\nprint(context[:10])\n```\nDone for now."
    )
    parsed = parse_response(text)
    assert [b.code for b in parsed.blocks] == ["n = len(context)", "print(context[:10])"]
    assert parsed.final is None
    assert "First the size." in parsed.prose and "n = len" not in parsed.prose


def test_plain_fence_infers_language() -> None:
    text = "```\nx = [len(c) for c in context]\nprint(x)\n```\n```\nls -la | grep data\n```"
    blocks = parse_response(text).blocks
    assert [(b.language, b.inferred, b.tag) for b in blocks] == [
        ("python", True, None),
        ("shell", True, None),
    ]


def test_tilde_fence_and_longer_fence_with_inner_backticks() -> None:
    text = '~~~python\nprint("a")\n~~~\n````repl\ns = "```"\nprint(s)\n````'
    blocks = parse_response(text).blocks
    assert [b.code for b in blocks] == ['print("a")', 's = "```"\nprint(s)']


def test_unclosed_fence_runs_to_the_end() -> None:
    parsed = parse_response("Let me check.\n```repl\nprint(context[:100])\nx = 1")
    assert parsed.blocks[0].code == "print(context[:100])\nx = 1"


def test_closing_fence_glued_to_last_line() -> None:
    parsed = parse_response("```repl\nx = 1\nprint(x)```\nFINAL(1)")
    assert parsed.blocks[0].code == "x = 1\nprint(x)"
    assert parsed.final is not None and parsed.final.value == "1"


def test_one_line_fence() -> None:
    assert (
        parse_response("```python print(len(context))```").blocks[0].code == "print(len(context))"
    )
    block = parse_response("```print(len(context))```").blocks[0]
    assert block.code == "print(len(context))" and block.language == "python"


def test_data_fences_are_not_executed() -> None:
    text = '```json\n{"a": 1}\n```\n```text\nsome output\n```\n```repl\nprint(1)\n```'
    parsed = parse_response(text)
    assert [b.code for b in parsed.blocks] == ["print(1)"]
    assert [b.language for b in parsed.data_blocks] == ["json", "text"]


def test_empty_fence_is_skipped() -> None:
    assert parse_response("```repl\n\n```").blocks == ()


# ----------------------------------------------------------------------------- raw / inline


def test_raw_code_response() -> None:
    text = "chunks = [context[i:i+1000] for i in range(0, len(context), 1000)]\nprint(len(chunks))"
    parsed = parse_response(text)
    assert [(b.kind, b.language) for b in parsed.blocks] == [("raw", "python")]
    assert parsed.blocks[0].code == text


@pytest.mark.parametrize(
    "text",
    [
        "Done",  # a bare name compiles, but it is not code
        "The context is a list of reports. I will count them next.",
        "FINAL(42)",  # a marker line alone is the outside-code form
        "FINAL_VAR(result)",
        "",
    ],
)
def test_not_raw_code(text: str) -> None:
    assert all(b.kind != "raw" for b in parse_response(text).blocks)


def test_a_reply_that_is_one_backtick_span_of_code_runs() -> None:
    parsed = parse_response("  `print(context[:200])`\n")
    assert [(b.kind, b.code) for b in parsed.blocks] == [("inline", "print(context[:200])")]


@pytest.mark.parametrize(
    "text",
    [
        # rlms runs nothing here: code mentioned in prose is never executed.
        'When I am done I will set `answer["ready"] = True` with the result.',
        "Then I call `FINAL_VAR(count)` once the loop has finished.",
        "Next I will run `print(context[:200])` to see the start.",
        "I can call `llm_query()` later.",
        "Use `context` to read it.",
    ],
)
def test_code_mentioned_in_prose_never_runs(text: str) -> None:
    parsed = parse_response(text)
    assert parsed.blocks == ()
    assert parsed.final is None  # a backticked marker is not at the start of a line


def test_a_backtick_span_that_is_not_code_does_not_run() -> None:
    assert parse_response("`Done`").blocks == ()
    assert parse_response("`print(context[:10)`").blocks == ()


def test_prose_mentions_ignored_when_fenced_blocks_exist() -> None:
    parsed = parse_response("I ran `print(context[:5])` before.\n```repl\nprint(1)\n```")
    assert [b.code for b in parsed.blocks] == ["print(1)"]


# ----------------------------------------------------------------------------- FINAL


def test_final_outside_code() -> None:
    final = parse_response("I have checked every chunk.\nFINAL(Paris is the capital)").final
    assert final is not None and (final.kind, final.value, final.line) == (
        "FINAL",
        "Paris is the capital",
        1,
    )


def test_final_with_nested_parentheses_on_one_line() -> None:
    final = find_final("FINAL(f(x) and (g(y) or h(z)))")
    assert final is not None and final.value == "f(x) and (g(y) or h(z))"


def test_final_with_unbalanced_parenthesis_inside_answer() -> None:
    final = find_final("FINAL(Options: a) red b) blue)")
    assert final is not None and final.value == "Options: a) red b) blue"


def test_final_followed_by_prose_with_parentheses() -> None:
    final = find_final("FINAL(42) is my answer (checked twice)")
    assert final is not None and final.value == "42"


def test_final_trailing_punctuation_and_quotes() -> None:
    assert (f := find_final('FINAL("Oslo").')) is not None and f.value == "Oslo"
    assert (f := find_final("  FINAL('x y')  ")) is not None and f.value == "x y"


def test_final_not_greedy_across_lines() -> None:
    text = "FINAL(first answer)\nsome text (with parens)\nFINAL(second)"
    final = find_final(text)
    assert final is not None and final.value == "first answer"


def test_multiline_final_ends_at_the_balanced_parenthesis() -> None:
    text = "FINAL(The answer:\n1. alpha\n2. beta)\nLater remark (aside)"
    final = find_final(text)
    assert final is not None and final.value == "The answer:\n1. alpha\n2. beta"


def test_multiline_final_whose_lines_hold_parentheses() -> None:
    # rlms 0.1.1 semantics: the balanced parenthesis closes the call, not a line ending in ")".
    text = "Here it is.\nFINAL(1. Paris (France)\n2. Rome (Italy))\nThanks."
    final = parse_response(text).final
    assert final is not None and final.value == "1. Paris (France)\n2. Rome (Italy)"


def test_quoted_final_argument_may_hold_parentheses() -> None:
    final = find_final('FINAL("smiley :) and (frown")')
    assert final is not None and final.value == "smiley :) and (frown"


def test_final_must_start_the_line() -> None:
    assert find_final("When done I will write FINAL(answer) here.") is None
    assert find_final("`FINAL(x)`") is None


def test_final_inside_code_block_is_not_the_outside_form() -> None:
    parsed = parse_response("```repl\nFINAL(total)\n```")
    assert parsed.final is None
    assert parsed.blocks[0].code == "FINAL(total)"


def test_final_outside_and_block_inside_both_seen() -> None:
    parsed = parse_response("```repl\nresult = 3\n```\nFINAL_VAR(result)")
    assert len(parsed.blocks) == 1
    assert parsed.final is not None and (parsed.final.kind, parsed.final.value) == (
        "FINAL_VAR",
        "result",
    )


@pytest.mark.parametrize(
    "text", ["FINAL_VAR(result)", "FINAL_VAR('result')", 'FINAL_VAR( "result" )']
)
def test_final_var_forms(text: str) -> None:
    final = find_final(text)
    assert final is not None and (final.kind, final.value) == ("FINAL_VAR", "result")


def test_first_marker_wins() -> None:
    final = find_final("FINAL_VAR(summary)\nFINAL(other)")
    assert final is not None and final.kind == "FINAL_VAR"


def test_unclosed_final_takes_the_rest() -> None:
    final = find_final("FINAL(The answer is 42")
    assert final is not None and final.value == "The answer is 42"


def test_final_with_a_stray_open_parenthesis_ends_at_the_last_close() -> None:
    final = find_final("FINAL(Items: (a, b\nthat is all)")
    assert final is not None and final.value == "Items: (a, b\nthat is all"


# ----------------------------------------------------------------------------- languages


@pytest.mark.parametrize(
    ("code", "language"),
    [
        ("x = 1\nprint(x)", "python"),
        ("def f(a):\n    return a", "python"),
        ("for c in context:\n    print(len(c)", "python"),  # broken Python is still Python
        ("console.log('hi')", "javascript"),
        ("const n = context.length;\nconsole.log(n);", "javascript"),
        ("#!/bin/bash\necho hi", "shell"),
        ("$ ls -la", "shell"),
        ("cat data.txt | wc -l", "shell"),
        ("SELECT name FROM users WHERE id = 1", "sql"),
        ('fn main() {\n    println!("hi");\n}', "rust"),
        ("package main\nfunc main() {}", "go"),
        ("#include <stdio.h>\nint main() { return 0; }", "c"),
        ("x <- c(1, 2, 3)", "r"),
        ("puts 'hello'", "ruby"),
        ("Hello there, general", "unknown"),
        ("", "unknown"),
    ],
)
def test_infer_language(code: str, language: str) -> None:
    assert infer_language(code) == language


def test_normalize_language_aliases() -> None:
    assert normalize_language("repl") == "python"
    assert normalize_language("BASH") == "shell"
    assert normalize_language("ts") == "typescript"
    assert normalize_language("cobol") == "cobol"
    assert normalize_language("") == "unknown"
