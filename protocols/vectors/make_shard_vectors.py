"""Regenerate the SHARD protocol's golden vectors (deterministic; run from the repo root).

    python protocols/vectors/make_shard_vectors.py

Writes `shard/<name>.msgpack` (one whole envelope, as framed on the wire minus the length
prefix) and `shard/<name>.json` (the decoded payload, bytes as {"$bytes": hex}), plus
`shard/sealed_tensor.*`: one tensor sealed by the shard cache under a fixed key and salt.
Tests decode the committed files; regenerate only on an intentional wire change.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from kowalski_node.adapters.libp2p import envelope as env
from kowalski_node.inference import wire
from kowalski_node.inference.shards import derive_master_key, encrypt_stream

HERE = Path(__file__).resolve().parent / "shard"
MODEL = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
ROUTE = (wire.Stage("12D3KooWStageA", 0, 11), wire.Stage("12D3KooWStageB", 11, 30))
CLUSTER_KEY = bytes(range(32))
SALT = bytes(range(16, 32))


def to_json(value: Any) -> Any:
    if isinstance(value, bytes | memoryview):
        return {"$bytes": bytes(value).hex()}
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return value


def messages() -> dict[str, env.Envelope]:
    hidden = (np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5) / 4
    first = wire.ForwardMsg("sess-1", 0, 1, 0, MODEL, ROUTE, 0, (2, 1), "token", (1, 9, 42))
    second = first.next_hop(hidden)
    decode = wire.ForwardMsg("sess-1", 0, 2, 3, MODEL, ROUTE, 0, (1,), "token", (7,))
    logits = np.array([0.5, -1.25, 3.0, 0.0], dtype=np.float32)
    return {
        "forward_tokens": env.request(wire.T_FORWARD, wire.encode_forward(first), 1),
        "forward_hidden": env.request(wire.T_FORWARD, wire.encode_forward(second), 2),
        "forward_decode": env.request(wire.T_FORWARD, wire.encode_forward(decode), 3),
        "reply_token": env.Envelope(
            kind="reply",
            type=wire.T_FORWARD,
            id=1,
            payload=wire.encode_reply(wire.ForwardReply("sess-1", 0, 1, token=198)),
        ),
        "reply_logits": env.Envelope(
            kind="reply",
            type=wire.T_FORWARD,
            id=1,
            payload=wire.encode_reply(wire.ForwardReply("sess-1", 0, 1, logits=logits)),
        ),
        "error_stage_lost": env.error_reply(
            wire.T_FORWARD, 2, "stage_lost", "peer=12D3KooWStageB reason=ConnectionLost: gone"
        ),
        "end": env.request(wire.T_END, {"v": 1, "session": "sess-1", "epoch": 0}, 4),
        "offer": env.request(
            wire.T_OFFER, {"v": 1, "model": MODEL, "name": "smollm2-135m-instruct"}, 5
        ),
        "load": env.request(
            wire.T_LOAD,
            {
                "v": 1,
                "model": MODEL,
                "name": "smollm2-135m-instruct",
                "start": 11,
                "end": 30,
                "source": "12D3KooWStageA",
            },
            6,
        ),
    }


def main() -> None:
    HERE.mkdir(parents=True, exist_ok=True)
    for name, envelope in messages().items():
        packed = env.encode_envelope(envelope)
        (HERE / f"{name}.msgpack").write_bytes(packed)
        (HERE / f"{name}.json").write_text(
            json.dumps(
                {"kind": envelope.kind, "type": envelope.type, "id": envelope.id,
                 "payload": to_json(envelope.payload)},
                indent=1,
            ) + "\n"
        )  # fmt: skip
    plain = io.BytesIO()
    np.save(plain, np.arange(6, dtype=np.float32).reshape(2, 3))
    sealed = io.BytesIO()
    data = plain.getvalue()
    encrypt_stream(
        derive_master_key(CLUSTER_KEY),
        MODEL,
        "blk.0.attn_norm",
        [data],
        len(data),
        sealed,
        salt=SALT,
    )
    (HERE / "sealed_tensor.kws").write_bytes(sealed.getvalue())
    (HERE / "sealed_tensor.json").write_text(
        json.dumps(
            {"cluster_key": CLUSTER_KEY.hex(), "model": MODEL, "name": "blk.0.attn_norm",
             "salt": SALT.hex(), "plaintext": data.hex()},
            indent=1,
        ) + "\n"
    )  # fmt: skip


if __name__ == "__main__":
    main()
