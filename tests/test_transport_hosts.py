"""Real libp2p hosts in separate processes on 127.0.0.1: who gets in, and how failures surface.

Peers run `kowalski_node.adapters.libp2p.probe_peer` (started in parallel once
per module, ~1.5 s); this process is the other node. Every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import trio

from kowalski_node.adapters.libp2p import transport as transport_module
from kowalski_node.adapters.libp2p.blob import DEFAULT_CHUNK, file_sha256
from kowalski_node.adapters.libp2p.errors import (
    ClusterKeyMismatch,
    ConnectionLost,
    DialError,
)
from kowalski_node.adapters.libp2p.probe_peer import (
    PROBE,
    PeerProc,
    make_data_dir,
    spawn_peer,
    wait_ready,
)
from kowalski_node.adapters.libp2p.transport import (
    Libp2pTransport,
    TransportConfig,
)
from kowalski_node.identity import ClusterKey, NodeIdentity

BLOB_MB = int(os.environ.get("KOWALSKI_TEST_BLOB_MB", "200"))


@dataclass
class Cluster:
    key: ClusterKey
    me: NodeIdentity  # on peer A's allow-list
    a: PeerProc  # allow-list: [me]
    victim: PeerProc  # gets SIGKILLed
    quitter: PeerProc  # gets SIGTERMed
    tmp: Path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("hosts")
    key = ClusterKey.generate()
    me = NodeIdentity.generate()
    dirs = {name: tmp / name for name in ("a", "victim", "quitter")}
    make_data_dir(dirs["a"], key, allow=[me.peer_id])
    make_data_dir(dirs["victim"], key)
    make_data_dir(dirs["quitter"], key)
    procs = {
        "a": spawn_peer(dirs["a"]),
        "victim": spawn_peer(dirs["victim"]),
        "quitter": spawn_peer(dirs["quitter"]),
    }
    try:
        peers = {name: wait_ready(proc, dirs[name]) for name, proc in procs.items()}
        yield Cluster(key, me, peers["a"], peers["victim"], peers["quitter"], tmp)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)


def transport(identity: NodeIdentity, key: ClusterKey, **kw: object) -> Libp2pTransport:
    return Libp2pTransport(identity, key, TransportConfig(dial_timeout_s=3.0, **kw))  # type: ignore[arg-type]


async def expect_refused(dial: Awaitable[object], within: float = 3.0) -> None:
    """The dial must fail (any library error) well before it would hang."""
    started = time.monotonic()
    try:
        with trio.fail_after(8):
            await dial
    except trio.TooSlowError:
        pytest.fail("the dial hung instead of being refused")
    except Exception:  # py-libp2p raises nested exception groups; any failure is a refusal
        pass
    else:
        pytest.fail("the dial succeeded")
    assert time.monotonic() - started < within


async def test_same_key_request_response(cluster: Cluster) -> None:
    async with transport(cluster.me, cluster.key).running() as t:
        started = time.perf_counter()
        peer = await t.connect(cluster.a.addr)
        connect_ms = (time.perf_counter() - started) * 1000
        assert peer == cluster.a.peer_id and t.is_connected(peer)
        assert connect_ms < 2000
        reply = await t.request(peer, PROBE, "echo", {"n": 1, "b": b"\x00\xff"}, timeout=3)
        assert reply == {"n": 1, "b": b"\x00\xff"}
        rtts = []
        for i in range(20):
            t0 = time.perf_counter()
            assert await t.request(peer, PROBE, "echo", i, timeout=3) == i
            rtts.append(time.perf_counter() - t0)
        assert sorted(rtts)[10] < 0.05  # ~1 ms here; generous for a loaded CI box


async def test_wrong_key_is_reported_as_key_mismatch_within_seconds(cluster: Cluster) -> None:
    async with transport(NodeIdentity.generate(), ClusterKey.generate()).running() as outsider:
        started = time.monotonic()
        with pytest.raises(ClusterKeyMismatch, match="likely a cluster key mismatch") as info:
            await outsider.connect(cluster.a.addr, timeout=10)
        assert time.monotonic() - started < 3.0
        assert info.value.reason == DialError.REASON_KEY_MISMATCH
        assert not outsider.connected_peers()
    async with transport(cluster.me, cluster.key).running() as t:
        await t.connect(cluster.a.addr)
        diag = await t.request(cluster.a.peer_id, PROBE, "diag", None, timeout=3)
        assert diag["pnet_inbound_key_mismatches"] >= 1
        assert diag["peers"] == [cluster.me.peer_id]


async def test_host_without_any_key_is_refused(cluster: Cluster) -> None:
    """A stock py-libp2p host (noise, no pnet) cannot connect, and the peer stays clean."""
    from libp2p import new_host
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from multiaddr import Multiaddr

    host = new_host(key_pair=NodeIdentity.generate().to_libp2p_keypair())
    async with host.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        await expect_refused(host.connect(info_from_p2p_addr(Multiaddr(cluster.a.addr))))
        assert not host.get_network().get_connections()
        await host.close()
    async with transport(cluster.me, cluster.key).running() as t:
        await t.connect(cluster.a.addr)
        diag = await t.request(cluster.a.peer_id, PROBE, "diag", None, timeout=3)
        assert diag["peers"] == [cluster.me.peer_id]


async def test_plaintext_only_dialer_is_refused(cluster: Cluster) -> None:
    """Right cluster key, but only /plaintext/2.0.0 offered: a noise-only node says no."""
    from libp2p import new_swarm
    from libp2p.custom_types import TProtocol
    from libp2p.host.basic_host import BasicHost
    from libp2p.network.config import ConnectionConfig, RetryConfig
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
    from multiaddr import Multiaddr

    from kowalski_node.adapters.libp2p.pnet import PnetTCPTransport

    keypair = NodeIdentity.generate().to_libp2p_keypair()
    pnet = PnetTCPTransport(cluster.key.key)
    swarm = new_swarm(
        key_pair=keypair,
        sec_opt={TProtocol(PLAINTEXT_PROTOCOL_ID): InsecureTransport(keypair)},
        transports=[pnet],
        retry_config=RetryConfig(max_retries=0),
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )
    host = BasicHost(network=swarm)
    async with host.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        await expect_refused(host.connect(info_from_p2p_addr(Multiaddr(cluster.a.addr))))
        trace = pnet.last_outbound_trace("127.0.0.1", int(cluster.a.addr.split("/")[4]))
        assert trace is not None and trace.header_verified  # the key matched; security refused
        assert not host.get_network().get_connections()
        await host.close()


async def test_allow_list_rejects_unlisted_peer(cluster: Cluster) -> None:
    async with transport(NodeIdentity.generate(), cluster.key).running() as stranger:
        with pytest.raises(DialError) as info:
            await stranger.connect(cluster.a.addr, timeout=5)
        assert not isinstance(info.value, ClusterKeyMismatch)
        assert info.value.reason in (DialError.REASON_HANDSHAKE, DialError.REASON_TIMEOUT)
        assert not stranger.connected_peers()
    async with transport(cluster.me, cluster.key).running() as t:
        await t.connect(cluster.a.addr)
        diag = await t.request(cluster.a.peer_id, PROBE, "diag", None, timeout=3)
        assert diag["allow_list_rejections"] >= 1
        assert cluster.me.peer_id in diag["peers"] and len(diag["peers"]) == 1


async def test_local_allow_list_refuses_before_dialing(cluster: Cluster) -> None:
    config = TransportConfig(dial_timeout_s=3.0)
    other = NodeIdentity.generate().peer_id
    t = Libp2pTransport(cluster.me, cluster.key, config, allow_list=[other])
    async with t.running():
        with pytest.raises(DialError) as info:
            await t.connect(cluster.a.addr)
        assert info.value.reason == DialError.REASON_NOT_ALLOWED


async def test_sigkill_fails_pending_request_fast(cluster: Cluster) -> None:
    async with transport(cluster.me, cluster.key).running() as t:
        peer = await t.connect(cluster.victim.addr)
        events: list[bool] = []
        t.on_connection_event(lambda e: events.append(e.connected))

        async def kill_soon() -> None:
            await trio.sleep(0.3)
            os.kill(cluster.victim.proc.pid, signal.SIGKILL)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(kill_soon)
            started = time.monotonic()
            with pytest.raises(ConnectionLost):
                await t.request(peer, PROBE, "sleep", {"s": 30}, timeout=20)
            elapsed = time.monotonic() - started
        assert elapsed < 2.0, f"pending read took {elapsed:.1f}s to fail"
        with trio.fail_after(3):
            while False not in events:
                await trio.sleep(0.02)
        assert not t.is_connected(peer)
        with pytest.raises(DialError):
            await t.connect(cluster.victim.addr, timeout=2)


async def test_large_blob_with_bounded_rss(cluster: Cluster) -> None:
    src = cluster.tmp / "big.bin"
    block = os.urandom(1024 * 1024)
    with open(src, "wb") as handle:
        for i in range(BLOB_MB):
            handle.write(block[:-8] + i.to_bytes(8, "big"))
    receiver = psutil.Process(cluster.a.proc.pid)
    me = psutil.Process()
    try:
        async with transport(cluster.me, cluster.key).running() as t:
            peer = await t.connect(cluster.a.addr)
            await t.request(peer, PROBE, "echo", 0, timeout=3)
            base = {"me": me.memory_info().rss, "peer": receiver.memory_info().rss}
            peak = dict(base)

            async def sample() -> None:
                while True:
                    peak["me"] = max(peak["me"], me.memory_info().rss)
                    peak["peer"] = max(peak["peer"], receiver.memory_info().rss)
                    await trio.sleep(0.05)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sample)
                with trio.fail_after(120):
                    receipt = await t.send_blob(peer, src, meta={"purpose": "test"}, timeout=30)
                nursery.cancel_scope.cancel()
        assert receipt.size == BLOB_MB * 1024 * 1024
        # Normally one stream carries it all. py-libp2p 0.8's yamux sometimes loses a window
        # update under heavy load (seen on a saturated CI run); send_blob then resumes on a
        # new stream from the receiver's last whole chunk, which is what this allows.
        assert receipt.resumed_from % DEFAULT_CHUNK == 0
        assert receipt.resumed_from + receipt.sent_bytes == receipt.size
        stored = cluster.a.data_dir / "blobs" / receipt.blob_id
        assert stored.stat().st_size == receipt.size
        growth = {k: (peak[k] - base[k]) / 2**20 for k in base}
        assert growth["me"] < 100 and growth["peer"] < 100, growth
    finally:
        src.unlink(missing_ok=True)
        for leftover in (cluster.a.data_dir / "blobs").glob("*"):
            leftover.unlink()


class DropsAfter:
    """Wraps a real libp2p stream; resets it once `limit` bytes went out (a stalled yamux
    window or a flaky link looks like this to the sender)."""

    def __init__(self, inner: object, limit: int) -> None:
        self.inner = inner
        self.limit = limit
        self.written = 0

    async def read(self, n: int | None = None) -> bytes:
        return await self.inner.read(n)  # type: ignore[attr-defined]  # wraps any stream

    async def write(self, data: bytes) -> None:
        if self.written + len(data) > self.limit:
            await trio.sleep(1.0)  # let the receiver store what already reached it
            await self.inner.reset()  # type: ignore[attr-defined]
            raise OSError("stream reset (test)")
        self.written += len(data)
        await self.inner.write(data)  # type: ignore[attr-defined]

    async def close(self) -> None:
        await self.inner.close()  # type: ignore[attr-defined]


async def test_blob_resumes_on_a_new_stream_after_a_reset(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = cluster.tmp / "resume.bin"
    src.write_bytes(os.urandom(6 * 1024 * 1024 + 12345))
    real_send = transport_module.send_blob_over
    streams: list[object] = []

    async def first_stream_drops(stream: object, path: Path, **kw: object) -> object:
        streams.append(stream)
        if len(streams) == 1:
            stream = DropsAfter(stream, limit=3 * 1024 * 1024 + 777)
        return await real_send(stream, path, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(transport_module, "send_blob_over", first_stream_drops)
    try:
        async with transport(cluster.me, cluster.key, blob_chunk_bytes=1024 * 1024).running() as t:
            peer = await t.connect(cluster.a.addr)
            with trio.fail_after(60):
                receipt = await t.send_blob(peer, src, timeout=10)
        assert len(streams) == 2
        # the second stream started at the receiver's last whole chunk, not at 0
        assert 0 < receipt.resumed_from <= 3 * 1024 * 1024
        assert receipt.resumed_from % (1024 * 1024) == 0
        assert receipt.sent_bytes == receipt.size - receipt.resumed_from
        assert receipt.blob_id == file_sha256(src)[0]
        stored = cluster.a.data_dir / "blobs" / receipt.blob_id
        assert stored.read_bytes() == src.read_bytes()
    finally:
        src.unlink(missing_ok=True)
        for leftover in (cluster.a.data_dir / "blobs").glob("*"):
            leftover.unlink()


async def test_sigterm_shuts_down_cleanly_and_stops_listening(cluster: Cluster) -> None:
    port = int(cluster.quitter.addr.split("/")[4])
    stream = await trio.open_tcp_stream("127.0.0.1", port)  # listening now
    await stream.aclose()
    assert cluster.quitter.stop(timeout=10) == 0
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)
