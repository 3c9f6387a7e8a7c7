"""Public value types of the RLM loop: progress events, block records, the result.

All are plain dataclasses with `to_dict()` so they can go to JSON (CLI `--json`,
HTTP API), msgpack (mesh checkpoints) and the JSONL trajectory unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

StopReason = Literal[
    "final",  # the model gave an answer (FINAL, FINAL_VAR, FINAL in code, answer dict)
    "max_iterations",
    "time_budget",
    "token_budget",
    "max_errors",
    "cancelled",
    "stalled",  # the model repeated blocks (max_repeats in a row) instead of answering
    "error",  # the root model failed for good; `RlmResult.error` says why
]

FinalVia = Literal[
    "FINAL",  # FINAL(...) written outside code
    "FINAL_VAR",  # FINAL_VAR(name) written outside code, resolved in the REPL
    "code",  # FINAL / FINAL_VAR / answer["ready"] inside a code block
    "extract",  # no marker in the final-answer turn: a short "value only" call gave it
    "output",  # no marker: the one-line output of the code the model kept re-running
    "text",  # no marker: the final-answer turn's text is taken as the answer
    "none",  # no answer (cancelled, error)
]

Stage = Literal[
    "start",
    "resumed",
    "model_call",
    "model_response",
    "exec_start",
    "exec_done",
    "sub_calls",
    "sub_calls_done",
    "finalizing",
    "done",
]


@dataclass(frozen=True)
class ProgressEvent:
    """A snapshot of where a task stands; emitted after every step of the loop.

    The one progress type: the loop emits it, the Python API hands it to callbacks (as
    `kowalski_node.ProgressUpdate`) and the node streams it over SSE, where the mesh
    runtime adds which `peer` and `epoch` sent it.
    """

    task_id: str
    stage: Stage | str
    iteration: int
    max_iterations: int
    tokens_in: int = 0
    tokens_out: int = 0
    elapsed_ms: float = 0.0
    model_latency_ms: float | None = None
    """Latency of the model call this event reports (model_response), else None."""
    avg_latency_ms: float | None = None
    """Mean root-model latency so far."""
    exec_ms: float | None = None
    """Run time of the block this event reports (exec_done), else None."""
    block_index: int | None = None
    sub_calls: int = 0
    """Sub-calls issued so far in this task."""
    active_devices: int = 1
    """Peers working on this task; the mesh runtime overrides it."""
    depth: int = 0
    message: str = ""
    peer: str | None = None
    """The peer that ran this step (mesh tasks), else None."""
    epoch: int | None = None
    """The fencing epoch of the lease the step ran under (mesh tasks), else None."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Keys a newer sender added that this version does not know: kept, never dropped."""

    @property
    def tokens(self) -> int:
        return self.tokens_in + self.tokens_out

    @property
    def done(self) -> bool:
        return self.stage == "done"

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**self.extra, **data}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProgressEvent:
        """Inverse of `to_dict`, for events from other peers too: each known field is
        checked and coerced to its type (ValueError names the field), unknown keys go to
        `extra`, and a missing `task_id` or `stage` is an error."""
        missing = [k for k in ("task_id", "stage") if k not in data]
        if missing:
            raise ValueError(f"progress event lacks {', '.join(missing)}")
        values: dict[str, Any] = {"iteration": 0, "max_iterations": 0}
        extra: dict[str, Any] = {}
        for key, value in data.items():
            kind = _PROGRESS_FIELDS.get(key)
            if kind is None:
                extra[str(key)] = value
            elif value is None and kind[1]:
                values[key] = None
            else:
                values[key] = _coerce(key, value, kind[0])
        return cls(**values, extra=extra)


# Field name -> (type, may be None), for `ProgressEvent.from_dict`; `PROGRESS_KEYS` below.
_PROGRESS_FIELDS: dict[str, tuple[type, bool]] = {
    "task_id": (str, False), "stage": (str, False), "message": (str, False),
    "iteration": (int, False), "max_iterations": (int, False), "tokens_in": (int, False),
    "tokens_out": (int, False), "sub_calls": (int, False), "active_devices": (int, False),
    "depth": (int, False), "block_index": (int, True), "epoch": (int, True),
    "elapsed_ms": (float, False), "model_latency_ms": (float, True),
    "avg_latency_ms": (float, True), "exec_ms": (float, True), "peer": (str, True),
}  # fmt: skip


