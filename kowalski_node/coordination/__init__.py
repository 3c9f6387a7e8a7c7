"""Pure per-task coordination: owner-arbitrated leases and fencing, checkpointed runs, commit-once.

Public API: :class:`Coordinator` (the state machine; ``handle``/``tick``/``next_deadline``
plus ``submit``, ``step_finished``, ``run_finished``, ``run_failed``, ``cancel``,
``recover``, ``peer_up``/``peer_down``/``peer_suspect``/``peer_alive``,
``update_profile``), :class:`CoordConfig`, :class:`SubmitOutcome`, :class:`CoordStats`,
the effects (:class:`SendMessage`, :class:`StartRun`, :class:`ContinueRun`,
:class:`AbortRun`, :class:`LeaderChanged`, :class:`TaskQueued`, :class:`TaskCommitted`,
:class:`TaskFailed`), the messages with :func:`decode_coord_message`, and
:class:`TaskSpec`. See docs/coordination.md.
"""

from kowalski_node.coordination.config import CoordConfig
from kowalski_node.coordination.core import Coordinator, SubmitOutcome
from kowalski_node.coordination.effects import (
    AbortRun,
    ContinueRun,
    CoordEffect,
    LeaderChanged,
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
    "CoordConfig",
    "CoordEffect",
    "CoordMessage",
    "CoordStats",
    "Coordinator",
    "Heartbeat",
    "LeaderChanged",
    "LeaderPhase",
    "Offer",
    "OfferReply",
    "OwnerPhase",
    "Prepare",
    "Promise",
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
