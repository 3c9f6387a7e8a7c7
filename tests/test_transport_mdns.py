"""mDNS discovery + connect, only inside a private network namespace (never the real LAN)."""

from __future__ import annotations

import pytest

from kowalski_node.adapters.libp2p.mdns_probe import netns_unavailable_reason, run_in_private_netns
from kowalski_node.adapters.mdns import build_txt, parse_txt

PEER = "12D3KooWExamplePeer"


def test_txt_roundtrip_and_rejections() -> None:
    addrs = [f"/ip4/192.168.1.{i}/tcp/7470/p2p/{PEER}" for i in range(12)]
    txt = build_txt(PEER, addrs, "abcd1234")
    encoded = {k.encode(): v.encode() for k, v in txt.items()}
    peer, got, cluster = parse_txt(encoded)  # type: ignore[misc]
    assert peer == PEER and cluster == "abcd1234"
    assert list(got) == addrs[:8]  # bounded number of addresses
    assert parse_txt({b"v": b"2", b"peer": PEER.encode()}) is None
    assert parse_txt({b"v": b"1"}) is None
    # addresses that do not end in the advertised peer ID are ignored
    bad = {b"v": b"1", b"peer": PEER.encode(), b"a0": b"/ip4/1.2.3.4/tcp/1/p2p/Other"}
    assert parse_txt(bad, ["10.0.0.5"], 7470) == (
        PEER,
        (f"/ip4/10.0.0.5/tcp/7470/p2p/{PEER}",),
        None,
    )
    assert parse_txt({b"v": b"1", b"peer": b"\xff\xfe"}) is None


def test_three_nodes_discover_and_connect_on_loopback() -> None:
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(f"mDNS test needs a private network namespace: {reason}")
    result = run_in_private_netns(3, timeout=60)
    assert result["nodes"] == 3
    for node in result["per_node"]:
        assert node["connected_all_ms"] is not None
    # generous bound for a loaded machine; bench/transport.py reports the real figure
    assert result["cluster_formed_ms"] < 2000, result
