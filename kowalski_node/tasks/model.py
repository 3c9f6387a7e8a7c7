"""Task records, checkpoints, and the deterministic merge that replicas use.

A record is immutable; every change makes a new one (``dataclasses.replace``). Replicas
receive whole records and merge them with :func:`merge_records`, a join (commutative,
associative, idempotent), so every replica converges whatever order or how many times
copies arrive:

* the *head* (state, leader, owner, epoch, version, result, error) comes from the record with
  the greater head key: committed > cancelled > failed > live, then (epoch, version), then
  a content digest as the last tie-break;
* counters (executions, commits, rejected commits) are merged by max;
* the checkpoint is the greatest by (epoch, step, digest): a newer leader's lineage
  supersedes whatever a fenced-off older leader managed to write.

``submitter`` is the task's *current owner* (the node that grants its leases and
accepts its commit). It starts as the node that took the submission and changes only
with a higher epoch, when a surviving acceptor takes the task over, so it belongs to
the head. ``acceptors`` (see docs/coordination.md) are the nodes a majority of which
must store every lease and the final result: set at submission, and re-formed only by
an owner whose ballot a majority of both the old and the new set stored (a dead member
replaced). While that ballot is out, the new set is only ``staged`` (at
``staged_epoch``); once it won, ``acceptors`` is the new set and ``config_epoch`` that
ballot. A merge keeps the acceptors of the copy with the greater ``config_epoch`` and the
staged set of the copy with the greater ``staged_epoch``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from kowalski_node.wire import (
    WireError,
    check_type_tag,
    expect_dict,
    get_bytes,
    get_float,
    get_int,
    get_opt_str,
    get_str,
    get_str_list,
)

MAX_KEY = 256
MAX_PAYLOAD = 64 * 1024 * 1024
MAX_ACCEPTORS = 7


class TaskState(StrEnum):
    QUEUED = "queued"
    LEASED = "leased"
    RUNNING = "running"
    COMMITTED = "committed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATES = frozenset({TaskState.COMMITTED, TaskState.FAILED, TaskState.CANCELLED})
_STATE_BY_VALUE = {s.value: s for s in TaskState}
# How strongly a state claims the head in a merge (terminal outcomes dominate live ones).
_HEAD_CLASS = {
    TaskState.QUEUED: 0,
    TaskState.LEASED: 0,
    TaskState.RUNNING: 0,
    TaskState.FAILED: 1,
    TaskState.CANCELLED: 2,
    TaskState.COMMITTED: 3,
}
_LIVE_ORDER = {TaskState.QUEUED: 0, TaskState.LEASED: 1, TaskState.RUNNING: 2}


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """An opaque snapshot of a task after ``step`` steps, written by the leader of ``epoch``."""

    step: int
    epoch: int
    snapshot: bytes

    def digest(self) -> bytes:
        return hashlib.blake2b(self.snapshot, digest_size=16).digest()

    def key(self) -> tuple[int, int, bytes]:
        return (self.epoch, self.step, self.digest())

    def to_wire(self) -> dict[str, Any]:
        return {"s": self.step, "e": self.epoch, "b": self.snapshot}

    @classmethod
    def from_wire(cls, obj: object) -> Checkpoint:
        what = "Checkpoint"
        d = expect_dict(obj, what)
        return cls(
            step=get_int(d, "s", what, min_value=0, max_value=2**62),
            epoch=get_int(d, "e", what, min_value=0, max_value=2**62),
            snapshot=get_bytes(d, "b", what, max_len=MAX_PAYLOAD),
        )


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """Everything a replica keeps about one task."""

    task_id: str
    idempotency_key: str
    submitter: str
    payload: bytes
    created_at: float
    state: TaskState = TaskState.QUEUED
    epoch: int = 0
    leader: str = ""
    version: int = 0
    executions: int = 0
    commits: int = 0
    rejected_commits: int = 0
    checkpoint: Checkpoint | None = None
    result: bytes | None = None
    error: str | None = None
    updated_at: float = 0.0
    acceptors: tuple[str, ...] = ()
    """Set at submission; empty = the owner alone arbitrates (clusters under 3 nodes)."""
    config_epoch: int = 0
    """The ballot that set ``acceptors`` (0 = at submission)."""
    staged: tuple[str, ...] = ()
    """A new acceptor set proposed at ballot ``staged_epoch``; pending while that is newer
    than ``config_epoch`` (then the next owner must ballot over both sets)."""
    staged_epoch: int = 0

    @property
    def pending_acceptors(self) -> tuple[str, ...]:
        """The staged set if it may have won without this copy knowing, else ()."""
        return self.staged if self.staged_epoch > self.config_epoch else ()

    TAG = "task"

    @property
    def quorum_set(self) -> tuple[str, ...]:
        """Who must store leases and results: the acceptors, or the owner alone."""
        return self.acceptors or (self.submitter,)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def head_key(self) -> tuple[int, int, int, int, bytes]:
        """Total order used to pick the head in a merge (see module docstring)."""
        return (
            _HEAD_CLASS[self.state],
            self.epoch,
            self.version,
            _LIVE_ORDER.get(self.state, 0),
            self._head_digest(),
        )

    def _head_digest(self) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        for part in (self.state.value, self.leader, self.submitter, self.error or ""):
            h.update(part.encode("utf-8"))
            h.update(b"\x00")
        h.update(self.result if self.result is not None else b"\xff<none>")
        h.update(repr(self.updated_at).encode())
        return h.digest()

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "t": self.TAG,
            "id": self.task_id,
            "key": self.idempotency_key,
            "sub": self.submitter,
            "p": self.payload,
            "c": self.created_at,
            "st": self.state.value,
            "e": self.epoch,
            "l": self.leader,
            "v": self.version,
            "x": self.executions,
            "n": self.commits,
            "rj": self.rejected_commits,
            "u": self.updated_at,
        }
        if self.checkpoint is not None:
            d["cp"] = self.checkpoint.to_wire()
        if self.result is not None:
            d["r"] = self.result
        if self.error is not None:
            d["err"] = self.error
        if self.acceptors:
            d["acc"] = list(self.acceptors)
        if self.config_epoch:
            d["ace"] = self.config_epoch
        if self.staged:
            d["stg"] = list(self.staged)
            d["stge"] = self.staged_epoch
        return d

    @classmethod
    def from_wire(cls, obj: object) -> TaskRecord:
        what = "TaskRecord"
        d = expect_dict(obj, what)
        check_type_tag(d, cls.TAG, what)
        state_s = get_str(d, "st", what)
        state = _STATE_BY_VALUE.get(state_s)
        if state is None:
            raise WireError(
                f"{what}.st: unknown task state {state_s!r} (expected one of {sorted(_STATE_BY_VALUE)})"
            )
        cp = d.get("cp")
        result = d.get("r")
        if result is not None and not isinstance(result, bytes | bytearray):
            raise WireError(f"{what}.r: expected bytes, got {type(result).__name__}")
        commits = get_int(d, "n", what, min_value=0, max_value=1)
        if state is TaskState.COMMITTED and commits != 1:
            raise WireError(f"{what}: a committed record must carry commits=1, got {commits}")
        return cls(
            task_id=get_str(d, "id", what, max_len=MAX_KEY, allow_empty=False),
            idempotency_key=get_str(d, "key", what, max_len=MAX_KEY, allow_empty=False),
            submitter=get_str(d, "sub", what, max_len=MAX_KEY),
            payload=get_bytes(d, "p", what, max_len=MAX_PAYLOAD),
            created_at=get_float(d, "c", what),
            state=state,
            epoch=get_int(d, "e", what, min_value=0, max_value=2**62),
            leader=get_str(d, "l", what, max_len=MAX_KEY),
            version=get_int(d, "v", what, min_value=0, max_value=2**62),
            executions=get_int(d, "x", what, min_value=0, max_value=2**62),
            commits=commits,
            rejected_commits=get_int(d, "rj", what, min_value=0, max_value=2**62),
            checkpoint=Checkpoint.from_wire(cp) if cp is not None else None,
            result=bytes(result) if result is not None else None,
            error=get_opt_str(d, "err", what, max_len=65536),
            updated_at=get_float(d, "u", what),
            acceptors=tuple(get_str_list(d, "acc", what, max_len=MAX_ACCEPTORS, default=[])),
            config_epoch=get_int(d, "ace", what, min_value=0, max_value=2**62, default=0),
            staged=tuple(get_str_list(d, "stg", what, max_len=MAX_ACCEPTORS, default=[])),
            staged_epoch=get_int(d, "stge", what, min_value=0, max_value=2**62, default=0),
        )


def _max_checkpoint(a: Checkpoint | None, b: Checkpoint | None) -> Checkpoint | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if a.key() >= b.key() else b


def merge_records(a: TaskRecord, b: TaskRecord) -> TaskRecord:
    """Join two copies of the same task (see module docstring). Raises if the ids differ."""
    if a.task_id != b.task_id:
        raise ValueError(f"merge_records: different tasks {a.task_id!r} and {b.task_id!r}")
    if a == b:
        return a
    head = a if a.head_key() >= b.head_key() else b
    # Immutable identity fields: keep the smallest encoding so the choice is order-free.
    ident = (
        a
        if (a.created_at, a.idempotency_key, a.acceptors, a.payload)
        <= (
            b.created_at,
            b.idempotency_key,
            b.acceptors,
            b.payload,
        )
        else b
    )
    # The acceptor set: the newest re-formation wins, else the identity rule above.
    if a.config_epoch != b.config_epoch:
        config = a if a.config_epoch > b.config_epoch else b
    else:
        config = ident
    staged = a if (a.staged_epoch, a.staged) >= (b.staged_epoch, b.staged) else b
    return replace(
        head,
        idempotency_key=ident.idempotency_key,
        acceptors=config.acceptors,
        config_epoch=config.config_epoch,
        staged=staged.staged,
        staged_epoch=staged.staged_epoch,
        payload=ident.payload,
        created_at=ident.created_at,
        executions=max(a.executions, b.executions),
        commits=max(a.commits, b.commits),
        rejected_commits=max(a.rejected_commits, b.rejected_commits),
        checkpoint=_max_checkpoint(a.checkpoint, b.checkpoint),
    )


def commits_conflict(a: TaskRecord, b: TaskRecord) -> bool:
    """Both copies are committed with different results: a second value was committed.

    The same result at two epochs is one decision learned twice (an owner that died
    right after committing, and the acceptor that took over and finished the commit).
    """
    return (
        a.state is TaskState.COMMITTED and b.state is TaskState.COMMITTED and a.result != b.result
    )
