"""Wire messages of the per-task coordination protocol.

Every message is a slotted dataclass with ``to_wire()`` (a msgpack-able dict whose ``t``
tag names the kind) and ``from_wire(obj)``, which validates types, ranges and sizes and
raises :class:`WireError` (a ``ValueError``). :func:`decode_coord_message` dispatches on
the tag. The sender is the authenticated remote peer and is passed to the core
separately; it is never read from the payload.

Record replication reuses the ledger's :class:`ReplicateRecord`/:class:`ReplicateAck`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from kowalski_node.tasks import ReplicateAck, ReplicateRecord, TaskRecord, TaskState
from kowalski_node.wire import (
    WireError,
    check_type_tag,
    expect_dict,
    get_bool,
    get_bytes,
    get_int,
    get_opt_str,
    get_str,
    get_str_list,
)

MAX_ID = 256
MAX_EPOCH = 2**62
MAX_BLOB = 64 * 1024 * 1024
MAX_REPLICAS = 16


def _task(d: Any, what: str) -> str:
    return get_str(d, "k", what, max_len=MAX_ID, allow_empty=False)


def _epoch(d: Any, what: str, key: str = "e", minimum: int = 1) -> int:
    return get_int(d, key, what, min_value=minimum, max_value=MAX_EPOCH)


def _state(d: Any, what: str) -> TaskState:
    s = get_str(d, "s", what, default=TaskState.QUEUED.value, max_len=32)
    try:
        return TaskState(s)
    except ValueError:
        raise WireError(f"{what}.s: unknown task state {s!r}") from None


@dataclass(frozen=True, slots=True)
class Offer:
    """Owner -> candidate: lead ``record`` at ``epoch``, replicating to ``replicas``.

    The record carries the spec and the latest checkpoint the owner knows, so the
    candidate resumes from the same turn.
    """

    task_id: str
    epoch: int
    replicas: tuple[str, ...]
    record: TaskRecord

    TAG = "co_offer"

    def to_wire(self) -> dict[str, Any]:
        return {
            "t": self.TAG,
            "k": self.task_id,
            "e": self.epoch,
            "r": list(self.replicas),
            "rec": self.record.to_wire(),
        }

    @classmethod
    def from_wire(cls, obj: object) -> Offer:
        what = "Offer"
        d = expect_dict(obj, what)
        check_type_tag(d, cls.TAG, what)
        task_id = _task(d, what)
        epoch = _epoch(d, what)
        record = TaskRecord.from_wire(d.get("rec"))
        if record.task_id != task_id or record.epoch != epoch:
            raise WireError(
                f"{what}: the record is for {record.task_id}@{record.epoch}, not {task_id}@{epoch}"
            )
        replicas = get_str_list(d, "r", what, max_len=MAX_REPLICAS)
        return cls(task_id, epoch, tuple(replicas), record)


@dataclass(frozen=True, slots=True)
class OfferReply:
    """Candidate -> owner. Refused offers say why; ``known_epoch`` is the highest the candidate saw."""

    task_id: str
    epoch: int
    accepted: bool
    known_epoch: int = 0
    reason: str = ""

    TAG = "co_offer_reply"

    def to_wire(self) -> dict[str, Any]:
        return {
            "t": self.TAG,
            "k": self.task_id,
            "e": self.epoch,
            "ok": self.accepted,
            "ke": self.known_epoch,
            "why": self.reason,
        }

    @classmethod
    def from_wire(cls, obj: object) -> OfferReply:
        what = "OfferReply"
        d = expect_dict(obj, what)
        check_type_tag(d, cls.TAG, what)
        return cls(
            _task(d, what),
            _epoch(d, what),
            get_bool(d, "ok", what),
            _epoch(d, what, "ke", minimum=0),
            get_str(d, "why", what, default="", max_len=1024),
        )


@dataclass(frozen=True, slots=True)
class StepCheckpoint:
    """Leader -> owner and replicas: the snapshot after ``step``; ``final`` = it is the result."""

    task_id: str
    epoch: int
    step: int
    snapshot: bytes
    final: bool = False

    TAG = "co_checkpoint"

    def to_wire(self) -> dict[str, Any]:
        return {
            "t": self.TAG,
            "k": self.task_id,
            "e": self.epoch,
            "n": self.step,
            "b": self.snapshot,
            "f": self.final,
        }

    @classmethod
    def from_wire(cls, obj: object) -> StepCheckpoint:
        what = "StepCheckpoint"
        d = expect_dict(obj, what)
        check_type_tag(d, cls.TAG, what)
        return cls(
            _task(d, what),
            _epoch(d, what),
            get_int(d, "n", what, min_value=0, max_value=MAX_EPOCH),
            get_bytes(d, "b", what, max_len=MAX_BLOB),
            get_bool(d, "f", what, default=False),
        )


class AckStatus(StrEnum):
    OK = "ok"
    FENCED = "fenced"
    """The receiver follows a newer epoch (or another leader at this one): stop."""
    UNKNOWN = "unknown"
    """The receiver has no record of the task (send the whole record)."""
    TERMINAL = "terminal"
    """The task is already committed, failed or cancelled: stop."""


@dataclass(frozen=True, slots=True)
class CheckpointAck:
    """Owner/replica -> leader: what happened to the checkpoint (or heartbeat) of ``step``."""

    task_id: str
    epoch: int
    step: int
    status: AckStatus
    current_epoch: int = 0
    state: TaskState = TaskState.QUEUED

    TAG = "co_checkpoint_ack"

    def to_wire(self) -> dict[str, Any]:
        return {
            "t": self.TAG,
            "k": self.task_id,
            "e": self.epoch,
            "n": self.step,
            "st": self.status.value,
            "ce": self.current_epoch,
            "s": self.state.value,
        }

    @classmethod
    def from_wire(cls, obj: object) -> CheckpointAck:
        what = "CheckpointAck"
        d = expect_dict(obj, what)
        check_type_tag(d, cls.TAG, what)
        raw = get_str(d, "st", what, max_len=16)
        try:
            status = AckStatus(raw)
        except ValueError:
            raise WireError(f"{what}.st: unknown ack status {raw!r}") from None
        return cls(
            _task(d, what),
            _epoch(d, what),
            get_int(d, "n", what, min_value=-1, max_value=MAX_EPOCH),
            status,
            _epoch(d, what, "ce", minimum=0),
            _state(d, what),
        )


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Leader -> owner during a long step: renews the lease (answered by a CheckpointAck, step -1)."""

    task_id: str
    epoch: int

    TAG = "co_heartbeat"

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.TAG, "k": self.task_id, "e": self.epoch}

    @classmethod
    def from_wire(cls, obj: object) -> Heartbeat:
        what = "Heartbeat"
        d = expect_dict(obj, what)
        check_type_tag(d, cls.TAG, what)
        return cls(_task(d, what), _epoch(d, what))


