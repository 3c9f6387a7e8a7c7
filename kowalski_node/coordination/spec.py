"""What the coordination layer stores in a task record's opaque byte fields.

The ledger treats ``TaskRecord.payload`` and checkpoint snapshots as opaque bytes. The
coordination protocol needs two more facts to survive restarts and failovers, so it
wraps them:

* the **task spec** (the caller's payload plus the hard requirement a leader must meet)
  is the record's payload, msgpack-encoded, so every replica and every future owner
  incarnation can re-offer the task without asking anyone;
* a **checkpoint snapshot** is either a step snapshot (``b"S"`` + the run's bytes) or the
  final result (``b"F"`` + result bytes). Storing the result as a final checkpoint on the
  replicas *before* the commit is what makes a finished result survive the leader: a new
  leader that is offered a final checkpoint commits it without running anything again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

from kowalski_node.placement.scheduler import Requirement
from kowalski_node.wire import WireError, expect_dict, get_bytes, get_int, get_opt_str

SPEC_TAG = "kspec1"
STEP_MARK = b"S"
FINAL_MARK = b"F"


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """The caller's payload and the requirement every leader of the task must satisfy."""

    payload: bytes
    requirement: Requirement = field(default_factory=Requirement)

    def encode(self) -> bytes:
        req = self.requirement
        d: dict[str, Any] = {"t": SPEC_TAG, "p": self.payload, "mem": req.min_memory}
        if req.language is not None:
            d["lang"] = req.language
        if req.model is not None:
            d["model"] = req.model
        if req.backend is not None:
            d["backend"] = req.backend
        packed: bytes = msgpack.packb(d, use_bin_type=True)
        return packed

    @classmethod
    def decode(cls, data: bytes) -> TaskSpec:
        """Decode a spec; raises :class:`WireError` (a ``ValueError``) when malformed."""
        try:
            obj = msgpack.unpackb(data, raw=False)
        except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated types
            raise WireError(f"TaskSpec: not valid msgpack ({exc})") from None
        what = "TaskSpec"
        d = expect_dict(obj, what)
        if d.get("t") != SPEC_TAG:
            raise WireError(f"{what}: expected type tag {SPEC_TAG!r}, got {d.get('t')!r}")
        req = Requirement(
            language=get_opt_str(d, "lang", what, max_len=64),
            min_memory=get_int(d, "mem", what, min_value=0, max_value=2**62),
            model=get_opt_str(d, "model", what, max_len=256),
            backend=get_opt_str(d, "backend", what, max_len=64),
        )
        return cls(get_bytes(d, "p", what), req)


def step_snapshot(data: bytes) -> bytes:
    """Wrap a run's step snapshot for the ledger."""
    return STEP_MARK + data


def final_snapshot(result: bytes) -> bytes:
    """Wrap a finished result as the task's last checkpoint."""
    return FINAL_MARK + result


def unwrap_snapshot(stored: bytes) -> tuple[bool, bytes]:
    """``(is_final, data)`` for a stored snapshot; raises ``ValueError`` on an unknown mark."""
    mark, data = stored[:1], stored[1:]
    if mark == STEP_MARK:
        return False, data
    if mark == FINAL_MARK:
        return True, data
    raise ValueError(f"checkpoint snapshot with unknown mark {mark!r}")
