"""What the HTTP API (and the CLI behind it) needs from a running node: `NodeService`.

The HTTP layer depends only on this protocol and these models, so it can be built and
tested against an in-memory fake while the mesh runtime is built elsewhere. The models
are also the JSON schema of the API (docs/http.md): a field added here appears in the
API, so add fields, never rename them.

Every timestamp is Unix time in seconds (float). Peer ids are libp2p peer ids (strings).
"""

from __future__ import annotations

import binascii
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from enum import StrEnum
from typing import Annotated, Any, Literal, Protocol, runtime_checkable

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)

from kowalski_node.config import RlmSettings
from kowalski_node.errors import TaskError
from kowalski_node.rlm.types import ExecutionResult, ProgressEvent
from kowalski_node.runtime.context_blob import (
    SlicedText,
    check_base64,
    decode_base64,
    submission_fingerprint,
)

TASK_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
_TASK_ID_RE = re.compile(TASK_ID_PATTERN)
PROMPT_PREVIEW_CHARS = 160


class IdempotencyConflict(TaskError):
    """An idempotency key (or client task id) was reused for a different task."""

    def __init__(self, key: str, existing_task_id: str) -> None:
        super().__init__(
            f"idempotency key {key!r} already names task {existing_task_id} with a different "
            "prompt, context or model; use a new key"
        )
        self.key = key
        self.existing_task_id = existing_task_id


class TaskStatus(StrEnum):
    """Where a task stands. `done`, `failed` and `cancelled` are final."""

    QUEUED = "queued"  # stored durably by its owner, no leader holds a lease yet
    RUNNING = "running"  # a leader holds a lease and runs the RLM loop
    CANCELLING = "cancelling"  # cancel requested; the leader has not stopped yet
    DONE = "done"  # committed: the result is final
    FAILED = "failed"  # committed as an error (limits, no capable device, ...)
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (TaskStatus.DONE, TaskStatus.FAILED, TaskStatus.CANCELLED)


class _Model(BaseModel):
    """Views tolerate fields they do not know (newer nodes), so clients keep working."""

    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------------------------------
# Submission
# ---------------------------------------------------------------------------------------


