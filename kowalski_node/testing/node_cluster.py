"""A cluster of real `kowalski-node start` processes on 127.0.0.1: the one harness that
tests, `kowalski-node demo` and the benchmarks (bench/mesh.py, bench/pipeline.py) use.

    with NodeCluster(tmp_path) as cluster:
        a, b, c = cluster.start_mesh(3, backend=f"scripted:{script}")
        cluster.wait_converged([a, b, c])
        task = c.post("/v1/tasks", {"prompt": "hi"})
        view = c.wait_task(task["task_id"])
        cluster.kill(a)                 # SIGKILL; also pause()/resume() (SIGSTOP/SIGCONT)

Each node gets its own data dir under the cluster's root (identity + the cluster's
swarm.key written directly, as `kowalski-node init` would), ephemeral ports for p2p and
the API, mDNS off, and (for tests, `home=`) its own `KOWALSKI_HOME`; the demo keeps the
user's home so nodes find the models already pulled. The first stdout lines of `start`
(`peer_id=`, `listen=`, `api=`, `ready`) are parsed (and echoed, with `echo=`); stderr
goes to `<name>.log` next to the data dir (printed on failure via `NodeProc.log_tail()`).
`close()` stops every process (SIGTERM, SIGCONT first for a paused one, then SIGKILL after
a grace period) and kills any sandbox worker that outlived its node; with
`check_leftovers` (tests) such a leftover is an error. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import psutil

from kowalski_node.errors import KowalskiError
from kowalski_node.identity import ClusterKey, NodeIdentity, save_cluster_key, save_identity

START_TIMEOUT_S = 30.0
STOP_GRACE_S = 15.0
FINAL_STATES = ("done", "failed", "cancelled")


class ClusterError(KowalskiError, AssertionError):
    """A node did not start, answer or converge in time; the message has its log tail.

    An `AssertionError` too, so a test that waits in vain fails rather than errors.
    """


def _free_tcp_port() -> int:
    """A loopback TCP port nobody listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def make_node_dir(data_dir: Path, key: ClusterKey, identity: NodeIdentity | None = None) -> str:
    """Write identity + swarm.key (what `kowalski-node init` does); returns the peer ID."""
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    ident = identity or NodeIdentity.generate()
    save_identity(data_dir, ident, overwrite=True)
    save_cluster_key(data_dir, key, overwrite=True)
    return ident.peer_id


@dataclass
class NodeProc:
    name: str
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[str]
    args: list[str]
    peer_id: str = ""
    listen: list[str] = field(default_factory=list)
    api: str = ""
    started_in_s: float = 0.0
    stdout_lines: list[str] = field(default_factory=list)
    # what `spawn` was given besides the name and bootstrap: `restart` reuses it
    spawn_options: dict[str, Any] = field(default_factory=dict)
    spawned_at: float = 0.0  # time.monotonic() at spawn
    ready_at: float = 0.0  # time.monotonic() when it printed `ready`

    @property
    def addr(self) -> str:
        return self.listen[0]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # -------------------------------------------------------------- HTTP helpers

    def get(self, path: str, timeout: float = 10.0) -> Any:
        resp = httpx.get(self.api + path, timeout=timeout)
        if resp.status_code >= 400:
            raise ClusterError(f"{self.name} GET {path}: {resp.status_code} {resp.text[:500]}")
        return resp.json()

    def post(self, path: str, body: Any, timeout: float = 30.0, ok: Iterable[int] = ()) -> Any:
        resp = httpx.post(self.api + path, json=body, timeout=timeout)
        if resp.status_code >= 400 and resp.status_code not in set(ok):
            raise ClusterError(f"{self.name} POST {path}: {resp.status_code} {resp.text[:500]}")
        return resp.json()

    def post_raw(self, path: str, body: Any, timeout: float = 10.0) -> httpx.Response:
        return httpx.post(self.api + path, json=body, timeout=timeout)

    def peers(self) -> list[dict[str, Any]]:
        return list(self.get("/v1/peers")["peers"])

    def task(self, task_id: str) -> dict[str, Any]:
        return dict(self.get(f"/v1/tasks/{task_id}"))

    def wait_task(
        self, task_id: str, timeout: float = 30.0, states: Sequence[str] = FINAL_STATES
    ) -> dict[str, Any]:
        """Poll until the task reaches one of `states`; returns its view."""
        deadline = time.monotonic() + timeout
        view: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                view = self.task(task_id)
            except (ClusterError, httpx.HTTPError):
                view = {}
            if view.get("status") in states:
                return view
            time.sleep(0.05)
        raise ClusterError(
            f"task {task_id} on {self.name} not in {list(states)} after {timeout}s: "
            f"{json.dumps(view)[:1500]}\n--- {self.name} log ---\n{self.log_tail()}"
        )

    # -------------------------------------------------------------- signals

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def terminate(self, timeout: float = STOP_GRACE_S) -> int:
        """SIGTERM and wait (SIGKILL after `timeout`); returns the exit code."""
        if self.alive():
            with _suppress():
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return exc_type is not None and issubclass(exc_type, ProcessLookupError)


