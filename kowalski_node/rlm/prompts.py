"""What the root model is told: the system prompt, context metadata and per-turn feedback.

The context itself never enters a prompt: the model sees only its type, size and
how it is chunked, and reads it through code in the REPL. That is the point of
an RLM: a context far larger than the model's window stays usable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

_MAX_LISTED_CHUNKS = 20

SYSTEM_PROMPT = """\
You are tasked with answering a query about a context that is too large to read at once. \
You can examine it by writing Python code that runs in a persistent REPL. Work in small steps \
and look at the output of each step before deciding the next.

The REPL gives you:
1. `context`: a variable holding the full context ({context_type}). Look at parts of it \
with code (slicing, len, splitting, searching); never try to print all of it.
2. `llm_query(prompt, model=None) -> str`: ask a sub-model one question. It sees only the \
prompt you pass, so include the text it must read (for example one chunk of `context`). \
It can read roughly {sub_chars} characters per call.
3. `llm_query_batched(prompts, model=None) -> list[str]`: ask many questions at once; they \
run concurrently, so this is much faster than a loop of `llm_query`. A failed slot returns \
a string starting with "Error:" and does not fail the others.
4. `print(...)`: your only way to see results. Printed output longer than {max_output} \
characters is truncated, so print summaries, not whole chunks.
5. `SHOW_VARS()`: list the variables you have defined.
6. `FINAL(answer)` and `FINAL_VAR(variable_name)`: end the task (see below).

Variables persist between blocks. To run code, write it in a fenced block tagged repl:
```repl
chunk = context[:2000]
print(len(context), chunk[:300])
```
A typical plan: inspect the context's structure, split it into chunks, use \
`llm_query_batched` to extract what the query needs from every chunk into variables, \
then combine those results (with code or one more `llm_query`).

When you have the answer, end with one of these on its own line, outside any code block:
FINAL(your final answer here)
FINAL_VAR(variable_name)
FINAL_VAR returns the value of a variable you created in the REPL. You may also call \
FINAL(...) or FINAL_VAR("name") inside a repl block. Do not give a final answer before you \
have examined the context: answer only from what your code found."""

NO_CODE_NUDGE = (
    "Your last message had no code block and no final answer. Write a ```repl block to "
    "examine `context`, or end with FINAL(answer) / FINAL_VAR(variable_name) on its own line."
)


def system_prompt(context_meta: Mapping[str, Any], *, max_output_chars: int, sub_chars: int) -> str:
    return SYSTEM_PROMPT.format(
        context_type=context_meta.get("type", "unknown"),
        sub_chars=f"{sub_chars:,}",
        max_output=f"{max_output_chars:,}",
    )


def context_metadata(context: object) -> dict[str, Any]:
    """Type, total size and chunk sizes of `context`: never its content."""
    meta: dict[str, Any] = {"type": type(context).__name__}
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


def first_user_message(prompt: str, meta: Mapping[str, Any]) -> str:
    if meta.get("type") == "NoneType":
        return (
            f"{describe_context(meta)}\n\n"
            f"Query: {prompt}\n\n"
            "Answer with FINAL(your answer) on its own line. Write a ```repl block first "
            "only if you need to compute something."
        )
    return (
        f"{describe_context(meta)}\n\n"
        f"Query: {prompt}\n\n"
        "You have not seen the context yet. Start by examining it with a ```repl block; "
        "do not answer yet."
    )


def turn_header(iteration: int, max_iterations: int) -> str:
    return f"[iteration {iteration}/{max_iterations}]"


def continue_message(iteration: int, max_iterations: int) -> str:
    left = max_iterations - iteration
    return (
        f"{left} iteration(s) left. Continue with another ```repl block, or end with "
        "FINAL(answer) / FINAL_VAR(variable_name) on its own line."
    )


LIMIT_TEXT: dict[str, str] = {
    "max_iterations": "the maximum number of iterations",
    "time_budget": "the time budget",
    "token_budget": "the token budget",
    "max_errors": "too many consecutive failing code blocks",
    "cancelled": "a cancellation request",
}


def final_ask_message(limit: str) -> str:
    reason = LIMIT_TEXT.get(limit, limit)
    return (
        f"The task has stopped because of {reason}. Do not explore further. Give your best "
        "final answer now from what you have found, as FINAL(answer) or "
        "FINAL_VAR(variable_name) on its own line."
    )


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
