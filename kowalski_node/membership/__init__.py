"""Pure SWIM-style membership with Lifeguard refinements (alive/suspect/dead/left, incarnations).

Public API: :class:`Membership` (the core), :class:`SwimConfig` (``lan()``/``wan()`` profiles),
the effects (:class:`Send`, :class:`MemberUp`, :class:`MemberSuspect`, :class:`MemberAlive`,
:class:`MemberDown`, :class:`LeaveComplete`) and the wire messages with ``decode_message``.
"""

from kowalski_node.membership.config import SwimConfig
from kowalski_node.membership.core import MemberInfo, Membership, MembershipStats
from kowalski_node.membership.effects import (
    LeaveComplete,
    MemberAlive,
    MemberDown,
    MembershipEffect,
    MembershipEvent,
    MemberSuspect,
    MemberUp,
    Send,
)
from kowalski_node.membership.messages import (
    Ack,
    Gossip,
    MembershipMessage,
    MemberUpdate,
    Nack,
    Ping,
    PingReq,
    Status,
    Sync,
    decode_message,
)

__all__ = [
    "Ack",
    "Gossip",
    "LeaveComplete",
    "MemberAlive",
    "MemberDown",
    "MemberInfo",
    "MemberSuspect",
    "MemberUp",
    "MemberUpdate",
    "Membership",
    "MembershipEffect",
    "MembershipEvent",
    "MembershipMessage",
    "MembershipStats",
    "Nack",
    "Ping",
    "PingReq",
    "Send",
    "Status",
    "SwimConfig",
    "Sync",
    "decode_message",
]
