"""`kowalski-node init`: create this device's identity and cluster key, or join a cluster.

    kowalski-node init --data-dir D                       # new cluster: new key
    kowalski-node init --data-dir D --cluster-key-file F  # use an existing swarm.key
    kowalski-node init --data-dir D --join JOIN           # key + bootstrap from a join string

It prints the peer ID and a join string for the next device. The join string
contains the cluster key: share it like a password.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path

from kowalski_node.errors import ConfigError
from kowalski_node.identity import (
    IDENTITY_FILE,
    SWARM_KEY_FILE,
    ClusterKey,
    JoinInfo,
    NodeIdentity,
    decode_join,
    encode_join,
    load_bootstrap,
    load_cluster_key,
    load_cluster_key_file,
    load_identity,
    save_bootstrap,
    save_cluster_key,
    save_identity,
)
from kowalski_node.startup_checks import DataDirLock

DEFAULT_P2P_PORT = 7470


def default_data_dir() -> Path:
    home = os.environ.get("KOWALSKI_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "kowalski-node"
    return base / "node"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="node data dir (default $KOWALSKI_HOME/node)"
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--cluster-key-file", type=Path, help="use this swarm.key instead of creating a new key"
    )
    source.add_argument(
        "--join", metavar="JOIN", help="the kowalski2:... string `init` printed on a member"
    )
    parser.add_argument(
        "--advertise",
        action="append",
        default=None,
        metavar="HOST:PORT|MULTIADDR",
        help="address to put in the join string (repeatable; default: this host's "
        f"LAN IPv4 addresses on port {DEFAULT_P2P_PORT}, never loopback)",
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_P2P_PORT, help="p2p port for default advertise addrs"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing cluster key")
    parser.add_argument(
        "--new-identity",
        action="store_true",
        help="replace an existing identity (the node gets a new peer ID)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")


def _local_ipv4s() -> list[str]:
    """This host's LAN-reachable IPv4 addresses, private ranges first (read locally).

    Loopback is left out (on another device it names that device) and so are
    link-local addresses; a public address, if an interface has one, comes last.
    """
    import ipaddress

    import psutil

    found = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family.name == "AF_INET" and not a.address.startswith(("127.", "169.254.")):
                found.append(a.address)
    return sorted(dict.fromkeys(found), key=lambda ip: not ipaddress.ip_address(ip).is_private)


def _advertise_addr(addr: str) -> str:
    """`--advertise` takes a multiaddr or HOST:PORT, like `start --listen`."""
    from kowalski_node.addresses import listen_multiaddr

    if addr.strip().startswith("/"):
        return _validate_multiaddr(addr.strip())
    return listen_multiaddr(addr)


def _validate_multiaddr(addr: str) -> str:
    from multiaddr import Multiaddr

    try:
        Multiaddr(addr)
    except Exception as exc:  # noqa: BLE001 - py-multiaddr raises many unrelated types for bad input
        raise ConfigError(f"bad multiaddr {addr!r}: {exc}") from None
    return addr


def _ensure_identity(data_dir: Path, force: bool) -> tuple[NodeIdentity, bool]:
    if (data_dir / IDENTITY_FILE).exists() and not force:
        return load_identity(data_dir), False
    identity = NodeIdentity.generate()
    save_identity(data_dir, identity, overwrite=force)
    return identity, True


def _ensure_key(data_dir: Path, args: argparse.Namespace) -> tuple[ClusterKey, str]:
    existing = (data_dir / SWARM_KEY_FILE).exists()
    if args.join is not None:
        info = decode_join(args.join)
        if existing and not args.force and load_cluster_key(data_dir) != info.cluster_key:
            raise ConfigError(
                f"{data_dir / SWARM_KEY_FILE} holds another cluster's key; pass --force to replace"
            )
        save_cluster_key(data_dir, info.cluster_key, overwrite=True)
        addrs = [_validate_multiaddr(a) for a in info.bootstrap]
        merged = list(dict.fromkeys([*load_bootstrap(data_dir), *addrs]))
        save_bootstrap(data_dir, merged)
        return info.cluster_key, "joined"
    if args.cluster_key_file:
        key = load_cluster_key_file(args.cluster_key_file)
        if existing and not args.force and load_cluster_key(data_dir) != key:
            raise ConfigError(
                f"{data_dir / SWARM_KEY_FILE} holds another key; pass --force to replace"
            )
        save_cluster_key(data_dir, key, overwrite=True)
        return key, "imported"
    if existing and not args.force:
        return load_cluster_key(data_dir), "existing"
    key = ClusterKey.generate()
    save_cluster_key(data_dir, key, overwrite=args.force)
    return key, "created"


def main(args: argparse.Namespace) -> int:
    data_dir: Path = (args.data_dir or default_data_dir()).expanduser()
    # validate every input before anything is written
    if args.join is not None:
        decode_join(args.join)
    if args.cluster_key_file:
        load_cluster_key_file(args.cluster_key_file)
    advertised = [_advertise_addr(a) for a in args.advertise or []]
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    changes = args.join is not None or args.cluster_key_file or args.force or args.new_identity
    with DataDirLock(data_dir) if changes else contextlib.nullcontext():
        identity, new_identity = _ensure_identity(data_dir, args.new_identity)
        key, key_source = _ensure_key(data_dir, args)
    advertise = advertised or [f"/ip4/{ip}/tcp/{args.port}" for ip in _local_ipv4s()]
    bootstrap = tuple(a if "/p2p/" in a else f"{a}/p2p/{identity.peer_id}" for a in advertise)
    join = encode_join(JoinInfo(key, bootstrap, identity.peer_id))
    result = {
        "data_dir": str(data_dir),
        "peer_id": identity.peer_id,
        "identity": "created" if new_identity else "existing",
        "cluster_key": key_source,
        "cluster_key_fingerprint": key.fingerprint(),
        "join": join,
        "bootstrap": load_bootstrap(data_dir),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"data dir:     {data_dir}")
    print(f"peer ID:      {identity.peer_id} ({result['identity']})")
    print(
        f"cluster key:  {key_source}, fingerprint {key.fingerprint()} ({data_dir / SWARM_KEY_FILE})"
    )
    if result["bootstrap"]:
        print("bootstrap:    " + "\n              ".join(result["bootstrap"]))
    print(
        "\nTo add another device, run there (this string contains the cluster key; keep it secret):"
    )
    print(f"  kowalski-node init --join {join}")
    if bootstrap:
        print(
            "It lists this device at "
            + ", ".join(a.split("/p2p/")[0] for a in bootstrap)
            + ". If that address changes (DHCP), devices still find each other by mDNS on\n"
            "the same LAN and through addresses they learned; otherwise run `init` here again."
        )
    else:
        print("It lists no address (no LAN interface found): pass --advertise HOST:PORT.")
    return 0
