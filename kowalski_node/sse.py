"""The one reader of server-sent event streams (`text/event-stream`), for every client here.

`NodeClient.stream_events` reads a node's task events with it, the OpenAI-compatible
backend reads streamed completions with it. Parsing follows the SSE format: `event:` and
`data:` fields (one leading space dropped), `:` comment lines (keep-alives) skipped,
several `data:` lines of one event joined with newlines, a blank line ends the event.
An event still open when the stream ends is delivered too (some servers omit the last
blank line).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable

DEFAULT_EVENT = "message"


async def sse_events(lines: AsyncIterable[str]) -> AsyncGenerator[tuple[str, str], None]:
    """Each event of the stream as `(event type, data)`; events without data are skipped."""
    event = DEFAULT_EVENT
    data: list[str] = []
    async for line in lines:
        if not line.strip():
            if data:
                yield event, "\n".join(data)
            event, data = DEFAULT_EVENT, []
            continue
        if line.startswith(":"):
            continue  # comment / keep-alive
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value.strip() or DEFAULT_EVENT
    if data:
        yield event, "\n".join(data)
