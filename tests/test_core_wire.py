"""Wire encoding of the core messages: round trips, and hostile input gives WireError only."""

from __future__ import annotations

import contextlib
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kowalski_node.membership import messages
from kowalski_node.wire import WireError

peer_ids = st.text(min_size=1, max_size=40)
updates = st.builds(
    messages.MemberUpdate,
    peer=peer_ids,
    status=st.sampled_from(list(messages.Status)),
    incarnation=st.integers(min_value=0, max_value=2**40),
    addr=st.text(max_size=60),
    by=st.text(max_size=20),
)
update_lists = st.lists(updates, max_size=8)
membership_messages = st.one_of(
    st.builds(messages.Ping, seq=st.integers(0, 2**40), target=peer_ids, updates=update_lists),
    st.builds(
        messages.PingReq,
        seq=st.integers(0, 2**40),
        target=peer_ids,
        target_addr=st.text(max_size=60),
        timeout=st.floats(0, 60),
        updates=update_lists,
    ),
    st.builds(
        messages.Ack, seq=st.integers(0, 2**40), inc=st.integers(0, 2**40), updates=update_lists
    ),
    st.builds(messages.Nack, seq=st.integers(0, 2**40)),
    st.builds(messages.Gossip, updates=update_lists),
    st.builds(messages.Sync, members=update_lists, reply=st.booleans()),
)


@given(membership_messages)
@settings(max_examples=300, deadline=None)
def test_membership_messages_roundtrip_through_msgpack(msg: Any) -> None:
    raw = msgpack.packb(msg.to_wire(), use_bin_type=True)
    assert messages.decode_message(msgpack.unpackb(raw, raw=False)) == msg


json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4)
    ),
    max_leaves=20,
)


@given(json_like)
@settings(max_examples=400, deadline=None)
def test_arbitrary_data_raises_wire_error_only(obj: Any) -> None:
    with contextlib.suppress(WireError):
        messages.decode_message(obj)


@given(membership_messages, st.text(max_size=3), json_like)
@settings(max_examples=400, deadline=None)
def test_mutated_messages_raise_wire_error_only(msg: Any, key: str, value: Any) -> None:
    d = msg.to_wire()
    target = d
    if d.get("u"):
        target = d["u"][0] if key.startswith("u") else d
    target[key[:1] or "q"] = value
    with contextlib.suppress(WireError):
        messages.decode_message(d)


@pytest.mark.parametrize(
    ("obj", "fragment"),
    [
        ([], "expected a dict"),
        ({"t": "bogus"}, "unknown type tag"),
        ({"t": "ping", "q": -1, "g": "a"}, "below the minimum"),
        ({"t": "ping", "q": True, "g": "a"}, "expected int"),
        ({"t": "ping", "q": 1}, "missing field 'g'"),
        (
            {"t": "ping", "q": 1, "g": "a", "u": [{"p": "x", "s": "zombie", "i": 0}]},
            "unknown status",
        ),
        ({"t": "ping_req", "q": 1, "g": "a", "o": float("nan")}, "finite"),
        ({"t": "gossip", "u": [{}] * 65}, "exceed the limit"),
    ],
)
def test_malformed_messages_name_the_problem(obj: Any, fragment: str) -> None:
    with pytest.raises(WireError, match=fragment):
        messages.decode_message(obj)


# --------------------------------------------------------------------------- other cores' messages


def _other_decoders() -> list[Any]:
    from kowalski_node.capabilities import DeviceProfile
    from kowalski_node.tasks import ReplicateAck, ReplicateRecord, TaskRecord

    return [
        DeviceProfile.from_wire,
        TaskRecord.from_wire,
        ReplicateRecord.from_wire,
        ReplicateAck.from_wire,
    ]


def _valid_samples() -> list[dict[str, Any]]:
    from kowalski_node.capabilities import DeviceProfile, ServedModel
    from kowalski_node.tasks import Checkpoint, ReplicateAck, TaskRecord, TaskState

    rec = TaskRecord(
        "t1", "k", "s", b"p", 1.0, TaskState.RUNNING, 2, "L", 3, 1, 0, 0, Checkpoint(1, 2, b"x")
    )
    return [
        DeviceProfile("a", 1, models=(ServedModel("m", 4),), repl_languages=("python",)).to_wire(),
        rec.to_wire(),
        {"t": "replicate", "rec": rec.to_wire()},
        ReplicateAck("t1", 2, 3, True).to_wire(),
    ]


@given(json_like, st.integers(0, 3))
@settings(max_examples=400, deadline=None)
def test_other_decoders_raise_wire_error_only_on_garbage(obj: Any, which: int) -> None:
    with contextlib.suppress(WireError):
        _other_decoders()[which](obj)


@given(st.integers(0, 3), st.text(max_size=4), json_like)
@settings(max_examples=600, deadline=None)
def test_other_decoders_raise_wire_error_only_on_mutations(
    which: int, key: str, value: Any
) -> None:
    d = _valid_samples()[which]
    keys = sorted(d)
    d[keys[len(key) % len(keys)] if key else key] = value
    with contextlib.suppress(WireError):
        _other_decoders()[which](d)
