"""What the root model is told: the system prompt, context metadata and per-turn feedback.

The context itself never enters a prompt: the model sees only its type, size and
how it is chunked, and reads it through code in the REPL. That is the point of
an RLM: a context far larger than the model's window stays usable.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

_MAX_LISTED_CHUNKS = 20

# Kept short and concrete: a 0.5B code model copies what it sees. The one code example
# computes on toy data, so a copy answers no real question (a `chunk = context[:2000]`
# example was copied verbatim turn after turn), and `FINAL(...)` placeholders that a
# model might copy are refused by the loop.
SYSTEM_PROMPT = """\
You answer a query about a context that is too large to read at once. The context is \
stored in a Python REPL as the variable `context` ({context_type}); you are shown only \
its size and a short preview. Write Python code that reads `context` and computes the \
answer. Each ```repl block you write is run, and you see what it printed.

The REPL has:
- `context`: the data ({context_type}).
- `print(...)`: the only way to see a value. Output longer than {max_output} characters \
is cut.
- `llm_query(prompt) -> str`: ask a sub-model about text you include in the prompt (up to \
about {sub_chars} characters). `llm_query_batched(prompts) -> list[str]` asks many at once.
- `rlm_query(prompt)` / `rlm_query_batched(prompts)`: like llm_query, but the sub-model \
gets its own REPL when recursion is enabled.
- `SHOW_VARS() -> str`: the variables you have defined.
Variables persist between blocks.

Write code in a fenced block tagged repl. This example only shows the form:
```repl
prices = {{"tea": 3.5, "cake": 4.0, "jam": 2.25}}
cheapest = min(prices, key=prices.get)
print(cheapest, prices[cheapest])
```
For exact facts (counts, totals, largest, lookups) compute them with code: split lines, \
match text, convert numbers. Use llm_query only where meaning has to be judged.

When you know the answer, write it on its own line, outside code:
FINAL(the answer itself)
or FINAL_VAR(variable_name) to answer with the value of a variable you created. Give \
only answers that your code found in `context`."""

# Whole tasks, very short, on data unlike any real context: they show the rhythm
# (look, compute, answer) without a block that a copy could pass off as progress.
WORKED_EXAMPLES = (
    """\
Query: How many lines of the poem mention the moon?
```repl
lines = context.splitlines()
print(len(lines), lines[:2])
```
Output: 14 ['Silver light on the lake,', 'the moon climbs slow.']
```repl
moon = [ln for ln in lines if "moon" in ln]
print(len(moon))
```
Output: 3
FINAL(3)""",
    """\
Query: Which planet in the table has the most moons?
```repl
rows = [ln.split(",") for ln in context.strip().splitlines()]
print(rows[0], rows[1])
```
Output: ['planet', 'moons'] ['Mars', '2']
```repl
best = max(rows[1:], key=lambda r: int(r[1]))
print(best)
```
Output: ['Saturn', '146']
FINAL(Saturn)""",
    """\
Query: What is the secret word in the letters?
```repl
import re
found = re.findall(r"secret word is (\\w+)", context)
print(found)
```
Output: ['marigold']
FINAL(marigold)""",
)

NO_CODE_NUDGE = (
    "Your last message had no code block and no final answer. Write a ```repl block that "
    "computes the answer from `context`, or end with FINAL(answer) on its own line."
)


def system_prompt(
    context_meta: Mapping[str, Any],
    *,
    max_output_chars: int,
    sub_chars: int,
    template: str | None = None,
    worked_examples: int = 0,
) -> str:
    """The root model's system prompt: the built-in one, or a custom `template`.

    A custom template may use {context_type}, {max_output} and {sub_chars}; other
    braces are left as they are (custom prompts often hold code).
    """
    values = {
        "context_type": str(context_meta.get("type", "unknown")),
        "sub_chars": f"{sub_chars:,}",
        "max_output": f"{max_output_chars:,}",
    }
    if template is None:
        text = SYSTEM_PROMPT.format(**values)
    else:
        text = template
        for key, value in values.items():
            text = text.replace("{" + key + "}", value)
    examples = WORKED_EXAMPLES[: max(0, worked_examples)]
    if examples:
        shown = "\n\n".join(f"Example {i}:\n{ex}" for i, ex in enumerate(examples, start=1))
        text += (
            "\n\nWorked examples (other data, other queries; do not reuse their code as it "
            f"is):\n\n{shown}"
        )
    return text


