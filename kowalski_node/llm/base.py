"""The one protocol every model backend implements.

Requests carry `task_id`, `purpose` and `sequence` so that deterministic backends
(the scripted replay) can answer from the task's own position, which survives a
failover to another node: the counter lives in the task checkpoint, not in the backend.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

Purpose = Literal["root", "sub", "fold"]


@dataclass(frozen=True)
class ChatMessage:
    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True)
class LlmRequest:
    messages: tuple[ChatMessage, ...]
    model: str | None = None
    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    task_id: str | None = None
    purpose: Purpose = "root"
    # Per-task, per-purpose ordinal of this call (0-based). Root turns count turns,
    # sub-calls count `llm_query` slots in the order the code issued them.
    sequence: int = 0


@dataclass(frozen=True)
class LlmResponse:
    text: str
    model: str
    backend: str
    tokens_in: int
    tokens_out: int
    latency_ms: float
    finish_reason: Literal["stop", "length", "cancelled"] = "stop"
    extra: dict[str, object] = field(default_factory=dict)


@runtime_checkable
class LlmBackend(Protocol):
    """Async model backend. Implementations must be safe to call concurrently."""

    name: str

    async def complete(self, request: LlmRequest) -> LlmResponse:
        """Run one chat completion; raise `kowalski_node.errors.LlmError` subclasses on failure."""
        ...

    def stream(self, request: LlmRequest) -> AsyncIterator[str]:
        """Yield text pieces as they are generated."""
        ...

    async def list_models(self) -> list[str]:
        """Names of the models this backend can serve right now."""
        ...

    async def aclose(self) -> None:
        """Release clients, threads and memory."""
        ...
