"""The SHARD protocol's golden vectors (protocols/vectors/shard) decode to the documented
payloads, re-encode to the same bytes, and the sealed shard-cache file opens under the
documented key derivation (and refuses a flipped bit or a cut file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kowalski_node.adapters.libp2p import envelope as env
from kowalski_node.inference import wire
from kowalski_node.inference.errors import ShardCorrupt
from kowalski_node.inference.shards import decrypt_bytes, derive_master_key

VECTORS = Path(__file__).resolve().parents[1] / "protocols" / "vectors" / "shard"
NAMES = sorted(p.stem for p in VECTORS.glob("*.msgpack"))


def from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$bytes"}:
            return bytes.fromhex(value["$bytes"])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def test_vectors_exist() -> None:
    assert {"forward_tokens", "forward_hidden", "reply_token", "reply_logits"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_vector_decodes_to_documented_payload_and_reencodes(name: str) -> None:
    packed = (VECTORS / f"{name}.msgpack").read_bytes()
    doc = json.loads((VECTORS / f"{name}.json").read_text())
    decoded = env.decode_envelope(packed)
    assert (decoded.kind, decoded.type, decoded.id) == (doc["kind"], doc["type"], doc["id"])
    assert decoded.payload == from_json(doc["payload"])
    assert env.encode_envelope(decoded) == packed
    if decoded.type == wire.T_FORWARD and decoded.kind == "request":
        msg = wire.decode_forward(decoded.payload)
        assert wire.encode_forward(msg) == decoded.payload
        assert (
            env.encode_envelope(env.request(wire.T_FORWARD, wire.encode_forward(msg), decoded.id))
            == packed
        )


def test_hidden_vector_holds_little_endian_float32_rows() -> None:
    decoded = env.decode_envelope((VECTORS / "forward_hidden.msgpack").read_bytes())
    msg = wire.decode_forward(decoded.payload)
    assert msg.hop == 1 and msg.splits == (2, 1) and msg.route[1].start == 11
    assert msg.hidden is not None
    np.testing.assert_array_equal(
        msg.hidden, (np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5) / 4
    )


def test_reply_vectors() -> None:
    token = wire.decode_reply(
        env.decode_envelope((VECTORS / "reply_token.msgpack").read_bytes()).payload
    )
    assert token.token == 198 and token.step == 1
    logits = wire.decode_reply(
        env.decode_envelope((VECTORS / "reply_logits.msgpack").read_bytes()).payload
    )
    assert logits.logits is not None
    np.testing.assert_array_equal(logits.logits, np.array([0.5, -1.25, 3.0, 0.0], np.float32))


def test_sealed_tensor_vector_opens_and_refuses_tampering() -> None:
    doc = json.loads((VECTORS / "sealed_tensor.json").read_text())
    sealed = (VECTORS / "sealed_tensor.kws").read_bytes()
    master = derive_master_key(bytes.fromhex(doc["cluster_key"]))
    plain = decrypt_bytes(master, doc["model"], doc["name"], sealed)
    assert plain == bytes.fromhex(doc["plaintext"])
    assert sealed[4:20] == bytes.fromhex(doc["salt"])
    flipped = bytearray(sealed)
    flipped[-20] ^= 1
    with pytest.raises(ShardCorrupt, match="authentication"):
        decrypt_bytes(master, doc["model"], doc["name"], bytes(flipped))
    with pytest.raises(ShardCorrupt, match="truncated"):
        decrypt_bytes(master, doc["model"], doc["name"], sealed[:-1])
    with pytest.raises(ShardCorrupt, match="authentication"):
        decrypt_bytes(derive_master_key(bytes(32)), doc["model"], doc["name"], sealed)
    with pytest.raises(ShardCorrupt, match="authentication"):
        decrypt_bytes(master, doc["model"], "blk.1.attn_norm", sealed)  # moved file
