"""The contract between the RLM runner and whatever executes code blocks.

A *session* is one task's persistent namespace. Sub-model calls made by code
(`llm_query`, `llm_query_batched`) are forwarded to the caller through a
`SubCallHandler`, so the sandbox never holds model clients or network access.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

ErrorKind = Literal[
    "exception",  # the code raised; traceback in `error`
    "syntax",  # the code did not compile
    "timeout",  # wall or CPU limit hit
    "memory",  # address-space limit hit
    "killed",  # worker died (signal, fork bomb, ...)
    "unsupported_language",  # this node cannot run the block's language
    "sandbox",  # the sandbox itself failed
    "duplicate",  # not run: the same code already ran in this task (RLM loop)
]


@dataclass(frozen=True)
class SubCallResult:
    """One slot of a batched sub-call: either `text` or `error` is set."""

    text: str | None = None
    error: str | None = None


# (prompts, model) -> one result per prompt, in order. A failing slot does not fail the batch.
SubCallHandler = Callable[[list[str], str | None], Awaitable[list[SubCallResult]]]


@dataclass(frozen=True)
class ExecRequest:
    session_id: str
    code: str
    language: str = "python"
    timeout_s: float = 10.0


@dataclass
class ExecResult:
    stdout: str = ""
    stderr: str = ""
    error: str | None = None
    error_kind: ErrorKind | None = None
    exec_ms: float = 0.0
    # Termination signalled from inside code: FINAL(x), FINAL_VAR(name) or answer["ready"].
    final_answer: str | None = None
    # Names defined in the session after the block, mapped to a short type description.
    variables: dict[str, str] = field(default_factory=dict)
    sub_calls: int = 0
    # The session's worker had been replaced and its namespace was rebuilt (by replaying
    # earlier blocks) before this block ran.
    namespace_rebuilt: bool = False
    # Sandbox remarks about this block (restored reserved names, worker replaced, ...).
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None


@runtime_checkable
class ReplExecutor(Protocol):
    """Runs code blocks in per-session namespaces."""

    languages: tuple[str, ...]

    async def open_session(self, session_id: str, context: Any) -> None:
        """Create a namespace holding `context`; idempotent for an existing session."""
        ...

    async def execute(self, request: ExecRequest, sub_calls: SubCallHandler) -> ExecResult:
        """Run one block; never raises for faults of the code itself."""
        ...

    async def close_session(self, session_id: str) -> None:
        """Drop the namespace and its worker state."""
        ...

    async def aclose(self) -> None:
        """Stop every worker; no process may be left behind."""
        ...