def context_metadata(context: object, *, preview_chars: int = 0) -> dict[str, Any]:
    """Type, total size and chunk sizes of `context`, plus its first `preview_chars`
    characters: a small model that sees how the data looks writes code for it."""
    meta: dict[str, Any] = {"type": type(context).__name__}
    if preview_chars > 0 and context is not None:
        meta["preview"] = _preview(context, preview_chars)
    if context is None:  # a task without context: nothing to examine
        meta.update(total_length=0, unit="characters", chunks=None)
    elif isinstance(context, str):
        meta.update(total_length=len(context), unit="characters", lines=context.count("\n") + 1)
        meta["chunks"] = None
    elif isinstance(context, (bytes, bytearray, memoryview)):
        meta.update(total_length=len(bytes(context)), unit="bytes", chunks=None)
    elif isinstance(context, Mapping):
        sizes = [_size(k) + _size(v) for k, v in context.items()]
        meta.update(total_length=sum(sizes), unit="characters", keys=len(sizes))
        meta["chunks"] = _chunk_summary(sizes)
    elif isinstance(context, Sequence):
        sizes = [_size(item) for item in context]
        meta.update(total_length=sum(sizes), unit="characters", items=len(sizes))
        meta["chunks"] = _chunk_summary(sizes)
    else:
        meta.update(total_length=len(str(context)), unit="characters", chunks=None)
    return meta


def _preview(context: object, limit: int) -> str:
    if isinstance(context, str):
        text = context[: limit + 1]
    elif isinstance(context, (bytes, bytearray, memoryview)):
        text = bytes(context[: limit + 1]).decode("utf-8", errors="replace")
    elif isinstance(context, (Mapping, list, tuple)):
        text = repr(_head(context, limit))
    else:
        text = str(context)[: limit + 1]
    return text[:limit]


def _head(value: object, limit: int) -> object:
    """The first items of a list or dict: enough for a preview without repr'ing all of it."""
    if isinstance(value, Mapping):
        out: dict[Any, Any] = {}
        for key, item in value.items():
            out[key] = _head(item, limit) if isinstance(item, (Mapping, list, tuple)) else item
            if len(repr(out)) > limit:
                break
        return out
    if isinstance(value, (list, tuple)):
        items: list[Any] = []
        for item in value:
            items.append(_head(item, limit) if isinstance(item, (Mapping, list, tuple)) else item)
            if len(repr(items)) > limit:
                break
        return items
    return value