def _coerce(key: str, value: Any, kind: type) -> Any:
    """`value` as `kind` (numbers may arrive as numeric strings or floats), else ValueError."""
    if kind is str:
        if isinstance(value, str):
            return value
    elif not isinstance(value, bool) and isinstance(value, int | float | str):
        try:
            number = float(value)
        except ValueError:
            pass
        else:
            if kind is float:
                return number
            if number.is_integer():
                return int(number)
    raise ValueError(f"progress event field {key!r}: expected {kind.__name__}, got {value!r}")


@dataclass(frozen=True)
class SubCallRecord:
    """One `llm_query` slot: what was asked and what came back (text or error)."""

    sequence: int
    prompt: str
    model: str | None
    text: str | None
    error: str | None
    tokens_in: int = 0
    tokens_out: int = 0
    latency_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "sequence": self.sequence,
            "prompt": self.prompt,
            "model": self.model,
            "text": self.text,
            "error": self.error,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "latency_ms": self.latency_ms,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SubCallRecord:
        return cls(**data)


@dataclass(frozen=True)
class BlockRecord:
    """One executed (or refused) code block and what it produced."""

    index: int
    """Position among all blocks of the task (0-based)."""
    iteration: int
    language: str
    code: str
    output: str
    """stdout + stderr as the model saw it (already truncated)."""
    error: str | None
    error_kind: str | None
    exec_ms: float
    sub_calls: tuple[SubCallRecord, ...] = ()
    replayable: bool = True
    """False for blocks whose effects cannot be rebuilt (timed out, killed, never ran)."""

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "iteration": self.iteration,
            "language": self.language,
            "code": self.code,
            "output": self.output,
            "error": self.error,
            "error_kind": self.error_kind,
            "exec_ms": self.exec_ms,
            "sub_calls": [s.to_dict() for s in self.sub_calls],
            "replayable": self.replayable,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BlockRecord:
        values = dict(data)
        values["sub_calls"] = tuple(SubCallRecord.from_dict(s) for s in values.get("sub_calls", ()))
        return cls(**values)


@dataclass(frozen=True)
class Timings:
    elapsed_ms: float = 0.0
    model_ms: float = 0.0
    """Sum of root-model latencies."""
    sub_ms: float = 0.0
    """Sum of sub-call latencies (slots overlap, so this can exceed wall time)."""
    exec_ms: float = 0.0
    """Sum of block run times."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RlmResult:
    """What a finished RLM task hands back."""

    task_id: str
    content: str
    iterations: int
    stop_reason: StopReason
    final_via: FinalVia
    blocks: tuple[BlockRecord, ...]
    tokens_in: int
    tokens_out: int
    sub_calls: int
    timings: Timings = field(default_factory=Timings)
    error: str | None = None
    trajectory_path: str | None = None

    @property
    def tokens(self) -> int:
        return self.tokens_in + self.tokens_out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: what `kowalski-node run --json` prints."""
        return {**self.summary_dict(), "blocks": [b.to_dict() for b in self.blocks]}

    def summary_dict(self) -> dict[str, Any]:
        """Everything but the blocks."""
        return {
            "task_id": self.task_id,
            "content": self.content,
            "iterations": self.iterations,
            "stop_reason": self.stop_reason,
            "final_via": self.final_via,
            "tokens": {"in": self.tokens_in, "out": self.tokens_out, "total": self.tokens},
            "sub_calls": self.sub_calls,
            "timings": self.timings.to_dict(),
            "error": self.error,
            "trajectory_path": self.trajectory_path,
        }


PROGRESS_KEYS = frozenset(_PROGRESS_FIELDS)
"""The fields a progress event carries on the wire (every field but `extra`)."""
