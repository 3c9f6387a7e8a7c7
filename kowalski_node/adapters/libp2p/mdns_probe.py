"""Measure mDNS discovery + connect on loopback, inside a private network namespace.

    python -m kowalski_node.adapters.libp2p.mdns_probe --nodes 3

re-executes itself under `unshare -n` (a fresh network namespace that has only
`lo`, with multicast enabled there), so no packet can reach a real network.
Inside, it starts N transports whose zeroconf is restricted to 127.0.0.1; each
connects to the peers it discovers. Prints one JSON line with, per node, the
milliseconds from its start until every other node was discovered and connected.
The inner run refuses to start if any non-loopback interface exists.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

import trio

NETNS_SETUP = "ip link set lo up && ip link set lo multicast on && ip route add 224.0.0.0/4 dev lo"


def netns_unavailable_reason() -> str | None:
    """Why a private network namespace cannot be made here (None if it can)."""
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "needs the `unshare` and `ip` tools"
    try:
        probe = subprocess.run(  # noqa: S603 - diagnostic tool, fixed argv
            ["unshare", "-n", "sh", "-c", NETNS_SETUP],  # noqa: S607 - the host's own unshare/sh, as the operator runs them
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare -n failed: {exc}"
    if probe.returncode != 0:
        err = probe.stderr.decode(errors="replace").strip()
        return f"cannot create a network namespace with multicast on lo ({err or 'not root?'})"
    return None


def run_in_private_netns(nodes: int, timeout: float = 60.0) -> dict[str, Any]:
    """Run the measurement in a fresh network namespace; returns its JSON result."""
    inner = f"{NETNS_SETUP} && exec {sys.executable} -m {__spec__.name if __spec__ else __name__}"
    cmd = ["unshare", "-n", "sh", "-c", f"{inner} --inner --nodes {int(nodes)}"]
    done = subprocess.run(cmd, capture_output=True, timeout=timeout, env=os.environ.copy())  # noqa: S603 - diagnostic tool, argv built here, no shell
    if done.returncode != 0:
        raise RuntimeError(
            f"mdns probe failed (rc {done.returncode}): {done.stderr.decode(errors='replace')[-2000:]}"
        )
    result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return result


def _only_loopback() -> bool:
    import psutil

    return all(name == "lo" for name in psutil.net_if_addrs())


async def _measure(nodes: int) -> dict[str, Any]:
    from kowalski_node.adapters.libp2p.transport import Libp2pTransport, TransportConfig
    from kowalski_node.adapters.mdns import DiscoveredPeer, MdnsDiscovery
    from kowalski_node.identity import ClusterKey, NodeIdentity

    key = ClusterKey.generate()
    transports = [
        Libp2pTransport(NodeIdentity.generate(), key, TransportConfig()) for _ in range(nodes)
    ]
    started: dict[str, float] = {}
    discovered: dict[str, dict[str, float]] = {t.peer_id: {} for t in transports}
    connected: dict[str, dict[str, float]] = {t.peer_id: {} for t in transports}
    all_done = trio.Event()
    formed_at: list[float] = []

    def check_done() -> None:
        if not all_done.is_set() and all(len(c) == nodes - 1 for c in connected.values()):
            formed_at.append(time.monotonic())
            all_done.set()

    async with trio.open_nursery() as nursery:

        async def run_node(t: Libp2pTransport, ready: trio.Event) -> None:
            def on_event(event: Any) -> None:
                if event.connected:
                    connected[t.peer_id].setdefault(event.peer_id, time.monotonic())
                    check_done()

            t.on_connection_event(on_event)

            def on_peer(peer: DiscoveredPeer) -> None:
                if peer.lost or peer.peer_id in discovered[t.peer_id]:
                    return
                discovered[t.peer_id][peer.peer_id] = peer.at
                nursery.start_soon(connect, t, peer)

            async with t.running():
                started[t.peer_id] = time.monotonic()
                mdns = MdnsDiscovery(
                    t.peer_id,
                    t.listen_addrs,
                    on_peer,
                    cluster=key.fingerprint(),
                    interfaces=["127.0.0.1"],
                )
                async with mdns.running():
                    ready.set()
                    await all_done.wait()
                    await trio.sleep(0.2)

        async def connect(t: Libp2pTransport, peer: DiscoveredPeer) -> None:
            if t.is_connected(peer.peer_id):
                return
            try:
                await t.connect(peer.addrs[0], timeout=3)
            except Exception as exc:  # noqa: BLE001 - diagnostic tool: print whatever the library raised
                print(f"connect failed: {exc}", file=sys.stderr)

        with trio.fail_after(30):
            for t in transports:
                ready = trio.Event()
                nursery.start_soon(run_node, t, ready)
                await ready.wait()
            await all_done.wait()
    per_node = []
    for t in transports:
        start = started[t.peer_id]
        per_node.append(
            {
                "discovered_all_ms": round(
                    (max(discovered[t.peer_id].values(), default=start) - start) * 1000, 1
                )
                if len(discovered[t.peer_id]) == nodes - 1
                else None,
                "connected_all_ms": round((max(connected[t.peer_id].values()) - start) * 1000, 1),
            }
        )
    last_start = max(started.values())
    return {
        "nodes": nodes,
        "cluster_formed_ms": round((formed_at[0] - last_start) * 1000, 1),
        "per_node": per_node,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.nodes < 2 or args.nodes > 16:
        parser.error("--nodes must be between 2 and 16")
    if not args.inner:
        reason = netns_unavailable_reason()
        if reason:
            print(json.dumps({"skipped": reason}))
            return 0
        print(json.dumps(run_in_private_netns(args.nodes)))
        return 0
    if not _only_loopback():
        print("refusing to run mDNS outside a private network namespace", file=sys.stderr)
        return 2
    print(json.dumps(trio.run(_measure, args.nodes)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
