"""The one result type of a finished task: what `execute` returns, what the node stores
and what its HTTP API and SSE `done` event carry (as `ExecutionResult.to_dict()`).

One concept, two layers: the pure loop's `rlm.types.RlmResult` is the run's full record
(every sub-call's prompt and answer, which block a replay can rebuild: what checkpoints
and trajectories need); `ExecutionResult` is its public projection
(`ExecutionResult.from_rlm`, where a run ends: sub-calls counted, the model and backend
read from the trajectory). Nothing else converts between them. Keys a newer node sends
that this version does not know are kept in `extra`, never dropped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Self

from kowalski_node.rlm.types import BlockRecord, RlmResult


@dataclass(frozen=True)
class BlockResult:
    """One code block the model wrote and what running it gave."""

    index: int
    iteration: int
    language: str
    code: str
    output: str
    error: str | None
    error_kind: str | None
    exec_ms: float
    sub_calls: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Keys a newer node sent that this version does not know: kept, never dropped."""

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.extra,
            "index": self.index,
            "iteration": self.iteration,
            "language": self.language,
            "code": self.code,
            "output": self.output,
            "error": self.error,
            "error_kind": self.error_kind,
            "exec_ms": round(self.exec_ms, 3),
            "sub_calls": self.sub_calls,
        }

    @classmethod
    def from_record(cls, block: BlockRecord) -> BlockResult:
        """The public view of one block of the loop's record (sub-calls counted)."""
        return cls(
            index=block.index,
            iteration=block.iteration,
            language=block.language,
            code=block.code,
            output=block.output,
            error=block.error,
            error_kind=block.error_kind,
            exec_ms=float(block.exec_ms),
            sub_calls=len(block.sub_calls),
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BlockResult:
        subs = data.get("sub_calls", 0)
        extra = {str(k): v for k, v in data.items() if k not in _BLOCK_KEYS}
        return cls(
            extra=extra,
            index=int(data.get("index", 0)),
            iteration=int(data.get("iteration", 0)),
            language=str(data.get("language", "")),
            code=str(data.get("code", "")),
            output=str(data.get("output", "")),
            error=data.get("error"),
            error_kind=data.get("error_kind"),
            exec_ms=float(data.get("exec_ms", 0.0)),
            sub_calls=len(subs) if isinstance(subs, list) else int(subs),
        )


# What `BlockResult.from_dict` reads; `replayable` is the core's own bookkeeping (can a
# replay rebuild the block's effects), deliberately not part of the public result.
_BLOCK_KEYS = frozenset(
    {"index", "iteration", "language", "code", "output", "error", "error_kind", "exec_ms"}
    | {"sub_calls", "replayable"}
)
# What `ExecutionResult.from_dict` reads (the `to_dict` shape, plus the flat token counts).
_RESULT_KEYS = frozenset(
    {"task_id", "content", "iterations", "stop_reason", "final_via", "blocks", "tokens"}
    | {"tokens_in", "tokens_out", "sub_calls", "timings", "error", "trajectory_path"}
    | {"executed_on", "model", "backend"}
)


def model_used(trajectory_path: object) -> tuple[str | None, str | None]:
    """(model, backend) of the last model turn recorded in a trajectory file.

    The RLM result itself does not carry them; the trajectory does, for every turn,
    as the backend reported it (so a default model shows by its real name).
    """
    if not isinstance(trajectory_path, str) or not trajectory_path:
        return None, None
    model = backend = None
    try:
        with open(trajectory_path, encoding="utf-8") as handle:
            for line in handle:
                if '"model_response"' not in line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("type") == "model_response":
                    model = record.get("model") or model
                    backend = record.get("backend") or backend
    except (OSError, UnicodeDecodeError):
        return None, None
    return model, backend


@dataclass(frozen=True)
class ExecutionResult:
    """What `execute` returns. `stop_reason` says what ended the run ("final" = answered)."""

    task_id: str
    content: str
    iterations: int
    stop_reason: str
    blocks: tuple[BlockResult, ...] = ()
    tokens_in: int = 0
    tokens_out: int = 0
    sub_calls: int = 0
    timings: Mapping[str, float] = field(default_factory=dict)
    final_via: str = "none"
    error: str | None = None
    trajectory_path: str | None = None
    executed_on: str = "local"
    # the model that answered (as the backend reported it) and its backend kind;
    # "unknown" only when no model turn was recorded (a run that failed before one)
    model: str = "unknown"
    backend: str = "unknown"
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Keys a newer node sent that this version does not know: kept, never dropped."""

    @property
    def tokens(self) -> int:
        return self.tokens_in + self.tokens_out

    @property
    def ok(self) -> bool:
        """True when the model produced an answer (possibly after a limit was hit)."""
        return self.error is None and self.stop_reason not in ("error", "cancelled")

    def to_dict(self) -> dict[str, Any]:
        """The `kowalski-node run --json` and HTTP API shape."""
        return {
            **self.extra,
            "task_id": self.task_id,
            "content": self.content,
            "iterations": self.iterations,
            "stop_reason": self.stop_reason,
            "final_via": self.final_via,
            "blocks": [b.to_dict() for b in self.blocks],
            "tokens": {"in": self.tokens_in, "out": self.tokens_out, "total": self.tokens},
            "sub_calls": self.sub_calls,
            "timings": {k: round(float(v), 3) for k, v in self.timings.items()},
            "error": self.error,
            "trajectory_path": self.trajectory_path,
            "executed_on": self.executed_on,
            "model": self.model,
            "backend": self.backend,
        }

    @classmethod
    def from_rlm(cls, result: RlmResult, *, executed_on: str) -> Self:
        """The public projection of a finished run of the loop."""
        model, backend = model_used(result.trajectory_path)
        return cls(
            task_id=result.task_id,
            content=result.content,
            iterations=result.iterations,
            stop_reason=result.stop_reason,
            blocks=tuple(BlockResult.from_record(b) for b in result.blocks),
            tokens_in=result.tokens_in,
            tokens_out=result.tokens_out,
            sub_calls=result.sub_calls,
            timings={k: float(v) for k, v in result.timings.to_dict().items()},
            final_via=result.final_via,
            error=result.error,
            trajectory_path=result.trajectory_path,
            executed_on=executed_on,
            model=model or "unknown",
            backend=backend or "unknown",
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, executed_on: str | None = None) -> Self:
        tokens = data.get("tokens") or {}
        timings = data.get("timings") or {}
        model, backend = data.get("model"), data.get("backend")
        if not model or not backend:
            used = model_used(data.get("trajectory_path"))
            model, backend = model or used[0], backend or used[1]
        return cls(
            extra={str(k): v for k, v in data.items() if k not in _RESULT_KEYS},
            task_id=str(data["task_id"]),
            content=str(data.get("content") or ""),
            iterations=int(data.get("iterations", 0)),
            stop_reason=str(data.get("stop_reason", "error")),
            blocks=tuple(BlockResult.from_dict(b) for b in data.get("blocks") or ()),
            tokens_in=int(tokens.get("in", data.get("tokens_in", 0))),
            tokens_out=int(tokens.get("out", data.get("tokens_out", 0))),
            sub_calls=int(data.get("sub_calls", 0)),
            timings={str(k): float(v) for k, v in timings.items()},
            final_via=str(data.get("final_via", "none")),
            error=data.get("error"),
            trajectory_path=data.get("trajectory_path"),
            executed_on=executed_on or str(data.get("executed_on", "network")),
            model=str(model or "unknown"),
            backend=str(backend or "unknown"),
        )

    @classmethod
    def failed(cls, task_id: str, error: str, stop_reason: str = "error") -> Self:
        return cls(task_id=task_id, content="", iterations=0, stop_reason=stop_reason, error=error)
