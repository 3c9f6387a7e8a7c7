"""The value types of the RLM loop, one of each: the progress event, the block, the result.

The loop builds them and every layer above uses the same ones (the Python API, the HTTP
API, the CLI, the node's store). All are plain frozen dataclasses with `to_dict()` so
they can go to JSON (CLI `--json`, HTTP API), msgpack (mesh checkpoints) and the JSONL
trajectory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Self

StopReason = Literal[
    "final",  # the model gave an answer (FINAL, FINAL_VAR, FINAL in code, answer dict)
    "max_iterations",
    "time_budget",
    "token_budget",
    "max_errors",
    "cancelled",
    "stalled",  # the model repeated blocks (max_repeats in a row) instead of answering
    "error",  # the root model failed for good; `ExecutionResult.error` says why
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
    def from_dict(cls, data: Mapping[str, Any]) -> SubCallRecord:
        """Inverse of `to_dict`; a key it does not know, or a missing one, is a ValueError."""
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValueError(f"sub-call record: {exc}") from None


@dataclass(frozen=True)
class BlockResult:
    """One code block the model wrote (or that was refused) and what running it gave.

    The loop's record also keeps each sub-call (`sub_call_records`) and whether a replay
    can rebuild the block's effects (`replayable`): checkpoints and trajectories carry
    that form (`to_record()`). The public form (`to_dict()`: the HTTP API, the CLI, stored
    results) counts the sub-calls instead, so a block read back from it has the count and
    no records.
    """

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
    sub_calls: int = 0
    """How many `llm_query` slots the block used (`len(sub_call_records)` in the loop)."""
    sub_call_records: tuple[SubCallRecord, ...] = ()
    replayable: bool = True
    """False for blocks whose effects cannot be rebuilt (timed out, killed, never ran)."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Keys a newer node sent that this version does not know: kept, never dropped."""

    @property
    def ok(self) -> bool:
        return self.error is None

    def _fields(self) -> dict[str, Any]:
        return {
            **self.extra,
            "index": self.index,
            "iteration": self.iteration,
            "language": self.language,
            "code": self.code,
            "output": self.output,
            "error": self.error,
            "error_kind": self.error_kind,
        }

    def to_dict(self) -> dict[str, Any]:
        """The public shape: sub-calls counted, `replayable` left out."""
        return {
            **self._fields(),
            "exec_ms": round(float(self.exec_ms), 3),
            "sub_calls": self.sub_calls,
        }

    def to_record(self) -> dict[str, Any]:
        """The loop's record (checkpoints, trajectory `block` lines): every sub-call."""
        return {
            **self._fields(),
            "exec_ms": self.exec_ms,
            "sub_calls": [s.to_dict() for s in self.sub_call_records],
            "replayable": self.replayable,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BlockResult:
        """Either form: `sub_calls` as a list (the record) or a count (the public shape)."""
        subs = data.get("sub_calls", 0)
        records = tuple(SubCallRecord.from_dict(s) for s in subs) if isinstance(subs, list) else ()
        return cls(
            extra={str(k): v for k, v in data.items() if k not in _BLOCK_KEYS},
            index=int(data.get("index", 0)),
            iteration=int(data.get("iteration", 0)),
            language=str(data.get("language", "")),
            code=str(data.get("code", "")),
            output=str(data.get("output", "")),
            error=data.get("error"),
            error_kind=data.get("error_kind"),
            exec_ms=float(data.get("exec_ms", 0.0)),
            sub_calls=len(records) if isinstance(subs, list) else int(subs),
            sub_call_records=records,
            replayable=bool(data.get("replayable", True)),
        )


@dataclass(frozen=True)
class ExecutionResult:
    """The one result type of a finished task: what the loop ends with, what `execute`
    returns, what the node stores and what its HTTP API and SSE `done` event carry.

    `stop_reason` (a `StopReason`) says what ended the run ("final" = answered) and
    `final_via` (a `FinalVia`) how the answer was found. `timings` holds `elapsed_ms`,
    `model_ms` (sum of root-model latencies), `sub_ms` (sum of sub-call latencies; slots
    overlap, so this can exceed wall time) and `exec_ms` (sum of block run times). The
    loop leaves `executed_on`, `model` and `backend` at their defaults; the runtime fills
    them in (`model` as the backend reported it; "unknown" when no model turn was
    recorded). Keys a newer node sends that this version does not know are kept in
    `extra`, never dropped.
    """

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

    def _head(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "content": self.content,
            "iterations": self.iterations,
            "stop_reason": self.stop_reason,
            "final_via": self.final_via,
        }

    def _tail(self, timings: Mapping[str, float]) -> dict[str, Any]:
        return {
            "tokens": {"in": self.tokens_in, "out": self.tokens_out, "total": self.tokens},
            "sub_calls": self.sub_calls,
            "timings": dict(timings),
            "error": self.error,
            "trajectory_path": self.trajectory_path,
        }

    def summary_dict(self) -> dict[str, Any]:
        """What the loop knows, but the blocks: the trajectory's `final` record."""
        return {**self._head(), **self._tail(self.timings)}

    def to_dict(self) -> dict[str, Any]:
        """The public shape: `kowalski-node run --json`, the HTTP API, stored results."""
        return {
            **self.extra,
            **self._head(),
            "blocks": [b.to_dict() for b in self.blocks],
            **self._tail({k: round(float(v), 3) for k, v in self.timings.items()}),
            "executed_on": self.executed_on,
            "model": self.model,
            "backend": self.backend,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, executed_on: str | None = None) -> Self:
        """Inverse of `to_dict` (and of `summary_dict`); flat `tokens_in`/`tokens_out`
        are read too. `executed_on` overrides the stored one ("network" if none)."""
        tokens = data.get("tokens") or {}
        timings = data.get("timings") or {}
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
            model=str(data.get("model") or "unknown"),
            backend=str(data.get("backend") or "unknown"),
        )

    @classmethod
    def failed(cls, task_id: str, error: str, stop_reason: str = "error") -> Self:
        return cls(task_id=task_id, content="", iterations=0, stop_reason=stop_reason, error=error)


# What `BlockResult.from_dict` and `ExecutionResult.from_dict` read; any other key goes to
# `extra`.
_BLOCK_KEYS = frozenset(
    {"index", "iteration", "language", "code", "output", "error", "error_kind", "exec_ms"}
    | {"sub_calls", "replayable"}
)
_RESULT_KEYS = frozenset(
    {"task_id", "content", "iterations", "stop_reason", "final_via", "blocks", "tokens"}
    | {"tokens_in", "tokens_out", "sub_calls", "timings", "error", "trajectory_path"}
    | {"executed_on", "model", "backend"}
)

PROGRESS_KEYS = frozenset(_PROGRESS_FIELDS)
"""The fields a progress event carries on the wire (every field but `extra`)."""
