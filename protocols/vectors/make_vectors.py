"""Regenerate the golden vectors in this directory (deterministic; run from the repo root).

    python protocols/vectors/make_vectors.py

The vectors are committed; tests decode the committed files and never call this
script, so a codec change that alters the wire shows up as a test failure. Only
regenerate on an intentional wire change (and bump the protocol version).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack

from kowalski_node.adapters.libp2p import envelope as env
from kowalski_node.adapters.libp2p.framing import encode_frame
from kowalski_node.adapters.libp2p.xsalsa20 import XSalsa20, hsalsa20, xsalsa20_keystream

HERE = Path(__file__).resolve().parent

# The NaCl distribution's xsalsa20 test inputs (tests/core3.c, tests/stream3.c).
NACL_KEY = bytes.fromhex("1b27556473e985d462cd51197a9a46c76009549eac6474f206c4ee0844f68389")
NACL_NONCE = bytes.fromhex("69696ee955b62b73cd62bda875fc73d68219e0036b7a0b37")


def to_json(value: Any) -> Any:
    """JSON form of a msgpack value: bytes become {"$bytes": hex}."""
    if isinstance(value, bytes):
        return {"$bytes": value.hex()}
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return value


def xsalsa20_vectors() -> dict[str, Any]:
    key2 = bytes(range(32))
    nonce2 = bytes(range(100, 124))
    return {
        "description": "XSalsa20 = HSalsa20(key, nonce[:16]) then Salsa20(subkey, nonce[16:24])",
        "vectors": [
            {
                "name": "nacl-stream3",
                "key": NACL_KEY.hex(),
                "nonce": NACL_NONCE.hex(),
                "hsalsa20_subkey": hsalsa20(NACL_KEY, NACL_NONCE[:16]).hex(),
                "keystream": xsalsa20_keystream(NACL_KEY, NACL_NONCE, 32).hex(),
            },
            {
                "name": "counting-200",
                "key": key2.hex(),
                "nonce": nonce2.hex(),
                "hsalsa20_subkey": hsalsa20(key2, nonce2[:16]).hex(),
                "keystream": xsalsa20_keystream(key2, nonce2, 200).hex(),
            },
        ],
    }


def pnet_vector() -> dict[str, Any]:
    key = bytes.fromhex("00112233445566778899aabbccddeeff" * 2)
    nonce = bytes(range(24))
    plaintext = b"\x13/multistream/1.0.0\n\x07/noise\n"
    wire = nonce + XSalsa20(key, nonce).apply(plaintext)
    return {
        "description": "one direction of a pnet connection: 24-byte nonce, then "
        "plaintext XOR XSalsa20(key, nonce) keystream",
        "swarm_key": f"/key/swarm/psk/1.0.0/\n/base16/\n{key.hex()}\n",
        "nonce": nonce.hex(),
        "plaintext": plaintext.hex(),
        "wire": wire.hex(),
    }


ENVELOPES: dict[str, env.Envelope] = {
    "request_ping": env.request("ping", {"incarnation": 3, "from": "12D3KooWExample"}, 7),
    "reply_ping": env.Envelope(kind="reply", type="ping", id=7, payload={"ack": True}),
    "error_unknown_type": env.error_reply(
        "task.frobnicate", 9, env.ERR_UNKNOWN_TYPE, "/kowalski/task/1.0.0 has no message type"
    ),
    "notify_gossip": env.notify("capabilities.advert", {"cores": 8, "models": ["smollm2"]}),
    "blob_chunk": env.notify(
        "blob.chunk", {"offset": 0, "data": b"hello blob", "sha256": bytes(32)}
    ),
    # /kowalski/context/1.0.0: a leader asks a holder for a task's context (50 MiB here)
    "request_context_pull": env.request("context.pull", {"h": "ab" * 32, "n": 52_428_800}, 11),
}


def task_payload_vector() -> dict[str, Any]:
    """A task payload (format 2) whose context is a blob reference, inside the TaskSpec
    and the record an offer carries: the offer stays a few hundred bytes."""
    from kowalski_node.coordination.messages import Offer
    from kowalski_node.coordination.spec import TaskSpec
    from kowalski_node.runtime.payload import ContextRef, TaskPayload
    from kowalski_node.tasks.model import TaskRecord, TaskState

    payload = TaskPayload(
        prompt="How many lines mention ERROR?",
        context=None,
        model=None,
        sub_model=None,
        rlm=None,
        priority=0,
        fingerprint="cd" * 32,
        alias=None,
        context_ref=ContextRef("ab" * 32, 52_428_800),
    ).encode()
    record = TaskRecord(
        task_id="t0123456789abcdef01234567",
        idempotency_key="logs-2026-12-06",
        submitter="12D3KooWOwner",
        payload=TaskSpec(payload).encode(),
        created_at=1_765_000_000.0,
        state=TaskState.LEASED,
        epoch=1,
        leader="12D3KooWLeader",
        version=1,
        updated_at=1_765_000_000.0,
    )
    offer = Offer(record.task_id, 1, ("12D3KooWReplica",), record)
    packed = msgpack.packb(offer.to_wire(), use_bin_type=True)
    return {
        "description": "task payload v2 (context by reference) and the co_offer carrying it",
        "payload_hex": payload.hex(),
        "payload": to_json(msgpack.unpackb(payload, raw=False)),
        "offer_hex": packed.hex(),
    }


def main() -> None:
    (HERE / "xsalsa20.json").write_text(json.dumps(xsalsa20_vectors(), indent=2) + "\n")
    (HERE / "pnet_handshake.json").write_text(json.dumps(pnet_vector(), indent=2) + "\n")
    (HERE / "task_payload_v2.json").write_text(json.dumps(task_payload_vector(), indent=2) + "\n")
    out = HERE / "envelope"
    out.mkdir(exist_ok=True)
    for name, message in ENVELOPES.items():
        packed = env.encode_envelope(message)
        (out / f"{name}.msgpack").write_bytes(packed)
        decoded = {
            "v": message.v,
            "kind": message.kind,
            "type": message.type,
            "id": message.id,
            "payload": to_json(message.payload),
        }
        (out / f"{name}.json").write_text(
            json.dumps({"decoded": decoded, "frame_hex": encode_frame(packed).hex()}, indent=2)
            + "\n"
        )


if __name__ == "__main__":
    main()
