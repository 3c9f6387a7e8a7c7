"""The one handler of /kowalski/repl/1.0.0 on a transport.

A node is both a peer that runs REPL jobs for leaders (`repl.open/exec/close/cancel`,
served by `ReplService`) and a leader whose jobs call back with sub-calls (`repl.sub`,
answered by `RemoteReplExecutor`). A transport has one handler per protocol, so this
endpoint owns it and routes by message type; a sub-call is routed by the `exec_id` the
leader chose for the block, and only the peer that block was sent to may use it.
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from kowalski_node.adapters.libp2p import envelope as env
from kowalski_node.adapters.libp2p import protocol_ids
from kowalski_node.adapters.libp2p.api import Request, TransportPort
from kowalski_node.adapters.libp2p.errors import RequestRejected
from kowalski_node.remote import wire

SERVICE_TYPES = frozenset({wire.REPL_OPEN, wire.REPL_EXEC, wire.REPL_CLOSE, wire.REPL_CANCEL})
ALL_TYPES = SERVICE_TYPES | {wire.REPL_SUB, wire.REPL_PING}


class ReplJobHandler(Protocol):
    async def handle(self, request: Request) -> Any: ...


SubAnswerer = Callable[[wire.SubCallAsk], Awaitable[dict[str, Any]]]


@dataclass
class _Outstanding:
    peer: str
    answer: SubAnswerer


class ReplEndpoint:
    """Routes REPL protocol messages; get it with `ReplEndpoint.of(transport)`."""

    _instances: ClassVar[weakref.WeakKeyDictionary[Any, ReplEndpoint]] = weakref.WeakKeyDictionary()

    def __init__(self, transport: TransportPort) -> None:
        self.transport = transport
        self.service: ReplJobHandler | None = None
        self._outstanding: dict[str, _Outstanding] = {}
        self.rejected_sub_calls = 0
        transport.register_handler(protocol_ids.REPL, self._handle, types=ALL_TYPES)

    @classmethod
    def of(cls, transport: TransportPort) -> ReplEndpoint:
        """The endpoint of `transport`, created (and the handler registered) on first use."""
        endpoint = cls._instances.get(transport)
        if endpoint is None:
            endpoint = cls(transport)
            cls._instances[transport] = endpoint
        return endpoint

    # -------------------------------------------------------------- leader side

    def expect_sub_calls(self, exec_id: str, peer: str, answer: SubAnswerer) -> None:
        """While a block runs on `peer`, its sub-calls (tagged `exec_id`) go to `answer`."""
        self._outstanding[exec_id] = _Outstanding(peer, answer)

    def done(self, exec_id: str) -> None:
        self._outstanding.pop(exec_id, None)

    # -------------------------------------------------------------- dispatch

    async def _handle(self, request: Request) -> Any:
        if request.type == wire.REPL_SUB:
            return await self._sub(request)
        if request.type == wire.REPL_PING:
            return {"ok": True}
        if self.service is None:
            raise RequestRejected(
                env.ERR_UNAVAILABLE, "this node does not run REPL jobs for other peers"
            )
        return await self.service.handle(request)

    async def _sub(self, request: Request) -> dict[str, Any]:
        ask = wire.parse(wire.SubCallAsk, request.payload, "repl.sub")
        outstanding = self._outstanding.get(ask.exec_id)
        if outstanding is None or outstanding.peer != request.peer_id:
            self.rejected_sub_calls += 1
            raise RequestRejected(
                env.ERR_BAD_REQUEST,
                f"no block {ask.exec_id!r} is running on {request.peer_id} for this leader "
                "(it finished, was abandoned, or belongs to another peer)",
            )
        return await outstanding.answer(ask)
