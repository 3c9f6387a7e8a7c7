"""What the coordination core asks its driver to do, or tells it happened.

The driver (trio runtime, simulator, test harness) carries these out through the shared
glue (``kowalski_node/glue.py``): the ledger writes (``PutRecord``, ``PutPending``,
``DeletePending``, from :mod:`kowalski_node.tasks.store`) come first in every call's list
and are made durable, in one transaction, before anything else; ``SendMessage`` goes over
the transport; ``StartRun``/``ContinueRun``/``AbortRun`` drive the RLM run; the rest are
notifications for the API, metrics and checkers.
"""

from __future__ import annotations

from dataclasses import dataclass

from kowalski_node.coordination.messages import CoordMessage
from kowalski_node.tasks.store import DeletePending, LedgerWrite, PutPending, PutRecord


@dataclass(frozen=True, slots=True)
class SendMessage:
    """Deliver ``message`` to ``to`` (best effort; the core retries what matters)."""

    to: str
    message: CoordMessage


@dataclass(frozen=True, slots=True)
class StartRun:
    """Leader: start (``resume_step`` 0, ``snapshot`` None) or resume the RLM run of a task.

    The driver runs one step at a time and reports each with ``step_finished``; after
    that it waits for :class:`ContinueRun` before running the next step.
    """

    task_id: str
    epoch: int
    payload: bytes
    resume_step: int
    snapshot: bytes | None


@dataclass(frozen=True, slots=True)
class ContinueRun:
    """Leader: the checkpoint of ``step`` is acknowledged; run step ``step + 1``."""

    task_id: str
    epoch: int
    step: int


@dataclass(frozen=True, slots=True)
class AbortRun:
    """Leader: stop the run of ``task_id`` at ``epoch`` (fenced, task terminal, or replaced)."""

    task_id: str
    epoch: int
    reason: str


@dataclass(frozen=True, slots=True)
class LeaderChanged:
    """Owner: ``leader`` accepted the task at ``epoch`` (resuming after ``resume_step`` steps)."""

    task_id: str
    epoch: int
    leader: str
    resume_step: int
    failover: bool


@dataclass(frozen=True, slots=True)
class TaskQueued:
    """Owner: no live peer can lead the task right now; it stays durably queued and is retried."""

    task_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class TaskCommitted:
    """Owner: the task's one commit was accepted."""

    task_id: str
    epoch: int
    leader: str
    result: bytes


@dataclass(frozen=True, slots=True)
class TaskFailed:
    """Owner: the task ended without a result (the run failed, or no peer can ever run it)."""

    task_id: str
    reason: str


CoordAction = (
    SendMessage
    | StartRun
    | ContinueRun
    | AbortRun
    | LeaderChanged
    | TaskQueued
    | TaskCommitted
    | TaskFailed
)
"""Every coordination effect but the ledger writes."""

CoordEffect = LedgerWrite | CoordAction

__all__ = [
    "AbortRun",
    "ContinueRun",
    "CoordAction",
    "CoordEffect",
    "DeletePending",
    "LeaderChanged",
    "LedgerWrite",
    "PutPending",
    "PutRecord",
    "SendMessage",
    "StartRun",
    "TaskCommitted",
    "TaskFailed",
    "TaskQueued",
]
