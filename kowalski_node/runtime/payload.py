"""The task payload every replica stores, and the result bytes a commit carries.

Payload: msgpack of what a leader needs to run the task anywhere (prompt, context with
bytes kept as bytes, model choices, per-task RLM limits) plus the submission's
fingerprint (to tell a retry from a conflicting reuse of a key) and the client's own
task id. A large context is not inline: the payload carries a `ContextRef` (sha256 and
size of the context file, format version 2) and the context travels as a blob
(`kowalski_node.runtime.contexts`), so offers and replication stay small. Result: the
JSON of `ExecutionResult.to_dict()` (`kowalski_node.rlm.types`, the one result type).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import msgpack

from kowalski_node.rlm.types import ExecutionResult
from kowalski_node.runtime.service import TaskSubmission
from kowalski_node.runtime.trajectory import model_used
from kowalski_node.wire import WireError

PAYLOAD_VERSION = 1
PAYLOAD_VERSION_REF = 2  # the context is a blob reference ("cref"); older nodes refuse it
MAX_CONTEXT_REF_BYTES = 1 << 40


@dataclass(frozen=True)
class ContextRef:
    """A context stored as a content-addressed file: its sha256 (hex) and size in bytes."""

    sha256: str
    size: int

    def to_wire(self) -> dict[str, Any]:
        return {"h": self.sha256, "n": self.size}

    @classmethod
    def from_wire(cls, obj: object) -> ContextRef:
        if not isinstance(obj, dict):
            raise WireError("task payload: cref must be a map")
        digest, size = obj.get("h"), obj.get("n")
        if not isinstance(digest, str) or not _is_sha256_hex(digest):
            raise WireError("task payload: cref.h must be 64 lowercase hex digits")
        if (
            not isinstance(size, int)
            or isinstance(size, bool)
            or not 0 <= size <= MAX_CONTEXT_REF_BYTES
        ):
            raise WireError(f"task payload: cref.n must be a size in bytes, got {size!r}")
        return cls(digest, size)


def _is_sha256_hex(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


@dataclass(frozen=True)
class TaskPayload:
    prompt: str
    context: Any
    model: str | None
    sub_model: str | None
    rlm: dict[str, Any] | None
    priority: int
    fingerprint: str
    alias: str | None
    context_ref: ContextRef | None = None

    @classmethod
    def from_submission(cls, sub: TaskSubmission) -> TaskPayload:
        return cls(
            prompt=sub.prompt,
            context=sub.context_value(),
            model=sub.model,
            sub_model=sub.sub_model,
            rlm=sub.rlm,
            priority=sub.priority,
            fingerprint=sub.fingerprint(),
            alias=sub.task_id,
        )

    def encode(self) -> bytes:
        body: dict[str, Any] = {
            "v": PAYLOAD_VERSION if self.context_ref is None else PAYLOAD_VERSION_REF,
            "prompt": self.prompt,
            "context": self.context if self.context_ref is None else None,
            "model": self.model,
            "sub_model": self.sub_model,
            "rlm": self.rlm,
            "priority": self.priority,
            "fp": self.fingerprint,
            "alias": self.alias,
        }
        if self.context_ref is not None:
            body["cref"] = self.context_ref.to_wire()
        data: bytes = msgpack.packb(body, use_bin_type=True)
        return data

    @classmethod
    def decode(cls, data: bytes) -> TaskPayload:
        try:
            d = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated types for garbage
            raise WireError(f"task payload: not valid msgpack ({exc})") from None
        if not isinstance(d, dict) or d.get("v") not in (PAYLOAD_VERSION, PAYLOAD_VERSION_REF):
            raise WireError("task payload: unknown format (from a newer node?)")
        ref = ContextRef.from_wire(d.get("cref")) if d["v"] == PAYLOAD_VERSION_REF else None
        prompt = d.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise WireError("task payload: prompt missing")
        rlm = d.get("rlm")
        return cls(
            prompt=prompt,
            context=d.get("context"),
            model=_opt_str(d.get("model")),
            sub_model=_opt_str(d.get("sub_model")),
            rlm=rlm if isinstance(rlm, dict) else None,
            priority=int(d.get("priority") or 0),
            fingerprint=str(d.get("fp") or ""),
            alias=_opt_str(d.get("alias")),
            context_ref=ref,
        )


def _opt_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def encode_result(result: dict[str, Any]) -> bytes:
    return json.dumps(result, ensure_ascii=False, separators=(",", ":"), default=str).encode()


def decode_result(data: bytes | None, task_id: str) -> ExecutionResult | None:
    """The stored result as the API view (the API's task id, not the run's)."""
    if data is None:
        return None
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return ExecutionResult.failed(task_id, "stored result is unreadable")
    if not isinstance(obj, dict):
        return ExecutionResult.failed(task_id, "stored result is unreadable")
    obj["task_id"] = task_id
    if not obj.get("model") or not obj.get("backend"):
        # stored by a version whose results did not name their model: its trajectory does
        model, backend = model_used(_opt_str(obj.get("trajectory_path")))
        obj["model"], obj["backend"] = obj.get("model") or model, obj.get("backend") or backend
    return ExecutionResult.from_dict(obj)