@dataclass(frozen=True, slots=True)
class CommitRequest:
    """Leader -> owner: commit ``result`` at ``epoch`` (retried until answered).

    With ``error`` set it reports that the task itself failed instead (same fencing and retries).
    """

    task_id: str
    epoch: int
    result: bytes
    error: str | None = None

    TAG = "co_commit"

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {"t": self.TAG, "k": self.task_id, "e": self.epoch, "r": self.result}
        if self.error is not None:
            d["err"] = self.error
        return d

    @classmethod
    def from_wire(cls, obj: object) -> CommitRequest:
        what = "CommitRequest"
        d = expect_dict(obj, what)
        check_type_tag(d, cls.TAG, what)
        return cls(
            _task(d, what),
            _epoch(d, what),
            get_bytes(d, "r", what, max_len=MAX_BLOB),
            get_opt_str(d, "err", what, max_len=65536),
        )


class CommitOutcome(StrEnum):
    ACCEPTED = "accepted"
    """This leader's commit is the task's one commit (also the answer to a retried one)."""
    DUPLICATE = "duplicate"
    """Another commit was accepted first; this one is refused and counted."""
    FENCED = "fenced"
    """The commit carried a stale epoch; refused and counted."""
    REFUSED = "refused"
    """Unknown task, or the task failed / was cancelled."""


