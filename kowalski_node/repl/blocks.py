"""Compiling a code block the way an interactive prompt treats it.

A block whose last top-level statement is an expression shows that expression's value
(`len(context)` prints the length), as in a Jupyter cell. Parsing to an AST and compiling
that costs about twice a plain compile, so the common case splits the source text at the
start of its last unindented line instead: if the tail compiles as an expression and the
head compiles on its own, the split is exact (an unfinished string, bracket or backslash
continuation makes one of the two fail). A last line that may close a multi-line or
`;`-joined expression falls back to the AST; anything else compiles as plain statements.
"""

from __future__ import annotations

import ast
from types import CodeType


def compile_block(code: str, filename: str) -> tuple[CodeType, CodeType | None]:
    """(statements, final expression or None); raises SyntaxError/ValueError like compile()."""
    lines = code.splitlines(keepends=True)
    last = _last_top_level_line(lines)
    if last is not None:
        try:
            # Leading newlines keep the expression's line numbers right in tracebacks.
            expression = compile("\n" * last + "".join(lines[last:]).strip(), filename, "eval")
            statements = compile("".join(lines[:last]), filename, "exec")
        except SyntaxError:
            pass
        else:
            return statements, expression
        line = lines[last].lstrip()
        if line[:1] in ")]}" or ";" in line:  # may end a multi-line or ;-joined expression
            return _split_with_ast(code, filename)
    return compile(code, filename, "exec"), None


def _split_with_ast(code: str, filename: str) -> tuple[CodeType, CodeType | None]:
    tree = ast.parse(code, filename, "exec")
    final = tree.body[-1] if tree.body else None
    if not isinstance(final, ast.Expr):
        return compile(tree, filename, "exec"), None
    tree.body.pop()
    return compile(tree, filename, "exec"), compile(ast.Expression(final.value), filename, "eval")


def _last_top_level_line(lines: list[str]) -> int | None:
    for index in range(len(lines) - 1, -1, -1):
        line = lines[index]
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0] in " \t":
            return None  # ends inside an indented block: not an expression statement
        return index
    return None
