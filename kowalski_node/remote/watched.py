"""A long request to a peer that ends when the peer does (the remote REPL and LLM fan-out).

A block or a model batch may run for minutes, so the request has no transport deadline:
the caller's cancel scope bounds it, membership ends it early (polled every
`live_poll_s`), and a ping every `keepalive_s` keeps the stream from looking idle to the
peer's transport.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import trio

from kowalski_node.adapters.libp2p.api import TransportPort
from kowalski_node.adapters.libp2p.errors import TransportError
from kowalski_node.remote.placement import PeerChooser

NO_DEADLINE_S = 7 * 24 * 3600.0


@dataclass
class Watched:
    """How a watched request ended: a reply, a transport error, or neither (cancelled)."""

    reply: Any = None
    error: TransportError | None = None
    peer_gone: bool = False
    """Membership stopped counting the peer as alive while we waited."""


async def watched_request(
    transport: TransportPort,
    chooser: PeerChooser,
    peer: str,
    protocol: str,
    type_: str,
    payload: Any,
    *,
    ping_type: str,
    scope: trio.CancelScope,
    live_poll_s: float,
    keepalive_s: float,
) -> Watched:
    """`type_` to `peer` under `scope`; errors come back in the result, not as a group."""
    outcome = Watched()

    async def watch() -> None:
        while True:
            await trio.sleep(live_poll_s)
            if not chooser.is_live(peer):
                outcome.peer_gone = True
                scope.cancel()
                return

    async def keepalive() -> None:
        while True:
            await trio.sleep(keepalive_s)
            with contextlib.suppress(TransportError):
                await transport.notify(peer, protocol, ping_type, {}, timeout=1.0)

    with scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            nursery.start_soon(keepalive)
            try:
                outcome.reply = await transport.request(
                    peer, protocol, type_, payload, timeout=NO_DEADLINE_S
                )
            except TransportError as exc:  # kept out of the nursery's exception group
                outcome.error = exc
            finally:
                nursery.cancel_scope.cancel()
    return outcome