@dataclass(frozen=True, slots=True)
class CommitReply:
    """Owner -> leader."""

    task_id: str
    epoch: int
    outcome: CommitOutcome
    current_epoch: int = 0
    detail: str = ""

    TAG = "co_commit_reply"

    def to_wire(self) -> dict[str, Any]:
        return {
            "t": self.TAG,
            "k": self.task_id,
            "e": self.epoch,
            "o": self.outcome.value,
            "ce": self.current_epoch,
            "d": self.detail,
        }

    @classmethod
    def from_wire(cls, obj: object) -> CommitReply:
        what = "CommitReply"
        d = expect_dict(obj, what)
        check_type_tag(d, cls.TAG, what)
        raw = get_str(d, "o", what, max_len=16)
        try:
            outcome = CommitOutcome(raw)
        except ValueError:
            raise WireError(f"{what}.o: unknown commit outcome {raw!r}") from None
        return cls(
            _task(d, what),
            _epoch(d, what),
            outcome,
            _epoch(d, what, "ce", minimum=0),
            get_str(d, "d", what, default="", max_len=1024),
        )


@dataclass(frozen=True, slots=True)
class Abandon:
    """Leader -> owner: I no longer run this task at ``epoch`` (restarted, draining): re-offer now."""

    task_id: str
    epoch: int

    TAG = "co_abandon"

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.TAG, "k": self.task_id, "e": self.epoch}

    @classmethod
    def from_wire(cls, obj: object) -> Abandon:
        what = "Abandon"
        d = expect_dict(obj, what)
        check_type_tag(d, cls.TAG, what)
        return cls(_task(d, what), _epoch(d, what))


@dataclass(frozen=True, slots=True)
class Cancel:
    """Owner -> leader: the task was cancelled or failed; stop running it."""

    task_id: str
    epoch: int

    TAG = "co_cancel"

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.TAG, "k": self.task_id, "e": self.epoch}

    @classmethod
    def from_wire(cls, obj: object) -> Cancel:
        what = "Cancel"
        d = expect_dict(obj, what)
        check_type_tag(d, cls.TAG, what)
        return cls(_task(d, what), _epoch(d, what, minimum=0))


@dataclass(frozen=True, slots=True)
class Query:
    """Owner -> replica before a failover: what do you hold for this task?"""

    task_id: str

    TAG = "co_query"

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.TAG, "k": self.task_id}

    @classmethod
    def from_wire(cls, obj: object) -> Query:
        what = "Query"
        d = expect_dict(obj, what)
        check_type_tag(d, cls.TAG, what)
        return cls(_task(d, what))


@dataclass(frozen=True, slots=True)
class QueryReply:
    """Replica -> owner: its copy of the record, or ``None`` when it has none."""

    task_id: str
    record: TaskRecord | None

    TAG = "co_query_reply"

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {"t": self.TAG, "k": self.task_id}
        if self.record is not None:
            d["rec"] = self.record.to_wire()
        return d

    @classmethod
    def from_wire(cls, obj: object) -> QueryReply:
        what = "QueryReply"
        d = expect_dict(obj, what)
        check_type_tag(d, cls.TAG, what)
        task_id = _task(d, what)
        rec = TaskRecord.from_wire(d["rec"]) if d.get("rec") is not None else None
        if rec is not None and rec.task_id != task_id:
            raise WireError(f"{what}: record for {rec.task_id}, expected {task_id}")
        return cls(task_id, rec)


