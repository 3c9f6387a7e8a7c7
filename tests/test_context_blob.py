"""Context files, sliced fingerprints and base64, and the format-2 task payload.

The sliced code paths must give exactly what the one-piece calls give (a fingerprint that
changed would turn every retry of an older task into an idempotency conflict), so they are
checked against `json.dumps` / `base64.b64decode` with the slice size shrunk to a few
characters, over Hypothesis-generated JSON values.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kowalski_node.coordination.messages import Offer, decode_coord_message
from kowalski_node.coordination.spec import TaskSpec
from kowalski_node.runtime import context_blob
from kowalski_node.runtime.context_blob import (
    check_base64,
    decode_base64,
    read_context_file,
    submission_fingerprint,
    write_context_file,
)
from kowalski_node.runtime.contexts import approx_size, rank_peers
from kowalski_node.runtime.payload import ContextRef, TaskPayload
from kowalski_node.runtime.service import TaskSubmission
from kowalski_node.wire import WireError

VECTOR = Path(__file__).resolve().parents[1] / "protocols" / "vectors" / "task_payload_v2.json"

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=12) | st.dictionaries(st.text(max_size=6), inner, max_size=8)
    ),
    max_leaves=60,
)
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=40)
    | st.binary(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=12) | st.dictionaries(st.text(max_size=6), inner, max_size=8)
    ),
    max_leaves=60,
)


@pytest.fixture
def tiny_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slices of 4 characters and groups of 3 items: every sliced branch runs."""
    monkeypatch.setattr(context_blob, "SLICE", 4)
    monkeypatch.setattr(context_blob, "_LIST_GROUP", 3)
    monkeypatch.setattr(context_blob, "_B64_SLICE", 8)


def _one_piece(*parts: Any) -> str:
    text = json.dumps(list(parts), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(value=json_values, prompt=st.text(min_size=1, max_size=20))
def test_sliced_fingerprint_equals_one_piece(tiny_slices: None, value: Any, prompt: str) -> None:
    got = submission_fingerprint(prompt, value, "json", "m", None, {"max_iterations": 2})
    assert got == _one_piece(prompt, value, "json", "m", None, {"max_iterations": 2})


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(value=msgpack_values)
def test_context_file_roundtrip_and_same_bytes_same_id(
    tiny_slices: None, tmp_path_factory: pytest.TempPathFactory, value: Any
) -> None:
    directory = tmp_path_factory.mktemp("ctx")
    sha, size, path = write_context_file(value, directory)
    assert read_context_file(path) == value
    assert (sha, size) == (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_size)
    again = write_context_file(value, directory)
    assert again[0] == sha
    # any msgpack reader reads it
    assert msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False) == value


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=64), cut=st.integers(0, 90), junk=st.sampled_from("=!A é"))
def test_sliced_base64_agrees_with_b64decode(
    tiny_slices: None, data: bytes, cut: int, junk: str
) -> None:
    text = base64.b64encode(data).decode()
    check_base64(text)
    assert decode_base64(text) == data
    broken = text[:cut] + junk + text[cut:]
    try:
        base64.b64decode(broken, validate=True)
        accepted = True
    except (binascii.Error, ValueError):
        accepted = False
    if not accepted:
        with pytest.raises(ValueError):
            check_base64(broken)


def test_big_values_in_real_slices(tmp_path: Path) -> None:
    text = "ünïcode line\n" * 300_000  # ~4 MB: several real 1 MiB slices
    sub = TaskSubmission(prompt="p", context=text)
    assert sub.fingerprint() == _one_piece("p", text, "json", None, None, None)
    _sha, size, path = write_context_file(text, tmp_path)
    assert size > 3 * context_blob.SLICE and read_context_file(path) == text
    raw = bytes(range(256)) * 20_000
    b64 = TaskSubmission(
        prompt="p", context=base64.b64encode(raw).decode(), context_encoding="base64"
    )
    assert b64.context_value() == raw


