"""`Libp2pTransport`: the network port the runtime uses (requests, blobs, events).

    async with Libp2pTransport(identity, cluster_key, TransportConfig()).running() as t:
        t.register_handler(protocol_ids.MEMBERSHIP, on_membership)
        await t.connect("/ip4/192.168.1.7/tcp/7470/p2p/12D3KooW...")
        reply = await t.request(peer_id, protocol_ids.MEMBERSHIP, "ping", {"n": 1}, timeout=0.5)

Everything here is bounded in time: dials have a hard deadline, every request
has a timeout, streams have idle and per-frame deadlines. Library failures are
translated into `errors.*` with one readable line (py-libp2p raises nested
exception groups).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from multiaddr import Multiaddr

from kowalski_node.adapters.libp2p import envelope as env
from kowalski_node.adapters.libp2p import protocol_ids
from kowalski_node.adapters.libp2p.api import (
    ConnectionCallback,
    ConnectionEvent,
    TransportPort,
)
from kowalski_node.adapters.libp2p.backoff import REDIAL_MAX_S, REDIAL_MIN_S, RedialBackoff
from kowalski_node.adapters.libp2p.blob import (
    DEFAULT_CHUNK,
    BlobCallback,
    BlobReceipt,
    BlobStore,
    file_sha256,
    receive_blob_over,
    send_blob_over,
)
from kowalski_node.adapters.libp2p.errors import (
    ClusterKeyMismatch,
    ConnectionLost,
    DialError,
    ProtocolNotSupported,
    RemoteError,
    RequestTimeout,
    TransportError,
    describe_exception,
)
from kowalski_node.adapters.libp2p.framing import DEFAULT_MAX_FRAME
from kowalski_node.adapters.libp2p.host import BuiltHost, HostTimeouts, build_host
from kowalski_node.adapters.libp2p.liblog import route_library_logs
from kowalski_node.adapters.libp2p.rpc import (
    RequestHandler,
    RpcChannel,
    RpcLimits,
    serve_rpc_stream,
)
from kowalski_node.identity import ClusterKey, NodeIdentity

logger = logging.getLogger(__name__)

MAX_ADDRS_PER_DIAL = 8  # addresses tried one by one per dial (stale ones are skipped)
PEER_ADDR_TTL_S = 600


@dataclass(frozen=True)
class TransportConfig:
    listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    dial_timeout_s: float = 3.0
    request_timeout_s: float = 5.0
    stream_open_timeout_s: float = 3.0
    max_frame_bytes: int = DEFAULT_MAX_FRAME
    idle_timeout_s: float = 60.0
    frame_timeout_s: float = 10.0
    write_timeout_s: float = 10.0
    max_inflight_per_stream: int = 64
    blob_dir: Path | None = None  # where received blobs land; None refuses blobs
    blob_chunk_bytes: int = DEFAULT_CHUNK
    max_blob_bytes: int = 64 * 1024**3
    blob_attempts: int = 4  # a stalled or reset blob stream is reopened and resumed
    redial_min_s: float = REDIAL_MIN_S  # per-peer redial backoff (backoff.py)
    redial_max_s: float = REDIAL_MAX_S
    host_timeouts: HostTimeouts = field(default_factory=HostTimeouts)

    def rpc_limits(self) -> RpcLimits:
        return RpcLimits(
            max_frame=self.max_frame_bytes,
            idle_timeout=self.idle_timeout_s,
            frame_timeout=self.frame_timeout_s,
            write_timeout=self.write_timeout_s,
            max_inflight=self.max_inflight_per_stream,
        )


@dataclass
class _HandlerEntry:
    fn: RequestHandler
    types: frozenset[str] | None


class _Notifee(INotifee):
    def __init__(self, transport: Libp2pTransport) -> None:
        self._t = transport

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._t._peer_up(conn.muxed_conn.peer_id)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._t._peer_maybe_down(conn.muxed_conn.peer_id)

    async def listen(self, network: INetwork, multiaddr: Multiaddr) -> None:
        return None

    async def listen_close(self, network: INetwork, multiaddr: Multiaddr) -> None:
        return None


def split_p2p_addr(addr: str) -> tuple[str, Multiaddr]:
    """('12D3KooW...', transport multiaddr) from '/ip4/../tcp/../p2p/<id>'; DialError if bad."""
    try:
        info = info_from_p2p_addr(Multiaddr(addr))
    except Exception as exc:  # noqa: BLE001 - py-multiaddr raises many unrelated types for bad input
        raise DialError(
            f"bad peer address {addr!r}: {describe_exception(exc)} "
            "(expected e.g. /ip4/192.168.1.7/tcp/7470/p2p/12D3KooW...)",
            DialError.REASON_BAD_ADDRESS,
            addr,
        ) from None
    return info.peer_id.to_base58(), info.addrs[0]


def _host_port(maddr: Multiaddr) -> tuple[str, int] | None:
    ip: str | None = None
    for proto in ("ip4", "ip6"):
        with contextlib.suppress(Exception):
            ip = maddr.value_for_protocol(proto)
        if ip:
            break
    try:
        port = maddr.value_for_protocol("tcp")
    except Exception:  # noqa: BLE001 - py-multiaddr raises many unrelated types for bad input
        return None
    if not ip or port is None:
        return None
    return str(ip), int(port)


def _interface_ipv4s() -> list[str]:
    import psutil

    out = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family.name == "AF_INET" and not a.address.startswith("127."):
                out.append(a.address)
    return out


def _guarded(
    protocol: str, handler: Callable[[INetStream], Awaitable[None]]
) -> Callable[[INetStream], Awaitable[None]]:
    """`handler` that never lets an error out into libp2p.

    py-libp2p runs stream handlers inside the connection's nursery, so an exception a
    handler does not catch ends every task of the host: one peer that went silent in
    the middle of a blob transfer took a whole node down that way. The stream is reset
    and the error logged; the node keeps serving everyone else."""

    async def run(stream: INetStream) -> None:
        try:
            await handler(stream)
        except Exception:  # a bug or a hostile peer: this stream only
            logger.exception("handler for %s failed; the stream is reset", protocol)
            with contextlib.suppress(Exception):
                await stream.reset()

    return run


class Libp2pTransport:
    """One node's libp2p endpoint. Create, then `async with t.running(): ...`."""

    def __init__(
        self,
        identity: NodeIdentity,
        cluster_key: ClusterKey,
        config: TransportConfig | None = None,
        *,
        allow_list: Iterable[str] | None = None,
    ) -> None:
        self.config = config or TransportConfig()
        self.identity = identity
        self.peer_id = identity.peer_id
        self._cluster_key = cluster_key
        self._allow: frozenset[str] | None = None if allow_list is None else frozenset(allow_list)
        self._library_logs = route_library_logs()
        self._redial = RedialBackoff(min_s=self.config.redial_min_s, max_s=self.config.redial_max_s)
        self._built: BuiltHost = build_host(
            identity,
            cluster_key,
            peer_filter=self._peer_allowed,
            timeouts=self.config.host_timeouts,
        )
        self._host = self._built.host
        self._limits = self.config.rpc_limits()
        self._handlers: dict[str, _HandlerEntry] = {}
        self._channels: dict[tuple[str, str], RpcChannel] = {}
        self._channel_locks: dict[tuple[str, str], trio.Lock] = {}
        self._connected: set[str] = set()
        self._conn_callbacks: list[ConnectionCallback] = []
        self._nursery: trio.Nursery | None = None
        self._blob_store: BlobStore | None = (
            BlobStore(self.config.blob_dir, self.config.max_blob_bytes)
            if self.config.blob_dir is not None
            else None
        )
        self._blob_callbacks: list[BlobCallback] = []
        self._running = False
        self.stats: dict[str, int] = {
            "requests_sent": 0,
            "requests_failed": 0,
            "streams_opened": 0,
            "dials": 0,
            "dial_failures": 0,
        }
        self._host.get_network().register_notifee(_Notifee(self))
        self._host.set_stream_handler(
            TProtocol(protocol_ids.BLOB), _guarded(protocol_ids.BLOB, self._on_blob_stream)
        )

    # ------------------------------------------------------------------ lifecycle

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Libp2pTransport]:
        """Listen, and on exit close everything (listener included)."""
        listen = [Multiaddr(a) for a in self.config.listen]
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(self._host.run(listen))
            # py-libp2p keeps accepting after run() exits unless the host is closed inside it
            stack.push_async_callback(self._close_host)
            if not self._host.get_transport_addrs():
                raise TransportError(f"could not listen on any of {list(self.config.listen)}")
            nursery = await stack.enter_async_context(trio.open_nursery())
            self._nursery = nursery
            stack.callback(nursery.cancel_scope.cancel)
            self._running = True
            try:
                yield self
            finally:
                self._running = False
                for channel in list(self._channels.values()):
                    await channel.aclose()
                self._channels.clear()

    async def _close_host(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(5.0):
            try:
                await self._host.close()
            except Exception as exc:  # noqa: BLE001 - closing at shutdown: log and go on
                logger.debug("host close: %s", describe_exception(exc))

    # ------------------------------------------------------------------ addresses, peers

    @property
    def listen_addrs(self) -> list[str]:
        """Dialable addresses with /p2p/<id>; 0.0.0.0 is expanded to interface addresses."""
        out: list[str] = []
        for maddr in self._host.get_transport_addrs():
            hp = _host_port(maddr)
            if hp is not None and hp[0] == "0.0.0.0":  # noqa: S104 - a comparison: a wildcard listen address is replaced by a dialable one
                ips = ["127.0.0.1", *_interface_ipv4s()]
                out.extend(f"/ip4/{ip}/tcp/{hp[1]}/p2p/{self.peer_id}" for ip in ips)
            else:
                out.append(f"{maddr}/p2p/{self.peer_id}")
        return out

    def connected_peers(self) -> list[str]:
        return sorted(self._connected)

    def is_connected(self, peer_id: str) -> bool:
        return peer_id in self._connected

    def add_peer_addrs(self, peer_id: str, addrs: Iterable[str], ttl_s: int = 600) -> None:
        """Remember where a peer listens (from mDNS, bootstrap or gossip) for later dials."""
        maddrs = []
        for a in addrs:
            try:
                m = Multiaddr(a)
                with contextlib.suppress(Exception):
                    m = m.decapsulate(Multiaddr(f"/p2p/{peer_id}"))
                maddrs.append(m)
            except Exception:  # noqa: BLE001 - py-multiaddr raises many unrelated types for bad input
                logger.debug("ignoring bad address %r for %s", a, peer_id)
        if maddrs:
            self._host.get_peerstore().add_addrs(ID.from_base58(peer_id), maddrs, ttl_s)

    # ------------------------------------------------------------------ allow-list

    def _peer_allowed(self, peer_id: str) -> bool:
        return self._allow is None or peer_id in self._allow or peer_id == self.peer_id

    @property
    def allow_list(self) -> frozenset[str] | None:
        return self._allow

    async def set_allow_list(self, peers: Iterable[str] | None) -> None:
        """Replace the allow-list (None: any holder of the cluster key); drops now-unlisted peers."""
        self._allow = None if peers is None else frozenset(peers)
        for peer in list(self._connected):
            if not self._peer_allowed(peer):
                logger.warning("disconnecting %s: removed from the allow-list", peer)
                await self.disconnect(peer)

    # ------------------------------------------------------------------ connection events

    def on_connection_event(self, callback: ConnectionCallback) -> None:
        """Call `callback(ConnectionEvent)` when a peer's first connection opens / last closes.

        Callbacks run synchronously on the trio thread and must not block.
        """
        self._conn_callbacks.append(callback)

    def _emit(self, peer_id: str, connected: bool) -> None:
        event = ConnectionEvent(peer_id, connected, time.monotonic())
        for cb in list(self._conn_callbacks):
            try:
                cb(event)
            except Exception:
                logger.exception("connection callback failed")

    def _peer_up(self, peer: ID) -> None:
        pid = peer.to_base58()
        failed_steps = self._redial.succeeded(pid)
        if failed_steps:
            logger.info("event=peer_reachable peer=%s after_attempts=%d", pid, failed_steps)
        if pid not in self._connected:
            self._connected.add(pid)
            self._emit(pid, True)

    def _peer_maybe_down(self, peer: ID) -> None:
        pid = peer.to_base58()
        live = [c for c in self._host.get_network().get_connections(peer) if not c.is_closed]
        if not live and pid in self._connected:
            self._connected.discard(pid)
            for key in [k for k in self._channels if k[0] == pid]:
                channel = self._channels.pop(key)
                if self._nursery is not None:
                    self._nursery.start_soon(channel.aclose)
            self._emit(pid, False)

    # ------------------------------------------------------------------ dialing

    async def connect(self, addr: str, timeout: float | None = None) -> str:
        """Dial `/.../p2p/<peer id>` with a hard deadline; returns the peer ID.

        Raises ClusterKeyMismatch when the peer answers with undecryptable data,
        DialError(reason=...) otherwise, always within `timeout` (+ a little).
        """
        peer_id, maddr = split_p2p_addr(addr)
        if peer_id == self.peer_id:
            raise DialError(
                f"{addr} is this node's own address", DialError.REASON_BAD_ADDRESS, addr
            )
        if not self._peer_allowed(peer_id):
            raise DialError(
                f"peer {peer_id} is not on this node's allow-list",
                DialError.REASON_NOT_ALLOWED,
                addr,
            )
        if self.is_connected(peer_id):
            return peer_id
        await self._dial(ID.from_base58(peer_id), [maddr], addr, timeout)
        return peer_id

    async def _dial(
        self, peer: ID, maddrs: list[Multiaddr], label: str, timeout: float | None
    ) -> None:
        limit = self.config.dial_timeout_s if timeout is None else timeout
        network = self._host.get_network()
        cache = getattr(network, "_negative_peer_cache", None)
        if cache is not None:  # a failed dial blocks the peer for 60 s otherwise
            cache.evict(str(peer))
        started = time.monotonic()
        self.stats["dials"] += 1
        failure: BaseException | None = None
        timed_out = False
        try:
            with trio.fail_after(limit):
                await self._connect_each(peer, maddrs)
            return
        except trio.TooSlowError:
            timed_out = True
        except (trio.Cancelled, KeyboardInterrupt):
            raise
        except BaseException as exc:  # noqa: BLE001 - nested groups from the library
            failure = exc
        self.stats["dial_failures"] += 1
        error = self._explain_dial_failure(maddrs, label, started, limit, timed_out, failure)
        step = self._redial.failed(str(peer), trio.current_time())
        if step is not None:
            logger.info(
                "event=peer_unreachable peer=%s attempt=%d retry_in_s=%.1f reason=%s detail=%s",
                step.peer,
                step.attempt,
                step.retry_in_s,
                error.reason,
                _one_line(str(error)),
            )
        raise error

    async def _connect_each(self, peer: ID, maddrs: list[Multiaddr]) -> None:
        """Dial `maddrs` one at a time until one connects; raise the last failure.

        py-libp2p's dial_peer tries only the first TCP address in the peer store, so a
        stale address (a laptop's old DHCP lease, learned earlier) would hide every
        fresh one. Here the store holds just the address being tried during its dial,
        and everything known is put back afterwards.
        """
        store = self._host.get_peerstore()
        try:
            known = list(store.addrs(peer))
        except Exception:  # noqa: BLE001 - the library's peerstore raises its own types for an unknown peer
            known = []
        order = list(dict.fromkeys(maddrs)) or known
        last: BaseException | None = None
        try:
            for maddr in order[:MAX_ADDRS_PER_DIAL]:
                with contextlib.suppress(Exception):
                    store.clear_addrs(peer)
                cache = getattr(self._host.get_network(), "_negative_peer_cache", None)
                if cache is not None:
                    cache.evict(str(peer))
                try:
                    await self._host.connect(PeerInfo(peer, [maddr]))
                    return
                except (trio.Cancelled, KeyboardInterrupt):
                    raise
                except BaseException as exc:  # noqa: BLE001 - nested groups from the library
                    last = exc
        finally:
            with contextlib.suppress(Exception):
                store.add_addrs(peer, list(dict.fromkeys([*order, *known])), PEER_ADDR_TTL_S)
        if last is not None:
            raise last

    def _explain_dial_failure(
        self,
        maddrs: list[Multiaddr],
        label: str,
        started: float,
        limit: float,
        timed_out: bool,
        failure: BaseException | None,
    ) -> DialError:
        detail = describe_exception(failure) if failure is not None else ""
        traces = []
        for m in maddrs:
            hp = _host_port(m)
            trace = self._built.pnet.last_outbound_trace(*hp) if hp else None
            if trace is not None and trace.opened_at >= started:
                traces.append(trace)
        fp = self._cluster_key.fingerprint()
        if any(t.key_mismatch for t in traces) or any(
            t.closed_early and not t.header_verified for t in traces
        ):
            return ClusterKeyMismatch(
                f"{label}: the peer does not accept our cluster key (ours has fingerprint {fp}): "
                "likely a cluster key mismatch; check that both nodes use the same swarm.key",
                label,
            )
        if not traces:
            if timed_out:
                return DialError(
                    f"{label}: no TCP connection within {limit:.1f}s (host down or filtered?)",
                    DialError.REASON_TIMEOUT,
                    label,
                )
            return DialError(f"{label}: unreachable: {detail}", DialError.REASON_UNREACHABLE, label)
        if any(not t.nonce_received for t in traces):
            return DialError(
                f"{label}: TCP connected but the peer sent nothing within {limit:.1f}s "
                "(not a kowalski/pnet node, or paused)",
                DialError.REASON_TIMEOUT,
                label,
            )
        if not any(t.header_verified for t in traces):
            return ClusterKeyMismatch(
                f"{label}: the private-network handshake did not complete within {limit:.1f}s: "
                f"likely a cluster key mismatch (ours has fingerprint {fp})",
                label,
            )
        reason = "timed out" if timed_out else detail
        return DialError(
            f"{label}: the cluster key matched but the secure handshake failed ({reason}); "
            "the peer may refuse us (allow-list), have another peer ID, or not speak noise",
            DialError.REASON_HANDSHAKE,
            label,
        )

    async def _ensure_connected(self, peer_id: str, timeout: float) -> None:
        if self.is_connected(peer_id):
            return
        if not self._peer_allowed(peer_id):
            raise DialError(
                f"peer {peer_id} is not on the allow-list", DialError.REASON_NOT_ALLOWED
            )
        peer = ID.from_base58(peer_id)
        try:
            addrs = list(self._host.get_peerstore().addrs(peer))
        except Exception:  # noqa: BLE001 - the library's peerstore raises its own types for an unknown peer
            addrs = []
        if not addrs:
            raise DialError(
                f"not connected to {peer_id} and no address known for it",
                DialError.REASON_UNREACHABLE,
            )
        wait = self._redial.wait_s(peer_id, trio.current_time())
        if wait > 0:
            raise DialError(
                f"{peer_id} was unreachable {self._redial.attempts(peer_id)} time(s); "
                f"next dial in {wait:.1f}s",
                DialError.REASON_BACKOFF,
            )
        await self._dial(peer, addrs, peer_id, timeout)

    async def disconnect(self, peer_id: str) -> None:
        with trio.move_on_after(2.0):
            try:
                await self._host.disconnect(ID.from_base58(peer_id))
            except Exception as exc:  # noqa: BLE001 - disconnect is best effort; log and go on
                logger.debug("disconnect %s: %s", peer_id, describe_exception(exc))

    # ------------------------------------------------------------------ request/response

    def register_handler(
        self, protocol: str, handler: RequestHandler, *, types: Collection[str] | None = None
    ) -> None:
        """Serve `protocol`: `await handler(Request)` returns the reply payload.

        Raise `RequestRejected(code, message)` for a specific error reply; with
        `types`, other message types get an `unknown_type` error automatically.
        """
        protocol_ids.check_protocol(protocol)
        if protocol == protocol_ids.BLOB:
            raise ValueError("the blob protocol is served by the transport itself")
        self._handlers[protocol] = _HandlerEntry(
            handler, None if types is None else frozenset(types)
        )

        async def on_stream(stream: INetStream) -> None:
            peer = stream.muxed_conn.peer_id.to_base58()
            entry = self._handlers.get(protocol)
            if entry is None:
                await stream.reset()
                return
            await serve_rpc_stream(
                stream,
                peer_id=peer,
                protocol=protocol,
                handler=entry.fn,
                types=entry.types,
                limits=self._limits,
            )

        self._host.set_stream_handler(TProtocol(protocol), _guarded(protocol, on_stream))

    def unregister_handler(self, protocol: str) -> None:
        self._handlers.pop(protocol, None)
        self._host.remove_stream_handler(TProtocol(protocol))

    async def _open_stream(self, peer_id: str, protocol: str, timeout: float) -> INetStream:
        with trio.move_on_after(timeout) as scope:
            await self._ensure_connected(peer_id, timeout)
            try:
                stream = await self._host.new_stream(ID.from_base58(peer_id), [TProtocol(protocol)])
            except (trio.Cancelled, KeyboardInterrupt):
                raise
            except Exception as exc:  # noqa: BLE001 - the library raises many types for a failed stream open; classified below
                detail = describe_exception(exc)
                if "protocol not supported" in detail or "protocols not supported" in detail:
                    self._library_logs.protocol_unsupported(peer_id, f"[{protocol!r}]")
                    raise ProtocolNotSupported(protocol, peer_id) from None
                raise ConnectionLost(f"could not open {protocol} to {peer_id}: {detail}") from None
            self.stats["streams_opened"] += 1
            return stream
        assert scope.cancelled_caught
        raise RequestTimeout(f"could not open {protocol} to {peer_id} within {timeout:.2f}s")

    async def _channel(self, peer_id: str, protocol: str, timeout: float) -> RpcChannel:
        key = (peer_id, protocol)
        channel = self._channels.get(key)
        if channel is not None and not channel.closed:
            return channel
        lock = self._channel_locks.setdefault(key, trio.Lock())
        async with lock:
            channel = self._channels.get(key)
            if channel is not None and not channel.closed:
                return channel
            if self._nursery is None or not self._running:
                raise TransportError("transport is not running")
            stream = await self._open_stream(peer_id, protocol, timeout)
            # the requester gives up an idle stream before the responder does, so a
            # request never races the responder's idle close
            limits = dataclasses.replace(self._limits, idle_timeout=self._limits.idle_timeout / 2)
            channel = RpcChannel(stream, peer_id=peer_id, protocol=protocol, limits=limits)
            self._channels[key] = channel
            self._nursery.start_soon(self._run_channel, key, channel)
            return channel

    async def _run_channel(self, key: tuple[str, str], channel: RpcChannel) -> None:
        try:
            await channel.run_reader()
        finally:
            if self._channels.get(key) is channel:
                del self._channels[key]

    async def request(
        self,
        peer_id: str,
        protocol: str,
        type_: str,
        payload: Any,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Send one request and return the reply payload.

        Raises RequestTimeout, ConnectionLost (peer went away with the request
        pending), RemoteError (error reply; `.code`), DialError (not reachable).
        The whole call, dial and stream opening included, is bounded by `timeout`.
        """
        limit = self.config.request_timeout_s if timeout is None else timeout
        deadline = trio.current_time() + limit
        self.stats["requests_sent"] += 1
        try:
            channel = await self._channel(peer_id, protocol, limit)
            remaining = max(0.0, deadline - trio.current_time())
            return await channel.call(type_, payload, remaining)
        except TransportError:
            self.stats["requests_failed"] += 1
            raise

    async def notify(
        self, peer_id: str, protocol: str, type_: str, payload: Any, *, timeout: float | None = None
    ) -> None:
        """Send a one-way message on the shared stream (no reply)."""
        limit = self.config.request_timeout_s if timeout is None else timeout
        deadline = trio.current_time() + limit
        channel = await self._channel(peer_id, protocol, limit)
        await channel.notify(type_, payload, max(0.0, deadline - trio.current_time()))

    # ------------------------------------------------------------------ blobs

    def on_blob(self, callback: BlobCallback) -> None:
        """`await callback(peer_id, offer, path)` after a blob is received and verified."""
        self._blob_callbacks.append(callback)

    async def _blob_received(self, peer_id: str, offer: Any, path: Path) -> None:
        for cb in list(self._blob_callbacks):
            try:
                await cb(peer_id, offer, path)
            except Exception:
                logger.exception("blob callback failed")

    async def _on_blob_stream(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id.to_base58()
        if self._blob_store is None:
            logger.info("refusing blob from %s: no blob_dir configured", peer)
            with contextlib.suppress(Exception):
                await stream.reset()
            return
        await receive_blob_over(
            stream,
            peer_id=peer,
            store=self._blob_store,
            on_complete=self._blob_received,
            limits=self._limits,
        )

    def blob_path(self, blob_id: str) -> Path | None:
        """Local path of a received blob (None if absent)."""
        if self._blob_store is None or not self._blob_store.has(blob_id):
            return None
        return self._blob_store.path_for(blob_id)

    async def send_blob(
        self,
        peer_id: str,
        path: Path,
        *,
        meta: Any = None,
        blob_id: str | None = None,
        timeout: float | None = None,
    ) -> BlobReceipt:
        """Stream a file to a peer's blob store (chunked, hashed, resumable).

        `timeout` bounds connecting and each wait for the receiver's answers;
        the transfer itself is bounded by per-frame write deadlines. A stream that
        stalls or resets mid-transfer (a busy receiver, a lost yamux window update)
        is reopened and the transfer resumes from the receiver's last whole chunk,
        up to `config.blob_attempts` streams in all.
        """
        limit = self.config.request_timeout_s if timeout is None else timeout
        path = Path(path)
        if blob_id is None:
            digest_hex, _size = await trio.to_thread.run_sync(file_sha256, path)
            blob_id = str(digest_hex)
        attempts = max(1, self.config.blob_attempts)
        for attempt in range(1, attempts + 1):
            try:
                receipt = await self._send_blob_once(peer_id, path, meta, blob_id, limit)
            except (ConnectionLost, RequestTimeout, RemoteError) as exc:
                if attempt == attempts or (
                    isinstance(exc, RemoteError) and exc.code != env.ERR_OVERLOADED
                ):
                    raise
                logger.warning(
                    "blob %s to %s: stream failed (%s); resuming on a new stream (%d/%d)",
                    blob_id[:12],
                    peer_id[-8:],
                    exc,
                    attempt + 1,
                    attempts,
                )
                await trio.sleep(min(0.25 * 2**attempt, 2.0))
                continue
            return receipt  # resumed_from/sent_bytes describe the stream that finished
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _send_blob_once(
        self, peer_id: str, path: Path, meta: Any, blob_id: str, limit: float
    ) -> BlobReceipt:
        stream = await self._open_stream(peer_id, protocol_ids.BLOB, limit)
        try:
            return await send_blob_over(
                stream,
                path,
                chunk_size=self.config.blob_chunk_bytes,
                meta=meta,
                blob_id=blob_id,
                limits=self._limits,
                reply_timeout=max(limit, 30.0),
            )
        finally:
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(1.0),
                contextlib.suppress(Exception),
            ):
                await stream.close()

    # ------------------------------------------------------------------ diagnostics

    def diagnostics(self) -> dict[str, Any]:
        pnet = self._built.pnet
        return {
            **self.stats,
            "connected_peers": len(self._connected),
            "open_channels": len(self._channels),
            "pnet_inbound_key_mismatches": pnet.inbound_mismatches,
            "pnet_outbound_key_mismatches": pnet.outbound_mismatches,
            "allow_list_rejections": self._built.noise.rejected_peers,
        }


def _one_line(text: str, limit: int = 300) -> str:
    """A quoted single-line rendering of free text for a `key=value` log field."""
    flat = " ".join(text.split())
    return repr(flat[:limit])


def is_loopback_addr(addr: str) -> bool:
    """True if a multiaddr points at 127.0.0.0/8 or ::1 (tests use this as a guard)."""
    hp = _host_port(Multiaddr(addr))
    return hp is not None and ipaddress.ip_address(hp[0]).is_loopback


def _conforms(transport: Libp2pTransport) -> TransportPort:
    """Static check (mypy) that Libp2pTransport implements TransportPort."""
    return transport
