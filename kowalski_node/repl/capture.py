"""Bounded capture of a block's stdout/stderr inside the worker.

File descriptors 1 and 2 point at in-memory files (memfd), so output of child processes
and C code is captured too; RLIMIT_FSIZE bounds those files. `sys.stdout`/`sys.stderr`
become writers that stop storing after the cap but keep counting, so a `while True:
print(...)` loop costs CPU, not memory, and the model is told how much was cut.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile

_FLUSH_AT = 16 * 1024


def _memory_file(name: str) -> int:
    if hasattr(os, "memfd_create"):
        try:
            return os.memfd_create(f"kowalski-{name}", 0)
        except OSError:
            pass
    with tempfile.TemporaryFile() as handle:  # unlinked already; the dup keeps it alive
        return os.dup(handle.fileno())


class CappedWriter(io.TextIOBase):
    """Text stream onto a file descriptor that stores at most `cap` bytes per block."""

    def __init__(self, fd: int, cap: int, name: str) -> None:
        super().__init__()
        self._fd = fd
        self._cap = cap
        self._name = name
        self._pending = bytearray()
        self.accepted = 0
        self.dropped = 0

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    @property
    def errors(self) -> str:  # type: ignore[override]
        return "replace"

    @property
    def name(self) -> str:
        return self._name

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._fd

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        data = text.encode("utf-8", "replace")
        room = self._cap - self.accepted
        if room <= 0:
            self.dropped += len(data)
            return len(text)
        if len(data) > room:
            self.dropped += len(data) - room
            data = data[:room]
        self.accepted += len(data)
        self._pending += data
        if len(self._pending) >= _FLUSH_AT:
            self.flush()
        return len(text)

    def flush(self) -> None:
        while self._pending:
            try:
                written = os.write(self._fd, self._pending)
            except OSError:  # EFBIG past RLIMIT_FSIZE, or a closed fd: drop, do not raise
                self.dropped += len(self._pending)
                self._pending.clear()
                return
            del self._pending[:written]

    def reset(self) -> None:
        self._pending.clear()
        self.accepted = 0
        self.dropped = 0


class Capture:
    """Owns fds 1 and 2 and the Python-level streams for the worker's lifetime."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._files = (_memory_file("stdout"), _memory_file("stderr"))
        os.dup2(self._files[0], 1)
        os.dup2(self._files[1], 2)
        self.stdout = CappedWriter(1, cap, "<stdout>")
        self.stderr = CappedWriter(2, cap, "<stderr>")
        sys.stdout = self.stdout
        sys.stderr = self.stderr

    def reset(self) -> None:
        """Start a block with empty outputs (and our streams back, if code replaced them)."""
        sys.stdout, sys.stderr = self.stdout, self.stderr
        for writer in (self.stdout, self.stderr):
            writer.reset()
            try:
                os.ftruncate(writer.fileno(), 0)
                os.lseek(writer.fileno(), 0, os.SEEK_SET)
            except OSError:
                pass

    def collect(self) -> tuple[str, str]:
        """The block's (stdout, stderr), each capped, with a note saying how much was cut."""
        return self._read(self.stdout), self._read(self.stderr)

    def _read(self, writer: CappedWriter) -> str:
        writer.flush()
        fd = writer.fileno()
        try:
            size = os.fstat(fd).st_size
            data = os.pread(fd, min(size, self.cap), 0) if size else b""
        except OSError:
            size, data = 0, b""
        cut = writer.dropped + max(0, size - len(data))
        text = data.decode("utf-8", "replace")
        if cut:
            text += f"\n[output truncated: {cut} more bytes over the {self.cap}-byte limit]"
        return text