def _size(value: object) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, Mapping):
        return sum(_size(k) + _size(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(_size(v) for v in value)
    return len(str(value))


def _chunk_summary(sizes: list[int]) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "count": len(sizes),
        "lengths": sizes[:_MAX_LISTED_CHUNKS],
        "lengths_truncated": len(sizes) > _MAX_LISTED_CHUNKS,
    }
    if sizes:
        summary.update(min=min(sizes), max=max(sizes), mean=round(sum(sizes) / len(sizes), 1))
    return summary


def describe_context(meta: Mapping[str, Any]) -> str:
    """One readable paragraph of context metadata for the first user message."""
    kind = meta.get("type", "unknown")
    if kind == "NoneType":
        return "There is no context for this query (`context` is None)."
    total = meta.get("total_length", 0)
    unit = meta.get("unit", "characters")
    text = f"Your context is a {kind} with {total:,} total {unit}."
    if kind == "str" and "lines" in meta:
        text += f" It has {meta['lines']:,} lines."
    chunks = meta.get("chunks")
    if chunks:
        what = "keys (key + value)" if "keys" in meta else "items"
        lengths = ", ".join(str(n) for n in chunks["lengths"])
        more = ", ..." if chunks["lengths_truncated"] else ""
        text += f" It is split into {chunks['count']:,} {what} with lengths [{lengths}{more}]"
        if chunks["count"]:
            text += f" (min {chunks['min']:,}, max {chunks['max']:,}, mean {chunks['mean']:,})"
        text += "."
    return text


def describe_preview(meta: Mapping[str, Any]) -> str:
    preview = meta.get("preview")
    if not preview:
        return ""
    total = int(meta.get("total_length") or 0)
    more = " (the rest is not shown)" if total > len(str(preview)) else ""
    return f"The context begins{more}:\n<<<\n{preview}\n>>>\n\n"


def first_user_message(prompt: str, meta: Mapping[str, Any]) -> str:
    if meta.get("type") == "NoneType":
        return (
            f"{describe_context(meta)}\n\n"
            f"Query: {prompt}\n\n"
            "Answer with FINAL(your answer) on its own line. Write a ```repl block first "
            "only if you need to compute something."
        )
    return (
        f"{describe_context(meta)}\n\n{describe_preview(meta)}"
        f"Query: {prompt}\n\n"
        "You have not run any code yet. Write a ```repl block that computes the answer "
        "from `context`; do not answer before your code has run."
    )


def turn_header(iteration: int, max_iterations: int) -> str:
    return f"[iteration {iteration}/{max_iterations}]"


def continue_message(iteration: int, max_iterations: int, query: str = "") -> str:
    """After block outputs: the query again (small models lose it), then what to do."""
    left = max_iterations - iteration
    reminder = f"Query: {query}\n" if query else ""
    return (
        f"{reminder}{left} iteration(s) left. If the output above answers the query, reply "
        "FINAL(answer) on its own line; otherwise write the next ```repl block."
    )


NOT_READ_YET = (
    "no code has read `context` yet, so this answer cannot come from it. Write a ```repl "
    "block that computes the answer from `context` and prints it first"
)

_STOP_WORDS = (
    "a an and are as at be by can did do does for from had has have how in is it its many "
    "much of on or that the their there these this to was were what when where which who "
    "whom whose why with write wrote written line lines value values number numbers total "
    "find give tell list show count context data text query answer"
)
_NOT_SEARCH_WORDS = frozenset(_STOP_WORDS.split())


def search_word(query: str) -> str:
    """A word of the query worth searching `context` for: the longest one that is not a
    stop word ("word" when there is none). Small models copy the example they are given,
    so the example should search for something that matters to this query."""
    words = [w.lower() for w in re.findall(r"[A-Za-z][A-Za-z0-9_-]{2,}", query)]
    useful = [w for w in words if w not in _NOT_SEARCH_WORDS]
    return max(useful, key=len) if useful else "word"


def context_unread(query: str) -> str:
    """Shown after a block that never read `context` (a 0.5B model "answers" by assigning
    a made-up literal and printing it)."""
    word = search_word(query)
    return (
        "\nNote: no code has read `context` yet, so this output says nothing about the data. "
        "The answer is in `context`: search it, e.g. "
        f'[ln for ln in context.splitlines() if "{word}" in ln.lower()].'
    )


EMPTY_RESULT = (
    "\nNote: this looks empty: the filter or search may have matched nothing. Print a few "
    "lines of `context` (e.g. print(context.splitlines()[:3])) to see their exact format, "
    "then fix the code."
)


def duplicate_block(
    index: int, original: int, output: str = "", *, read_context: bool = True, query: str = ""
) -> str:
    """The nudge for a repeated block. When the earlier run read `context` and printed one
    short line, that line is likely what the model wanted: it is shown inside a ready
    FINAL(...). A repeated block that never read `context` gets a search to try instead
    (its output, often a made-up literal, is no answer)."""
    text = (
        f"Block {index + 1} was not run: it is the same code as block {original + 1}, which "
        "already ran. Running it again shows nothing new."
    )
    if not read_context:
        return text + context_unread(query)
    lines = [ln.strip() for ln in output.strip().splitlines() if ln.strip()]
    if len(lines) == 1 and len(lines[0]) <= 80:
        return (
            f"{text} Its output was: {lines[0]}\nIf that answers the query, reply "
            f"FINAL({lines[0]}). Otherwise write different code."
        )
    return (
        f"{text} Write different code that gets closer to the answer, or answer with FINAL(answer)."
    )


def final_refused(form: str, reason: str) -> str:
    return f"{form} was refused: {reason}."


LIMIT_TEXT: dict[str, str] = {
    "max_iterations": "the maximum number of iterations",
    "time_budget": "the time budget",
    "token_budget": "the token budget",
    "max_errors": "too many consecutive failing code blocks",
    "cancelled": "a cancellation request",
    "stalled": "repeated blocks with nothing new to run",
}


def final_ask_message(limit: str) -> str:
    reason = LIMIT_TEXT.get(limit, limit)
    return (
        f"The task has stopped because of {reason}. Do not explore further. Give your best "
        "final answer now from what you have found, as FINAL(answer) or "
        "FINAL_VAR(variable_name) on its own line."
    )


EXTRACT_SYSTEM = (
    "You state the answer to a query from what a program printed. Reply with the answer only."
)


def extract_message(query: str, outputs: Sequence[str], reply: str) -> str:
    """The short "value only" request made when the final ask gave no usable marker."""
    shown = "\n\n".join(o for o in outputs if o.strip()) or "(no output)"
    text = f"Query: {query}\n\nWhat the code printed last:\n{shown}\n"
    if reply.strip():
        text += f"\nThe analyst's last note:\n{reply.strip()}\n"
    return (
        text + "\nThe code above was written to answer the query. What is the answer? Reply "
        "with the value only (a number, a name or a short phrase), with no explanation."
    )


def strip_echo(text: str, *instructions: str) -> str:
    """`text` without the sentences it copied from our own instructions.

    A small model asked for a final answer sometimes repeats the request itself; that
    must never become the task's answer.
    """
    out = text
    for instruction in instructions:
        for sentence in re.split(r"(?<=[.!?])\s+|\n+", instruction):
            sentence = sentence.strip().rstrip(".!?")
            if len(sentence) >= 16 and sentence in out:
                out = out.replace(sentence, " ")
    return out.strip() if re.search(r"\w", out) else ""


def final_var_missing(name: str, variables: Mapping[str, str], detail: str | None) -> str:
    listed = ", ".join(sorted(variables)) if variables else "none reported"
    text = f"FINAL_VAR({name}) failed: there is no variable named {name!r} in the REPL."
    if detail:
        text += f" ({detail.strip().splitlines()[-1] if detail.strip() else detail})"
    return text + f" Defined variables: {listed}. Create it first, or use FINAL(answer)."


def truncate(text: str, limit: int) -> str:
    """Keep the head and the tail: errors and totals usually sit at the end."""
    if len(text) <= limit:
        return text
    head = (limit * 2) // 3
    tail = limit - head
    cut = len(text) - head - tail
    return f"{text[:head]}\n... [{cut:,} characters truncated] ...\n{text[len(text) - tail :]}"
