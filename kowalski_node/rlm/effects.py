"""Effects the pure RLM machine asks its driver to carry out.

The machine never does I/O. Each method returns a list of these; the driver
(the trio runner, the mesh runtime, a test, the simulator) performs them and
reports back with the matching `call_id`. Results for a call id the machine no
longer waits for (aborted, superseded) are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from kowalski_node.llm.base import LlmRequest
from kowalski_node.rlm.types import ExecutionResult, ProgressEvent, SubCallRecord


@dataclass(frozen=True)
class NeedLlm:
    """Call the root model; answer with `on_llm_response` or `on_llm_error`."""

    call_id: int
    request: LlmRequest
    timeout_s: float | None = None
    """Set for the final-answer turn: the grace period once the time budget ran out, else
    what is left of the budget (at least the grace period). The runner keeps the text that
    arrived in time if the bound cuts the answer short."""


@dataclass(frozen=True)
class NeedExec:
    """Run one code block in the task's REPL session; answer with `on_exec_result`.

    purpose "block" is model code; "resolve" looks up a FINAL_VAR written outside code.
    While a "block" runs, its `llm_query` calls go through `on_sub_calls`.
    """

    call_id: int
    block_index: int
    code: str
    language: str
    timeout_s: float
    purpose: Literal["block", "resolve"] = "block"
    rebuild: bool = False
    """Set when the previous attempt failed for an infrastructure reason: open a fresh REPL
    session and replay the recorded blocks into it before running this one."""
    attempt: int = 0
    """Infrastructure retries before this one (0 on the first try)."""


@dataclass(frozen=True)
class NeedSubCalls:
    """Run the sub-calls of one `llm_query`/`llm_query_batched`; answer with `on_sub_results`.

    `answered[i]` is set where the machine already knows slot i's outcome (refused
    for budget, or recorded before a failover); the driver runs only the empty slots.
    `recursive` asks for a child RLM run per slot instead of a plain model call.
    """

    call_id: int
    requests: tuple[LlmRequest, ...]
    answered: tuple[SubCallRecord | None, ...]
    recursive: bool
    depth: int
    """Depth of the child runs when `recursive` (this machine's depth + 1)."""


@dataclass(frozen=True)
class Abort:
    """Stop the in-flight call `call_id`; its result, if it still comes, is ignored."""

    call_id: int
    reason: str


@dataclass(frozen=True)
class Progress:
    event: ProgressEvent


@dataclass(frozen=True)
class Trace:
    """One trajectory record (plain data) to append to the task's JSONL file."""

    record: dict[str, Any]


@dataclass(frozen=True)
class Final:
    result: ExecutionResult


Effect = NeedLlm | NeedExec | NeedSubCalls | Abort | Progress | Trace | Final


@dataclass(frozen=True)
class SubCallOutcome:
    """What the driver reports for one sub-call slot."""

    text: str | None = None
    error: str | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    latency_ms: float = 0.0