class TaskSubmission(BaseModel):
    """The body of POST /v1/tasks (and one item of POST /v1/tasks/batch).

    `context` travels as JSON; bytes travel base64-encoded with `context_encoding:
    "base64"` (the same convention as `kowalski_node.client.encode_context`). A client may
    choose `task_id`; resubmitting it, or the same `idempotency_key`, never runs the task
    twice. When only `task_id` is given it is also the idempotency key.
    """

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    # Declared before `context` so the context validator can see it.
    context_encoding: Literal["json", "base64"] = "json"
    context: Any = None
    task_id: str | None = Field(default=None, pattern=TASK_ID_PATTERN)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=256)
    model: str | None = None
    sub_model: str | None = None
    # Overrides of `rlm.*` limits for this task (keys of config.RlmSettings).
    rlm: dict[str, Any] | None = None
    priority: int = Field(default=0, ge=-1000, le=1000)

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt is blank")
        return value

    @field_validator("context")
    @classmethod
    def _context_is_json(cls, value: Any, info: ValidationInfo) -> Any:
        if info.data.get("context_encoding") == "base64":
            if not isinstance(value, str):
                raise ValueError("context_encoding base64 needs a string context")
            try:
                check_base64(value)  # in slices: a 50 MB context must not hold the GIL
            except binascii.Error as exc:
                raise ValueError(f"context is not valid base64: {exc}") from None
            return value
        if value is None or isinstance(value, str | int | float | bool | list | dict):
            return value
        raise ValueError(f"context must be JSON data, got {type(value).__name__}")

    @field_validator("rlm")
    @classmethod
    def _rlm_keys_known(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        try:
            RlmSettings.model_validate(value)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ValueError(f"rlm.{where}: {err['msg']}") from None
        return value

    @property
    def dedup_key(self) -> str | None:
        """The key that makes resubmission idempotent: the explicit key, else the task id."""
        return self.idempotency_key or self.task_id

    def context_value(self) -> str | bytes | list[Any] | dict[str, Any] | int | float | bool | None:
        """The context as the REPL will hold it (base64 decoded back to bytes)."""
        if self.context_encoding == "base64" and self.context is not None:
            ctx = self.context
            return decode_base64(ctx if isinstance(ctx, SlicedText) else str(ctx))
        return self.context

    def fingerprint(self) -> str:
        """sha256 over what defines the task, to tell a retry from a conflicting reuse."""
        # the same digest as sha256(json.dumps([...], sort_keys=True, ...)), in slices
        return submission_fingerprint(
            self.prompt, self.context, self.context_encoding, self.model, self.sub_model, self.rlm
        )

    def preview(self) -> str:
        return prompt_preview(self.prompt)


def prompt_preview(prompt: str) -> str:
    """The first line-ish of a prompt, for lists and tables."""
    flat = " ".join(prompt.split())
    return flat if len(flat) <= PROMPT_PREVIEW_CHARS else flat[: PROMPT_PREVIEW_CHARS - 1] + "…"


def valid_task_id(task_id: str) -> bool:
    return bool(_TASK_ID_RE.match(task_id))


class BatchSubmission(BaseModel):
    """The body of POST /v1/tasks/batch: many tasks accepted in one request."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[TaskSubmission] = Field(min_length=1)


# ---------------------------------------------------------------------------------------
# Views
# ---------------------------------------------------------------------------------------


def _as_result(value: object) -> ExecutionResult:
    if isinstance(value, ExecutionResult):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("task_id"), str):
        return ExecutionResult.from_dict(value)
    raise ValueError("a task result is an object with a task_id")


# A committed result in a view: `kowalski_node.rlm.types.ExecutionResult` (the one result
# type), validated from and rendered as its `to_dict()` shape.
ResultField = Annotated[
    ExecutionResult,
    PlainValidator(_as_result),
    PlainSerializer(lambda result: result.to_dict(), return_type=dict[str, Any]),
    WithJsonSchema({"type": "object", "description": "ExecutionResult.to_dict()"}),
]


class TaskAccepted(_Model):
    """The answer to a submission. `created` is False when it matched an earlier one."""

    task_id: str
    status: TaskStatus
    created: bool
    idempotency_key: str | None = None
    owner: str = ""
    leader: str | None = None
    # Present when the matched task has already finished: resubmission returns it.
    result: ResultField | None = None
    error: str | None = None


class TaskHistoryEntry(_Model):
    """One thing one peer did to a task (lease, execution, checkpoint, commit, ...)."""

    at: float
    peer: str
    action: str  # submitted, leased, executing, checkpoint, failover, committed, rejected, ...
    epoch: int | None = None
    detail: str = ""


class TaskView(_Model):
    """Everything a user may ask about one task."""

    task_id: str
    status: TaskStatus
    prompt_preview: str = ""
    idempotency_key: str | None = None
    owner: str = ""  # the submitter: arbitrates the lease, epoch and commit
    leader: str | None = None  # the peer currently leased to run the loop
    epoch: int = 0  # fencing epoch of the current lease
    replicas: list[str] = Field(default_factory=list)
    executions: int = 0  # times the loop was started (repeats after failover)
    commits: int = 0  # committed results: 0 or 1, never more
    failovers: int = 0
    iteration: int = 0
    max_iterations: int = 0
    result: ResultField | None = None
    error: str | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float
    history: list[TaskHistoryEntry] = Field(default_factory=list)


PeerState = Literal["alive", "suspect", "dead", "left"]


class PeerView(_Model):
    """A cluster member as this node sees it (membership + its latest capability advert)."""

    peer_id: str
    addrs: list[str] = Field(default_factory=list)
    state: PeerState = "alive"
    is_self: bool = False
    incarnation: int = 0
    device_class: str = "unknown"  # desktop | laptop | constrained | phone | unknown
    cores: int | None = None
    ram_total_mb: int | None = None
    ram_free_mb: int | None = None
    cpu_load_pct: float | None = None
    backends: list[str] = Field(default_factory=list)
    models: list[str] = Field(default_factory=list)
    languages: list[str] = Field(default_factory=list)
    tokens_per_s: float | None = None
    latency_ms: float | None = None  # round trip of the latest probe
    battery_pct: float | None = None
    on_power: bool | None = None
    temperature_c: float | None = None
    active_tasks: int = 0
    last_seen: float | None = None


class NodeStatus(_Model):
    """This node and its counters (GET /v1/status; also feeds /metrics)."""

    peer_id: str
    version: str = ""
    listen_addrs: list[str] = Field(default_factory=list)
    api_addr: str = ""
    started_at: float
    uptime_s: float
    tasks_by_status: dict[str, int] = Field(default_factory=dict)
    queue_depth: int = 0  # tasks owned here waiting for a leader
    commits_total: int = 0
    executions_total: int = 0
    failovers_total: int = 0
    stale_rejections_total: int = 0  # checkpoints/commits refused for an old epoch
    peers_by_state: dict[str, int] = Field(default_factory=dict)


class BatchAccepted(_Model):
    """The answer to POST /v1/tasks/batch: one `TaskAccepted` per item, in order."""

    accepted: list[TaskAccepted]
    created: int
    duplicates: int


class TaskList(_Model):
    """GET /v1/tasks: newest first; `result` and `history` are left out of list items."""

    tasks: list[TaskView]
    count: int


class PeerList(_Model):
    """GET /v1/peers."""

    peers: list[PeerView]


# ---------------------------------------------------------------------------------------
# The protocol
# ---------------------------------------------------------------------------------------


@runtime_checkable
class NodeService(Protocol):
    """The node as the HTTP API sees it; the mesh runtime implements it.

    Errors: raise `NoCapableDevice` when no live peer can run a task, `IdempotencyConflict`
    when a key is reused for a different task, another `TaskError` for other refusals.
    The HTTP layer turns those into 4xx/503 answers and anything else into a 500.
    """

    async def submit(self, submission: TaskSubmission) -> TaskAccepted:
        """Store durably and acknowledge. The same dedup key returns the same task id and,
        once finished, its stored result; a task never runs twice because of a retry."""
        ...

    async def submit_many(self, submissions: Sequence[TaskSubmission]) -> list[TaskAccepted]:
        """Accept a batch in order (one answer per item); cheap, one durable write."""
        ...

    async def get_task(self, task_id: str) -> TaskView | None:
        """The task, or None if this node does not know it."""
        ...

    async def list_tasks(
        self, limit: int = 100, status: TaskStatus | None = None
    ) -> list[TaskView]:
        """Newest first, at most `limit`, optionally only one status."""
        ...

    def task_events(self, task_id: str) -> AsyncIterator[ProgressEvent]:
        """Progress of a task as it happens; ends when the task is final (at once if it
        already is, or is unknown)."""
        ...

    async def cancel(self, task_id: str) -> TaskView | None:
        """Ask the task to stop; the view after the request (`cancelling`, or `cancelled`
        when it stopped at once), None if unknown. A finished task is returned unchanged."""
        ...

    async def peers(self) -> list[PeerView]:
        """Every known member, this node included (`is_self`)."""
        ...

    async def status(self) -> NodeStatus:
        """This node's identity, addresses and counters."""
        ...


__all__ = [
    "TASK_ID_PATTERN",
    "BatchAccepted",
    "BatchSubmission",
    "IdempotencyConflict",
    "NodeService",
    "NodeStatus",
    "PeerList",
    "PeerState",
    "PeerView",
    "TaskAccepted",
    "TaskHistoryEntry",
    "TaskList",
    "TaskStatus",
    "TaskSubmission",
    "TaskView",
    "prompt_preview",
    "valid_task_id",
]