@dataclass(frozen=True, slots=True)
class Prepare:
    """Owner -> acceptor: promise ``epoch`` (lease to ``leader``, owned by the sender).

    ``record`` is the owner's copy, stored by an acceptor that lacks the task. The
    acceptor stores the lease durably when ``epoch`` is newer than what it holds (or
    the same ballot again) and answers with the copy it held *before*, so that the owner
    learns the highest accepted checkpoint or result from a majority (Paxos phase 1).
    """

    task_id: str
    epoch: int
    leader: str
    record: TaskRecord

    TAG = "co_prepare"

    def to_wire(self) -> dict[str, Any]:
        return {
            "t": self.TAG,
            "k": self.task_id,
            "e": self.epoch,
            "l": self.leader,
            "rec": self.record.to_wire(),
        }

    @classmethod
    def from_wire(cls, obj: object) -> Prepare:
        what = "Prepare"
        d = expect_dict(obj, what)
        check_type_tag(d, cls.TAG, what)
        task_id = _task(d, what)
        record = TaskRecord.from_wire(d.get("rec"))
        if record.task_id != task_id:
            raise WireError(f"{what}: record for {record.task_id}, expected {task_id}")
        leader = get_str(d, "l", what, max_len=MAX_ID, allow_empty=False)
        return cls(task_id, _epoch(d, what), leader, record)


@dataclass(frozen=True, slots=True)
class Promise:
    """Acceptor -> owner: ``ok`` (the lease is stored) with the copy held before, or refused
    with the copy that wins (a newer ballot, or a finished task)."""

    task_id: str
    epoch: int
    ok: bool
    record: TaskRecord | None

    TAG = "co_promise"

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {"t": self.TAG, "k": self.task_id, "e": self.epoch, "ok": self.ok}
        if self.record is not None:
            d["rec"] = self.record.to_wire()
        return d

    @classmethod
    def from_wire(cls, obj: object) -> Promise:
        what = "Promise"
        d = expect_dict(obj, what)
        check_type_tag(d, cls.TAG, what)
        task_id = _task(d, what)
        rec = TaskRecord.from_wire(d["rec"]) if d.get("rec") is not None else None
        if rec is not None and rec.task_id != task_id:
            raise WireError(f"{what}: record for {rec.task_id}, expected {task_id}")
        ok = get_bool(d, "ok", what)
        if not ok and rec is None:
            raise WireError(f"{what}: a refusal must carry the winning record")
        return cls(task_id, _epoch(d, what), ok, rec)


CoordMessage = (
    Offer
    | OfferReply
    | StepCheckpoint
    | CheckpointAck
    | Heartbeat
    | CommitRequest
    | CommitReply
    | Abandon
    | Cancel
    | Query
    | QueryReply
    | Prepare
    | Promise
    | ReplicateRecord
    | ReplicateAck
)

_DECODERS: dict[str, Callable[[object], CoordMessage]] = {
    cls.TAG: cls.from_wire
    for cls in (
        Offer,
        OfferReply,
        StepCheckpoint,
        CheckpointAck,
        Heartbeat,
        CommitRequest,
        CommitReply,
        Abandon,
        Cancel,
        Query,
        QueryReply,
        Prepare,
        Promise,
        ReplicateRecord,
        ReplicateAck,
    )
}

MESSAGE_TAGS = tuple(sorted(_DECODERS))


def decode_coord_message(obj: object) -> CoordMessage:
    """Decode any coordination message from its wire dict; raises :class:`WireError` if malformed."""
    d = expect_dict(obj, "coordination message")
    tag = d.get("t")
    decoder = _DECODERS.get(tag) if isinstance(tag, str) else None
    if decoder is None:
        raise WireError(
            f"coordination message: unknown type tag {tag!r} (expected one of {list(MESSAGE_TAGS)})"
        )
    try:
        return decoder(d)
    except WireError:
        raise
    except (TypeError, ValueError, KeyError) as exc:
        raise WireError(f"coordination message {tag}: {exc}") from None
