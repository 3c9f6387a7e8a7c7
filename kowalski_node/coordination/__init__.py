"""Pure per-task coordination: owner-arbitrated leases and fencing, checkpointed runs, commit-once.

Public API: :class:`Coordinator` (the state machine; ``handle``/``tick``/``next_deadline``
plus ``submit``, ``step_finished``, ``run_finished``, ``run_failed``, ``cancel``,
``recover``, ``peer_up``/``peer_down``/``peer_suspect``/``peer_alive``,
``update_profile``), :class:`CoordConfig`, :class:`SubmitOutcome`, :class:`CoordStats`,
the effects (the ledger writes :class:`PutRecord`, :class:`PutPending`,
:class:`DeletePending` first, then :class:`SendMessage`, :class:`StartRun`, :class:`ContinueRun`,
:class:`AbortRun`, :class:`LeaderChanged`, :class:`TaskQueued`, :class:`TaskCommitted`,
:class:`TaskFailed`), the messages with :func:`decode_coord_message`, and
:class:`TaskSpec`. See docs/coordination.md.
"""

from kowalski_node.coordination.config import CoordConfig
from kowalski_node.coordination.core import Coordinator, SubmitOutcome
from kowalski_node.coordination.effects import (
    AbortRun,
    ContinueRun,
    CoordAction,
    CoordEffect,
    DeletePending,
    LeaderChanged,
    LedgerWrite,
    PutPending,
    PutRecord,
    SendMessage,
    StartRun,
    TaskCommitted,
    TaskFailed,
    TaskQueued,
)
from kowalski_node.coordination.messages import (
    MESSAGE_TAGS,
    Abandon,
    AckStatus,
    Cancel,
    CheckpointAck,
    CommitOutcome,
    CommitReply,
    CommitRequest,
    CoordMessage,
    Heartbeat,
    Offer,
    OfferReply,
    Prepare,
    Promise,
    Query,
    QueryReply,
    StepCheckpoint,
    decode_coord_message,
)
from kowalski_node.coordination.spec import TaskSpec
from kowalski_node.coordination.state import LeaderPhase, OwnerPhase
from kowalski_node.coordination.stats import CoordStats

__all__ = [
    "MESSAGE_TAGS",
    "Abandon",
    "AbortRun",
    "AckStatus",
    "Cancel",
    "CheckpointAck",
    "CommitOutcome",
    "CommitReply",
    "CommitRequest",
    "ContinueRun",
    "CoordAction",
    "CoordConfig",
    "CoordEffect",
    "CoordMessage",
    "CoordStats",
    "Coordinator",
    "DeletePending",
    "Heartbeat",
    "LeaderChanged",
    "LeaderPhase",
    "LedgerWrite",
    "Offer",
    "OfferReply",
    "OwnerPhase",
    "Prepare",
    "Promise",
    "PutPending",
    "PutRecord",
    "Query",
    "QueryReply",
    "SendMessage",
    "StartRun",
    "StepCheckpoint",
    "SubmitOutcome",
    "TaskCommitted",
    "TaskFailed",
    "TaskQueued",
    "TaskSpec",
    "decode_coord_message",
]
