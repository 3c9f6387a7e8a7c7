"""Checks that keep two nodes from sharing what only one may own: a data dir and a p2p port.

* **Data-dir lock**: `start` holds an exclusive `fcntl.flock` on `<data-dir>/node.lock`
  for its whole life (the kernel drops it when the process dies, kill -9 included, so
  a stale lock file never blocks a restart). The file holds the owner's PID so the
  refusal can name it. `init` takes the same lock briefly, so it cannot rewrite the
  key of a running node.
* **Port probe**: py-libp2p listens with SO_REUSEPORT, so a second node on a taken
  port would bind too and the kernel would split incoming connections between them.
  Before the host starts, each fixed TCP listen port is bound once *without*
  SO_REUSEPORT; if that fails, another process holds it. (Two starts racing within
  the same millisecond can still both pass; the lock covers the same-data-dir case.)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from pathlib import Path
from typing import IO

from kowalski_node.addresses import listen_host_port
from kowalski_node.errors import ConfigError

LOCK_FILE = "node.lock"


class DataDirLocked(ConfigError):
    """Another process holds the data dir's lock."""

    def __init__(self, data_dir: Path, pid: int | None) -> None:
        who = f"process {pid}" if pid else "another process"
        hint = f" (stop it with `kill {pid}`)" if pid else ""
        super().__init__(
            f"{data_dir} is already in use by a running node, {who}{hint}; "
            "each node needs its own --data-dir"
        )
        self.pid = pid


class PortInUse(ConfigError):
    """Another process listens on a p2p port we were asked to listen on."""


def _holder_pid(handle: IO[str]) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        handle.seek(0)
        text = handle.read().strip()
        return int(text) if text else None
    return None


class DataDirLock:
    """An exclusive, process-lifetime lock on a data dir (`with DataDirLock(d): ...`)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / LOCK_FILE
        self._handle: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock or raise DataDirLocked naming the PID that holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        handle = os.fdopen(fd, "r+", encoding="ascii")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            pid = _holder_pid(handle)
            handle.close()
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise DataDirLocked(self.data_dir, pid) from None
            raise ConfigError(f"cannot lock {self.path}: {exc.strerror}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        """Drop the lock. The file stays: unlinking it would let a third process lock a
        different inode while a second one still waits on the old one."""
        if self._handle is not None:
            with contextlib.suppress(OSError):
                self._handle.seek(0)
                self._handle.truncate()
            self._handle.close()
            self._handle = None

    def __enter__(self) -> DataDirLock:
        if self._handle is None:  # already held when acquired before `with`
            self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_ports_free(listen: list[str] | tuple[str, ...]) -> None:
    """Raise PortInUse when a fixed TCP port in `listen` (multiaddrs) is taken already."""
    for addr in listen:
        hp = listen_host_port(addr)
        if hp is None or hp[1] == 0:
            continue
        host, port = hp
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        probe = socket.socket(family, socket.SOCK_STREAM)
        try:
            # SO_REUSEADDR so a port left in TIME_WAIT by our own last run is not "taken";
            # an active listener still makes bind fail on Linux. No SO_REUSEPORT, on purpose.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(
                    f"p2p port {port} on {host} is already in use by another process "
                    f"(another kowalski node?); pick a free one with --listen {host}:PORT"
                ) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise PortInUse(
                    f"listen address {addr}: {host} is not an address of this machine"
                ) from None
            raise PortInUse(f"cannot listen on {addr}: {exc.strerror}") from None
        finally:
            probe.close()
