"""Libp2pTransport API behaviour with two hosts in one process (fast; real TCP on 127.0.0.1)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from kowalski_node.adapters.libp2p import protocol_ids as P
from kowalski_node.adapters.libp2p.errors import (
    DialError,
    ProtocolNotSupported,
    RemoteError,
    RequestTimeout,
)
from kowalski_node.adapters.libp2p.rpc import Request
from kowalski_node.adapters.libp2p.transport import (
    ConnectionEvent,
    Libp2pTransport,
    TransportConfig,
    is_loopback_addr,
)
from kowalski_node.identity import ClusterKey, NodeIdentity

CONFIG = TransportConfig(dial_timeout_s=3.0, request_timeout_s=3.0)


@pytest.fixture
async def two() -> AsyncIterator[tuple[Libp2pTransport, Libp2pTransport]]:
    key = ClusterKey.generate()
    a = Libp2pTransport(NodeIdentity.generate(), key, CONFIG)
    b = Libp2pTransport(NodeIdentity.generate(), key, CONFIG)
    notes: list[Any] = []

    async def task_handler(req: Request) -> Any:
        if req.one_way:
            notes.append(req.payload)
            return None
        if req.type == "slow":
            await trio.sleep(5)
        return {"type": req.type, "peer": req.peer_id, "payload": req.payload}

    a.register_handler(P.TASK, task_handler, types={"submit", "slow", "note"})
    a.notes = notes  # type: ignore[attr-defined]
    async with a.running(), b.running():
        yield a, b


async def test_connect_request_notify_and_events(
    two: tuple[Libp2pTransport, Libp2pTransport],
) -> None:
    a, b = two
    events: list[ConnectionEvent] = []
    b.on_connection_event(events.append)
    assert all(is_loopback_addr(x) for x in a.listen_addrs)
    peer = await b.connect(a.listen_addrs[0])
    assert peer == a.peer_id and b.connected_peers() == [a.peer_id]
    assert await b.connect(a.listen_addrs[0]) == peer  # already connected: no new dial
    reply = await b.request(peer, P.TASK, "submit", {"prompt": "hi"})
    assert reply == {"type": "submit", "peer": b.peer_id, "payload": {"prompt": "hi"}}
    with pytest.raises(RemoteError) as info:
        await b.request(peer, P.TASK, "frobnicate", None)
    assert info.value.code == "unknown_type"
    await b.notify(peer, P.TASK, "note", {"n": 1})
    with trio.fail_after(2):
        while not a.notes:  # type: ignore[attr-defined]
            await trio.sleep(0.01)
    assert events and events[0].connected and events[0].peer_id == peer
    with pytest.raises(RequestTimeout):
        await b.request(peer, P.TASK, "slow", None, timeout=0.2)
    assert b.diagnostics()["requests_failed"] >= 2


async def test_unsupported_protocol_and_unknown_peers(
    two: tuple[Libp2pTransport, Libp2pTransport],
) -> None:
    a, b = two
    peer = await b.connect(a.listen_addrs[0])
    with pytest.raises(ProtocolNotSupported):
        await b.request(peer, P.REPL, "run", {})
    stranger = NodeIdentity.generate().peer_id
    with pytest.raises(DialError, match="no address known"):
        await b.request(stranger, P.TASK, "submit", {})
    for bad in ("not a multiaddr", "/ip4/127.0.0.1/tcp/1", f"/ip4/1.2.3/tcp/1/p2p/{stranger}"):
        with pytest.raises(DialError) as info:
            await b.connect(bad)
        assert info.value.reason == DialError.REASON_BAD_ADDRESS
    with pytest.raises(DialError, match="own address"):
        await b.connect(b.listen_addrs[0])


async def test_reconnect_through_known_addresses(
    two: tuple[Libp2pTransport, Libp2pTransport],
) -> None:
    a, b = two
    events: list[ConnectionEvent] = []
    b.on_connection_event(events.append)
    b.add_peer_addrs(a.peer_id, a.listen_addrs)  # as mDNS or gossip would
    assert (await b.request(a.peer_id, P.TASK, "submit", 1))["payload"] == 1  # dials on demand
    await b.disconnect(a.peer_id)
    with trio.fail_after(3):
        while b.is_connected(a.peer_id):
            await trio.sleep(0.01)
    assert [e.connected for e in events] == [True, False]
    assert (await b.request(a.peer_id, P.TASK, "submit", 2))["payload"] == 2


async def test_unreachable_peer_reported_quickly() -> None:
    t = Libp2pTransport(NodeIdentity.generate(), ClusterKey.generate(), CONFIG)
    async with t.running():
        listener = trio.socket.socket()
        await listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        listener.close()  # nothing listens there now
        peer = NodeIdentity.generate().peer_id
        with trio.fail_after(5), pytest.raises(DialError) as info:
            await t.connect(f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer}")
        assert info.value.reason == DialError.REASON_UNREACHABLE


async def test_allow_list_update_disconnects(two: tuple[Libp2pTransport, Libp2pTransport]) -> None:
    a, b = two
    await b.connect(a.listen_addrs[0])
    with trio.fail_after(2):
        while not a.is_connected(b.peer_id):
            await trio.sleep(0.01)
    await a.set_allow_list([NodeIdentity.generate().peer_id])
    with trio.fail_after(3):
        while a.is_connected(b.peer_id) or b.is_connected(a.peer_id):
            await trio.sleep(0.01)
    with pytest.raises(DialError):
        await b.connect(a.listen_addrs[0])
    await a.set_allow_list(None)
    assert await b.connect(a.listen_addrs[0]) == a.peer_id


def test_register_handler_rejects_bad_protocol_ids() -> None:
    t = Libp2pTransport(NodeIdentity.generate(), ClusterKey.generate(), CONFIG)

    async def h(req: Request) -> None:
        return None

    with pytest.raises(ValueError):
        t.register_handler("/echo/1.0.0", h)
    with pytest.raises(ValueError):
        t.register_handler(P.BLOB, h)
