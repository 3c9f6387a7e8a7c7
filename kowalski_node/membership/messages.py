"""Membership wire messages: plain dataclasses with ``to_wire``/``from_wire``.

The transport frames the dicts (msgpack); the sender is the authenticated remote peer and
is passed to ``Membership.handle`` separately, so messages do not repeat it. Messages are
treated as immutable once built (a fake network may deliver one object twice).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from kowalski_node.wire import (
    WireError,
    check_type_tag,
    expect_dict,
    get_bool,
    get_float,
    get_int,
    get_list,
    get_str,
)

MAX_PEER_ID = 256
MAX_ADDR = 1024
MAX_UPDATES_PER_MESSAGE = 64
MAX_SYNC_MEMBERS = 100_000
MAX_INCARNATION = 2**62


class Status(StrEnum):
    """A member's state as seen by one node. Precedence at equal incarnation: left > dead > suspect > alive."""

    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


STATUS_RANK = {Status.ALIVE: 0, Status.SUSPECT: 1, Status.DEAD: 2, Status.LEFT: 3}
_STATUS_BY_VALUE = {s.value: s for s in Status}


@dataclass(slots=True)
class MemberUpdate:
    """One gossiped fact: ``peer`` is in ``status`` at ``incarnation``.

    ``by`` names the node that raised a suspicion (Lifeguard counts distinct suspecters as
    independent confirmations); it is empty for other statuses.
    """

    peer: str
    status: Status
    incarnation: int
    addr: str = ""
    by: str = ""

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {"p": self.peer, "s": self.status.value, "i": self.incarnation}
        if self.addr:
            d["a"] = self.addr
        if self.by:
            d["b"] = self.by
        return d

    @classmethod
    def from_wire(cls, obj: object) -> MemberUpdate:
        what = "MemberUpdate"
        d = expect_dict(obj, what)
        status_s = get_str(d, "s", what)
        status = _STATUS_BY_VALUE.get(status_s)
        if status is None:
            raise WireError(
                f"{what}.s: unknown status {status_s!r} (expected one of {sorted(_STATUS_BY_VALUE)})"
            )
        return cls(
            peer=get_str(d, "p", what, max_len=MAX_PEER_ID, allow_empty=False),
            status=status,
            incarnation=get_int(d, "i", what, min_value=0, max_value=MAX_INCARNATION),
            addr=get_str(d, "a", what, default="", max_len=MAX_ADDR),
            by=get_str(d, "b", what, default="", max_len=MAX_PEER_ID),
        )


def _updates_to_wire(updates: list[MemberUpdate]) -> list[dict[str, Any]]:
    return [u.to_wire() for u in updates]


def _updates_from_wire(
    d: Any, what: str, key: str = "u", max_len: int = MAX_UPDATES_PER_MESSAGE
) -> list[MemberUpdate]:
    return [MemberUpdate.from_wire(x) for x in get_list(d, key, what, max_len=max_len, default=[])]


@dataclass(slots=True)
class Ping:
    """Direct probe. ``target`` is the peer the sender meant, so a misrouted ping is ignored."""

    seq: int
    target: str
    updates: list[MemberUpdate] = field(default_factory=list)

    TAG = "ping"

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.TAG, "q": self.seq, "g": self.target, "u": _updates_to_wire(self.updates)}

    @classmethod
    def from_wire(cls, obj: object) -> Ping:
        what = "Ping"
        d = expect_dict(obj, what)
        check_type_tag(d, cls.TAG, what)
        return cls(
            seq=get_int(d, "q", what, min_value=0),
            target=get_str(d, "g", what, max_len=MAX_PEER_ID, allow_empty=False),
            updates=_updates_from_wire(d, what),
        )


