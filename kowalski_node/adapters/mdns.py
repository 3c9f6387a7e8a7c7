"""LAN discovery over mDNS with zeroconf, without blocking the trio loop.

py-libp2p's built-in mDNS blocks trio for ~1.7 s while zeroconf probes, only
fills the peerstore, and is one global object per process. Here:

- zeroconf runs its asyncio loop in its own thread; every blocking zeroconf
  call runs in a trio worker thread, and discoveries come back to trio through
  the trio token (`run_sync_soon`), never by touching trio from zeroconf's thread;
- the service instance name is our peer ID, which is unique by construction, so
  registration skips the ~1.5 s name probing (`cooperating_responders=True`)
  and the announcement goes out at once; the browser queries at start;
- TXT records carry the peer ID, its multiaddrs and a short cluster-key
  fingerprint (peers of other clusters on the LAN are ignored without a dial);
- the caller decides what to do on discovery (the runtime connects).

`interfaces` restricts the sockets to given interface addresses (tests use
["127.0.0.1"] inside a private network namespace; see tests/test_transport_mdns.py).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

logger = logging.getLogger(__name__)

SERVICE_TYPE = "_kowalski._tcp.local."
# trio-typing's stubs (pulled in by py-libp2p) predate `abandon_on_cancel`; trio 0.35 has it.
_run_in_thread: Any = trio.to_thread.run_sync
TXT_VERSION = "1"
MAX_TXT_ADDRS = 8


@dataclass(frozen=True)
class DiscoveredPeer:
    peer_id: str
    addrs: tuple[str, ...]  # multiaddrs ending in /p2p/<peer_id>
    cluster: str | None  # cluster-key fingerprint the peer advertises
    at: float  # time.monotonic() when it reached the trio side
    lost: bool = False  # True when the peer withdrew its service (goodbye)


PeerCallback = Callable[[DiscoveredPeer], None]


def build_txt(peer_id: str, addrs: Sequence[str], cluster: str | None) -> dict[str, str]:
    """TXT properties; each value must fit one 255-byte TXT string."""
    txt = {"v": TXT_VERSION, "peer": peer_id}
    if cluster:
        txt["c"] = cluster
    kept = [a for a in addrs if len(a) <= 250][:MAX_TXT_ADDRS]
    for i, addr in enumerate(kept):
        txt[f"a{i}"] = addr
    return txt


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def parse_txt(
    properties: dict[Any, Any], fallback_ips: Sequence[str] = (), port: int | None = None
) -> tuple[str, tuple[str, ...], str | None] | None:
    """(peer_id, addrs, cluster) from TXT properties, or None if it is not ours / malformed."""
    props = {_text(k): _text(v) for k, v in properties.items()}
    if props.get("v") != TXT_VERSION:
        return None
    peer_id = props.get("peer")
    if not peer_id or len(peer_id) > 128 or "/" in peer_id:
        return None
    addrs = []
    for i in range(MAX_TXT_ADDRS):
        addr = props.get(f"a{i}")
        if addr and addr.startswith("/") and addr.endswith(f"/p2p/{peer_id}"):
            addrs.append(addr)
    if not addrs and port:
        for ip in fallback_ips:
            kind = "ip6" if ipaddress.ip_address(ip).version == 6 else "ip4"
            addrs.append(f"/{kind}/{ip}/tcp/{port}/p2p/{peer_id}")
    return peer_id, tuple(addrs), props.get("c")


def _ips_and_port(addrs: Sequence[str]) -> tuple[list[str], int]:
    ips: list[str] = []
    port = 0
    for addr in addrs:
        parts = addr.strip("/").split("/")
        if len(parts) >= 4 and parts[0] in ("ip4", "ip6") and parts[2] == "tcp":
            if parts[1] not in ("0.0.0.0", "::") and parts[1] not in ips:  # noqa: S104 - a comparison: wildcard addresses are not advertised
                ips.append(parts[1])
            port = port or int(parts[3])
    return ips, port


class MdnsDiscovery:
    """Announce this node and report other nodes of the same cluster found on the LAN."""

    def __init__(
        self,
        peer_id: str,
        addrs: Sequence[str],
        on_peer: PeerCallback,
        *,
        cluster: str | None = None,
        interfaces: Sequence[str] | None = None,
        service_type: str = SERVICE_TYPE,
    ) -> None:
        self.peer_id = peer_id
        self.addrs = list(addrs)
        self.cluster = cluster
        self.interfaces = list(interfaces) if interfaces is not None else None
        self.service_type = service_type
        self._on_peer = on_peer
        self._zc: Any = None
        self._browser: Any = None
        self._info: Any = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._seen: dict[str, tuple[str, ...]] = {}
        self.started_at: float | None = None

    # -- zeroconf thread side ------------------------------------------------

    def _start_blocking(self) -> None:
        from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, Zeroconf

        ips, port = _ips_and_port(self.addrs)
        if not port:
            raise ValueError(f"no TCP port in {self.addrs}; cannot announce")
        kwargs: dict[str, Any] = {"ip_version": IPVersion.V4Only}
        if self.interfaces is not None:
            kwargs["interfaces"] = self.interfaces
        self._zc = Zeroconf(**kwargs)
        self._info = ServiceInfo(
            self.service_type,
            f"{self.peer_id}.{self.service_type}",
            port=port,
            properties=build_txt(self.peer_id, self.addrs, self.cluster),
            server=f"{self.peer_id[-16:].lower()}.local.",
            parsed_addresses=[ip for ip in ips if ipaddress.ip_address(ip).version == 4]
            or ["127.0.0.1"],
        )
        # Unique instance name (our peer ID): no probing. Only wait for the
        # registration itself, not for the three spaced announcements (~0.5 s).
        import asyncio

        registered = asyncio.run_coroutine_threadsafe(
            self._zc.async_register_service(self._info, cooperating_responders=True),
            self._zc.loop,
        )
        registered.result(timeout=3.0)
        self._browser = ServiceBrowser(self._zc, self.service_type, handlers=[self._on_change])

    def _on_change(self, zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        """Runs in zeroconf's browser thread: resolve, then hand over to trio."""
        from zeroconf import ServiceStateChange

        try:
            if state_change is ServiceStateChange.Removed:
                peer_id = name.split(".", 1)[0]
                if peer_id != self.peer_id:
                    self._post(DiscoveredPeer(peer_id, (), None, 0.0, lost=True))
                return
            t0 = time.monotonic()
            info = zeroconf.get_service_info(service_type, name, timeout=1500)
            logger.debug("mDNS: resolved %s in %.3fs", name, time.monotonic() - t0)
            if info is None:
                return
            parsed = parse_txt(info.properties or {}, info.parsed_addresses(), info.port)
            if parsed is None:
                return
            peer_id, addrs, cluster = parsed
            if peer_id == self.peer_id:
                return
            if self.cluster and cluster and cluster != self.cluster:
                logger.debug("mDNS: ignoring %s of another cluster (%s)", peer_id, cluster)
                return
            self._post(DiscoveredPeer(peer_id, addrs, cluster, 0.0))
        except Exception:  # a hostile or broken responder must not kill the browser thread
            logger.debug("mDNS: could not process %s", name, exc_info=True)

    def _post(self, peer: DiscoveredPeer) -> None:
        token = self._token
        if token is None:
            return
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(self._deliver, peer)

    def _stop_blocking(self) -> None:
        with contextlib.suppress(Exception):
            if self._browser is not None:
                self._browser.cancel()
        with contextlib.suppress(Exception):
            if self._zc is not None:
                self._zc.unregister_all_services()
        with contextlib.suppress(Exception):
            if self._zc is not None:
                self._zc.close()

    # -- trio side ------------------------------------------------------------

    def _deliver(self, peer: DiscoveredPeer) -> None:
        peer = DiscoveredPeer(peer.peer_id, peer.addrs, peer.cluster, time.monotonic(), peer.lost)
        if peer.lost:
            self._seen.pop(peer.peer_id, None)
        elif self._seen.get(peer.peer_id) == peer.addrs:
            return  # repeated announcement, nothing new
        else:
            self._seen[peer.peer_id] = peer.addrs
        try:
            self._on_peer(peer)
        except Exception:
            logger.exception("mDNS discovery callback failed")

    @contextlib.asynccontextmanager
    async def running(self, start_timeout: float = 5.0) -> AsyncIterator[MdnsDiscovery]:
        """Announce and browse while inside; withdraw the service on exit (bounded time)."""
        self._token = trio.lowlevel.current_trio_token()
        self.started_at = time.monotonic()
        try:
            with trio.fail_after(start_timeout):
                await _run_in_thread(self._start_blocking, abandon_on_cancel=True)
            yield self
        finally:
            self._token = None
            with trio.CancelScope(shield=True), trio.move_on_after(3.0):
                await _run_in_thread(self._stop_blocking, abandon_on_cancel=True)

    def known_peers(self) -> dict[str, tuple[str, ...]]:
        return dict(self._seen)
