"""Coordination messages: msgpack round trips, and malformed input raises ValueError only."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kowalski_node.coordination import (
    Abandon,
    AckStatus,
    Cancel,
    CheckpointAck,
    CommitOutcome,
    CommitReply,
    CommitRequest,
    Heartbeat,
    Offer,
    OfferReply,
    Query,
    QueryReply,
    StepCheckpoint,
    TaskSpec,
    decode_coord_message,
)
from kowalski_node.placement import Requirement
from kowalski_node.tasks import Checkpoint, ReplicateAck, ReplicateRecord, TaskRecord, TaskState

REC = TaskRecord(
    "tabc",
    "key",
    "owner",
    TaskSpec(b"hello", Requirement(language="python", min_memory=10)).encode(),
    1.5,
    state=TaskState.LEASED,
    epoch=3,
    leader="lead",
    version=2,
    checkpoint=Checkpoint(4, 3, b"Ssnap"),
)

SAMPLES = [
    Offer("tabc", 3, ("r1", "r2"), REC),
    OfferReply("tabc", 3, False, 5, "newer epoch"),
    StepCheckpoint("tabc", 3, 4, b"snap"),
    StepCheckpoint("tabc", 3, 5, b"result", final=True),
    CheckpointAck("tabc", 3, 4, AckStatus.FENCED, 4, TaskState.RUNNING),
    CheckpointAck("tabc", 3, -1, AckStatus.OK),
    Heartbeat("tabc", 3),
    CommitRequest("tabc", 3, b"result"),
    CommitRequest("tabc", 3, b"", "it broke"),
    CommitReply("tabc", 3, CommitOutcome.DUPLICATE, 4, "already"),
    Abandon("tabc", 3),
    Cancel("tabc", 0),
    Query("tabc"),
    QueryReply("tabc", REC),
    QueryReply("tabc", None),
    ReplicateRecord(REC),
    ReplicateAck("tabc", 3, 2, True, "lead", TaskState.RUNNING),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_through_msgpack(msg: object) -> None:
    wire = msgpack.unpackb(msgpack.packb(msg.to_wire(), use_bin_type=True), raw=False)  # type: ignore[attr-defined]
    assert decode_coord_message(wire) == msg


def test_spec_round_trip_and_errors() -> None:
    spec = TaskSpec(b"x", Requirement(language="python", min_memory=5, model="m", backend="b"))
    assert TaskSpec.decode(spec.encode()) == spec
    with pytest.raises(ValueError, match="msgpack"):
        TaskSpec.decode(b"\xc1")
    with pytest.raises(ValueError, match="type tag"):
        TaskSpec.decode(msgpack.packb({"t": "nope"}))


@pytest.mark.parametrize(
    "bad, needle",
    [
        ([], "expected a dict"),
        ({"t": "co_nope"}, "unknown type tag"),
        ({"t": "co_offer_reply", "k": "t", "e": 0, "ok": True}, "below the minimum"),
        ({"t": "co_checkpoint", "k": "t", "e": 1, "n": "1", "b": b""}, "expected int"),
        ({"t": "co_checkpoint_ack", "k": "t", "e": 1, "n": 1, "st": "maybe"}, "unknown ack status"),
        ({"t": "co_commit_reply", "k": "t", "e": 1, "o": "yes"}, "unknown commit outcome"),
        ({"t": "co_heartbeat", "k": "", "e": 1}, "must not be empty"),
        ({"t": "co_offer", "k": "other", "e": 3, "r": [], "rec": REC.to_wire()}, "record is for"),
    ],
)
def test_malformed_messages_name_the_problem(bad: object, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        decode_coord_message(bad)


wire_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=6)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    tag=st.sampled_from([str(m.TAG) for m in SAMPLES]),  # type: ignore[attr-defined]
    body=st.dictionaries(
        st.sampled_from(["k", "e", "n", "b", "r", "rec", "st", "o", "ok", "ke", "s", "err", "ce"]),
        wire_values,
        max_size=8,
    ),
)
def test_fuzzed_messages_only_raise_value_error(tag: str, body: dict[str, object]) -> None:
    body = dict(body, t=tag)
    with contextlib.suppress(ValueError):
        decode_coord_message(body)


@settings(max_examples=200, deadline=None)
@given(
    idx=st.integers(0, len(SAMPLES) - 1),
    key=st.sampled_from(["k", "e", "n", "b", "r", "rec", "st", "o", "ok"]),
    value=wire_values,
)
def test_mutated_valid_messages_only_raise_value_error(idx: int, key: str, value: object) -> None:
    wire = SAMPLES[idx].to_wire()  # type: ignore[attr-defined]
    wire[key] = value
    with contextlib.suppress(ValueError):
        decode_coord_message(wire)
