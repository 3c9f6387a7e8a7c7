"""`kowalski-node start`: run the mesh node on this device until SIGTERM/SIGINT.

The first lines on stdout are machine-readable, one `key=value` per line, then `ready`:

    peer_id=12D3KooW...
    listen=/ip4/127.0.0.1/tcp/7470/p2p/12D3KooW...      (one line per address)
    api=http://127.0.0.1:7471
    data_dir=/home/me/.cache/kowalski-node/node
    ready

Logs go to stderr as structured `ts=... level=... event=... key=value` lines
(`--log-format json` for JSON lines). SIGTERM or SIGINT drains the node (no new tasks,
leadership handed over, owned tasks given `--drain-timeout` seconds to finish, a
graceful membership leave) and exits 0.

A data dir without an identity is an error that names `kowalski-node init`; `--init`
creates the identity and a *new* cluster key there instead (a first node).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from kowalski_node.errors import ConfigError

PROFILES = ("desktop", "laptop", "constrained")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, help="node data dir (default node.data_dir)")
    parser.add_argument(
        "--listen",
        action="append",
        metavar="HOST:PORT|MULTIADDR",
        help="p2p listen address, e.g. 0.0.0.0:7470 or /ip4/0.0.0.0/tcp/7470; repeatable "
        "(default node.listen: /ip4/0.0.0.0/tcp/7470)",
    )
    parser.add_argument(
        "--bootstrap",
        action="append",
        default=[],
        metavar="MULTIADDR",
        help="peer to join through, /ip4/../tcp/../p2p/<id> (repeatable; adds to node.bootstrap "
        "and <data-dir>/bootstrap)",
    )
    parser.add_argument(
        "--api",
        metavar="HOST:PORT|URL",
        help="HTTP API address, e.g. 127.0.0.1:7471 (default node.api: 127.0.0.1:7471)",
    )
    parser.add_argument("--no-api", action="store_true", help="do not serve the HTTP API")
    parser.add_argument(
        "--backend", help="model backend for tasks this node leads (default llm.backend)"
    )
    parser.add_argument("--model", help="model for tasks this node leads (default llm.model)")
    parser.add_argument(
        "--profile", choices=PROFILES, default="desktop", help="device profile (default desktop)"
    )
    parser.add_argument("--config", type=Path, help="TOML config (default $KOWALSKI_CONFIG)")
    parser.add_argument(
        "--mdns",
        choices=("auto", "on", "off"),
        default="auto",
        help="LAN discovery; auto = on unless every listen address is loopback",
    )
    parser.add_argument(
        "--init",
        action="store_true",
        help="create an identity and a new cluster key if the data dir has none",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=10.0,
        help="seconds a SIGTERM waits for owned tasks to finish (default 10)",
    )
    parser.add_argument(
        "--measure-tokens",
        choices=("auto", "on", "off"),
        default="auto",
        help="decode a few tokens at start to advertise tokens/s (auto: llamacpp and builtin only)",
    )
    parser.add_argument(
        "--log-format", choices=("logfmt", "json"), default="logfmt", help="stderr log format"
    )
    parser.add_argument(
        "--remote",
        choices=("on", "off"),
        default="on",
        help="run code blocks and sub-calls on the best-scored peers (default on)",
    )
    parser.add_argument(
        "--slow-step-ms",
        type=float,
        default=250.0,
        help="log event-loop steps longer than this (they starve membership probes)",
    )


def _ensure_identity(data_dir: Path, create: bool) -> None:
    from kowalski_node.identity import IDENTITY_FILE, SWARM_KEY_FILE

    has_id = (data_dir / IDENTITY_FILE).exists()
    has_key = (data_dir / SWARM_KEY_FILE).exists()
    if has_id and has_key:
        return
    if not create:
        missing = "an identity" if not has_id else "a cluster key"
        raise ConfigError(
            f"{data_dir} has no {missing}: run `kowalski-node init --data-dir {data_dir}` "
            f"first (or `kowalski-node init --data-dir {data_dir} --join JOIN` to join a "
            "cluster), or pass --init to create a new cluster here"
        )
    import os

    from kowalski_node.identity import ClusterKey, NodeIdentity, save_cluster_key, save_identity

    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    if not has_id:
        save_identity(data_dir, NodeIdentity.generate())
    if not has_key:
        save_cluster_key(data_dir, ClusterKey.generate())


def _validate_bootstrap(addrs: list[str]) -> list[str]:
    from multiaddr import Multiaddr

    from kowalski_node.runtime.discovery import peer_of

    out = []
    for addr in addrs:
        valid = True
        try:
            Multiaddr(addr)
        except Exception:  # noqa: BLE001 - py-multiaddr raises many unrelated types for bad input
            valid = False
        if not valid or not addr.startswith("/") or not peer_of(addr):
            raise ConfigError(
                f"bootstrap address {addr!r} must be a multiaddr ending in /p2p/<peer id>, "
                "e.g. /ip4/192.168.1.7/tcp/7470/p2p/12D3KooW..."
            )
        out.append(addr)
    return out


def main(args: argparse.Namespace) -> int:
    from kowalski_node.addresses import listen_multiaddr
    from kowalski_node.config import load_settings
    from kowalski_node.runtime.logfmt import setup_logging
    from kowalski_node.startup_checks import DataDirLock, check_ports_free

    level = str(getattr(args, "log_level", "INFO") or "INFO")
    setup_logging("INFO" if level.upper() == "WARNING" else level, args.log_format)
    overrides: dict[str, Any] = {
        "llm.backend": args.backend,
        "llm.model": args.model,
        "node.data_dir": args.data_dir,
    }
    if args.listen:
        overrides["node.listen"] = [listen_multiaddr(a) for a in args.listen]
    settings = load_settings(args.config, overrides=overrides)
    listen = tuple(listen_multiaddr(a) for a in settings.node.listen)
    data_dir = settings.node_data_dir.expanduser()
    # every check that can refuse runs before anything is written or bound
    if not args.no_api and args.api:
        from kowalski_node.adapters.http import parse_api_address

        parse_api_address(args.api)
    _validate_bootstrap([*args.bootstrap, *settings.node.bootstrap])
    if not args.init:
        _ensure_identity(data_dir, create=False)  # raises the "run init first" message
    lock = DataDirLock(data_dir)
    if data_dir.is_dir():
        lock.acquire()  # a running node on this dir is named before its port is
        try:
            check_ports_free(listen)
        except BaseException:
            lock.release()
            raise
    else:
        check_ports_free(listen)
        data_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    with lock:
        _ensure_identity(data_dir, args.init)
        import trio

        try:
            return trio.run(
                _run, args, settings.with_overrides({"node.listen": list(listen)}), data_dir
            )
        except BaseExceptionGroup as group:
            from kowalski_node.adapters.libp2p.errors import iter_leaf_exceptions

            for leaf in iter_leaf_exceptions(group):
                if isinstance(leaf, ConfigError):
                    raise leaf from None
            raise


async def _run(args: argparse.Namespace, settings: Any, data_dir: Path) -> int:
    import trio

    from kowalski_node.adapters.http import parse_api_address
    from kowalski_node.adapters.libp2p.transport import Libp2pTransport, TransportConfig
    from kowalski_node.adapters.sqlite_store import SqliteLedgerStore
    from kowalski_node.identity import (
        load_allow_list,
        load_bootstrap,
        load_cluster_key,
        load_identity,
        load_known_peers,
    )
    from kowalski_node.runtime.node import Node, NodeOptions
    from kowalski_node.runtime.profiles import node_profile

    identity = load_identity(data_dir)
    key = load_cluster_key(data_dir)
    allow = load_allow_list(data_dir)
    profile = node_profile(args.profile, settings)
    settings = settings.with_overrides(
        {"sandbox.pool_size": profile.sandbox_pool, "sandbox.memory_mb": profile.sandbox_memory_mb}
    )
    bootstrap = _validate_bootstrap(
        list(dict.fromkeys([*args.bootstrap, *settings.node.bootstrap, *load_bootstrap(data_dir)]))
    )
    # addresses learned from peers on earlier runs: a way back in when the join
    # string's addresses have gone stale (a laptop's DHCP lease changed)
    bootstrap += [a for a in load_known_peers(data_dir) if a not in bootstrap]
    listen = tuple(settings.node.listen)
    loopback_only = all(a.startswith(("/ip4/127.", "/ip6/::1/")) for a in listen)
    mdns = args.mdns == "on" or (args.mdns == "auto" and not loopback_only)
    api_host: str | None = None
    api_port = 0
    if not args.no_api:
        if args.api:
            api_host, api_port = parse_api_address(args.api)
        else:
            api_host, api_port = settings.node.api.host, settings.node.api.port
    backend_kind = settings.llm.backend.split(":", 1)[0]
    measure = args.measure_tokens == "on" or (
        args.measure_tokens == "auto" and backend_kind in ("builtin", "llamacpp")
    )
    store = SqliteLedgerStore(data_dir)
    transport = Libp2pTransport(
        identity,
        key,
        TransportConfig(listen=listen, blob_dir=data_dir / "blobs"),
        allow_list=allow,
    )
    options = NodeOptions(
        data_dir=data_dir,
        settings=settings,
        profile=profile,
        bootstrap=bootstrap,
        mdns=mdns,
        api_host=api_host,
        api_port=api_port,
        api_token=settings.node.api.token,
        drain_timeout_s=args.drain_timeout,
        measure_tokens=measure,
        cluster_fingerprint=key.fingerprint(),
        remote=args.remote == "on",
    )
    node = Node(
        identity.peer_id, transport, store, options, metadata=store, sign_adverts=identity.sign
    )
    from kowalski_node.runtime.loopwatch import SlowStepWatch

    watch = SlowStepWatch(args.slow_step_ms)
    trio.lowlevel.add_instrument(watch)
    node.loop_watch = watch
    try:
        # signals are caught before `ready` is printed, so a SIGTERM right after it drains
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with transport.running(), trio.open_nursery() as nursery:
                info = await nursery.start(node.run)
                lines = [f"peer_id={info.peer_id}"]
                lines += [f"listen={a}" for a in info.listen_addrs]
                lines.append(f"api={info.api_url or '-'}")
                lines.append(f"data_dir={data_dir}")
                lines.append("ready")
                nursery.start_soon(_stop_on_signal, signals, node)
                nursery.start_soon(_remember_peers, node, data_dir)
                sys.stdout.write("\n".join(lines) + "\n")
                sys.stdout.flush()
                await node.stopped.wait()
                nursery.cancel_scope.cancel()
    finally:
        save_learned_peers(node, data_dir)
        store.close()
    return 0


REMEMBER_PEERS_EVERY_S = 30.0


def save_learned_peers(node: Any, data_dir: Path) -> None:
    """Write the live members' addresses to <data-dir>/known_peers (tried at next start)."""
    from kowalski_node.identity import save_known_peers
    from kowalski_node.membership import Status

    if node.membership is None:
        return
    addrs = [
        m.addr
        for m in node.membership.core.members()
        if m.peer != node.peer_id and m.addr and m.status in (Status.ALIVE, Status.SUSPECT)
    ]
    if addrs:
        try:
            save_known_peers(data_dir, addrs)
        except OSError as exc:
            import logging

            logging.getLogger("kowalski_node.runtime.discovery").warning(
                "event=known_peers_not_saved reason=%r", str(exc)
            )


async def _remember_peers(node: Any, data_dir: Path) -> None:
    import trio

    while True:
        await trio.sleep(REMEMBER_PEERS_EVERY_S)
        save_learned_peers(node, data_dir)


async def _stop_on_signal(signals: Any, node: Any) -> None:
    import logging

    async for signum in signals:
        logging.getLogger("kowalski_node.runtime.node").info(
            "event=signal signal=%s action=drain", signal.Signals(signum).name
        )
        node.request_stop()
