"""Worker-side confinement: namespaces, mounts, an unprivileged uid, rlimits.

Runs inside a freshly started worker before it reads any user code. Every step is tried,
and what actually took effect is written into a report (`Enforcement` per limit) that the
worker sends to the node in its hello, so the node can say exactly what this machine does
not enforce instead of pretending. Stdlib only (ctypes for unshare/mount/prctl).

Full mode (Linux, started as root), in this order:
1. unshare the network, mount, PID, IPC and UTS namespaces;
2. fork: the outer process stays outside as a watcher (kills the sandbox if the node
   dies) and the inner one becomes PID 1 of the new PID namespace, so killing it kills
   every process the code started;
3. make all mounts private, hide /tmp, /var/tmp, /dev/shm, /run and the node's home
   behind empty tmpfs (re-binding the Python installation where it lives under them),
   remount everything read-only, mount a size-limited tmpfs as the private working
   directory and a fresh /proc;
4. switch to a per-worker unprivileged uid/gid, set no_new_privs, the parent-death signal
   and the rlimits (address space, CPU, processes, file size, open files, core).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import resource
import select
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38

# statvfs f_flag bits that a read-only bind remount must carry over (locked in user namespaces).
_ST_TO_MS = ((1, MS_RDONLY), (2, MS_NOSUID), (4, MS_NODEV), (8, MS_NOEXEC),
             (1024, MS_NOATIME), (2048, MS_NODIRATIME), (4096, MS_RELATIME))  # fmt: skip

DEFAULT_HIDDEN = ("/tmp", "/var/tmp", "/dev/shm", "/run")
STAGING = "/proc"  # replaced by a fresh procfs at the end, so a fine place to stage binds
NESTED_UID = 65534  # uid inside the nested user namespace of a non-root node
_CAP_VERSION_3 = 0x20080522


@dataclass
class Enforcement:
    enforced: bool
    how: str

    def to_wire(self) -> dict[str, Any]:
        return {"enforced": self.enforced, "how": self.how}


@dataclass
class Confinement:
    """What the worker ended up with."""

    report: dict[str, Enforcement] = field(default_factory=dict)
    pid_namespace: bool = False
    mount_namespace: bool = False
    uid: int = 0
    workdir: str = ""
    # Kill every other process of this sandbox after each block (safe only when isolated).
    can_sweep: bool = False


class _Libc:
    def __init__(self) -> None:
        self.lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self.lib.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                   ctypes.c_ulong, ctypes.c_char_p]  # fmt: skip
        self.lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        self.lib.unshare.argtypes = [ctypes.c_int]
        self.lib.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong,
                                   ctypes.c_ulong, ctypes.c_ulong]  # fmt: skip

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def unshare(self, flags: int) -> None:
        self._check(self.lib.unshare(flags), "unshare")

    def mount(self, source: str | None, target: str, fstype: str | None, flags: int,
              data: str | None = None) -> None:  # fmt: skip
        self._check(
            self.lib.mount(
                source.encode() if source else None, target.encode(),
                fstype.encode() if fstype else None, flags, data.encode() if data else None,
            ),
            f"mount {target}",
        )  # fmt: skip

    def umount(self, target: str) -> None:
        self._check(self.lib.umount2(target.encode(), MNT_DETACH), f"umount {target}")

    def drop_capabilities(self) -> None:
        header = (ctypes.c_uint32 * 2)(_CAP_VERSION_3, 0)
        data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable x 2 words: all zero
        self._check(self.lib.capset(header, data), "capset")

    def prctl(self, option: int, arg: int) -> None:
        self._check(self.lib.prctl(option, arg, 0, 0, 0), f"prctl {option}")


def confine(cfg: dict[str, Any], protocol_fds: Iterable[int]) -> Confinement:
    """Apply every limit we can; returns in the sandboxed process (may fork a watcher)."""
    result = Confinement()
    report = result.report
    is_linux = sys.platform.startswith("linux")
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    libc: _Libc | None = None
    if is_linux:
        try:
            libc = _Libc()
        except OSError as exc:
            report["namespaces"] = Enforcement(False, f"libc unavailable: {exc}")
    node_pid = int(cfg.get("parent_pid") or os.getppid())

    unshared = 0
    if libc is not None and cfg.get("use_namespaces", True):
        unshared = _unshare_all(libc, is_root, report)
    result.mount_namespace = bool(unshared & CLONE_NEWNS)
    result.pid_namespace = bool(unshared & CLONE_NEWPID)

    if result.pid_namespace:
        _split_watcher(node_pid, protocol_fds)  # returns only in the inner process

    workdir = str(cfg["workdir"])
    result.workdir = workdir
    uid = int(cfg["uid"]) if (is_root and cfg.get("uid") is not None) else os.getuid()
    result.uid = uid

    fs_how = "none"
    if result.mount_namespace and libc is not None:
        try:
            _setup_mounts(libc, cfg, workdir, uid, result.pid_namespace)
            fs_how = "private mount namespace: everything read-only except the workdir tmpfs"
        except OSError as exc:
            report["mounts"] = Enforcement(False, f"mount setup failed: {exc}")
            result.mount_namespace = False
    if not result.mount_namespace:
        os.makedirs(workdir, mode=0o700, exist_ok=True)
        if is_root and uid != 0:
            os.chown(workdir, uid, uid)
    os.chdir(workdir)

    dropped = False
    if is_root and uid != 0:
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            dropped = True
        except OSError as exc:
            report["privileges"] = Enforcement(False, f"could not drop to uid {uid}: {exc}")
    elif libc is not None and unshared & CLONE_NEWUSER and result.mount_namespace:
        try:
            _enter_unprivileged_userns(libc, NESTED_UID)
            dropped = True
            result.uid = NESTED_UID
        except OSError as exc:
            report["privileges"] = Enforcement(
                False, f"could not leave the namespace's root user: {exc}"
            )
    if libc is not None:
        with contextlib.suppress(OSError):
            libc.prctl(PR_SET_NO_NEW_PRIVS, 1)
        if result.pid_namespace:
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            _exit_if_watcher_gone(cfg)
    if dropped:
        report["privileges"] = Enforcement(
            True,
            f"runs as unprivileged uid/gid {result.uid}"
            + ("" if is_root else " in a nested user namespace, no capabilities")
            + ", no_new_privs",
        )
    elif "privileges" not in report:
        report["privileges"] = Enforcement(
            False, f"runs as the node's own uid {os.getuid()} (node not started as root)"
        )

    _apply_rlimits(cfg, report, dropped)
    report["wall_timeout"] = Enforcement(True, "SIGALRM in the worker, then kill by the node")
    report["env"] = Enforcement(True, "environment replaced by a minimal allow-list")
    report["workdir"] = Enforcement(
        True,
        f"tmpfs of {cfg.get('workdir_mb')} MiB mounted only inside the sandbox"
        if result.mount_namespace
        else "private directory on the host, removed when the worker ends",
    )

    if unshared & CLONE_NEWNET:
        names = [n for _, n in socket_interfaces()]
        report["network"] = Enforcement(
            names in ([], ["lo"]), f"empty network namespace (interfaces: {names or 'none'})"
        )
    else:
        report["network"] = Enforcement(False, "no network namespace: code can open connections")

    blocked, writable = _probe_writes(cfg, workdir)
    report["filesystem"] = Enforcement(
        blocked,
        fs_how if blocked and result.mount_namespace
        else ("unprivileged uid without write permission outside the workdir" if blocked
              else f"writable outside the workdir: {', '.join(writable)}"),
    )  # fmt: skip

    # kill(-1) reaches every process the sandbox may signal: only safe when that set is
    # exactly the sandbox (its own PID namespace, or a uid no other process uses).
    swept_uid = dropped and is_root
    if result.pid_namespace:
        how = "PID namespace: the sandbox's PID 1 dies with the worker, taking every child along"
    elif swept_uid:
        how = f"process group kill plus a sweep of uid {uid} (no PID namespace)"
    else:
        how = "process group kill only: a child calling setsid() can outlive the worker"
    result.can_sweep = result.pid_namespace or swept_uid
    report["process_cleanup"] = Enforcement(result.can_sweep, how)
    return result


def socket_interfaces() -> list[tuple[int, str]]:
    import socket

    try:
        return list(socket.if_nameindex())
    except OSError:
        return []


def _unshare_all(libc: _Libc, is_root: bool, report: dict[str, Enforcement]) -> int:
    done = 0
    if not is_root:
        try:
            uid, gid = os.getuid(), os.getgid()
            libc.unshare(CLONE_NEWUSER)
            _write("/proc/self/setgroups", "deny")
            _write("/proc/self/uid_map", f"0 {uid} 1")
            _write("/proc/self/gid_map", f"0 {gid} 1")
            done |= CLONE_NEWUSER
        except OSError as exc:
            report["namespaces"] = Enforcement(False, f"user namespaces unavailable: {exc}")
            return 0
    for flag in (CLONE_NEWNET, CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWIPC, CLONE_NEWUTS):
        try:
            libc.unshare(flag)
            done |= flag
        except OSError:
            pass
    report["namespaces"] = Enforcement(
        bool(done & CLONE_NEWNET and done & CLONE_NEWNS and done & CLONE_NEWPID),
        "unshared: " + ", ".join(
            name for flag, name in ((CLONE_NEWUSER, "user"), (CLONE_NEWNET, "net"),
                                    (CLONE_NEWNS, "mount"), (CLONE_NEWPID, "pid"),
                                    (CLONE_NEWIPC, "ipc"), (CLONE_NEWUTS, "uts"))
            if done & flag
        ),
    )  # fmt: skip
    return done


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _split_watcher(node_pid: int, protocol_fds: Iterable[int]) -> None:
    """Fork; the child returns (it is PID 1 of the new namespace), the parent never does.

    The parent stays outside the namespace, as root, and only waits: it exits when the
    child exits (mirroring its status) and SIGKILLs the child if the node disappears.
    A pipe it holds open lets the child notice if the parent was killed early.
    """
    lifeline_r, lifeline_w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(lifeline_w)
        os.environ["_KOWALSKI_LIFELINE"] = str(lifeline_r)
        return
    os.close(lifeline_r)
    for fd in protocol_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    os._exit(_watch(child, node_pid))


def _watch(child: int, node_pid: int) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def stop_child(signum: int, frame: Any) -> None:
        # The node asks us to end the sandbox: kill its PID 1 (the kernel then kills and
        # reaps everything inside), reap it ourselves, exit; no zombie is left to anyone.
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)

    signal.signal(signal.SIGTERM, stop_child)
    node_fd = child_fd = -1
    try:
        node_fd = os.pidfd_open(node_pid)
        child_fd = os.pidfd_open(child)
    except (AttributeError, OSError):
        pass
    while True:
        if child_fd >= 0 and node_fd >= 0:
            ready, _, _ = select.select([node_fd, child_fd], [], [])
            node_gone = node_fd in ready and child_fd not in ready
        else:
            time.sleep(0.2)
            node_gone = os.getppid() != node_pid
        if node_gone:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        pid, status = os.waitpid(child, 0 if node_gone else os.WNOHANG)
        if pid == child:
            if os.WIFSIGNALED(status):
                return 128 + os.WTERMSIG(status)
            return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1


def _exit_if_watcher_gone(cfg: dict[str, Any]) -> None:
    fd = int(os.environ.pop("_KOWALSKI_LIFELINE", "-1"))
    if fd < 0:
        return
    readable, _, _ = select.select([fd], [], [], 0)
    if readable:  # EOF: the watcher died before we armed PDEATHSIG
        os._exit(137)
    # Keep the fd open (it never becomes readable while the watcher lives).
    cfg["_lifeline_fd"] = fd


def _setup_mounts(libc: _Libc, cfg: dict[str, Any], workdir: str, uid: int, new_proc: bool) -> None:
    original = _mountpoints()
    libc.mount(None, "/", None, MS_REC | MS_PRIVATE)
    needed = sorted({os.path.realpath(p) for p in cfg.get("needed_paths", []) if os.path.exists(p)})
    hidden = _hidden_dirs(cfg, needed)
    made: list[str] = []

    libc.mount("tmpfs", STAGING, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0700")
    try:
        staged: dict[str, str] = {}
        for i, path in enumerate(p for p in needed if any(_under(p, h) for h in hidden)):
            stage = f"{STAGING}/{i}"
            os.mkdir(stage) if os.path.isdir(path) else open(stage, "w").close()
            libc.mount(path, stage, None, MS_BIND | MS_REC)
            staged[path] = stage
        for h in hidden:
            libc.mount("tmpfs", h, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
            made.append(h)
        for path, stage in staged.items():
            _make_chain(path, os.path.isdir(stage))
            libc.mount(stage, path, None, MS_BIND | MS_REC)
            made.append(path)
        os.makedirs(workdir, mode=0o755, exist_ok=True)
    finally:
        libc.umount(STAGING)

    for target in [*original, *made]:
        _remount_readonly(libc, target)
    size = int(cfg.get("workdir_mb") or 256)
    libc.mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV,
               f"size={size}m,mode=0700,uid={uid},gid={uid}")  # fmt: skip
    if new_proc:
        # Not read-only: a non-root node writes its nested uid_map here. Host-wide files in it
        # (/proc/sys) belong to root, which the sandbox is not.
        libc.mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def _enter_unprivileged_userns(libc: _Libc, inside_uid: int) -> None:
    """Non-root node: leave the namespace-root user we needed for mounting.

    A new user namespace with a new mount namespace locks every mount (read-only flags
    included), mapping our uid to an ordinary one; then all capabilities are dropped.
    """
    libc.unshare(CLONE_NEWUSER | CLONE_NEWNS)
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{inside_uid} 0 1")
    _write("/proc/self/gid_map", f"{inside_uid} 0 1")
    libc.drop_capabilities()


def _mountpoints() -> list[str]:
    points: list[str] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4:
                points.append(_unescape(fields[4]))
    return points


def _unescape(path: str) -> str:
    out, i = [], 0
    while i < len(path):
        if path[i] == "\\" and i + 3 < len(path) and path[i + 1 : i + 4].isdigit():
            out.append(chr(int(path[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(path[i])
            i += 1
    return "".join(out)


def _hidden_dirs(cfg: dict[str, Any], needed: list[str]) -> list[str]:
    """Directories to cover with an empty tmpfs: scratch dirs, the node's home, and any
    non-traversable ancestor of a path the interpreter needs (e.g. /root for a pyenv)."""
    candidates = set(DEFAULT_HIDDEN) | set(cfg.get("hide_paths", []))
    for path in needed:
        blocker = _first_private_ancestor(path)
        if blocker is not None:
            candidates.add(blocker)
    out: list[str] = []
    for c in sorted(candidates, key=len):
        real = os.path.realpath(c)
        if real in ("/", "/proc", "/sys", "/dev") or not os.path.isdir(real) or os.path.islink(c):
            continue
        if any(_under(real, o) for o in out):  # an ancestor is already hidden
            continue
        out.append(real)
    return out


def _first_private_ancestor(path: str) -> str | None:
    parts = path.strip("/").split("/")
    for i in range(1, len(parts)):
        d = "/" + "/".join(parts[:i])
        try:
            if not os.stat(d).st_mode & 0o001:
                return d
        except OSError:
            return None
    return None


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _make_chain(path: str, is_dir: bool) -> None:
    parent = os.path.dirname(path)
    os.makedirs(parent, mode=0o755, exist_ok=True)
    if is_dir:
        os.makedirs(path, mode=0o755, exist_ok=True)
    elif not os.path.exists(path):
        open(path, "w").close()


def _remount_readonly(libc: _Libc, target: str) -> None:
    try:
        st = os.statvfs(target)
    except OSError:
        return  # hidden or gone: unreachable anyway
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY
    for st_bit, ms_bit in _ST_TO_MS:
        if st.f_flag & st_bit:
            flags |= ms_bit
    with contextlib.suppress(OSError):  # reported by the write probe if it matters
        libc.mount(None, target, None, flags)


def _apply_rlimits(cfg: dict[str, Any], report: dict[str, Enforcement], dropped: bool) -> None:
    mb = 1024 * 1024

    def setlimit(name: str, which: int, value: int, how: str) -> None:
        try:
            resource.setrlimit(which, (value, value))
            report[name] = Enforcement(True, how)
        except (ValueError, OSError) as exc:
            report[name] = Enforcement(False, f"setrlimit failed: {exc}")

    memory = int(cfg["memory_mb"])
    setlimit("memory", resource.RLIMIT_AS, memory * mb, f"RLIMIT_AS = {memory} MiB per process")
    if sys.platform == "darwin":
        report["memory"] = Enforcement(False, "macOS does not enforce RLIMIT_AS")
    fsize = int(cfg["file_size_mb"])
    setlimit("file_size", resource.RLIMIT_FSIZE, fsize * mb, f"RLIMIT_FSIZE = {fsize} MiB")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead of killing
    total = int(cfg["cpu_total_s"])
    try:
        resource.setrlimit(resource.RLIMIT_CPU, (total, total))
        report["cpu"] = Enforcement(
            True, f"RLIMIT_CPU: soft limit per block (SIGXCPU), hard {total} s per worker (SIGKILL)"
        )
    except (ValueError, OSError) as exc:
        report["cpu"] = Enforcement(False, f"setrlimit failed: {exc}")
    procs = int(cfg["max_procs"])
    if dropped:
        setlimit("processes", resource.RLIMIT_NPROC, procs,
                 f"RLIMIT_NPROC = {procs} on a uid used by this worker alone")  # fmt: skip
    else:
        report["processes"] = Enforcement(
            False,
            "RLIMIT_NPROC counts every process of the node's user (and is not enforced for "
            "root), so it cannot bound this sandbox alone",
        )
    for which in (resource.RLIMIT_CORE,):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(which, (0, 0))
    nofile = int(cfg.get("max_open_files") or 256)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))


def _probe_writes(cfg: dict[str, Any], workdir: str) -> tuple[bool, list[str]]:
    """access(W_OK) honours both permissions and read-only mounts, and writes nothing."""
    probes = {"/", "/tmp", "/var/tmp", "/dev/shm", "/etc", "/usr", sys.prefix, sys.base_prefix}
    probes.update(cfg.get("probe_paths", []))
    writable = [
        p for p in sorted(probes)
        if os.path.isdir(p) and not _under(os.path.realpath(p), workdir) and os.access(p, os.W_OK)
    ]  # fmt: skip
    return (not writable, writable)
