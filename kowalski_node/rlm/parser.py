"""Find code blocks and final-answer markers in a model response.

Models format code in many ways, so detection runs in order of confidence and
stops at the first kind that finds something:

1. fenced blocks (``` or ~~~, tagged or not; an unclosed fence runs to the end,
   which is what a stop sequence or `max_tokens` cut leaves behind);
2. raw code: the whole response is Python (compiles, and looks like code);
3. inline code: `single backtick` spans that compile, call or assign something
   and use a REPL name (conservative on purpose: prose mentions code a lot).

`FINAL(...)` / `FINAL_VAR(name)` count as the outside-code form only at the
start of a line outside every code region, and never reach greedily across lines.
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
_INLINE = re.compile(r"(?<!`)`(?P<code>[^`\n]+)`(?!`)")
_REPL_NAMES = re.compile(
    r"\b(?:context|llm_query|llm_query_batched|FINAL|FINAL_VAR|SHOW_VARS|print|answer)\b"
)
_CALL_WITH_ARGS = re.compile(r"\w\s*\(\s*[^)\s]")
_ASSIGNMENT = re.compile(r"(?<![=!<>:])=(?!=)")
_CODE_SIGNAL = re.compile(r"[(=\[]|^\s*(?:import|from|def|class|for|while|if|with)\b", re.MULTILINE)


def parse_response(text: str) -> ParsedResponse:
    """Split a model response into executable blocks and an outside-code final marker."""
    lines = text.split("\n")
    fenced, data, code_lines = _fenced_blocks(lines)
    if fenced or data:
        outside = "\n".join(line if i not in code_lines else "" for i, line in enumerate(lines))
        prose = re.sub(r"\n{3,}", "\n\n", outside).strip()
        return ParsedResponse(tuple(fenced), find_final(outside), tuple(data), prose)
    raw = _raw_block(text)
    if raw is not None:
        return ParsedResponse((raw,), None, (), "")
    # Inline spans start with a backtick, so they can never hide a line-anchored FINAL.
    return ParsedResponse(tuple(_inline_blocks(text)), find_final(text), (), text.strip())


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


def _raw_block(text: str) -> CodeBlock | None:
    """The whole response as one Python block, if it clearly is code."""
    stripped = text.strip()
    if not stripped:
        return None
    body_lines = [ln for ln in stripped.splitlines() if ln.strip()]
    if all(_FINAL_START.match(ln) for ln in body_lines):
        return None  # only markers: the outside-code form, not code
    if not _CODE_SIGNAL.search(stripped) or not compiles_as_python(stripped):
        return None
    return CodeBlock(stripped, "python", None, "raw", True)


def _inline_blocks(text: str) -> list[CodeBlock]:
    found: list[CodeBlock] = []
    for match in _INLINE.finditer(text):
        code = match.group("code").strip()
        if not _REPL_NAMES.search(code):
            continue
        if not (_CALL_WITH_ARGS.search(code) or _ASSIGNMENT.search(code)):
            continue
        if not compiles_as_python(code):
            continue
        found.append(CodeBlock(code, "python", None, "inline", True))
    return found


def find_final(text: str) -> FinalMarker | None:
    """First line-anchored FINAL(...) / FINAL_VAR(...) in `text` (already stripped of code)."""
    match = _FINAL_START.search(text)
    if match is None:
        return None
    kind = match.group("kind")
    line_no = text.count("\n", 0, match.start())
    rest_start = match.end()
    line_end = text.find("\n", rest_start)
    line_rest = text[rest_start:] if line_end == -1 else text[rest_start:line_end]
    inner = _close_on_line(line_rest)
    if inner is None:
        inner = _close_on_later_line(text, rest_start)
    if kind == "FINAL_VAR":
        name = _unquote(inner.strip())
        return FinalMarker("FINAL_VAR", name, line_no)
    return FinalMarker("FINAL", _unquote(inner.strip()), line_no)


def _close_on_line(rest: str) -> str | None:
    """Argument text when this line closes the call; handles nested parentheses.

    The matching ')' wins when what follows it is balanced prose ("FINAL(42) (checked)");
    otherwise the answer itself holds stray ')' ("FINAL(a) red b) blue)") and the last
    ')' on the line closes the call.
    """
    depth = 1
    for pos, char in enumerate(rest):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                if _balanced(rest[pos + 1 :]):
                    return rest[:pos]
                break
    last = rest.rfind(")")
    return rest[:last] if last != -1 else None


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


def _close_on_later_line(text: str, rest_start: int) -> str:
    """A FINAL( spanning lines ends at the first later line ending in ')' (not the last one)."""
    lines = text[rest_start:].split("\n")
    for i in range(1, len(lines)):
        candidate = lines[i].rstrip()
        if candidate.endswith(")"):
            return "\n".join([*lines[:i], candidate[:-1]])
    # Never closed (cut off by a stop sequence): take what is there.
    return text[rest_start:].rstrip()


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
