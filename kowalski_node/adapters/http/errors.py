"""JSON error answers: one shape, `{"error": {"code", "message", "field"?}}`, for every failure.

Client mistakes get a 4xx naming the offending field; a failure inside the node gets a
500 with a message (and a log line), and the server keeps serving.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails
from starlette.responses import Response

from kowalski_node.errors import (
    ContextNotReplicated,
    NoCapableDevice,
    NoQuorum,
    TaskCancelled,
    TaskError,
)
from kowalski_node.runtime.service import IdempotencyConflict

log = logging.getLogger("kowalski_node.http")


class HandlerError(Exception):
    """Raised by handlers; rendered by `error_response`."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}


def error_body(code: str, message: str, field: str | None = None) -> bytes:
    err: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        err["field"] = field
    return json.dumps({"error": err}, ensure_ascii=False).encode("utf-8")


def error_response(exc: HandlerError) -> Response:
    return Response(
        error_body(exc.code, exc.message, exc.field),
        status_code=exc.status,
        media_type="application/json",
        headers=exc.headers,
    )


def _loc_text(loc: Sequence[int | str], prefix: str = "") -> str:
    """('tasks', 3, 'prompt') -> 'tasks[3].prompt'."""
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _describe(err: ErrorDetails) -> tuple[str, str, str | None]:
    """(code, message, field) for one pydantic error."""
    kind = err["type"]
    field = _loc_text(err["loc"]) or None
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if kind == "json_invalid":
        detail = err.get("ctx", {}).get("error", msg)
        return "invalid_json", f"request body is not valid JSON: {detail}", None
    if kind == "model_type" and field is None:
        return "invalid_body", "request body must be a JSON object", None
    if kind == "missing":
        return "missing_field", f"{field}: required field is missing", field
    if kind == "extra_forbidden":
        return "unknown_field", f"{field}: unknown field", field
    return "invalid_field", f"{field}: {msg}" if field else msg, field


def validation_error(exc: ValidationError) -> HandlerError:
    """The first problem becomes the message; the count of others is mentioned."""
    errors = exc.errors()
    code, message, field = _describe(errors[0])
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return HandlerError(400, code, message, field=field)


def service_error(exc: Exception, operation: str) -> HandlerError:
    """Map what the node raised to an answer; unexpected failures are logged as 500s."""
    if isinstance(exc, IdempotencyConflict):
        return HandlerError(409, "idempotency_conflict", str(exc), field="idempotency_key")
    if isinstance(exc, NoCapableDevice):
        return HandlerError(503, "no_capable_device", str(exc))
    if isinstance(exc, ContextNotReplicated):
        return HandlerError(503, "context_not_replicated", str(exc))
    if isinstance(exc, NoQuorum):
        return HandlerError(503, "no_quorum", str(exc))
    if isinstance(exc, TaskCancelled):
        return HandlerError(409, "task_cancelled", str(exc))
    if isinstance(exc, TaskError):
        return HandlerError(409, "task_rejected", str(exc))
    log.error("node service failed during %s", operation, exc_info=exc)
    detail = str(exc) or type(exc).__name__
    return HandlerError(500, "internal_error", f"the node failed to {operation}: {detail}")