def test_truncated_or_padded_file_is_refused(tmp_path: Path) -> None:
    _, _, path = write_context_file("x" * 5000, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(ValueError, match="ends early"):
        read_context_file(path)
    path.write_bytes(data + b"\x00")
    with pytest.raises(ValueError, match="trailing"):
        read_context_file(path)


def test_payload_formats_and_bad_refs() -> None:
    inline = TaskPayload("p", {"a": 1}, None, None, None, 0, "f", None)
    assert msgpack.unpackb(inline.encode())["v"] == 1
    assert TaskPayload.decode(inline.encode()) == inline
    ref = ContextRef("0f" * 32, 123)
    by_ref = TaskPayload("p", None, "m", None, None, 1, "f", "alias", ref)
    body = msgpack.unpackb(by_ref.encode())
    assert body["v"] == 2 and body["cref"] == {"h": "0f" * 32, "n": 123} and body["context"] is None
    assert TaskPayload.decode(by_ref.encode()) == by_ref
    for bad in ({"h": "XY" * 32, "n": 1}, {"h": "0f" * 32, "n": -1}, {"h": "0f", "n": 1}, "nope"):
        body["cref"] = bad
        with pytest.raises(WireError, match="cref"):
            TaskPayload.decode(msgpack.packb(body))


def test_golden_payload_v2_and_the_offer_that_carries_it() -> None:
    vector = json.loads(VECTOR.read_text())
    payload = TaskPayload.decode(bytes.fromhex(vector["payload_hex"]))
    assert payload.context_ref == ContextRef("ab" * 32, 52_428_800)
    assert payload.context is None and payload.prompt == vector["payload"]["prompt"]
    offer_bytes = bytes.fromhex(vector["offer_hex"])
    assert len(offer_bytes) < 1024  # a 50 MiB context, and the offer stays tiny
    offer = decode_coord_message(msgpack.unpackb(offer_bytes, raw=False))
    assert isinstance(offer, Offer)
    inner = TaskPayload.decode(TaskSpec.decode(offer.record.payload).payload)
    assert inner == payload


def test_size_estimate_stops_early_and_rank_is_stable() -> None:
    assert approx_size("x" * 100, 1000) == 100
    assert approx_size(["y" * 600, "z" * 600, "w" * 600], 1000) > 1000
    assert approx_size(list(range(10**6)), 1000) > 1000
    assert approx_size({"k": [1, 2, 3]}, 1000) < 100
    peers = ["a", "b", "c", "d"]
    assert rank_peers("h", peers) == rank_peers("h", list(reversed(peers)))
    assert sorted(rank_peers("h", peers)) == peers


surrogate_heavy_text = st.text(
    alphabet=st.sampled_from(["a", '"', "\\", "\n", "\x01", "é", "€", "😀", "/", "\u2028"]),
    max_size=60,
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    context=surrogate_heavy_text,
    prompt=surrogate_heavy_text.filter(lambda t: t.strip() != ""),
    ascii_only=st.booleans(),
    context_first=st.booleans(),
    extra=st.dictionaries(
        st.sampled_from(["model", "idempotency_key"]), st.text(min_size=1, max_size=5)
    ),
)
def test_sliced_body_parse_equals_the_ordinary_parse(
    monkeypatch: pytest.MonkeyPatch,
    context: str,
    prompt: str,
    ascii_only: bool,
    context_first: bool,
    extra: dict[str, str],
) -> None:
    from kowalski_node.adapters.http import app as http_app

    monkeypatch.setattr(context_blob, "SLICE", 7)
    monkeypatch.setattr(http_app, "SLICE", 7)
    body_dict: dict[str, Any] = (
        {"context": context, "prompt": prompt}
        if context_first
        else {"prompt": prompt, "context": context}
    )
    body_dict.update(extra)
    data = json.dumps(body_dict, ensure_ascii=ascii_only).encode("utf-8")
    expected = TaskSubmission.model_validate_json(data)
    got = http_app.parse_large_submission(data)
    assert got.context == expected.context
    assert got.fingerprint() == expected.fingerprint()
    assert got.model_copy(update={"context": None}) == expected.model_copy(update={"context": None})


def test_sliced_body_parse_base64_and_odd_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from kowalski_node.adapters.http import app as http_app
    from kowalski_node.runtime.context_blob import SlicedText, top_level_string_span

    monkeypatch.setattr(context_blob, "SLICE", 8)
    monkeypatch.setattr(http_app, "SLICE", 8)
    raw = bytes(range(256)) * 3
    good = json.dumps(
        {"prompt": "p", "context_encoding": "base64", "context": base64.b64encode(raw).decode()}
    ).encode()
    sub = http_app.parse_large_submission(good)
    assert isinstance(sub.context, SlicedText) and sub.context_value() == raw
    bad = good.replace(b'"context": "', b'"context": "!!!!')
    with pytest.raises(ValidationError, match="base64"):
        http_app.parse_large_submission(bad)
    # a repeated key, a non-string context, a non-object body: not sliced (ordinary parse)
    assert (
        top_level_string_span(b'{"context": "aaaaaaaaaaaaaaaaaaaa", "context": "b"}', "context")
        is None
    )
    assert top_level_string_span(b'{"context": [1, "x"], "prompt": "p"}', "context") is None
    assert top_level_string_span(b'["context"]', "context") is None
    nested = (
        b'{"rlm": {"context": "zzzzzzzzzzzzzzzz"}, "prompt": "p", "context": "abcdefghijklmnop"}'
    )
    span = top_level_string_span(nested, "context")
    assert span is not None and nested[span[0] : span[1] + 1] == b'"abcdefghijklmnop"'
