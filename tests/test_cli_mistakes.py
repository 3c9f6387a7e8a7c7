"""A new user's usual mistakes, each run as a real `kowalski-node` subprocess.

Every mistake must end in exactly one `error: ...` line on stderr (no traceback), the
documented exit code, and nothing half-done: no process left running, no file written
where the command was refused. One real node (started once per module) provides the
"already running" cases.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from kowalski_node.identity import ClusterKey, JoinInfo, NodeIdentity, encode_join
from kowalski_node.testing.node_cluster import NodeCluster, NodeProc

CLI = [sys.executable, "-m", "kowalski_node.cli"]
TIMEOUT_S = 60


@dataclass
class Outcome:
    code: int
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def cli(*args: str, home: Path, timeout: float = TIMEOUT_S) -> Outcome:
    env = {**os.environ, "KOWALSKI_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("KOWALSKI_CONFIG", None)
    env.pop("KOWALSKI_API", None)
    proc = subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


def assert_one_line_error(result: Outcome, code: int, *needles: str) -> str:
    """Exactly one non-empty stderr line, starting with `error:`, containing the needles."""
    assert result.code == code, (result.code, result.err)
    assert "Traceback" not in result.err, result.err
    assert len(result.error_lines) == 1, result.err
    line = result.error_lines[0]
    assert line.startswith("error: "), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")} if path.exists() else set()


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeCluster, NodeProc]]:
    tmp = tmp_path_factory.mktemp("mistakes")
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    with NodeCluster(tmp) as cluster:
        node = cluster.start("a")
        yield cluster, node
    stray = [p for p in me.children(recursive=True) if p.pid not in before and p.is_running()]
    assert not stray, f"processes left running: {stray}"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


# ------------------------------------------------------------------ 1. safe starts


def test_second_start_on_the_same_data_dir_is_refused_naming_the_pid(
    running: tuple[NodeCluster, NodeProc], home: Path
) -> None:
    _, node = running
    result = cli(
        "start", "--data-dir", str(node.data_dir), "--listen", "127.0.0.1:0", "--no-api",
        home=home,
    )  # fmt: skip
    assert_one_line_error(result, 1, "already in use by a running node", f"process {node.pid}")
    assert node.alive()
    # the lock file names the running node; it is the only new file
    assert (node.data_dir / "node.lock").read_text().strip() == str(node.pid)


def test_start_on_a_taken_p2p_port_is_refused(
    running: tuple[NodeCluster, NodeProc], tmp_path: Path, home: Path
) -> None:
    _, node = running
    port = int(node.addr.split("/tcp/")[1].split("/")[0])
    target = tmp_path / "other"
    result = cli(
        "start", "--init", "--data-dir", str(target), "--listen", f"127.0.0.1:{port}",
        "--no-api", home=home,
    )  # fmt: skip
    assert_one_line_error(result, 1, f"p2p port {port}", "already in use")
    assert not target.exists()  # refused before anything was written


def test_a_port_held_by_any_other_program_is_refused(tmp_path: Path, home: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = cli(
            "start", "--init", "--data-dir", str(tmp_path / "n"), "--listen",
            f"/ip4/127.0.0.1/tcp/{port}", "--no-api", home=home,
        )  # fmt: skip
    assert_one_line_error(result, 1, f"p2p port {port}")
    assert not (tmp_path / "n").exists()


# ------------------------------------------------------------------ 2. join strings


def _join(addr: str = "/ip4/192.168.1.7/tcp/7470") -> str:
    ident = NodeIdentity.generate()
    return encode_join(JoinInfo(ClusterKey.generate(), (f"{addr}/p2p/{ident.peer_id}",)))


@pytest.mark.parametrize(
    ("mangle", "needle"),
    [
        (lambda j: j[:20] + ("A" if j[20] != "A" else "B") + j[21:], "copy it again"),
        (lambda j: j[:-3], "copy it again"),
        (lambda j: "", "join string is empty"),
        (lambda j: "kowalski1:" + j.split(":", 1)[1], "re-generate"),
        (lambda j: "hello", "starts with 'kowalski2:'"),
    ],
    ids=["one-char-typo", "truncated", "empty", "old-format", "not-a-join-string"],
)
def test_bad_join_strings_fail_at_init_and_write_nothing(
    tmp_path: Path, home: Path, mangle: object, needle: str
) -> None:
    target = tmp_path / "dev"
    assert callable(mangle)
    result = cli("init", "--data-dir", str(target), "--join", mangle(_join()), home=home)
    assert_one_line_error(result, 1, needle)
    assert not target.exists()


def test_a_good_join_string_still_joins(tmp_path: Path, home: Path) -> None:
    result = cli("init", "--data-dir", str(tmp_path / "d"), "--join", _join(), "--json", home=home)
    assert result.code == 0, result.err
    assert json.loads(result.out)["cluster_key"] == "joined"


# ------------------------------------------------------------------ 3. addresses


@pytest.mark.parametrize(
    ("listen", "needle"),
    [
        ("127.0.0.1:99999", "port must be 0..65535"),
        ("/ip4/1.2.3/tcp/1", "not a valid multiaddr"),
        ("myhost:7470", "not an IP address"),
        ("127.0.0.1:http", "is not a number"),
    ],
)
def test_bad_listen_addresses_are_one_line_errors(
    tmp_path: Path, home: Path, listen: str, needle: str
) -> None:
    target = tmp_path / "n"
    result = cli(
        "start", "--init", "--data-dir", str(target), "--listen", listen, "--no-api", home=home
    )
    assert_one_line_error(result, 1, needle)
    assert not target.exists()


def test_listen_accepts_host_port(running: tuple[NodeCluster, NodeProc]) -> None:
    cluster, _ = running
    port = free_port()
    proc = cluster.start("hp", extra_args=["--listen", f"127.0.0.1:{port}"])
    try:
        assert any(f"/tcp/{port}/" in a for a in proc.listen), proc.listen
    finally:
        assert proc.terminate() == 0


@pytest.mark.parametrize("form", ["{host}:{port}", "http://{host}:{port}", "http://{host}:{port}/"])
def test_every_api_flag_takes_host_port_and_urls(
    running: tuple[NodeCluster, NodeProc], home: Path, form: str
) -> None:
    _, node = running
    host_port = node.api.removeprefix("http://")
    host, port = host_port.rsplit(":", 1)
    result = cli("peers", "--json", "--api", form.format(host=host, port=port), home=home)
    assert result.code == 0, result.err
    assert json.loads(result.out)["peers"]


@pytest.mark.parametrize(
    ("api", "needle"),
    [
        ("127.0.0.1:{free}", "no kowalski node API is reachable at http://127.0.0.1:{free}"),
        ("ftp://127.0.0.1:1", "scheme must be http or https"),
        ("127.0.0.1:port", "is not a number"),
    ],
)
def test_bad_or_dead_api_addresses_are_one_line_errors(home: Path, api: str, needle: str) -> None:
    free = free_port()
    result = cli("peers", "--api", api.format(free=free), home=home)
    assert_one_line_error(result, 1, needle.format(free=free))


def test_bad_bootstrap_address_is_one_line_error(tmp_path: Path, home: Path) -> None:
    result = cli(
        "start", "--init", "--data-dir", str(tmp_path / "n"), "--listen", "127.0.0.1:0",
        "--no-api", "--bootstrap", "192.168.1.7:7470", home=home,
    )  # fmt: skip
    assert_one_line_error(result, 1, "must be a multiaddr ending in /p2p/<peer id>")


# ------------------------------------------------------------------ 7. CLI habits


def test_version(home: Path) -> None:
    result = cli("--version", home=home)
    assert result.code == 0 and result.out.startswith("kowalski-node "), result


def test_global_options_after_the_command(home: Path) -> None:
    free = free_port()
    for args in (
        ["status", "--log-level", "debug", "--api", f"127.0.0.1:{free}"],
        ["--log-level", "debug", "status", "--api", f"127.0.0.1:{free}"],
    ):
        result = cli(*args, home=home)
        # accepted: the failure is the missing node, not the option
        assert result.code == 1 and "no kowalski node API is reachable" in result.err, result


def test_usage_mistakes_are_one_line(home: Path) -> None:
    assert_one_line_error(cli("strat", home=home), 2, "invalid choice: 'strat'")
    assert_one_line_error(cli("status", "--log-level", "loud", home=home), 2, "not a log level")
    assert_one_line_error(cli("run", home=home), 2, "required")


def test_help_speaks_to_users(home: Path) -> None:
    result = cli("--help", home=home)
    assert result.code == 0
    assert "thin dispatcher" not in result.out and "kowalski_node.commands" not in result.out
    assert "kowalski-node init" in result.out and "--version" in result.out


# ------------------------------------------------------------------ the lock is released


def test_lock_is_released_when_the_node_stops(
    running: tuple[NodeCluster, NodeProc], home: Path
) -> None:
    cluster, _ = running
    node = cluster.start("relock")
    node.proc.send_signal(signal.SIGTERM)
    node.proc.wait(30)
    deadline = time.monotonic() + 30
    again = cluster.start("relock")  # same data dir: the lock was released
    assert again.alive() and time.monotonic() < deadline
    assert (again.data_dir / "node.lock").read_text().strip() == str(again.pid)
    assert again.terminate() == 0
    assert files_under(again.data_dir) >= {"identity.key", "swarm.key", "node.lock"}


# ------------------------------------------------------------------ 2. stale bootstrap addresses


def test_learned_addresses_bring_a_node_back_without_bootstrap(
    running: tuple[NodeCluster, NodeProc], home: Path
) -> None:
    """A node that met the cluster once finds it again from <data-dir>/known_peers alone."""
    cluster, node = running
    first = cluster.start("learner", bootstrap=[node.addr])
    cluster.wait_converged([node, first], timeout=60.0)
    assert first.terminate() == 0
    known = (first.data_dir / "known_peers").read_text()
    assert node.peer_id in known
    (first.data_dir / "bootstrap").unlink(missing_ok=True)
    again = cluster.start("learner")  # no --bootstrap, no bootstrap file, mDNS off
    try:
        cluster.wait_converged([node, again], timeout=60.0)
    finally:
        assert again.terminate() == 0


def test_init_refuses_to_rewrite_the_key_of_a_running_node(
    running: tuple[NodeCluster, NodeProc], home: Path
) -> None:
    _, node = running
    key_before = (node.data_dir / "swarm.key").read_bytes()
    result = cli("init", "--data-dir", str(node.data_dir), "--force", home=home)
    assert_one_line_error(result, 1, "already in use by a running node", f"process {node.pid}")
    assert (node.data_dir / "swarm.key").read_bytes() == key_before
    shown = cli("init", "--data-dir", str(node.data_dir), "--json", home=home)  # read-only: fine
    assert shown.code == 0 and json.loads(shown.out)["join"].startswith("kowalski2:")
