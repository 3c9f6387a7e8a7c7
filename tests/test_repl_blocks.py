"""compile_block: the final expression of a block is shown, exactly as an AST split would."""

from __future__ import annotations

import ast
import contextlib
import io

import pytest

from kowalski_node.repl.blocks import compile_block


def shown(code: str) -> tuple[str, bool]:
    body, last = compile_block(code, "<t>")
    namespace: dict[str, object] = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(body, namespace)
        if last is not None:
            value = eval(last, namespace)
            if value is not None:
                print(repr(value))
    return out.getvalue(), last is not None


def ast_says_last_is_expression(code: str) -> bool:
    tree = ast.parse(code)
    return bool(tree.body) and isinstance(tree.body[-1], ast.Expr)


CASES = [
    ("x = 2\nx * 21", "42\n"),
    ("x = 2\nx * 21  # trailing comment\n# and another\n\n", "42\n"),
    ("def f():\n    return 5\nf()", "5\n"),
    ("if True:\n    y = 1\ny + 1", "2\n"),
    ("s = '''\nnot code\n'''\nlen(s)", "10\n"),
    ("t = '''\n1 + 1\n'''", ""),
    ("v = [\n1,\n2,\n]", ""),
    ("w = 1 + \\\n2\nw", "3\n"),
    ("total = (1 +\n2)", ""),
    ("print('hi')", "hi\n"),
    ("for i in range(2):\n    i", ""),
    ("a = 1; a", "1\n"),
    ("", ""),
    ("# only a comment", ""),
    ("'text'", "'text'\n"),
    ("import math\nmath.floor(\n    2.5\n)", "2\n"),
]


@pytest.mark.parametrize(("code", "expected"), CASES)
def test_final_expression_is_shown(code: str, expected: str) -> None:
    output, _ = shown(code)
    assert output == expected


@pytest.mark.parametrize(("code", "expected"), CASES)
def test_split_never_changes_meaning(code: str, expected: str) -> None:
    """Where the fast split is taken, the AST agrees the block ends with an expression."""
    _, split = shown(code)
    if split:
        assert ast_says_last_is_expression(code)


def test_syntax_errors_surface_with_line_numbers() -> None:
    with pytest.raises(SyntaxError) as info:
        compile_block("x = 1\ny = (\n", "<t>")
    assert info.value.lineno is not None and info.value.lineno >= 2
    with pytest.raises(ZeroDivisionError):
        body, last = compile_block("a = 0\n1 / a", "<t>")
        ns: dict[str, object] = {}
        exec(body, ns)
        assert last is not None
        eval(last, ns)
