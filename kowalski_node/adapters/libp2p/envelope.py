"""The message envelope every kowalski protocol frame carries, and its msgpack codec.

Wire form (a msgpack map, one per frame; see protocols/README.md):

    {"v": 1, "kind": "request", "type": "ping", "id": 7, "payload": {...}}

- `v`: envelope schema major version. A different major is refused.
- `kind`: request | reply | error | notify. A reply/error echoes the request id.
- `type`: the message type within the protocol (lowercase, dotted).
- `id`: request id chosen by the requester, 0..2**64-1 (0 for notify).
- `payload`: any msgpack value; message schemas belong to the protocol owners.

Unknown top-level keys are ignored (minor versions may add fields). Decoding
never raises anything but `MalformedMessage`, whatever the bytes.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kowalski_node.errors import KowalskiError

ENVELOPE_VERSION = 1
MAX_TYPE_LEN = 64
MAX_REQUEST_ID = 2**64 - 1
TYPE_PATTERN = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$")

Kind = Literal["request", "reply", "error", "notify"]

# Error codes carried in error replies' payload {"code": ..., "message": ...}.
ERR_MALFORMED = "malformed"  # the frame did not decode as an envelope
ERR_TOO_LARGE = "too_large"  # a frame or a reply exceeded the size limit
ERR_UNKNOWN_TYPE = "unknown_type"  # no handler for this message type
ERR_BAD_REQUEST = "bad_request"  # the handler rejected the payload
ERR_UNSUPPORTED_VERSION = "unsupported_version"  # envelope major version differs
ERR_OVERLOADED = "overloaded"  # too many requests in flight on this stream
ERR_INTERNAL = "internal"  # the handler failed; details are in the remote's log
ERR_UNAVAILABLE = "unavailable"  # the node is shutting down / not ready


class MalformedMessage(KowalskiError):
    """Bytes that are not a valid envelope; `code` says which error reply fits."""

    def __init__(self, message: str, code: str = ERR_MALFORMED, request_id: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.request_id = request_id


class Envelope(BaseModel):
    """One protocol message; immutable."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    v: int = ENVELOPE_VERSION
    kind: Kind
    type: str = Field(min_length=1, max_length=MAX_TYPE_LEN)
    id: int = Field(default=0, ge=0, le=MAX_REQUEST_ID)
    payload: Any = None

    @field_validator("type")
    @classmethod
    def _type_shape(cls, value: str) -> str:
        if not TYPE_PATTERN.match(value):
            raise ValueError("type must be lowercase dotted identifiers, e.g. 'task.submit'")
        return value

    @property
    def is_error(self) -> bool:
        return self.kind == "error"


def request(type_: str, payload: Any, request_id: int) -> Envelope:
    return Envelope(kind="request", type=type_, id=request_id, payload=payload)


def notify(type_: str, payload: Any) -> Envelope:
    return Envelope(kind="notify", type=type_, id=0, payload=payload)


def reply_to(req: Envelope, payload: Any) -> Envelope:
    return Envelope(kind="reply", type=req.type, id=req.id, payload=payload)


def error_reply(type_: str, request_id: int, code: str, message: str) -> Envelope:
    return Envelope(
        kind="error",
        type=type_,
        id=request_id,
        payload={"code": code, "message": message[:1000]},
    )


def encode_envelope(env: Envelope) -> bytes:
    """msgpack bytes; raises MalformedMessage if the payload has non-msgpack values."""
    body = {"v": env.v, "kind": env.kind, "type": env.type, "id": env.id, "payload": env.payload}
    try:
        return msgpack.packb(body, use_bin_type=True, datetime=False)
    except (TypeError, ValueError, OverflowError) as exc:
        raise MalformedMessage(f"payload is not msgpack-serialisable: {exc}") from None


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not allowed")


def decode_envelope(data: bytes) -> Envelope:
    """Decode one frame body; any problem becomes MalformedMessage (never another error)."""
    try:
        body = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=_no_ext,
            timestamp=0,
        )
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: every decoder failure is "malformed"
        raise MalformedMessage(f"not a msgpack message: {type(exc).__name__}: {exc}") from None
    if not isinstance(body, dict):
        raise MalformedMessage(f"envelope must be a map, got {type(body).__name__}")
    request_id = body.get("id")
    rid = request_id if isinstance(request_id, int) and 0 <= request_id <= MAX_REQUEST_ID else 0
    version = body.get("v")
    if isinstance(version, int) and not isinstance(version, bool) and version != ENVELOPE_VERSION:
        raise MalformedMessage(
            f"envelope version {version} is not supported (this node speaks {ENVELOPE_VERSION})",
            code=ERR_UNSUPPORTED_VERSION,
            request_id=rid,
        )
    try:
        return Envelope.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'envelope'}: {err['msg']}"
            for err in exc.errors()[:3]
        )
        raise MalformedMessage(f"invalid envelope: {problems}", request_id=rid) from None
    except Exception as exc:  # noqa: BLE001 - e.g. RecursionError on absurd nesting
        raise MalformedMessage(f"invalid envelope: {type(exc).__name__}", request_id=rid) from None
