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
3. replace `/` (pivot_root) with a fresh tmpfs holding only an allow-list: read-only binds
   of the Python runtime this worker needs and the system's libraries and tools, a
   synthesized /etc, a minimal /dev, a fresh /proc, and writable private /tmp (with the
   working directory) and /dev/shm. Nothing else of the host exists inside;
4. switch to a per-worker unprivileged uid/gid, set no_new_privs, the parent-death signal
   and the rlimits (address space, CPU, processes, file size, open files, core).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import resource
import select
import signal
import socket
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

# Where the new root is assembled: an existing directory that a tmpfs covers inside the
# worker's own mount namespace only (the host's /tmp is untouched).
NEW_ROOT_BASES = ("/tmp", "/mnt", "/media", "/srv", "/var/tmp", "/opt")


def new_root_base(allowed: list[str]) -> str:
    """Where the fresh root is built: a host directory that holds none of the allowed paths
    (a runtime under /tmp, e.g. a checkout's .venv there, must stay reachable to be bound)."""
    for candidate in NEW_ROOT_BASES:
        if os.path.isdir(candidate) and not any(_under(a, candidate) for a in allowed):
            return candidate
    raise OSError("no directory to build the sandbox root in (all hold allowed paths)")


# The system's libraries and tools (the interpreter's shared libraries, and what shell blocks
# run). Top-level links such as /bin -> usr/bin are recreated as links.
SYSTEM_PATHS = (
    "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/usr/bin", "/usr/sbin",
    "/usr/lib", "/usr/lib32", "/usr/lib64", "/usr/libx32", "/usr/libexec", "/usr/share/zoneinfo",
)  # fmt: skip
ETC_BINDS = ("/etc/ld.so.cache",)
DEV_NODES = ("null", "zero", "full", "random", "urandom")
SHM_MB = 64  # cap of the private /dev/shm (multiprocessing's semaphores and queues)
# pivot_root has no libc wrapper: its syscall number per architecture.
_SYS_PIVOT_ROOT = {"x86_64": 155, "amd64": 155, "aarch64": 41, "arm64": 41, "riscv64": 41,
                   "loongarch64": 41, "i386": 217, "i686": 217, "s390x": 217, "armv7l": 218,
                   "ppc64le": 203, "ppc64": 203}  # fmt: skip
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

    def pivot_root(self, new_root: str, put_old: str) -> None:
        number = _SYS_PIVOT_ROOT.get(platform.machine().lower())
        if number is None:
            raise OSError(f"pivot_root: syscall number unknown on {platform.machine()}")
        self.lib.syscall.restype = ctypes.c_long
        rc = self.lib.syscall(ctypes.c_long(number), new_root.encode(), put_old.encode())
        self._check(int(rc), "pivot_root")

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
            root_how = _build_root(libc, cfg, workdir, uid, result.pid_namespace)
            report["host_files"] = Enforcement(True, root_how)
            fs_how = "private mount namespace: fresh root, read-only except the private /tmp, workdir and /dev/shm"
        except OSError as exc:
            report["mounts"] = Enforcement(False, f"mount setup failed: {exc}")
            result.mount_namespace = False
    if "host_files" not in report:
        report["host_files"] = Enforcement(
            False,
            "NOT hidden: no mount namespace, so code can read every host file that "
            + ("its uid" if is_root else f"the node's user (uid {os.getuid()})")
            + " may read (/etc, /opt, other checkouts, world-readable homes)",
        )
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

    blocked, writable = _probe_writes(cfg, workdir, result.mount_namespace)
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


