"""Envelope codec, framing, protocol IDs and the golden vectors in protocols/vectors."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kowalski_node.adapters.libp2p import envelope as env
from kowalski_node.adapters.libp2p import protocol_ids
from kowalski_node.adapters.libp2p.framing import (
    FrameDecoder,
    FrameError,
    FrameTooLarge,
    decode_varint,
    encode_frame,
    encode_varint,
)

VECTORS = Path(__file__).resolve().parents[1] / "protocols" / "vectors" / "envelope"


def from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$bytes"}:
            return bytes.fromhex(value["$bytes"])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


GOLDEN = sorted(p.stem for p in VECTORS.glob("*.msgpack"))


def test_golden_vectors_exist() -> None:
    assert len(GOLDEN) >= 5


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_envelope_decodes_and_reencodes(name: str) -> None:
    packed = (VECTORS / f"{name}.msgpack").read_bytes()
    expected = json.loads((VECTORS / f"{name}.json").read_text())
    decoded = env.decode_envelope(packed)
    want = from_json(expected["decoded"])
    assert decoded.model_dump() == want
    assert env.encode_envelope(decoded) == packed  # the wire form is stable
    frames = FrameDecoder().feed(bytes.fromhex(expected["frame_hex"]))
    assert frames == [packed]


def test_unknown_fields_are_ignored_and_other_major_is_refused() -> None:
    body = {"v": 1, "kind": "request", "type": "ping", "id": 1, "payload": None, "extra": [1]}
    assert env.decode_envelope(msgpack.packb(body)).type == "ping"
    body["v"] = 2
    with pytest.raises(env.MalformedMessage) as info:
        env.decode_envelope(msgpack.packb(body))
    assert info.value.code == env.ERR_UNSUPPORTED_VERSION
    assert info.value.request_id == 1


@pytest.mark.parametrize(
    "body",
    [
        [1, 2, 3],
        {"kind": "request"},
        {"kind": "shout", "type": "ping"},
        {"kind": "request", "type": "Bad Type"},
        {"kind": "request", "type": "ping", "id": -1},
        {"kind": "request", "type": "ping", "id": "7"},
        {"kind": "request", "type": "x" * 100},
        {"v": True, "kind": "request", "type": "ping"},
    ],
)
def test_invalid_envelopes_are_malformed(body: Any) -> None:
    with pytest.raises(env.MalformedMessage):
        env.decode_envelope(msgpack.packb(body))


def test_ext_types_and_garbage_are_malformed() -> None:
    with pytest.raises(env.MalformedMessage):
        env.decode_envelope(msgpack.packb(msgpack.ExtType(5, b"x")))
    with pytest.raises(env.MalformedMessage):
        env.decode_envelope(b"\xc1")  # never-used msgpack byte
    with pytest.raises(env.MalformedMessage):
        env.decode_envelope(b"")


def test_unserialisable_payload_is_a_clear_error() -> None:
    with pytest.raises(env.MalformedMessage, match="not msgpack-serialisable"):
        env.encode_envelope(env.request("ping", {"obj": object()}, 1))


@given(st.binary(max_size=512))
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_decoder_never_raises_anything_but_malformed(data: bytes) -> None:
    with contextlib.suppress(env.MalformedMessage):
        env.decode_envelope(data)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.floats(allow_nan=False),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(
    st.sampled_from(["request", "reply", "error", "notify"]),
    st.from_regex(env.TYPE_PATTERN, fullmatch=True).filter(lambda t: len(t) <= env.MAX_TYPE_LEN),
    st.integers(0, env.MAX_REQUEST_ID),
    msgpack_values,
)
@settings(max_examples=80)
def test_roundtrip_any_valid_envelope(kind: str, type_: str, rid: int, payload: Any) -> None:
    message = env.Envelope(kind=kind, type=type_, id=rid, payload=payload)  # type: ignore[arg-type]
    assert env.decode_envelope(env.encode_envelope(message)) == message


@given(st.dictionaries(st.text(max_size=10), msgpack_values, max_size=6))
@settings(max_examples=80)
def test_random_maps_decode_or_are_malformed(body: dict[str, Any]) -> None:
    with contextlib.suppress(env.MalformedMessage):
        env.decode_envelope(msgpack.packb(body, use_bin_type=True))


# ------------------------------------------------------------------------------ framing


@given(st.integers(0, 2**63))
def test_varint_roundtrip(value: int) -> None:
    encoded = encode_varint(value)
    assert decode_varint(encoded) == (value, len(encoded))
    assert decode_varint(encoded[:-1]) is None


def test_frames_split_anywhere_reassemble() -> None:
    frames = [b"", b"a", b"x" * 300, bytes(range(256)) * 10]
    wire = b"".join(encode_frame(f) for f in frames)
    for step in (1, 2, 3, 7, 128, len(wire)):
        decoder = FrameDecoder()
        got: list[bytes] = []
        for i in range(0, len(wire), step):
            got.extend(decoder.feed(wire[i : i + step]))
        assert got == frames
        assert not decoder.in_frame


def test_oversized_frame_rejected_before_buffering() -> None:
    decoder = FrameDecoder(max_frame=1024)
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(encode_varint(10**9))  # only the header arrived: nothing allocated
    assert info.value.size == 10**9
    assert decoder.buffered == 0
    with pytest.raises(FrameTooLarge):
        encode_frame(b"x" * 1025, max_frame=1024)


def test_malformed_varints() -> None:
    with pytest.raises(FrameError, match="longer than"):
        FrameDecoder().feed(b"\xff" * 11)
    with pytest.raises(FrameError, match="non-minimal"):
        FrameDecoder().feed(b"\x80\x00")


@given(st.binary(max_size=2048))
@settings(max_examples=300)
def test_frame_decoder_random_bytes_bounded(data: bytes) -> None:
    decoder = FrameDecoder(max_frame=256)
    try:
        frames = decoder.feed(data)
    except FrameError:
        return
    assert all(len(f) <= 256 for f in frames)
    assert decoder.buffered <= 256 + 10


# ------------------------------------------------------------------------------ protocol IDs


def test_protocol_ids_are_well_formed_and_distinct() -> None:
    assert len(set(protocol_ids.ALL_PROTOCOLS)) == len(protocol_ids.ALL_PROTOCOLS)
    for pid in protocol_ids.ALL_PROTOCOLS:
        assert protocol_ids.check_protocol(pid) == pid
    for bad in ("/kowalski/task", "/other/task/1.0.0", "/kowalski/Task/1.0.0", "kowalski/x/1.0.0"):
        with pytest.raises(ValueError):
            protocol_ids.check_protocol(bad)


def test_readme_lists_every_protocol_id() -> None:
    readme = (Path(__file__).resolve().parents[1] / "protocols" / "README.md").read_text()
    for pid in protocol_ids.ALL_PROTOCOLS:
        assert pid in readme
