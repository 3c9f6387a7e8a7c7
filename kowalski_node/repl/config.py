"""Limits and knobs of the subprocess sandbox (pure data, validated at construction)."""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass, field, fields
from typing import Any

from kowalski_node.errors import ConfigError

MIB = 1024 * 1024

# Limits a deployment can insist on (`require=`): start() fails if one is not enforced.
LIMIT_NAMES = (
    "wall_timeout", "cpu", "memory", "processes", "file_size", "workdir", "env",
    "network", "filesystem", "host_files", "process_cleanup", "privileges",
)  # fmt: skip


@dataclass(frozen=True)
class SandboxConfig:
    """Per-worker limits. Memory, file size and processes are per sandbox, CPU per block."""

    pool_size: int = 2  # idle pre-started workers
    memory_mb: int = 1024  # RLIMIT_AS per process
    cpu_s: float = 60.0  # CPU seconds per block (soft: a clean "timeout" error)
    cpu_total_s: int = 3600  # CPU seconds per worker (hard: SIGKILL)
    max_procs: int = 64  # processes/threads of one sandbox
    file_size_mb: int = 64  # RLIMIT_FSIZE
    workdir_mb: int = 256  # size of the private tmpfs working directory
    max_output_bytes: int = MIB  # per stream per block
    max_open_files: int = 256
    timeout_grace_s: float = 1.0  # after the soft wall timeout, before the hard kill
    startup_timeout_s: float = 20.0
    max_frame_bytes: int = 64 * MIB  # largest message accepted from a worker
    max_sub_calls_per_block: int = 10_000
    use_namespaces: bool = True
    # Each worker runs as its own uid from this range when the node is root, so limits
    # counted per uid (processes) and signals cannot cross between sandboxes.
    sandbox_uid_base: int = 2_100_000_000
    sandbox_uid_count: int = 10_000
    base_dir: str | None = None  # parent of the per-worker directories (default: tmp dir)
    # Extra host paths code may read (bound read-only). Everything not on the allow-list
    # (the Python runtime, system libraries and tools, these) is absent from the sandbox.
    expose_paths: tuple[str, ...] = ()
    # Directories to cover with an empty tmpfs should they fall inside an exposed path
    # (the node passes its home and data dir; elsewhere they are absent anyway).
    hide_paths: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)  # extra variables visible to code
    require: frozenset[str] = frozenset()
    python: str = sys.executable
    launcher: tuple[str, ...] = ()  # argv prefix for the worker command (nice, taskset, ...)

    def __post_init__(self) -> None:
        positive = ("pool_size", "memory_mb", "cpu_s", "cpu_total_s", "max_procs", "file_size_mb",
                    "workdir_mb", "max_output_bytes", "max_open_files", "startup_timeout_s",
                    "max_frame_bytes", "max_sub_calls_per_block", "sandbox_uid_count")  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"sandbox.{name} must be a positive number, got {value!r}")
        if self.timeout_grace_s < 0:
            raise ConfigError(f"sandbox.timeout_grace_s must be >= 0, got {self.timeout_grace_s!r}")
        if self.memory_mb < 64:
            raise ConfigError(
                f"sandbox.memory_mb must be at least 64 (a Python worker needs it), got {self.memory_mb}"
            )
        if self.max_procs < 2:
            raise ConfigError(f"sandbox.max_procs must be at least 2, got {self.max_procs}")
        if self.cpu_total_s < self.cpu_s:
            raise ConfigError("sandbox.cpu_total_s must be at least sandbox.cpu_s")
        if not 1000 <= self.sandbox_uid_base <= 2**31 - 1 - self.sandbox_uid_count:
            raise ConfigError(f"sandbox.sandbox_uid_base out of range: {self.sandbox_uid_base}")
        for path in self.expose_paths:
            if not isinstance(path, str) or not os.path.isabs(path):
                raise ConfigError(
                    f"sandbox.expose_paths entries must be absolute paths, got {path!r}"
                )
        unknown = set(self.require) - set(LIMIT_NAMES)
        if unknown:
            raise ConfigError(
                f"sandbox.require names unknown limits {sorted(unknown)}; known: {', '.join(LIMIT_NAMES)}"
            )

    @classmethod
    def from_kwargs(cls, base: SandboxConfig | None = None, **overrides: Any) -> SandboxConfig:
        """`base` with keyword overrides; an unknown keyword is a ConfigError naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown sandbox option(s): {', '.join(unknown)}")
        values = {f.name: getattr(base, f.name) for f in fields(cls)} if base is not None else {}
        values.update(overrides)
        if "require" in values:
            values["require"] = frozenset(values["require"])
        for name in ("hide_paths", "expose_paths"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)

    def workdir_parent(self) -> str:
        return self.base_dir or tempfile.gettempdir()

    def sandbox_env(self) -> dict[str, str]:
        """The whole environment code sees (HOME and TMPDIR are set to the workdir)."""
        bin_dir = os.path.dirname(self.python)
        env = {
            "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONIOENCODING": "utf-8",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        env.update(self.env)
        return env
