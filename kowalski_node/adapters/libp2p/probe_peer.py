"""A standalone transport peer for tests and benchmarks: `python -m ...probe_peer`.

It starts a `Libp2pTransport` from a data dir (identity.key, swarm.key,
optional allowed_peers), prints one JSON line `{"peer_id", "addrs", "pid"}` on
stdout, then serves `/kowalski/probe/1.0.0` until SIGTERM/SIGINT (clean
shutdown) or SIGKILL. Message types: echo, sleep {s}, rss, diag. Blobs are accepted
into <data-dir>/blobs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from kowalski_node.adapters.libp2p.errors import RequestRejected
from kowalski_node.adapters.libp2p.rpc import Request
from kowalski_node.adapters.libp2p.transport import Libp2pTransport, TransportConfig
from kowalski_node.identity import (
    ClusterKey,
    NodeIdentity,
    load_allow_list,
    load_cluster_key,
    load_identity,
    save_allow_list,
    save_cluster_key,
    save_identity,
)

PROBE = "/kowalski/probe/1.0.0"
MAX_SLEEP_S = 60.0


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


async def serve(data_dir: Path, listen: str) -> None:
    identity = load_identity(data_dir)
    transport = Libp2pTransport(
        identity,
        load_cluster_key(data_dir),
        TransportConfig(listen=(listen,), blob_dir=data_dir / "blobs"),
        allow_list=load_allow_list(data_dir),
    )

    async def handle(req: Request) -> Any:
        p = req.payload if isinstance(req.payload, dict) else {}
        if req.type == "echo":
            return req.payload
        if req.type == "sleep":
            await trio.sleep(min(float(p.get("s", 1.0)), MAX_SLEEP_S))
            return {"slept": True}
        if req.type == "rss":
            return {"rss": rss_bytes()}
        if req.type == "diag":
            return {**transport.diagnostics(), "peers": transport.connected_peers()}
        raise RequestRejected("unknown_type", f"probe has no message type {req.type!r}")

    transport.register_handler(PROBE, handle)
    async with transport.running():
        info = {"peer_id": transport.peer_id, "addrs": transport.listen_addrs, "pid": os.getpid()}
        print(json.dumps(info), flush=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                break


# --------------------------------------------------------------- spawning (tests, bench)
@dataclass
class PeerProc:
    proc: subprocess.Popen[bytes]
    peer_id: str
    addrs: list[str]
    data_dir: Path

    @property
    def addr(self) -> str:
        return self.addrs[0]

    def stop(self, timeout: float = 5.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def make_data_dir(
    path: Path,
    key: ClusterKey,
    identity: NodeIdentity | None = None,
    allow: list[str] | None = None,
) -> NodeIdentity:
    ident = identity or NodeIdentity.generate()
    save_identity(path, ident)
    save_cluster_key(path, key)
    if allow is not None:
        save_allow_list(path, allow)
    return ident


def spawn_peer(data_dir: Path) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        __name__ if __name__ != "__main__" else "kowalski_node.adapters.libp2p.probe_peer",
        "--data-dir",
        str(data_dir),
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)  # noqa: S603 - our own interpreter and module, no shell


def wait_ready(proc: subprocess.Popen[bytes], data_dir: Path, timeout: float = 20.0) -> PeerProc:
    """Read the peer's JSON info line within `timeout` (the process is killed otherwise)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            proc.kill()
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"probe peer did not start within {timeout}s: {err[-2000:]}")
        ready, _, _ = select.select([proc.stdout], [], [], min(left, 0.2))
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                continue
            buf += chunk
    info = json.loads(buf.split(b"\n", 1)[0])
    return PeerProc(proc, info["peer_id"], info["addrs"], data_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--listen", default="/ip4/127.0.0.1/tcp/0")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    trio.run(serve, args.data_dir, args.listen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