@dataclass(slots=True)
class PingReq:
    """Ask the receiver to probe ``target`` for us and forward the ack (indirect probe)."""

    seq: int
    target: str
    target_addr: str
    timeout: float
    updates: list[MemberUpdate] = field(default_factory=list)

    TAG = "ping_req"

    def to_wire(self) -> dict[str, Any]:
        return {
            "t": self.TAG,
            "q": self.seq,
            "g": self.target,
            "a": self.target_addr,
            "o": self.timeout,
            "u": _updates_to_wire(self.updates),
        }

    @classmethod
    def from_wire(cls, obj: object) -> PingReq:
        what = "PingReq"
        d = expect_dict(obj, what)
        check_type_tag(d, cls.TAG, what)
        return cls(
            seq=get_int(d, "q", what, min_value=0),
            target=get_str(d, "g", what, max_len=MAX_PEER_ID, allow_empty=False),
            target_addr=get_str(d, "a", what, default="", max_len=MAX_ADDR),
            timeout=get_float(d, "o", what, min_value=0.0, max_value=60.0),
            updates=_updates_from_wire(d, what),
        )


@dataclass(slots=True)
class Ack:
    """Answer to a ping (or a forwarded answer through an indirect-probe relay).

    ``inc`` is the probed member's own incarnation: an ack is first-hand proof of life, so
    a prober that suspects an older incarnation takes it as the refutation, even when the
    refutation update itself has already left every gossip queue.
    """

    seq: int
    inc: int
    updates: list[MemberUpdate] = field(default_factory=list)

    TAG = "ack"

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.TAG, "q": self.seq, "n": self.inc, "u": _updates_to_wire(self.updates)}

    @classmethod
    def from_wire(cls, obj: object) -> Ack:
        what = "Ack"
        d = expect_dict(obj, what)
        check_type_tag(d, cls.TAG, what)
        return cls(
            seq=get_int(d, "q", what, min_value=0),
            inc=get_int(d, "n", what, min_value=0, max_value=MAX_INCARNATION),
            updates=_updates_from_wire(d, what),
        )


@dataclass(slots=True)
class Nack:
    """A relay reached the end of its wait without an ack: tells the requester the relay is healthy."""

    seq: int

    TAG = "nack"

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.TAG, "q": self.seq}

    @classmethod
    def from_wire(cls, obj: object) -> Nack:
        what = "Nack"
        d = expect_dict(obj, what)
        check_type_tag(d, cls.TAG, what)
        return cls(seq=get_int(d, "q", what, min_value=0))


@dataclass(slots=True)
class Gossip:
    """Fire-and-forget dissemination of membership updates."""

    updates: list[MemberUpdate] = field(default_factory=list)

    TAG = "gossip"

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.TAG, "u": _updates_to_wire(self.updates)}

    @classmethod
    def from_wire(cls, obj: object) -> Gossip:
        what = "Gossip"
        d = expect_dict(obj, what)
        check_type_tag(d, cls.TAG, what)
        return cls(updates=_updates_from_wire(d, what))


@dataclass(slots=True)
class Sync:
    """Push-pull anti-entropy: the sender's full member table; ``reply`` asks for the receiver's.

    Used for joining (to a seed), healing partitions (to a dead member) and periodic repair.
    """

    members: list[MemberUpdate]
    reply: bool

    TAG = "sync"

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.TAG, "m": _updates_to_wire(self.members), "r": self.reply}

    @classmethod
    def from_wire(cls, obj: object) -> Sync:
        what = "Sync"
        d = expect_dict(obj, what)
        check_type_tag(d, cls.TAG, what)
        return cls(
            members=_updates_from_wire(d, what, key="m", max_len=MAX_SYNC_MEMBERS),
            reply=get_bool(d, "r", what),
        )


MembershipMessage = Ping | PingReq | Ack | Nack | Gossip | Sync

_DECODERS: dict[str, Any] = {
    Ping.TAG: Ping.from_wire,
    PingReq.TAG: PingReq.from_wire,
    Ack.TAG: Ack.from_wire,
    Nack.TAG: Nack.from_wire,
    Gossip.TAG: Gossip.from_wire,
    Sync.TAG: Sync.from_wire,
}


def decode_message(obj: object) -> MembershipMessage:
    """Decode any membership message by its ``t`` tag; raises :class:`WireError` on bad input."""
    d = expect_dict(obj, "membership message")
    tag = d.get("t")
    decoder = _DECODERS.get(tag) if isinstance(tag, str) else None
    if decoder is None:
        raise WireError(
            f"membership message: unknown type tag {tag!r} (expected one of {sorted(_DECODERS)})"
        )
    msg: MembershipMessage = decoder(d)
    return msg
