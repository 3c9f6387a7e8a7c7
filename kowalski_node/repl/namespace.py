"""The RLM namespace a code block runs in: `context`, sub-call functions and termination helpers.

Kept free of I/O and of the sandbox so that any executor (the subprocess sandbox, a test
double, a future remote REPL) gives model code the same names with the same semantics:

- `context`: the task's data (str, bytes, list or dict, as given);
- `llm_query(prompt, model=None) -> str` and `llm_query_batched(prompts, model=None)
  -> list[str]`: forwarded through a transport. A failed slot yields the string
  ``"Error: <reason>"`` for that slot only (`SUBCALL_ERROR_PREFIX`), so one bad call never
  fails a batch and model code can test `answer.startswith("Error:")`;
- `rlm_query(prompt, model=None) -> str` and `rlm_query_batched(prompts, model=None)`:
  like the reference `rlms` library, a sub-call that is itself an RLM run (its own REPL
  and loop) where the task's `max_depth` allows one more level, else a plain
  `llm_query`. The request travels as a sub-call whose model carries the
  `RECURSIVE_MODEL_PREFIX`, so every executor and the remote REPL protocol pass it on
  unchanged; the RLM machine strips it;
- `FINAL(answer)`, `FINAL_VAR(name)`, and dspy's `SUBMIT(...)`: record the final answer
  (the block keeps running). A missing variable, or an answer that is empty, a
  placeholder ("your final answer here", "...") or the untouched `answer` dict, prints
  why to stderr, with how to answer, and records nothing;
- `SHOW_VARS()`: returns (as rlms does) a one-line str naming user variables and types;
- `answer = {"content": "", "ready": False}`: the reference library's convention; setting
  `ready` to True during a block makes `content` the final answer.

Reserved names are put back after every block, so model code cannot break the loop by
assigning to them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# (prompts, model) -> one (text, error) pair per prompt; exactly one of the two is set.
SubCallTransport = Callable[[list[str], str | None], list[tuple[str | None, str | None]]]

SUBCALL_ERROR_PREFIX = "Error: "
# A sub-call whose model starts with this asks for a child RLM run (rlm_query).
RECURSIVE_MODEL_PREFIX = "rlm_query:"
RESERVED_NAMES = (
    "context",
    "llm_query",
    "llm_query_batched",
    "rlm_query",
    "rlm_query_batched",
    "FINAL",
    "FINAL_VAR",
    "SUBMIT",
    "SHOW_VARS",
    "__builtins__",
)
# Answers a small model copies from instructions instead of computing one.
PLACEHOLDER_ANSWERS = frozenset(
    {
        "", "...", "\u2026", "todo", "tbd", "n/a", "answer", "your answer",
        "final answer", "your final answer", "your final answer here", "your answer here",
        "<answer>", "[answer]", "{answer}", "<your answer>", "variable_name", "your_answer",
        "your_final_answer", "final_answer",
    }
)  # fmt: skip
ANSWER_NAME = "answer"
MAX_LISTED_VARIABLES = 200


def describe(value: Any) -> str:
    """A short, safe type description: never calls user-defined __len__ or __repr__."""
    kind = type(value)
    name = kind.__name__
    if kind is str:
        return f"str ({len(value)} chars)"
    if kind in (bytes, bytearray):
        return f"{name} ({len(value)} bytes)"
    if kind in (list, tuple, dict, set, frozenset):
        return f"{name} ({len(value)} items)"
    if kind.__name__ == "module":
        return "module"
    if callable(value) and kind.__name__ in ("function", "builtin_function_or_method"):
        return "function"
    if isinstance(value, type):
        return "class"
    shape = getattr(value, "shape", None) if kind.__module__.startswith("numpy") else None
    if isinstance(shape, tuple):
        return f"{kind.__module__.split('.')[0]}.{name} shape={shape}"
    return name if kind.__module__ == "builtins" else f"{kind.__module__}.{name}"


def refusal_reason(value: Any) -> str | None:
    """Why `value` cannot be a final answer (None when it can).

    A 0.5B model ends tasks with FINAL(answer) on the untouched `answer` dict, an empty
    string, or a placeholder copied from the prompt. Refusing those, with a message
    that says how to answer, keeps the loop going instead of committing nonsense.
    """
    if type(value) is dict and set(value) <= {"content", "ready"} and "content" in value:
        content = value.get("content")
        if content in ("", None):
            return (
                "that is the `answer` dict with no content yet. Put the answer in it first "
                '(answer["content"] = result; answer["ready"] = True), or call FINAL(result) '
                "with the computed value"
            )
        return None
    if value is None:
        return (
            "None is not an answer (a lookup that found nothing?). Check the value in code, "
            "then call FINAL(value) with what you found"
        )
    text = final_text(value).strip()
    if text.lower().strip(" .\"'`") in PLACEHOLDER_ANSWERS:
        shown = repr(text) if text else "an empty value"
        return (
            f"{shown} is not an answer. Compute the answer in code, print it, then call "
            'FINAL(value) with that value or FINAL_VAR("variable_name") naming its variable'
        )
    return None


def final_text(value: Any) -> str:
    """The string form of a final answer (bytes are decoded, not repr'd)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


@dataclass
class BlockOutcome:
    """What the namespace noticed about one finished block."""

    final_answer: str | None = None
    restored: list[str] = field(default_factory=list)


class ReplNamespace:
    """One session's globals plus the bookkeeping around each block."""

    def __init__(self, context: Any, transport: SubCallTransport) -> None:
        self._transport = transport
        self._final: str | None = None
        self._answer_snapshot: tuple[int, Any, Any] | None = None
        self._reserved: dict[str, Any] = {
            "context": context,
            "llm_query": self.llm_query,
            "llm_query_batched": self.llm_query_batched,
            "rlm_query": self.rlm_query,
            "rlm_query_batched": self.rlm_query_batched,
            "FINAL": self.final,
            "FINAL_VAR": self.final_var,
            "SUBMIT": self.submit,
            "SHOW_VARS": self.show_vars,
            "__builtins__": __builtins__,
        }
        self.globals: dict[str, Any] = dict(self._reserved)
        self.globals["__name__"] = "__main__"
        self.globals[ANSWER_NAME] = {"content": "", "ready": False}

    # ------------------------------------------------------------------ model-facing API

    def llm_query(self, prompt: Any, model: str | None = None) -> str:
        """Ask a sub-model one question; returns its text or "Error: ..." on failure."""
        return self._ask([prompt], model)[0]

    def llm_query_batched(self, prompts: Any, model: str | None = None) -> list[str]:
        """Ask many questions concurrently; a failed slot is "Error: ..." and fails only itself."""
        items = _prompt_list(prompts, "llm_query_batched", "llm_query")
        return self._ask(items, model) if items else []

    def rlm_query(self, prompt: Any, model: str | None = None) -> str:
        """A child RLM run on `prompt` where depth allows, else a plain llm_query (as rlms)."""
        return self._ask([prompt], _recursive(model))[0]

    def rlm_query_batched(self, prompts: Any, model: str | None = None) -> list[str]:
        """One child RLM run per prompt (concurrent); a plain llm_query_batched at max depth."""
        items = _prompt_list(prompts, "rlm_query_batched", "rlm_query")
        return self._ask(items, _recursive(model)) if items else []

    def final(self, answer: Any) -> None:
        """Record `answer` as the task's final answer (refused: empty, placeholder, bare dict)."""
        self._record_final(answer, "FINAL")

    def submit(self, *args: Any, **fields: Any) -> None:
        """dspy.RLM's SUBMIT: one value, or named output fields (answer=... wins)."""
        if args and fields:
            self._refuse("SUBMIT", "pass one value, or output fields by name, not both")
            return
        if len(args) == 1:
            self._record_final(args[0], "SUBMIT")
        elif args:
            self._record_final(list(args), "SUBMIT")
        elif "answer" in fields or len(fields) == 1:
            self._record_final(fields.get("answer", next(iter(fields.values()))), "SUBMIT")
        elif fields:
            self._record_final(dict(fields), "SUBMIT")
        else:
            self._refuse("SUBMIT", "it needs the answer, e.g. SUBMIT(answer=result)")

    def final_var(self, name: Any) -> None:
        """Record the variable called `name` as the final answer; a missing name is reported."""
        if not isinstance(name, str):
            # The model passed the value itself; it cannot be a name, so take it as the answer.
            self._record_final(name, "FINAL_VAR")
            return
        key = name.strip().strip("\"'")
        if key in self.globals and key not in RESERVED_NAMES[1:]:
            self._record_final(self.globals[key], f"FINAL_VAR({key!r})")
            return
        known = ", ".join(sorted(self.user_variables())) or "none"
        print(
            f"Error: FINAL_VAR({name!r}): no variable named {key!r} exists. "
            f"Defined variables: {known}. Assign the answer to a variable first, "
            f"or call FINAL(value).",
            file=sys.stderr,
        )

    def show_vars(self) -> str:
        """User variables and their types, as one str (rlms returns it; it prints nothing)."""
        variables = self.user_variables()
        if not variables:
            return "No variables created yet. Assign results to variables in a ```repl block."
        listed = ", ".join(f"{name} ({kind})" for name, kind in variables.items())
        return f"Available variables: {listed}"

    # ------------------------------------------------------------------ executor-facing API

    @property
    def context(self) -> Any:
        return self._reserved["context"]

    def begin_block(self) -> None:
        """Call before running a block: resets FINAL and snapshots `answer`."""
        self._final = None
        self._answer_snapshot = self._answer_state()

    def end_block(self) -> BlockOutcome:
        """Call after a block (even a failed one): restores reserved names, finds the answer."""
        outcome = BlockOutcome()
        for name, original in self._reserved.items():
            if self.globals.get(name, _MISSING) is not original:
                self.globals[name] = original
                outcome.restored.append(name)
        if self._final is not None:
            outcome.final_answer = self._final
        else:
            after = self._answer_state()
            if after is not None and after[2] and after != self._answer_snapshot:
                reason = refusal_reason(after[1])
                if reason is None:
                    outcome.final_answer = final_text(after[1])
                else:
                    self._refuse('answer["ready"] = True', reason)
        self._final = None
        return outcome

    def user_variables(self) -> dict[str, str]:
        """User-defined names mapped to short type descriptions (reserved and dunder names left out)."""
        out: dict[str, str] = {}
        for name, value in list(self.globals.items()):
            if name in self._reserved or name.startswith("__"):
                continue
            if len(out) >= MAX_LISTED_VARIABLES:
                out["..."] = f"{len(self.globals) - len(out)} more"
                break
            out[name] = describe(value)
        return out

    # ------------------------------------------------------------------ internals

    def _record_final(self, value: Any, how: str) -> None:
        reason = refusal_reason(value)
        if reason is not None:
            self._refuse(how, reason)
            return
        self._final = final_text(value)

    @staticmethod
    def _refuse(how: str, reason: str) -> None:
        print(f"Error: {how} was refused: {reason}.", file=sys.stderr)

    def _answer_state(self) -> tuple[int, Any, Any] | None:
        answer = self.globals.get(ANSWER_NAME)
        if type(answer) is not dict:
            return None
        ready = answer.get("ready")
        is_ready = isinstance(ready, (bool, int)) and ready == True  # noqa: E712 (1 counts)
        return (id(answer), answer.get("content"), is_ready)

    def _ask(self, prompts: list[Any], model: Any) -> list[str]:
        if model is not None and not isinstance(model, str):
            raise TypeError(f"model must be a string or None, got {type(model).__name__}")
        texts = [p if isinstance(p, str) else final_text(p) for p in prompts]
        results = self._transport(texts, model)
        out: list[str] = []
        for slot in range(len(texts)):
            text, error = results[slot] if slot < len(results) else (None, "no answer")
            out.append(
                text if error is None and text is not None else f"{SUBCALL_ERROR_PREFIX}{error}"
            )
        return out


def _recursive(model: Any) -> Any:
    """The model field of an rlm_query sub-call: the prefix plus the named model, if any."""
    if model is not None and not isinstance(model, str):
        return model  # _ask reports the type error
    return RECURSIVE_MODEL_PREFIX + (model or "")


def _prompt_list(prompts: Any, name: str, single: str) -> list[Any]:
    if isinstance(prompts, (str, bytes)):
        raise TypeError(
            f"{name} expects a list of prompts, not a single string; "
            f"use {single}(prompt) for one prompt"
        )
    try:
        return list(prompts)
    except TypeError:
        raise TypeError(f"{name} expects a list of prompts, got {type(prompts).__name__}") from None


_MISSING = object()
