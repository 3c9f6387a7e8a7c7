"""Server-sent events for one task: `state` first, then `progress`, then `done`.

Written as a raw ASGI response (not a streaming generator) so the event pump, the
keep-alive timer and the client-disconnect watcher are ordinary trio tasks in one
nursery: nothing yields across a cancel scope, and a client that goes away stops the
pump at once.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import trio
from pydantic import BaseModel
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from kowalski_node.rlm.types import ProgressEvent
from kowalski_node.runtime.service import TaskView

from .errors import service_error

log = logging.getLogger("kowalski_node.http")

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def sse_frame(event: str, data: str | BaseModel | dict[str, Any]) -> bytes:
    """One event; `data` is JSON on one line, so no escaping of newlines is needed."""
    if isinstance(data, BaseModel):
        payload = data.model_dump_json()
    elif isinstance(data, dict):
        payload = json.dumps(data, ensure_ascii=False)
    else:
        payload = data
    return f"event: {event}\ndata: {payload}\n\n".encode()


class _ClientGone(Exception):
    """The connection closed while an event was being written."""


class TaskEventStream(Response):
    """The ASGI response for GET /v1/tasks/{id}/events."""

    def __init__(
        self,
        task_id: str,
        first: TaskView,
        events: Callable[[], AsyncIterator[ProgressEvent]],
        final_view: Callable[[], Awaitable[TaskView | None]],
        keepalive_s: float,
    ) -> None:
        super().__init__(status_code=200, media_type="text/event-stream")
        self.task_id = task_id
        self.first = first
        self.events = events
        self.final_view = final_view
        self.keepalive_s = keepalive_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_disconnect, receive, nursery.cancel_scope)
                await self._stream(send)
                nursery.cancel_scope.cancel()
            await self._send(send, b"", more=False)
        except* _ClientGone:
            log.debug("event stream of %s: client went away", self.task_id)

    async def _send(self, send: Send, body: bytes, *, more: bool = True) -> None:
        try:
            await send({"type": "http.response.body", "body": body, "more_body": more})
        except OSError as exc:
            # The client went away mid-write; nothing left to tell it.
            raise _ClientGone from exc

    async def _watch_disconnect(self, receive: Receive, scope: trio.CancelScope) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                scope.cancel()
                return

    async def _stream(self, send: Send) -> None:
        await self._send(send, sse_frame("state", self.first))
        if self.first.status.final:
            await self._send(send, sse_frame("done", self.first))
            return
        tx, rx = trio.open_memory_channel[ProgressEvent | BaseException](64)
        failure: BaseException | None = None
        async with trio.open_nursery() as pump_nursery:
            pump_nursery.start_soon(self._pump, tx)
            async with rx:
                while True:
                    with trio.move_on_after(self._keepalive_delay()) as idle:
                        try:
                            item = await rx.receive()
                        except trio.EndOfChannel:
                            break
                    if idle.cancelled_caught:
                        await self._send(send, b": keepalive\n\n")
                        continue
                    if isinstance(item, BaseException):
                        # No `return` here: leaving a cancelled scope would swallow it.
                        failure = item
                        pump_nursery.cancel_scope.cancel()
                        break
                    await self._send(send, sse_frame("progress", item.to_dict()))
        if failure is not None:
            err = service_error(
                failure if isinstance(failure, Exception) else RuntimeError(str(failure)),
                f"stream the events of task {self.task_id}",
            )
            body = {"error": {"code": err.code, "message": err.message}}
            await self._send(send, sse_frame("error", body))
            return
        try:
            view = await self.final_view()
        except Exception as exc:  # noqa: BLE001 - any service failure becomes the stream's error event
            err = service_error(exc, f"report task {self.task_id}")
            await self._send(
                send, sse_frame("error", {"error": {"code": err.code, "message": err.message}})
            )
            return
        if view is None:
            return
        # Only a final view is a `done`; otherwise the stream ended early and the client
        # falls back to polling GET /v1/tasks/{id}.
        await self._send(send, sse_frame("done" if view.status.final else "state", view))

    def _keepalive_delay(self) -> float:
        return self.keepalive_s if self.keepalive_s > 0 else math.inf

    async def _pump(self, tx: trio.MemorySendChannel[ProgressEvent | BaseException]) -> None:
        events = self.events()
        try:
            async for event in events:
                await tx.send(event)
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which renders it as an error event
            await tx.send(exc)
        finally:
            tx.close()
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                with trio.CancelScope(shield=True, deadline=trio.current_time() + 2.0):
                    await aclose()
