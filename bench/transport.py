"""Transport benchmark: two processes on 127.0.0.1 (and mDNS in a private netns).

    python bench/transport.py [--blob-mb 1024] [--rounds 500] [--connects 20] [--out FILE]

Prints one JSON document:
- connect_ms: fresh connection (TCP + pnet + noise + yamux), p50/p95 over --connects;
- key_mismatch_ms: how long a dial with a wrong cluster key takes to be reported;
- rtt_ms: request/response round trip on an open channel, p50/p95/p99 over --rounds;
- blob: --blob-mb file sent chunked + hashed + verified: MB/s and peak RSS growth
  of both processes (goal: < 100 MB extra for 1 GB);
- mdns: 3 nodes in a private network namespace, last start -> all connected.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import trio

from kowalski_node.adapters.libp2p.errors import ClusterKeyMismatch
from kowalski_node.adapters.libp2p.mdns_probe import netns_unavailable_reason, run_in_private_netns
from kowalski_node.adapters.libp2p.probe_peer import PROBE, make_data_dir, spawn_peer, wait_ready
from kowalski_node.adapters.libp2p.transport import Libp2pTransport, TransportConfig
from kowalski_node.identity import ClusterKey, NodeIdentity


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


async def measure(
    args: argparse.Namespace,
    peer_addr: str,
    peer_id: str,
    peer_pid: int,
    key: ClusterKey,
    blob_dir: Path,
    work: Path,
) -> dict[str, Any]:
    me = NodeIdentity.generate()
    out: dict[str, Any] = {}
    config = TransportConfig(dial_timeout_s=5.0)

    connects = []
    for _ in range(args.connects):
        async with Libp2pTransport(me, key, config).running() as t:
            t0 = time.perf_counter()
            await t.connect(peer_addr)
            connects.append((time.perf_counter() - t0) * 1000)
    out["connect_ms"] = {"p50": pct(connects, 0.5), "p95": pct(connects, 0.95), "n": len(connects)}

    async with Libp2pTransport(
        NodeIdentity.generate(), ClusterKey.generate(), config
    ).running() as bad:
        t0 = time.perf_counter()
        try:
            await bad.connect(peer_addr, timeout=10)
            out["key_mismatch_ms"] = None
        except ClusterKeyMismatch:
            out["key_mismatch_ms"] = round((time.perf_counter() - t0) * 1000, 1)

    async with Libp2pTransport(me, key, config).running() as t:
        await t.connect(peer_addr)
        for i in range(20):  # warm-up: stream negotiation, caches
            await t.request(peer_id, PROBE, "echo", i, timeout=5)
        rtts = []
        for i in range(args.rounds):
            t0 = time.perf_counter()
            await t.request(peer_id, PROBE, "echo", {"i": i, "pad": "x" * 64}, timeout=5)
            rtts.append((time.perf_counter() - t0) * 1000)
        out["rtt_ms"] = {
            "p50": pct(rtts, 0.5),
            "p95": pct(rtts, 0.95),
            "p99": pct(rtts, 0.99),
            "mean": round(statistics.fmean(rtts), 3),
            "n": len(rtts),
        }

        if args.blob_mb > 0:
            src = work / "blob.bin"
            block = os.urandom(1024 * 1024)
            with open(src, "wb") as handle:
                for i in range(args.blob_mb):
                    handle.write(block[:-8] + i.to_bytes(8, "big"))
            receiver, sender = psutil.Process(peer_pid), psutil.Process()
            base = {"sender": sender.memory_info().rss, "receiver": receiver.memory_info().rss}
            peak = dict(base)

            async def sample() -> None:
                while True:
                    peak["sender"] = max(peak["sender"], sender.memory_info().rss)
                    peak["receiver"] = max(peak["receiver"], receiver.memory_info().rss)
                    await trio.sleep(0.05)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sample)
                t0 = time.perf_counter()
                receipt = await t.send_blob(peer_id, src, timeout=60)
                elapsed = time.perf_counter() - t0
                nursery.cancel_scope.cancel()
            src.unlink()
            for f in blob_dir.glob("*"):
                f.unlink()
            out["blob"] = {
                "mb": args.blob_mb,
                "seconds": round(elapsed, 2),
                "mb_per_s": round(receipt.size / 2**20 / elapsed, 1),
                "rss_growth_mb": {k: round((peak[k] - base[k]) / 2**20, 1) for k in base},
                "chunk_bytes": config.blob_chunk_bytes,
                "includes": "sender sha256 pass + per-chunk sha256 + receiver disk write + verify",
            }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blob-mb", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--connects", type=int, default=20)
    parser.add_argument("--no-mdns", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    key = ClusterKey.generate()
    with tempfile.TemporaryDirectory(prefix="kowalski-bench-") as tmp:
        work = Path(tmp)
        make_data_dir(work / "peer", key)
        proc = spawn_peer(work / "peer")
        try:
            peer = wait_ready(proc, work / "peer")
            result = trio.run(
                measure,
                args,
                peer.addr,
                peer.peer_id,
                peer.proc.pid,
                key,
                work / "peer" / "blobs",
                work,
            )
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
    if not args.no_mdns:
        reason = netns_unavailable_reason()
        result["mdns"] = {"skipped": reason} if reason else run_in_private_netns(3)
    report = {
        "benchmark": "transport",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "setup": "probe peer in a separate process, this process dials it over 127.0.0.1",
        **result,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
