"""What the membership core asks its driver to do, or tells it happened."""

from __future__ import annotations

from dataclasses import dataclass

from kowalski_node.membership.messages import MembershipMessage


@dataclass(slots=True)
class Send:
    """Deliver ``message`` to peer ``to`` (best effort: loss is expected and tolerated).

    ``addr`` is the last address the core knows for ``to`` ('' if none): a dial hint for
    peers the transport has not met yet (joins through seeds, indirect probes).
    """

    to: str
    message: MembershipMessage
    addr: str = ""


@dataclass(slots=True)
class MemberUp:
    """``peer`` became a live member (first seen, or back after being dead/left)."""

    peer: str
    addr: str
    incarnation: int


@dataclass(slots=True)
class MemberSuspect:
    """``peer`` is suspected of having failed; it is still a member until declared down."""

    peer: str
    incarnation: int


@dataclass(slots=True)
class MemberAlive:
    """``peer`` refuted a suspicion (it is alive at a higher incarnation)."""

    peer: str
    incarnation: int


@dataclass(slots=True)
class MemberDown:
    """``peer`` is out: declared dead (``left`` False) or left gracefully (``left`` True)."""

    peer: str
    incarnation: int
    left: bool


@dataclass(slots=True)
class LeaveComplete:
    """The leave announcement has had time to spread: the driver may stop this node."""


MembershipEvent = MemberUp | MemberSuspect | MemberAlive | MemberDown | LeaveComplete
MembershipEffect = Send | MembershipEvent
