"""A throwaway cluster of `kowalski-node start` processes on 127.0.0.1 (demo and bench).

    with LocalCluster(Path(tmp), backend="builtin") as cluster:
        a, b, c = cluster.start_mesh(["a", "b", "c"])
        cluster.wait_converged()
        accepted = c.post("/v1/tasks", {"prompt": "..."})

Every node gets its own data dir (identity + the shared cluster key, as `kowalski-node
init` writes them), ephemeral p2p and API ports on loopback, and mDNS off, so nothing
leaves the machine. Every wait is bounded. `close()` sends SIGTERM (SIGCONT first, for a
paused node), SIGKILLs what is still running after the grace period, and kills any
sandbox worker that outlived its node, so nothing is left behind, on errors and Ctrl-C too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from kowalski_node.errors import KowalskiError
from kowalski_node.identity import ClusterKey, NodeIdentity, save_cluster_key, save_identity

START_TIMEOUT_S = 60.0
STOP_GRACE_S = 15.0


class ClusterError(KowalskiError):
    """A node did not start, answer or converge in time; the message has its log tail."""


@dataclass
class LocalNode:
    name: str
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[str]
    peer_id: str = ""
    listen: list[str] = field(default_factory=list)
    api: str = ""
    first_lines: list[str] = field(default_factory=list)
    spawned_at: float = 0.0
    ready_at: float = 0.0

    @property
    def addr(self) -> str:
        return self.listen[0]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def get(self, path: str, timeout: float = 10.0) -> Any:
        import httpx

        resp = httpx.get(self.api + path, timeout=timeout)
        if resp.status_code >= 400:
            raise ClusterError(
                f"node {self.name}: GET {path}: {resp.status_code} {resp.text[:300]}"
            )
        return resp.json()

    def post(self, path: str, body: Any, timeout: float = 30.0) -> Any:
        import httpx

        resp = httpx.post(self.api + path, json=body, timeout=timeout)
        if resp.status_code >= 400:
            raise ClusterError(
                f"node {self.name}: POST {path}: {resp.status_code} {resp.text[:300]}"
            )
        return resp.json()


class LocalCluster:
    """Starts, watches and stops `kowalski-node start` processes sharing one cluster key."""

    def __init__(
        self,
        root: Path,
        *,
        backend: str | None = None,
        env: dict[str, str] | None = None,
        extra_args: Sequence[str] = (),
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.key = ClusterKey.generate()
        self.backend = backend
        self.env = dict(env or {})
        self.extra_args = list(extra_args)
        self.echo = echo
        self.nodes: dict[str, LocalNode] = {}
        self._pids: set[int] = set()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -------------------------------------------------------------- start

    def _init_dir(self, name: str) -> Path:
        data_dir = self.root / name
        if not (data_dir / "identity.key").exists():
            data_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(data_dir, 0o700)
            save_identity(data_dir, NodeIdentity.generate(), overwrite=True)
            save_cluster_key(data_dir, self.key, overwrite=True)
        return data_dir

    def spawn(self, name: str, bootstrap: Sequence[str] = ()) -> LocalNode:
        """Launch one node (returns at once; see `wait_ready`)."""
        data_dir = self._init_dir(name)
        args = [
            sys.executable, "-m", "kowalski_node.cli", "--log-level", "INFO", "start",
            "--data-dir", str(data_dir), "--listen", "/ip4/127.0.0.1/tcp/0",
            "--api", "127.0.0.1:0", "--mdns", "off", "--measure-tokens", "auto",
        ]  # fmt: skip
        for addr in bootstrap:
            args += ["--bootstrap", addr]
        if self.backend:
            args += ["--backend", self.backend]
        args += self.extra_args
        log_path = self.root / f"{name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with open(log_path, "a", encoding="utf-8") as log_file:
            proc = subprocess.Popen(  # noqa: S603 - our own interpreter and CLI, no shell
                args,
                stdout=subprocess.PIPE,
                stderr=log_file,
                stdin=subprocess.DEVNULL,
                text=True,
                env=env,
                start_new_session=True,  # Ctrl-C reaches us, and we stop the nodes in order
            )
        node = LocalNode(name, data_dir, log_path, proc, spawned_at=time.monotonic())
        self.nodes[name] = node
        self._pids.add(proc.pid)
        return node

    def wait_ready(self, node: LocalNode, timeout: float = START_TIMEOUT_S) -> LocalNode:
        """Read the node's first stdout lines up to `ready` (bounded); echo them if asked."""
        lines: list[str] = []
        done = threading.Event()

        def reader() -> None:
            assert node.proc.stdout is not None
            for line in node.proc.stdout:
                line = line.rstrip("\n")
                lines.append(line)
                if self.echo is not None:
                    self.echo(f"[node {node.name}] {line}")
                if line.strip() == "ready":
                    break
            done.set()

        threading.Thread(target=reader, daemon=True).start()
        done.wait(timeout)
        if not lines or lines[-1].strip() != "ready":
            raise ClusterError(
                f"node {node.name} did not start within {timeout:.0f} s (exit code "
                f"{node.proc.poll()}); its log:\n{node.log_tail()}"
            )
        node.first_lines = lines
        node.ready_at = time.monotonic()
        for line in lines:
            key, _, value = line.partition("=")
            if key == "peer_id":
                node.peer_id = value
            elif key == "listen":
                node.listen.append(value)
            elif key == "api":
                node.api = value
        return node

    def start_mesh(self, names: Sequence[str]) -> list[LocalNode]:
        """The first node, then the others together, bootstrapping through it."""
        first = self.wait_ready(self.spawn(names[0]))
        rest = [self.spawn(n, bootstrap=[first.addr]) for n in names[1:]]
        return [first, *(self.wait_ready(n) for n in rest)]

    def restart(self, name: str, bootstrap: Sequence[str] = ()) -> LocalNode:
        """Start a stopped node again on its data dir (same identity)."""
        old = self.nodes[name]
        if old.alive():
            raise ClusterError(f"node {name} is still running")
        if old.proc.stdout is not None:
            old.proc.stdout.close()
        return self.wait_ready(self.spawn(name, bootstrap))

    def wait_converged(
        self, nodes: Sequence[LocalNode] | None = None, timeout: float = 30.0
    ) -> float:
        """Until every node sees every other alive with an advert; returns seconds waited."""
        nodes = list(nodes if nodes is not None else self.nodes.values())
        want = {n.peer_id for n in nodes}
        started = time.monotonic()
        last: dict[str, Any] = {}
        while time.monotonic() - started < timeout:
            ok = True
            for node in nodes:
                try:
                    peers = node.get("/v1/peers")["peers"]
                except Exception as exc:  # noqa: BLE001 - still starting, or a transient HTTP error
                    last[node.name] = str(exc)
                    ok = False
                    break
                alive = {
                    p["peer_id"] for p in peers if p.get("state") == "alive" and p.get("cores")
                }
                last[node.name] = len(alive)
                if not want <= alive:
                    ok = False
                    break
            if ok:
                return time.monotonic() - started
            time.sleep(0.05)
        raise ClusterError(f"the nodes did not all see each other within {timeout:.0f} s: {last}")

    # -------------------------------------------------------------- stop

    def close(self) -> None:
        """SIGTERM every node (drain), SIGKILL stragglers, kill orphaned sandbox workers."""
        import psutil

        tracked: list[psutil.Process] = []
        for pid in self._pids:
            try:
                proc = psutil.Process(pid)
                tracked.append(proc)
                tracked.extend(proc.children(recursive=True))
            except psutil.Error:
                continue
        for node in self.nodes.values():
            if node.alive():
                try:
                    os.kill(node.proc.pid, signal.SIGCONT)
                    node.proc.terminate()
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + STOP_GRACE_S
        for node in self.nodes.values():
            try:
                node.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(10)
            if node.proc.stdout is not None:
                node.proc.stdout.close()
        for proc in tracked:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    proc.kill()
            except psutil.Error:
                continue
        self._pids.clear()

    def exit_codes(self) -> dict[str, int | None]:
        return {name: node.proc.returncode for name, node in self.nodes.items()}