class NodeCluster:
    """Starts and tears down `kowalski-node start` processes sharing one cluster key."""

    def __init__(
        self,
        tmp: Path,
        key: ClusterKey | None = None,
        *,
        home: Path | bool | None = True,
        backend: str | None = None,
        env: dict[str, str] | None = None,
        extra_args: Sequence[str] = (),
        profile: str | None = "desktop",
        measure_tokens: str = "off",
        slow_step_ms: int | None = 100,
        start_timeout: float = START_TIMEOUT_S,
        echo: Callable[[str], None] | None = None,
        check_leftovers: bool = True,
    ) -> None:
        """`home`: True = a fresh `KOWALSKI_HOME` under `tmp` (tests), a path = that one,
        False/None = the user's own (the demo: models already pulled). `backend`, `env` and
        `extra_args` apply to every node unless `spawn` is given its own."""
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.key = key or ClusterKey.generate()
        self.home: Path | None = None
        if home is True:
            self.home = self.tmp / "home"
        elif isinstance(home, Path):
            self.home = home
        if self.home is not None:
            self.home.mkdir(parents=True, exist_ok=True)
        self.backend = backend
        self.env = dict(env or {})
        self.extra_args = list(extra_args)
        self.profile = profile
        self.measure_tokens = measure_tokens
        self.slow_step_ms = slow_step_ms
        self.start_timeout = start_timeout
        self.echo = echo
        self.check_leftovers = check_leftovers
        self.nodes: dict[str, NodeProc] = {}
        self._descendants: dict[int, psutil.Process] = {}

    @classmethod
    def as_a_user_would(cls, root: Path, **kw: Any) -> NodeCluster:
        """Nodes as `kowalski-node start` runs them for a user (the demo, benchmarks): the
        user's home and models, the detected device profile, tokens/s measured, no
        test-only step logging; leftover workers are killed, not reported."""
        options: dict[str, Any] = {
            "home": False,
            "profile": None,
            "measure_tokens": "auto",
            "slow_step_ms": None,
            "start_timeout": 60.0,
            "check_leftovers": False,
        }
        return cls(root, **{**options, **kw})

    def __enter__(self) -> NodeCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -------------------------------------------------------------- start

    def data_dir(self, name: str) -> Path:
        return self.tmp / name

    def init_node(self, name: str, key: ClusterKey | None = None) -> str:
        """Create a data dir (identity + key) unless it exists; returns the peer ID."""
        d = self.data_dir(name)
        if (d / "identity.key").exists():
            from kowalski_node.identity import load_identity

            return load_identity(d).peer_id
        return make_node_dir(d, key or self.key)

    def spawn(
        self,
        name: str,
        *,
        bootstrap: Sequence[str] = (),
        backend: str | None = None,
        profile: str | None = None,
        extra_args: Sequence[str] | None = None,
        env: dict[str, str] | None = None,
        key: ClusterKey | None = None,
        listen_port: int = 0,
    ) -> NodeProc:
        """Launch a node without waiting for it (see `wait_ready`); `listen_port` 0 = any."""
        backend = backend if backend is not None else self.backend
        profile = profile or self.profile
        extra_args = list(extra_args) if extra_args is not None else self.extra_args
        if name in self.nodes and self.nodes[name].alive():
            raise ClusterError(f"node {name} is already running")
        self.init_node(name, key)
        data_dir = self.data_dir(name)
        log_path = self.tmp / f"{name}.log"
        args = [
            sys.executable,
            "-m",
            "kowalski_node.cli",
            "--log-level",
            "INFO",
            "start",
            "--data-dir",
            str(data_dir),
            "--listen",
            f"/ip4/127.0.0.1/tcp/{listen_port}",
            "--api",
            "127.0.0.1:0",
            "--mdns",
            "off",
            "--measure-tokens",
            self.measure_tokens,
        ]
        if profile:
            args += ["--profile", profile]
        if self.slow_step_ms is not None:
            args += ["--slow-step-ms", str(self.slow_step_ms)]
        for addr in bootstrap:
            args += ["--bootstrap", addr]
        if backend:
            args += ["--backend", backend]
        args += list(extra_args)
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env, **(env or {})}
        if self.home is not None:  # an isolated node: no user home, no user config
            full_env["KOWALSKI_HOME"] = str(self.home)
            full_env.pop("KOWALSKI_CONFIG", None)
        log_file = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed with the process
        log_file.write(f"--- start {time.strftime('%H:%M:%S')} {' '.join(args)}\n")
        log_file.flush()
        proc = subprocess.Popen(  # noqa: S603 - our own interpreter and CLI, no shell
            args,
            stdout=subprocess.PIPE,
            stderr=log_file,
            stdin=subprocess.DEVNULL,
            text=True,
            env=full_env,
            start_new_session=True,
        )
        log_file.close()
        node = NodeProc(name, data_dir, log_path, proc, args, spawned_at=time.monotonic())
        node.spawn_options = {
            "backend": backend,
            "profile": profile,
            "extra_args": list(extra_args),
            "env": dict(env) if env else None,
            "key": key,
        }
        node.started_in_s = time.monotonic()
        self.nodes[name] = node
        return node

    def wait_ready(self, node: NodeProc, timeout: float | None = None) -> NodeProc:
        """Read the first stdout lines until `ready` (bounded); echo them if asked."""
        timeout = self.start_timeout if timeout is None else timeout
        started = node.started_in_s
        lines: list[str] = []
        done = threading.Event()

        def reader() -> None:
            assert node.proc.stdout is not None
            for line in node.proc.stdout:
                lines.append(line.rstrip("\n"))
                if self.echo is not None:
                    self.echo(f"[node {node.name}] {line.rstrip()}")
                if line.strip() == "ready":
                    break
            done.set()

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        done.wait(timeout)
        if not lines or lines[-1] != "ready":
            node.kill()
            raise ClusterError(
                f"node {node.name} did not become ready in {timeout}s (exit {node.proc.poll()}); "
                f"stdout={lines}\n--- log ---\n{node.log_tail()}"
            )
        node.stdout_lines = lines
        node.ready_at = time.monotonic()
        for line in lines:
            key, _, value = line.partition("=")
            if key == "peer_id":
                node.peer_id = value
            elif key == "listen":
                node.listen.append(value)
            elif key == "api":
                node.api = value
        node.started_in_s = time.monotonic() - started
        self._track(node)
        return node

    def start(self, name: str, **kw: Any) -> NodeProc:
        return self.wait_ready(self.spawn(name, **kw))

    def start_mesh(
        self, n: int | Sequence[str], names: Sequence[str] | None = None, **kw: Any
    ) -> list[NodeProc]:
        """Start every node at once, the rest bootstrapping through the first.

        The first node's port is chosen here and its peer ID comes from its data dir, so
        the others need not wait for it to print its address: each process loads Python,
        libp2p and its model in parallel and dials the first until it answers (discovery
        retries with backoff). The demo's mesh formed 13-15 s after the first start when
        the others waited. If the chosen port is taken before the first node binds it
        (another process won the race), the mesh starts again one node after another.

        `n`: how many (named a, b, c, ... unless `names` says) or the names themselves."""
        if names is None:
            names = [chr(ord("a") + i) for i in range(n)] if isinstance(n, int) else list(n)
        peer = self.init_node(names[0], kw.get("key"))
        port = _free_tcp_port()
        first = self.spawn(names[0], listen_port=port, **kw)
        addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer}"
        rest = [self.spawn(name, bootstrap=[addr], **kw) for name in names[1:]]
        try:
            self.wait_ready(first)
        except ClusterError:
            if first.alive():
                raise  # not a port race: it is running, but never said `ready`
            for node in rest:  # the port was taken: start again, one after another
                node.kill()
            first = self.start(names[0], **kw)
            rest = [self.spawn(name, bootstrap=[first.addr], **kw) for name in names[1:]]
        return [first, *(self.wait_ready(p) for p in rest)]

    def restart(self, node: NodeProc | str, **kw: Any) -> NodeProc:
        """Start a node again on its data dir (same identity and, unless `kw` overrides
        them, the same backend and options), bootstrapping through others."""
        node = self.nodes[node] if isinstance(node, str) else node
        if node.alive():
            raise ClusterError(f"node {node.name} is still running")
        others = [p.addr for p in self.nodes.values() if p.alive() and p.name != node.name]
        kw.setdefault("bootstrap", others[:2])
        return self.start(node.name, **{**node.spawn_options, **kw})

    def heal(self, names: Sequence[str], timeout: float = 20.0, **kw: Any) -> list[NodeProc]:
        """Make `names` a converged mesh again: resume paused nodes, restart dead ones.

        Module-scoped clusters call it before every test, so a test that kills or pauses
        a node does not decide what the next one finds (tests pass in any order).
        """
        for name in names:
            node = self.nodes[name]
            if node.alive():
                with _suppress():
                    node.resume()
        for name in names:
            if not self.nodes[name].alive():
                self.restart(self.nodes[name], **kw)
        nodes = [self.nodes[name] for name in names]
        self.wait_converged(nodes, timeout=timeout)
        return nodes

    # -------------------------------------------------------------- waits

    def wait_converged(
        self,
        nodes: Sequence[NodeProc] | None = None,
        timeout: float = 15.0,
        with_adverts: bool = True,
    ) -> float:
        """Wait until every node (default: all started) sees every other alive (with an
        advert); returns seconds."""
        nodes = list(nodes if nodes is not None else self.nodes.values())
        started = time.monotonic()
        want = {p.peer_id for p in nodes}
        deadline = started + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            ok = True
            for p in nodes:
                try:
                    peers = p.peers()
                except (ClusterError, httpx.HTTPError) as exc:
                    last[p.name] = str(exc)
                    ok = False
                    break
                alive = {
                    v["peer_id"]
                    for v in peers
                    if v.get("state") == "alive" and (not with_adverts or v.get("cores"))
                }
                last[p.name] = sorted(alive)
                if not want <= alive:
                    ok = False
                    break
            if ok:
                return time.monotonic() - started
            time.sleep(0.05)
        logs = "\n".join(f"--- {p.name} ---\n{p.log_tail(30)}" for p in nodes)
        raise ClusterError(f"cluster did not converge in {timeout}s: {last}\n{logs}")

    def wait_state(
        self, observer: NodeProc, peer_id: str, states: Sequence[str], timeout: float = 10.0
    ) -> float:
        """Wait until `observer` sees `peer_id` in one of `states` (absent counts as 'dead')."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            seen = {v["peer_id"]: v.get("state") for v in observer.peers()}
            if seen.get(peer_id, "dead") in states:
                return time.monotonic() - started
            time.sleep(0.02)
        raise ClusterError(f"{observer.name} never saw {peer_id} in {list(states)}")

    # -------------------------------------------------------------- teardown

    def _track(self, node: NodeProc) -> None:
        with _suppress():
            self._descendants[node.pid] = psutil.Process(node.pid)

    def _all_descendants(self) -> list[psutil.Process]:
        out: list[psutil.Process] = []
        for proc in list(self._descendants.values()):
            try:
                out.append(proc)
                out.extend(proc.children(recursive=True))
            except psutil.Error:
                continue
        return out

    def kill(self, node: NodeProc) -> None:
        """SIGKILL a node (its sandbox workers die with their session; checked at close)."""
        node.kill()

    def close(self) -> None:
        """SIGTERM every node, SIGKILL stragglers, and make sure nothing is left running."""
        tracked = self._all_descendants()
        for node in self.nodes.values():
            if node.alive():
                with _suppress():
                    os.kill(node.pid, signal.SIGCONT)
                node.proc.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for node in self.nodes.values():
            remaining = max(0.1, deadline - time.monotonic())
            try:
                node.proc.wait(remaining)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(10)
            if node.proc.stdout is not None:
                node.proc.stdout.close()
        # sandbox workers run in their own sessions: kill any that outlived their node
        time.sleep(0.2)
        leftovers = []
        for proc in tracked:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    leftovers.append(proc)
                    proc.kill()
            except psutil.Error:
                continue
        if leftovers and self.check_leftovers:
            raise ClusterError(f"processes left after close: {[p.pid for p in leftovers]}")

    def exit_codes(self) -> dict[str, int | None]:
        return {name: node.proc.returncode for name, node in self.nodes.items()}


def write_script(path: Path, responses: Sequence[Any], **extra: Any) -> Path:
    """A scripted-backend file (see kowalski_node/llm/scripted.py)."""
    path.write_text(json.dumps({"responses": list(responses), **extra}), encoding="utf-8")
    return path
