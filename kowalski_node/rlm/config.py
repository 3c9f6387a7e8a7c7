"""Limits and knobs of one RLM task.

Plain data only (numbers, strings, tuples), so the config travels inside the
machine snapshot and a task resumed on another node keeps its own limits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from kowalski_node.errors import ConfigError


@dataclass(frozen=True)
class RlmConfig:
    """Everything that shapes one RLM run; defaults suit a small local model."""

    # --- loop limits (enforced by the pure machine) ---
    max_iterations: int = 20
    """Root-model turns before the model is asked once for a final answer."""
    max_depth: int = 1
    """1 = `llm_query` is a plain model call; 2+ = sub-calls are RLM runs themselves."""
    block_timeout_s: float = 30.0
    """Wall-clock limit for one code block, passed on to the REPL executor."""
    time_budget_s: float | None = 600.0
    """Whole-task wall-clock budget; None = unlimited."""
    token_budget: int | None = None
    """Tokens in + out over root and sub calls; None = unlimited."""
    max_errors: int = 5
    """Consecutive failing code blocks before the run is wound up."""
    answer_after_code: bool = False
    """Refuse a FINAL written before any code has read `context` (on for the embedded
    small models: a 0.5B model answered a CSV sum with FINAL(1000) on its first turn)."""
    code_prefill: bool = False
    """While no block has read `context`, the root model's reply starts with an open ```repl
    fence that the model continues (only for backends that continue a trailing assistant
    message, like llama.cpp). On the dev set a 0.5B model answered FINAL(guess) before any
    code on 3 of 5 items, then echoed the refusal turn after turn."""
    max_repeats: int = 2
    """Repeated blocks in a row (code that already ran) after which the run stops asking
    the model and extracts the answer from the block outputs (stop_reason "stalled")."""
    max_output_chars: int = 20_000
    """Printed output of one block is cut to this many characters before the model sees it
    (20,000, as in the reference `rlms` library)."""
    sub_context_chars: int = 8000
    """Roughly how much text one sub-call can read; told to the model so it sizes chunks."""
    infra_retries: int = 2
    """A block that failed for an infrastructure reason (REPL session lost, sandbox worker
    or peer gone) runs again this many times in a fresh session rebuilt by replay, before
    the run fails; such a failure is never shown to the model as its own error."""
    final_grace_s: float = 30.0
    """The one final-answer turn after a limit: its blocks' timeout, and the bound on its
    model call when the time budget (or a graceful cancel) is what ended the run."""

    # --- what the root model is told (used by the machine) ---
    system_prompt: str | None = None
    """A custom system prompt (rlms' `custom_system_prompt`); None = the built-in one. It
    may use {context_type}, {max_output} and {sub_chars}."""
    worked_examples: int = 3
    """How many short worked examples (0-3) follow the system prompt."""
    context_preview_chars: int = 400
    """The first user turn shows this many characters of the context (0: none)."""
    extract_max_tokens: int = 64
    """Output cap of the "value only" extraction call made when the final ask gives no
    usable FINAL."""

    # --- model calls (used by the runner) ---
    root_model: str | None = None
    sub_model: str | None = None
    """Sub-calls may use a different, smaller model than the root."""
    max_tokens: int = 1024
    sub_max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    sub_concurrency: int = 8
    """How many `llm_query_batched` slots run at once."""
    llm_timeout_s: float = 300.0
    """Upper bound for one model call (root or sub)."""
    llm_retries: int = 3
    """Retries of a call whose backend is unreachable (BackendUnavailable)."""
    retry_backoff_s: float = 0.5
    retry_backoff_max_s: float = 8.0

    def __post_init__(self) -> None:
        positive_ints = (
            "max_iterations",
            "max_depth",
            "max_errors",
            "max_repeats",
            "max_output_chars",
            "sub_context_chars",
            "max_tokens",
            "sub_max_tokens",
            "sub_concurrency",
            "extract_max_tokens",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"rlm.{name} must be an integer >= 1, got {value!r}")
        positive_floats = ("block_timeout_s", "final_grace_s", "llm_timeout_s")
        for name in positive_floats:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"rlm.{name} must be a number > 0, got {value!r}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ConfigError(f"rlm.time_budget_s must be > 0 or None, got {self.time_budget_s!r}")
        if self.token_budget is not None and self.token_budget < 1:
            raise ConfigError(f"rlm.token_budget must be >= 1 or None, got {self.token_budget!r}")
        for name in ("infra_retries", "context_preview_chars"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"rlm.{name} must be an integer >= 0, got {value!r}")
        if not isinstance(self.worked_examples, int) or not 0 <= self.worked_examples <= 3:
            raise ConfigError(f"rlm.worked_examples must be 0-3, got {self.worked_examples!r}")
        if self.system_prompt is not None and not str(self.system_prompt).strip():
            raise ConfigError(
                "rlm.system_prompt must not be empty (leave it unset for the default)"
            )
        if self.llm_retries < 0:
            raise ConfigError(f"rlm.llm_retries must be >= 0, got {self.llm_retries!r}")
        if self.retry_backoff_s < 0 or self.retry_backoff_max_s < 0:
            raise ConfigError("rlm.retry_backoff_s and rlm.retry_backoff_max_s must be >= 0")
        if not 0.0 <= self.temperature <= 5.0:
            raise ConfigError(f"rlm.temperature must be in [0, 5], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"rlm.top_p must be in (0, 1], got {self.top_p!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RlmConfig:
        """Build from plain data; unknown keys are an error that names them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown rlm config key(s): {', '.join(unknown)}")
        return cls(**data)