def _build_root(libc: _Libc, cfg: dict[str, Any], workdir: str, uid: int, new_proc: bool) -> str:
    """Replace `/` with a fresh tmpfs holding only the allow-list; returns how, for the report.

    Read-only binds of the Python runtime (`runtime_paths`), the system's libraries and tools
    (`SYSTEM_PATHS`) and `expose_paths`; a synthesized /etc; a minimal /dev; writable private
    /tmp (holding the workdir), /dev/shm and the workdir; a fresh /proc for the PID namespace.
    Symlinks met on the way to an allowed path (`/bin -> usr/bin`, a `.venv` link) are
    recreated as symlinks. Nothing else of the host exists inside, not even as an empty name.
    """
    libc.mount(None, "/", None, MS_REC | MS_PRIVATE)
    allowed = allowed_paths(cfg)
    base = new_root_base(allowed)
    libc.mount("tmpfs", base, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    try:
        # The private /tmp first: allowed paths under /tmp are bound inside it, not hidden by it.
        size = int(cfg.get("workdir_mb") or 256)
        os.makedirs(base + "/tmp", mode=0o755, exist_ok=True)
        libc.mount("tmpfs", base + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV,
                   f"size={size}m,mode=1777")  # fmt: skip
        exposed = _bind_allowed(libc, base, allowed)
        for name in ("proc", "tmp", "etc", "dev"):
            os.makedirs(base + "/" + name, mode=0o755, exist_ok=True)
        in_tmp = _under(workdir, "/tmp")
        if not in_tmp:
            os.makedirs(base + workdir, mode=0o755, exist_ok=True)
        _write_etc(libc, base, uid, workdir)
        _minimal_dev(libc, base)
        for hidden in cfg.get("hide_paths", []):
            real = os.path.realpath(hidden)
            if any(_under(real, e) for e in exposed) and os.path.isdir(base + real):
                libc.mount("tmpfs", base + real, "tmpfs", MS_NOSUID | MS_NODEV, "size=4k,mode=0755")
        for target in _mountpoints():
            if _under(target, base) and target != base + "/tmp":
                _remount_readonly(libc, target)

        if in_tmp:
            os.makedirs(os.path.dirname(base + workdir), mode=0o755, exist_ok=True)
            os.mkdir(base + workdir, mode=0o700)
            os.chown(base + workdir, uid, uid)
        else:
            libc.mount("tmpfs", base + workdir, "tmpfs", MS_NOSUID | MS_NODEV,
                       f"size={size}m,mode=0700,uid={uid},gid={uid}")  # fmt: skip
        libc.mount("tmpfs", base + "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV,
                   f"size={min(size, SHM_MB)}m,mode=1777")  # fmt: skip
        if new_proc:
            # Not read-only: a non-root node writes its nested uid_map here. Host-wide files
            # in it belong to the real root; the kernel knobs are bound read-only besides.
            libc.mount("proc", base + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            for knob in ("sys", "sysrq-trigger", "irq", "bus"):
                path = f"{base}/proc/{knob}"
                with contextlib.suppress(OSError):
                    libc.mount(path, path, None, MS_BIND | MS_REC)
                    _remount_readonly(libc, path)
        os.chdir(base)
        libc.pivot_root(".", ".")
        libc.umount(".")  # the old root, now stacked on top of the new one
        os.chdir("/")
    except BaseException:
        with contextlib.suppress(OSError):
            os.chdir("/")
            libc.umount(base)
        raise
    shown = sorted(os.listdir("/"))
    return (
        f"fresh root with read-only binds of {len(exposed)} allow-listed paths (Python "
        f"runtime, system libraries and tools); writable only /tmp, the workdir and /dev/shm; "
        f"/ holds {shown}"
    )


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


def allowed_paths(cfg: dict[str, Any]) -> list[str]:
    """The host paths a worker sees (read-only): its Python runtime, system libraries and
    tools, and the deployment's `expose_paths`. Missing ones are skipped."""
    wanted = [*runtime_paths(), *SYSTEM_PATHS, *cfg.get("expose_paths", [])]
    return [p for p in dict.fromkeys(wanted) if os.path.isabs(p) and os.path.lexists(p)]


def runtime_paths() -> list[str]:
    """What this interpreter needs to keep importing: its prefixes (stdlib, lib-dynload,
    the executable, a venv's pyvenv.cfg) and the installed-package directories on sys.path.
    A source checkout on sys.path (an editable install) is left out: the worker's own
    modules are already imported when the root is replaced."""
    paths = {sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix,
             os.path.dirname(sys.executable)}  # fmt: skip
    paths.update(
        p for p in sys.path
        if os.path.isabs(p) and ("site-packages" in p or "dist-packages" in p or p.endswith(".zip"))
    )  # fmt: skip
    return sorted(p for p in paths if p)


def _bind_allowed(libc: _Libc, base: str, paths: list[str]) -> list[str]:
    """Bind each path at its own location under `base` (recreating symlinks on the way);
    returns the real paths bound. A path inside one already bound is visible through it."""
    bound: list[str] = []
    resolved: list[str] = []
    for path in paths:
        links, real = _resolve_links(path)
        for link, target in links:
            os.makedirs(base + os.path.dirname(link), mode=0o755, exist_ok=True)
            if not os.path.lexists(base + link):
                os.symlink(target, base + link)
        if os.path.exists(real):
            resolved.append(real)
    for real in sorted(set(resolved), key=len):
        if any(_under(real, b) for b in bound):
            continue
        is_dir = os.path.isdir(real)
        _make_chain(base + real, is_dir)
        libc.mount(real, base + real, None, MS_BIND | MS_REC)
        bound.append(real)
    return bound


def _resolve_links(path: str) -> tuple[list[tuple[str, str]], str]:
    """The symlinks met while resolving `path` ((link, target) in order) and the real path."""
    links: list[tuple[str, str]] = []
    pending = [p for p in path.split("/") if p]
    current = "/"
    for _ in range(4096):
        if not pending:
            break
        part = pending.pop(0)
        if part == ".":
            continue
        if part == "..":
            current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, part)
        if os.path.islink(candidate):
            if len(links) >= 40:
                raise OSError(f"too many symlinks resolving {path}")
            target = os.readlink(candidate)
            links.append((candidate, target))
            if target.startswith("/"):
                current = "/"
            pending = [p for p in target.split("/") if p] + pending
        else:
            current = candidate
    return links, current


def _write_etc(libc: _Libc, base: str, uid: int, workdir: str) -> None:
    """A synthesized /etc: user and group names for root and the sandbox uid, localhost, and
    the dynamic loader's cache (bound read-only). Nothing of the host's /etc otherwise."""
    name = "nobody" if uid == NESTED_UID else "sandbox"
    files = {
        "passwd": f"root:x:0:0:root:/:/bin/sh\n{name}:x:{uid}:{uid}:{name}:{workdir}:/bin/sh\n",
        "group": f"root:x:0:\n{name}:x:{uid}:\n",
        "hosts": "127.0.0.1 localhost\n::1 localhost\n",
        "hostname": "sandbox\n",
    }
    for file_name, text in files.items():
        with open(f"{base}/etc/{file_name}", "w") as f:
            f.write(text)
    for path in ETC_BINDS:
        if os.path.isfile(path):
            open(base + path, "w").close()
            libc.mount(path, base + path, None, MS_BIND)


def _minimal_dev(libc: _Libc, base: str) -> None:
    """/dev with only null, zero, full, random and urandom (bound from the host), the fd
    links and an empty shm directory (a private tmpfs is mounted on it later)."""
    dev = base + "/dev"
    libc.mount("tmpfs", dev, "tmpfs", MS_NOSUID, "size=64k,mode=0755")
    for node in DEV_NODES:
        if os.path.exists("/dev/" + node):
            open(f"{dev}/{node}", "w").close()
            libc.mount("/dev/" + node, f"{dev}/{node}", None, MS_BIND)
    for link, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):  # fmt: skip
        os.symlink(target, f"{dev}/{link}")
    os.mkdir(f"{dev}/shm", 0o755)


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


def _probe_writes(cfg: dict[str, Any], workdir: str, private_tmp: bool) -> tuple[bool, list[str]]:
    """access(W_OK) honours both permissions and read-only mounts, and writes nothing."""
    probes = {"/", "/etc", "/usr", "/dev", sys.prefix, sys.base_prefix}
    if not private_tmp:  # on the host, the shared scratch places count as escapes
        probes.update(("/tmp", "/var/tmp", "/dev/shm"))
    probes.update(cfg.get("probe_paths", []))
    writable = [
        p for p in sorted(probes)
        if os.path.isdir(p) and not _under(os.path.realpath(p), workdir) and os.access(p, os.W_OK)
    ]  # fmt: skip
    return (not writable, writable)
