"""The transport port the runtime programs against, without importing libp2p.

`Libp2pTransport` implements `TransportPort`; a fake network for tests can
implement the same Protocol (same event and message types) and be swapped in.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kowalski_node.adapters.libp2p.blob import BlobCallback, BlobReceipt
from kowalski_node.adapters.libp2p.rpc import Request, RequestHandler

__all__ = [
    "BlobCallback",
    "BlobReceipt",
    "ConnectionCallback",
    "ConnectionEvent",
    "Request",
    "RequestHandler",
    "TransportPort",
]


@dataclass(frozen=True)
class ConnectionEvent:
    """A peer's first connection opened (connected=True) or its last one closed."""

    peer_id: str
    connected: bool
    at: float  # time.monotonic()


ConnectionCallback = Callable[[ConnectionEvent], None]


class TransportPort(Protocol):
    """What the runtime needs from the network. All waits are bounded by `timeout`."""

    peer_id: str

    @property
    def listen_addrs(self) -> list[str]: ...

    def connected_peers(self) -> list[str]: ...

    def is_connected(self, peer_id: str) -> bool: ...

    def add_peer_addrs(self, peer_id: str, addrs: Iterable[str], ttl_s: int = 600) -> None: ...

    async def connect(self, addr: str, timeout: float | None = None) -> str: ...

    async def disconnect(self, peer_id: str) -> None: ...

    def register_handler(
        self, protocol: str, handler: RequestHandler, *, types: Collection[str] | None = None
    ) -> None: ...

    async def request(
        self, peer_id: str, protocol: str, type_: str, payload: Any, *, timeout: float | None = None
    ) -> Any: ...

    async def notify(
        self, peer_id: str, protocol: str, type_: str, payload: Any, *, timeout: float | None = None
    ) -> None: ...

    async def send_blob(
        self,
        peer_id: str,
        path: Path,
        *,
        meta: Any = None,
        blob_id: str | None = None,
        timeout: float | None = None,
    ) -> BlobReceipt: ...

    def on_blob(self, callback: BlobCallback) -> None: ...

    def blob_path(self, blob_id: str) -> Path | None: ...

    def on_connection_event(self, callback: ConnectionCallback) -> None: ...

    async def set_allow_list(self, peers: Iterable[str] | None) -> None: ...
