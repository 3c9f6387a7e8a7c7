"""Regenerate the task-coordination golden vectors in ``coord/`` (deterministic; repo root).

    python protocols/vectors/make_coord_vectors.py

Each vector is the msgpack body of one message on ``/kowalski/task/1.0.0`` (the envelope's
payload, see protocols/README.md section 9) as ``NAME.msgpack`` and its JSON form as
``NAME.json``. tests/test_coord_vectors.py decodes the committed files; only regenerate on
an intentional wire change.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack

from kowalski_node.coordination import Prepare, Promise
from kowalski_node.tasks import Checkpoint, TaskRecord, TaskState

HERE = Path(__file__).resolve().parent / "coord"
ACCEPTORS = ("12D3KooWAcceptorA", "12D3KooWAcceptorB", "12D3KooWAcceptorC")


def to_json(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"$bytes": value.hex()}
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return value


def record(**changes: Any) -> TaskRecord:
    base = TaskRecord(
        task_id="t5f0c1d2e3a4b5c6d7e8f9a0b",
        idempotency_key="invoice-2026-12-06-17",
        submitter=ACCEPTORS[0],
        payload=b"\x81\xa1p\xa2hi",
        created_at=1796590000.25,
        state=TaskState.LEASED,
        epoch=3,
        leader="12D3KooWLeader",
        version=2,
        executions=1,
        checkpoint=Checkpoint(2, 3, b"S\x01\x02"),
        updated_at=1796590001.5,
        acceptors=ACCEPTORS,
    )
    return replace(base, **changes)


def vectors() -> dict[str, Any]:
    rec = record()
    return {
        "task_record_with_acceptors": rec.to_wire(),
        "prepare": Prepare(rec.task_id, 4, "12D3KooWLeader2", rec).to_wire(),
        "promise_ok_with_prior": Promise(rec.task_id, 4, True, rec).to_wire(),
        "promise_ok_empty": Promise(rec.task_id, 4, True, None).to_wire(),
        "promise_refused": Promise(
            rec.task_id, 4, False, record(submitter=ACCEPTORS[1], epoch=5, version=1)
        ).to_wire(),
        "submit_forward": {
            "subs": [
                {
                    "prompt": "Total of the invoice?",
                    "context": "42",
                    "idempotency_key": "invoice-2026-12-06-17",
                    "context_encoding": "json",
                    "priority": 0,
                }
            ]
        },
    }


def main() -> None:
    HERE.mkdir(exist_ok=True)
    for name, value in vectors().items():
        (HERE / f"{name}.msgpack").write_bytes(msgpack.packb(value, use_bin_type=True))
        (HERE / f"{name}.json").write_text(json.dumps(to_json(value), indent=1) + "\n")


if __name__ == "__main__":
    main()
