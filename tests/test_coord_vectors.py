"""Golden vectors of the task-coordination wire (protocols/vectors/coord/): decoded from
the committed bytes, compared with their JSON form, and re-encoded byte for byte."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack
import pytest

from kowalski_node.coordination import Prepare, Promise, decode_coord_message
from kowalski_node.runtime.service import TaskSubmission
from kowalski_node.tasks import TaskRecord

VECTORS = Path(__file__).resolve().parent.parent / "protocols" / "vectors" / "coord"


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$bytes"}:
            return bytes.fromhex(value["$bytes"])
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def _load(name: str) -> tuple[bytes, Any]:
    raw = (VECTORS / f"{name}.msgpack").read_bytes()
    doc = _from_json(json.loads((VECTORS / f"{name}.json").read_text()))
    obj = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    assert obj == doc, f"{name}: the .msgpack and .json vectors disagree"
    return raw, obj


def _repack(value: Any) -> bytes:
    return bytes(msgpack.packb(value, use_bin_type=True))


def test_task_record_with_acceptors() -> None:
    raw, obj = _load("task_record_with_acceptors")
    rec = TaskRecord.from_wire(obj)
    assert rec.acceptors == ("12D3KooWAcceptorA", "12D3KooWAcceptorB", "12D3KooWAcceptorC")
    assert rec.submitter == rec.acceptors[0] and rec.epoch == 3
    assert rec.checkpoint is not None and rec.checkpoint.step == 2
    assert _repack(rec.to_wire()) == raw


@pytest.mark.parametrize(
    "name", ["prepare", "promise_ok_with_prior", "promise_ok_empty", "promise_refused"]
)
def test_coordination_messages(name: str) -> None:
    raw, obj = _load(name)
    msg = decode_coord_message(obj)
    assert _repack(msg.to_wire()) == raw
    if name == "prepare":
        assert isinstance(msg, Prepare) and msg.epoch == 4 and msg.leader == "12D3KooWLeader2"
        assert msg.record.epoch == 3  # the owner's copy before the new ballot
    else:
        assert isinstance(msg, Promise) and msg.epoch == 4
        assert msg.ok == (name != "promise_refused")
        if name == "promise_refused":
            assert msg.record is not None and msg.record.epoch == 5
            assert msg.record.submitter == "12D3KooWAcceptorB"
        if name == "promise_ok_empty":
            assert msg.record is None


def test_submit_forward_body() -> None:
    _, obj = _load("submit_forward")
    subs = [TaskSubmission.model_validate(d) for d in obj["subs"]]
    assert subs[0].dedup_key == "invoice-2026-12-06-17" and subs[0].context == "42"


def test_a_record_without_acceptors_still_decodes() -> None:
    """Records written before acceptor sets existed have no "acc" field: owner-only tasks."""
    _, obj = _load("task_record_with_acceptors")
    legacy = {k: v for k, v in obj.items() if k != "acc"}
    rec = TaskRecord.from_wire(legacy)
    assert rec.acceptors == () and rec.quorum_set == (rec.submitter,)
