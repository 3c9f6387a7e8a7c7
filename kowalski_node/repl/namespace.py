"""The RLM namespace a code block runs in: `context`, sub-call functions and termination helpers.

Kept free of I/O and of the sandbox so that any executor (the subprocess sandbox, a test
double, a future remote REPL) gives model code the same names with the same semantics:

- `context`: the task's data (str, bytes, list or dict, as given);
- `llm_query(prompt, model=None) -> str` and `llm_query_batched(prompts, model=None)
  -> list[str]`: forwarded through a transport. A failed slot yields the string
  ``"Error: <reason>"`` for that slot only (`SUBCALL_ERROR_PREFIX`), so one bad call never
  fails a batch and model code can test `answer.startswith("Error:")`;
- `FINAL(answer)`, `FINAL_VAR(name)`: record the final answer (the block keeps running);
  a missing variable prints an error to stderr and records nothing;
- `SHOW_VARS()`: prints user variables and their types;
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
RESERVED_NAMES = (
    "context",
    "llm_query",
    "llm_query_batched",
    "FINAL",
    "FINAL_VAR",
    "SHOW_VARS",
    "__builtins__",
)
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
            "FINAL": self.final,
            "FINAL_VAR": self.final_var,
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
        if isinstance(prompts, (str, bytes)):
            raise TypeError(
                "llm_query_batched expects a list of prompts, not a single string; "
                "use llm_query(prompt) for one prompt"
            )
        try:
            items = list(prompts)
        except TypeError:
            raise TypeError(
                f"llm_query_batched expects a list of prompts, got {type(prompts).__name__}"
            ) from None
        return self._ask(items, model) if items else []

    def final(self, answer: Any) -> None:
        """Record `answer` as the task's final answer."""
        self._final = final_text(answer)

    def final_var(self, name: Any) -> None:
        """Record the variable called `name` as the final answer; a missing name is reported."""
        if not isinstance(name, str):
            # The model passed the value itself; it cannot be a name, so take it as the answer.
            self._final = final_text(name)
            return
        key = name.strip().strip("\"'")
        if key in self.globals and key not in RESERVED_NAMES[1:]:
            self._final = final_text(self.globals[key])
            return
        known = ", ".join(sorted(self.user_variables())) or "none"
        print(
            f"Error: FINAL_VAR({name!r}): no variable named {key!r} exists. "
            f"Defined variables: {known}. Assign the answer to a variable first, "
            f"or call FINAL(value).",
            file=sys.stderr,
        )

    def show_vars(self) -> None:
        """Print user variables and their types."""
        variables = self.user_variables()
        if not variables:
            print("No user variables defined yet.")
            return
        width = max(len(n) for n in variables)
        for name, kind in variables.items():
            print(f"{name:<{width}}  {kind}")

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
                outcome.final_answer = final_text(after[1])
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


_MISSING = object()
