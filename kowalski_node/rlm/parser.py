"""Find code blocks and final-answer markers in a model response.

What runs follows the reference `rlms` library, so a model keeps its habits:

1. fenced blocks (``` or ~~~, tagged or not; an unclosed fence runs to the end,
   which is what a stop sequence or `max_tokens` cut leaves behind);
2. otherwise only a reply that is nothing but code runs: the whole reply compiles
   as Python and looks like code, or the whole reply is one `backtick span` of code.

Code mentioned in prose (`answer["ready"] = True` or `FINAL_VAR(count)` in backticks
inside a sentence) never runs.

`FINAL(...)` / `FINAL_VAR(name)` count as the outside-code form only at the start of a
line outside every code region. The argument ends at its balanced closing parenthesis,
which may be lines later ("FINAL(1. Paris (France)\n2. Rome (Italy))"); a quoted
argument ends at its closing quote.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from kowalski_node.rlm.languages import (
    UNKNOWN,
    compiles_as_python,
    infer_language,
    is_known_tag,
    is_non_code_tag,
    normalize_language,
)

BlockKind = Literal["fenced", "raw", "inline"]


@dataclass(frozen=True)
class CodeBlock:
    code: str
    language: str
    """Canonical language (see `languages.normalize_language`), or "unknown"."""
    tag: str | None
    """The fence tag as written; None when untagged."""
    kind: BlockKind
    inferred: bool
    """True when the language was guessed, not tagged."""


@dataclass(frozen=True)
class FinalMarker:
    kind: Literal["FINAL", "FINAL_VAR"]
    value: str
    """The answer text (FINAL) or the variable name (FINAL_VAR)."""
    line: int
    """0-based line of the marker in the response."""


@dataclass(frozen=True)
class ParsedResponse:
    blocks: tuple[CodeBlock, ...]
    """Blocks to execute, in order of appearance."""
    final: FinalMarker | None
    """The first outside-code final marker, if any."""
    data_blocks: tuple[CodeBlock, ...] = ()
    """Fenced blocks tagged as data/prose (json, text, output...): never executed."""
    prose: str = ""
    """The response with code regions removed: the answer when a final turn has no marker."""


_OPEN_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_FINAL_START = re.compile(r"^[ \t]*(?P<kind>FINAL_VAR|FINAL)\(", re.MULTILINE)
_WHOLE_INLINE = re.compile(r"\A\s*`(?P<code>[^`\n]+)`\s*\Z")
_CODE_SIGNAL = re.compile(r"[(=\[]|^\s*(?:import|from|def|class|for|while|if|with)\b", re.MULTILINE)


def parse_response(text: str) -> ParsedResponse:
    """Split a model response into executable blocks and an outside-code final marker."""
    lines = text.split("\n")
    fenced, data, code_lines = _fenced_blocks(lines)
    if fenced or data:
        outside = "\n".join(line if i not in code_lines else "" for i, line in enumerate(lines))
        prose = re.sub(r"\n{3,}", "\n\n", outside).strip()
        return ParsedResponse(tuple(fenced), find_final(outside), tuple(data), prose)
    whole = _whole_reply_block(text)
    if whole is not None:
        return ParsedResponse((whole,), None, (), "")
    # Prose: code it mentions never runs; only a line-anchored marker counts.
    return ParsedResponse((), find_final(text), (), text.strip())


def _fenced_blocks(lines: list[str]) -> tuple[list[CodeBlock], list[CodeBlock], set[int]]:
    blocks: list[CodeBlock] = []
    data: list[CodeBlock] = []
    covered: set[int] = set()
    i = 0
    while i < len(lines):
        match = _OPEN_FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        fence = match.group("fence")
        info = match.group("info").strip()
        if fence[0] == "`" and "`" in info:
            one_line = _one_line_fence(fence, info)
            if one_line is not None:
                _append(blocks, data, one_line[0], one_line[1])
                covered.add(i)
                i += 1
                continue
        start = i
        body: list[str] = []
        i += 1
        closed = False
        while i < len(lines):
            line = lines[i]
            stripped = line.strip()
            if stripped and set(stripped) == {fence[0]} and len(stripped) >= len(fence):
                closed = True
                break
            if (
                fence[0] == "`"
                and line.rstrip().endswith(fence)
                and not line.rstrip().endswith(fence + "`")
            ):
                # "x = 1```": a closing fence glued to the last code line.
                body.append(line.rstrip()[: -len(fence)])
                closed = True
                break
            body.append(line)
            i += 1
        end = i if closed else len(lines) - 1
        covered.update(range(start, end + 1))
        _append(blocks, data, "\n".join(body), info or None)
        i += 1
    return blocks, data, covered


def _one_line_fence(fence: str, info: str) -> tuple[str, str | None] | None:
    """```python print(1)``` on a single line."""
    if not info.endswith(fence):
        return None
    inner = info[: -len(fence)].strip()
    head, _, rest = inner.partition(" ")
    if rest.strip() and is_known_tag(head):
        return rest.strip(), head
    return inner, None


def _append(blocks: list[CodeBlock], data: list[CodeBlock], code: str, tag: str | None) -> None:
    if tag is not None and is_non_code_tag(tag):
        data.append(CodeBlock(code, normalize_language(tag), tag, "fenced", False))
        return
    if not code.strip():
        return
    if tag:
        blocks.append(CodeBlock(code, normalize_language(tag), tag, "fenced", False))
    else:
        blocks.append(CodeBlock(code, infer_language(code), None, "fenced", True))


def _whole_reply_block(text: str) -> CodeBlock | None:
    """The whole reply as one Python block, when it is nothing but code.

    Either the entire reply compiles and looks like code, or it is a single
    `backtick span` that does. A bare word (`Done`) or a reply of marker lines only
    (`FINAL(42)`) is not code: markers alone are the outside-code form.
    """
    inline = _WHOLE_INLINE.match(text)
    kind: BlockKind = "raw"
    stripped = text.strip()
    if inline is not None:
        stripped, kind = inline.group("code").strip(), "inline"
    if not stripped:
        return None
    body_lines = [ln for ln in stripped.splitlines() if ln.strip()]
    if all(_FINAL_START.match(ln) for ln in body_lines):
        return None
    if not _CODE_SIGNAL.search(stripped) or not compiles_as_python(stripped):
        return None
    return CodeBlock(stripped, "python", None, kind, True)


def find_final(text: str) -> FinalMarker | None:
    """First line-anchored FINAL(...) / FINAL_VAR(...) in `text` (already stripped of code)."""
    match = _FINAL_START.search(text)
    if match is None:
        return None
    kind = match.group("kind")
    line_no = text.count("\n", 0, match.start())
    inner = _argument(text, match.end())
    value = _unquote(inner.strip())
    return FinalMarker("FINAL_VAR" if kind == "FINAL_VAR" else "FINAL", value, line_no)


def _argument(text: str, start: int) -> str:
    """The text of a call's argument that opens at `start` (just after the parenthesis).

    - A quoted argument ends at its closing quote followed by `)`.
    - Otherwise the balanced closing parenthesis ends it, even lines later, so
      "1. Paris (France)\n2. Rome (Italy)" stays whole.
    - When that parenthesis is on the first line but what follows it on that line is
      not balanced prose, the answer itself holds a stray `)` ("FINAL(a) red b) blue)"):
      the line's last `)` closes the call.
    - Never closed (cut off by a stop sequence, or a stray `(` in the answer): up to
      the last `)`, or the whole rest when there is none.
    """
    quoted = _quoted_argument(text, start)
    if quoted is not None:
        return quoted
    first_line_end = text.find("\n", start)
    if first_line_end == -1:
        first_line_end = len(text)
    depth = 1
    for pos in range(start, len(text)):
        char = text[pos]
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                if pos < first_line_end and not _balanced(text[pos + 1 : first_line_end]):
                    return text[start : text.rfind(")", start, first_line_end)]
                return text[start:pos]
    last = text.rfind(")", start)
    return text[start:last] if last != -1 else text[start:].rstrip()


def _quoted_argument(text: str, start: int) -> str | None:
    """'"..."' or "'...'" (or triple-quoted) followed by `)`; None if not that shape."""
    pos = start
    while pos < len(text) and text[pos] in " \t":
        pos += 1
    for quote in ('"""', "'''", '"', "'"):
        if text.startswith(quote, pos):
            break
    else:
        return None
    close = pos + len(quote)
    while True:
        close = text.find(quote, close)
        if close == -1:
            return None
        if text[close - 1] != "\\":
            break
        close += 1
    after = close + len(quote)
    while after < len(text) and text[after] in " \t":
        after += 1
    if after < len(text) and text[after] == ")":
        return text[pos : close + len(quote)]
    return None


def _balanced(text: str) -> bool:
    depth = 0
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0


def _unquote(value: str) -> str:
    if (
        len(value) >= 2
        and value[0] == value[-1]
        and value[0] in "\"'"
        and value[0] not in value[1:-1]
    ):
        return value[1:-1]
    if len(value) >= 6 and value[:3] == value[-3:] and value[:3] in ('"""', "'''"):
        return value[3:-3]
    return value


__all__ = ["UNKNOWN", "CodeBlock", "FinalMarker", "ParsedResponse", "find_final", "parse_response"]
