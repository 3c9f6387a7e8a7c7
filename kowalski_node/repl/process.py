"""Node-side handle on one worker process: spawn, framed I/O over trio pipes, kill.

Nothing here blocks the trio loop: pipes are trio streams, the spawn runs in trio's
thread, and killing a worker waits for the exit asynchronously.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import shutil
import signal
import subprocess
from typing import Any

import trio

import kowalski_node
from kowalski_node.repl.config import SandboxConfig
from kowalski_node.repl.protocol import FrameDecoder, ProtocolError, encode

_BOOT_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


class WorkerGone(Exception):
    """The worker died or broke the protocol; the message says how."""


class WorkerProcess:
    """One sandbox worker. Owned by the pool until bound, then by one session."""

    def __init__(
        self, process: trio.Process, config: SandboxConfig, workdir: str, uid: int | None
    ) -> None:
        self.process = process
        self.config = config
        self.workdir = workdir
        self.uid = uid
        self.hello_message: dict[str, Any] | None = None
        self._decoder = FrameDecoder(config.max_frame_bytes)
        self._killed = False
        self._dead_reason: str | None = None

    @classmethod
    async def spawn(cls, config: SandboxConfig, uid: int | None) -> WorkerProcess:
        workdir = os.path.join(config.workdir_parent(), f"kowalski-repl-{secrets.token_hex(6)}")
        command = [*config.launcher, config.python, "-I", "-c", worker_boot_code()]
        process = await trio.lowlevel.open_process(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=_BOOT_ENV, cwd="/", start_new_session=True,
        )  # fmt: skip
        worker = cls(process, config, workdir, uid)
        with contextlib.suppress(WorkerGone):  # reported when someone waits for its hello
            await worker.send(_config_frame(config, workdir, uid))
        return worker

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return not self._killed and self._dead_reason is None and self.process.returncode is None

    async def hello(self) -> dict[str, Any]:
        """The worker's hello (waits for it once): its capabilities and languages."""
        if self.hello_message is None:
            try:
                with trio.fail_after(self.config.startup_timeout_s):
                    message = await self.recv()
            except trio.TooSlowError:
                raise WorkerGone(
                    f"worker did not start within {self.config.startup_timeout_s:g} s"
                ) from None
            if message.get("t") != "hello":
                raise WorkerGone(f"worker sent {message.get('t')!r} instead of hello")
            self.hello_message = message
        return self.hello_message

    async def send(self, message: dict[str, Any]) -> None:
        stdin = self.process.stdin
        assert stdin is not None
        try:
            await stdin.send_all(encode(message))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise WorkerGone(await self._describe_death(f"pipe to worker broke ({exc})")) from None

    async def send_frame(self, frame: bytes) -> None:
        """Send a frame already built with `encode` / `encode_sliced`."""
        stdin = self.process.stdin
        assert stdin is not None
        try:
            await stdin.send_all(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise WorkerGone(await self._describe_death(f"pipe to worker broke ({exc})")) from None

    async def recv(self) -> dict[str, Any]:
        stdout = self.process.stdout
        assert stdout is not None
        while True:
            try:
                message = self._decoder.next_message()
            except ProtocolError as exc:
                self._dead_reason = f"worker broke the protocol: {exc}"
                raise WorkerGone(self._dead_reason) from None
            if message is not None:
                return message
            try:
                chunk = await stdout.receive_some(1 << 20)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                chunk = b""
                detail = f"pipe from worker broke ({exc})"
            else:
                detail = "worker closed its pipe"
            if not chunk:
                self._dead_reason = await self._describe_death(detail)
                raise WorkerGone(self._dead_reason)
            self._decoder.feed(chunk)

    async def _describe_death(self, detail: str) -> str:
        """Why the worker is gone, from its exit status (waits briefly for it)."""
        with trio.move_on_after(1.0):
            await self.process.wait()
        code = self.process.returncode
        if code is None:
            return f"{detail}; the worker is still running"
        if code < 0 or code > 128:
            signum = -code if code < 0 else code - 128
            name = _signal_name(signum)
            hint = ""
            if signum == signal.SIGKILL:
                hint = (
                    f" (the {self.config.cpu_total_s} s CPU limit of the worker, the kernel's "
                    "out-of-memory killer, or the node)"
                )
            return f"the sandbox process was killed by {name}{hint}"
        return f"the sandbox process exited with status {code} ({detail})"

    async def stderr_tail(self, limit: int = 4000) -> str:
        """Whatever the worker printed to its stderr pipe before its capture took over."""
        stream = self.process.stderr
        if stream is None:
            return ""
        data = b""
        with trio.move_on_after(0.2):
            while len(data) < limit:
                chunk = await stream.receive_some(limit)
                if not chunk:
                    break
                data += chunk
        return data.decode("utf-8", "replace")[-limit:]

    async def kill(self) -> None:
        """SIGKILL the worker's process group (the PID namespace takes every child along),
        wait for it, and remove its directory. Idempotent; safe under cancellation."""
        with trio.CancelScope(shield=True):
            if not self._killed:
                self._killed = True
                hello = self.hello_message
                watcher = hello is None or bool(hello.get("pidns"))
                if watcher and self.process.returncode is None:
                    # The watcher outside the PID namespace kills the sandbox's PID 1 and
                    # reaps it, so no zombie is handed to the host's init.
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(self.process.pid, signal.SIGTERM)
                    with trio.move_on_after(1.0):
                        await self.process.wait()
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                if not watcher and self.uid is not None and self.uid not in (0, os.getuid()):
                    await trio.to_thread.run_sync(sweep_uid, self.uid)
                with trio.move_on_after(5.0):
                    await self.process.wait()
                for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
                    if stream is not None:
                        with contextlib.suppress(Exception):
                            await stream.aclose()
                await trio.to_thread.run_sync(_remove_dir, self.workdir)


def sweep_uid(uid: int) -> int:
    """SIGKILL every process running as `uid` (a sandbox uid no one else uses). Linux only."""
    if uid == 0 or uid == os.getuid() or not os.path.isdir("/proc"):
        return 0
    killed = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            os.kill(int(entry), signal.SIGKILL)
                            killed += 1
                        break
        except (OSError, ValueError):
            continue
    return killed


def _remove_dir(path: str) -> None:
    if os.path.lexists(path):
        shutil.rmtree(path, ignore_errors=True)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def worker_boot_code() -> str:
    """`python -I -c` code that runs this node's own worker module.

    `-I` drops PYTHONPATH and the user site, so a node running from a source checkout
    (PYTHONPATH or an editable install of another tree) would otherwise start a worker
    from different code. The checkout goes first on sys.path only for that import: the
    worker pre-imports everything it needs, and the checkout is not visible in the sandbox.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(kowalski_node.__file__)))
    insert = "" if _is_site_dir(root) else f"sys.path.insert(0, {root!r}); "
    return f"import sys; {insert}import kowalski_node.repl.worker as w; sys.exit(w.main())"


def _is_site_dir(path: str) -> bool:
    return os.path.basename(path) in ("site-packages", "dist-packages")


def _config_frame(config: SandboxConfig, workdir: str, uid: int | None) -> dict[str, Any]:
    home = os.path.expanduser("~")
    hide = [*config.hide_paths] + ([home] if home not in ("/", "") else [])
    return {
        "t": "config", "parent_pid": os.getpid(), "workdir": workdir, "uid": uid,
        "use_namespaces": config.use_namespaces, "memory_mb": config.memory_mb,
        "cpu_total_s": config.cpu_total_s, "max_procs": config.max_procs,
        "file_size_mb": config.file_size_mb, "workdir_mb": config.workdir_mb,
        "max_output_bytes": config.max_output_bytes, "max_open_files": config.max_open_files,
        "env": config.sandbox_env(), "expose_paths": list(config.expose_paths), "hide_paths": hide,
        "probe_paths": [os.getcwd(), home],
    }  # fmt: skip


# One counter per uid range per process, so two executors in one node never hand out
# the same uid at the same time; the pid-derived start spreads separate node processes.
_UID_COUNTERS: dict[tuple[int, int], itertools.count[int]] = {}


class UidAllocator:
    """Hands out sandbox uids round-robin from the configured range (root nodes only)."""

    def __init__(self, config: SandboxConfig) -> None:
        self._base = config.sandbox_uid_base
        self._count = config.sandbox_uid_count
        key = (self._base, self._count)
        if key not in _UID_COUNTERS:
            _UID_COUNTERS[key] = itertools.count((os.getpid() * 61) % self._count)
        self._next = _UID_COUNTERS[key]
        self.enabled = hasattr(os, "geteuid") and os.geteuid() == 0

    def allocate(self) -> int | None:
        if not self.enabled:
            return None
        return self._base + next(self._next) % self._count
