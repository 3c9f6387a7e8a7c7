"""Saved prompt prefixes for llama.cpp: a long system prompt is prefilled once per machine.

Why: on a 2-core CPU, prefill is the slowest part of an RLM task. The root system prompt
(instructions plus worked examples, about 800 tokens) is the same for every task with the
same kind of context, yet each new process prefilled it again: 22 s of a 30 s `run` with
Qwen2.5-Coder-0.5B on one thread (measured 2026-12-07). llama.cpp can save a slot's tokens
and keys/values to a file and restore them into another server; restoring the 810-token
prompt took 3 ms and left 12 tokens of the next request to prefill.

How it is used:
- `ensure_prefix(loaded, system_text)` runs before a request whose first message is a long
  system prompt. Once per server and prompt it restores the saved state into an idle slot,
  or, when nothing is saved yet, prefills exactly the templated system message into an idle
  slot and saves it. The request that follows finds the prefix in that slot through
  llama.cpp's own prompt cache (`cache_prompt`, slot chosen by prompt similarity).
- Files live in `<models dir>/kv-prefix/<key>.bin`. The key hashes the llama.cpp build, the
  GGUF (path, size, mtime) and the system text, so a changed model or prompt never restores
  stale state. A file is written under a temporary name and renamed, so a reader never sees
  half of one; a `flock` per key makes concurrent processes (three nodes of a local mesh)
  compute it once while the others wait, then restore it.
- Nothing here is needed for correctness: any failure is logged and the request simply
  prefills as before.

The slot endpoints are llama.cpp's (`/slots/N?action=save|restore`, `/apply-template`), on
the server's loopback listener that only holders of its random API key can use.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

PREFIX_DIRNAME = "kv-prefix"
# Below this a system prompt prefills in well under a second: not worth a file.
MIN_PREFIX_CHARS = 1500
# Files kept per directory (about 12 KB per token for Qwen2.5-0.5B: ~10 MB each).
MAX_PREFIX_FILES = 32
# How long a process waits for another one that is computing the same prefix.
LOCK_WAIT_S = 120.0
ADMIN_TIMEOUT_S = 30.0

PrefixOutcome = Literal["cached", "restored", "computed", "skipped", "busy", "failed"]


@dataclass
class PrefixState:
    """Per loaded server: which prefixes it already holds, and the lock that orders work."""

    directory: Path
    api_key: str
    ready: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


def prefix_key(model_path: Path, build: str, system_text: str) -> str:
    """Names the saved state: same llama.cpp build, same GGUF file, same system text."""
    try:
        stat = model_path.stat()
        identity = f"{model_path}\0{stat.st_size}\0{stat.st_mtime_ns}"
    except OSError:
        identity = str(model_path)
    digest = hashlib.sha256()
    for part in (build, identity, system_text):
        digest.update(part.encode("utf-8", "surrogatepass"))
        digest.update(b"\0\1")
    return digest.hexdigest()[:40]


def common_prefix(a: str, b: str) -> str:
    """The longest shared start of two strings."""
    n = 0
    limit = min(len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    return a[:n]


class ServerAdmin:
    """llama.cpp's own HTTP endpoints on the in-process server's loopback listener."""

    def __init__(self, base_url: str, api_key: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key

    def call(self, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base_url + path,
            data=data,
            headers={"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"},
        )
        # The URL is the server's own loopback listener (http://127.0.0.1:PORT).
        with urllib.request.urlopen(request, timeout=ADMIN_TIMEOUT_S) as reply:
            return json.loads(reply.read().decode())

    def idle_slot(self) -> int | None:
        for slot in self.call("/slots") or ():
            if isinstance(slot, dict) and not slot.get("is_processing", True):
                return int(slot["id"])
        return None

    def templated_system(self, system_text: str) -> str:
        """The chat-templated text of the system message, exactly as a chat request starts."""
        alone = self.call(
            "/apply-template", {"messages": [{"role": "system", "content": system_text}]}
        )
        followed = self.call(
            "/apply-template",
            {
                "messages": [
                    {"role": "system", "content": system_text},
                    {"role": "user", "content": "?"},
                ]
            },
        )
        return common_prefix(str(alone.get("prompt", "")), str(followed.get("prompt", "")))


def _prune(directory: Path, keep: int = MAX_PREFIX_FILES) -> None:
    files = sorted(directory.glob("*.bin"), key=lambda p: p.stat().st_mtime, reverse=True)
    for stale in files[keep:]:
        with contextlib.suppress(OSError):
            stale.unlink()
    for leftover in directory.glob("*.tmp"):
        with contextlib.suppress(OSError):
            if time.time() - leftover.stat().st_mtime > 3600:
                leftover.unlink()


@contextlib.contextmanager
def _file_lock(path: Path, wait_s: float) -> Any:
    """An exclusive flock on `path`, or None after `wait_s` (another process is slow)."""
    with open(path, "a+b") as handle:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield None
                    return
                time.sleep(0.05)
        try:
            yield handle
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def ensure_prefix(
    server: Any, base_url: str, state: PrefixState, model_path: Path, build: str, system_text: str
) -> PrefixOutcome:
    """Make `system_text`'s prefill free for the next request on `server` (blocking)."""
    if len(system_text) < MIN_PREFIX_CHARS:
        return "skipped"
    key = prefix_key(model_path, build, system_text)
    with state.lock:
        if key in state.ready:
            return "cached"
        admin = ServerAdmin(base_url, state.api_key)
        try:
            outcome = _restore_or_compute(server, admin, state.directory, key, system_text)
        except (OSError, urllib.error.URLError, ValueError, KeyError, TypeError) as exc:
            log.warning("event=kv_prefix_failed key=%s reason=%r", key[:12], str(exc)[:200])
            return "failed"
        if outcome in ("restored", "computed"):
            state.ready.add(key)
        return outcome


def _restore_or_compute(
    server: Any, admin: ServerAdmin, directory: Path, key: str, system_text: str
) -> PrefixOutcome:
    directory.mkdir(parents=True, exist_ok=True)
    saved = directory / f"{key}.bin"
    started = time.perf_counter()
    with _file_lock(directory / f"{key}.lock", LOCK_WAIT_S) as held:
        if held is None:
            return "busy"
        slot = admin.idle_slot()
        if slot is None:
            return "busy"
        if saved.exists():
            try:
                reply = admin.call(f"/slots/{slot}?action=restore", {"filename": saved.name})
            except urllib.error.HTTPError as exc:  # llama.cpp refused the file's contents
                reply = {"error": f"HTTP {exc.code}"}
            if int(reply.get("n_restored", 0)) > 0:
                with contextlib.suppress(OSError):
                    os.utime(saved)  # recently used files survive pruning
                log.info(
                    "event=kv_prefix_restored key=%s tokens=%s took_ms=%.0f",
                    key[:12], reply.get("n_restored"), (time.perf_counter() - started) * 1000,
                )  # fmt: skip
                return "restored"
            log.warning("event=kv_prefix_unreadable key=%s reply=%r", key[:12], str(reply)[:200])
            saved.unlink(missing_ok=True)
        prompt = admin.templated_system(system_text)
        if not prompt:
            return "failed"
        errors: list[str] = []

        def on_chunk(chunk: Any) -> bool:
            if isinstance(chunk, dict) and chunk.get("error"):
                errors.append(str(chunk["error"])[:200])
            return False

        server.handle_completions(
            {"prompt": prompt, "max_tokens": 1, "temperature": 0.0, "cache_prompt": True,
             "id_slot": slot, "stream": False},
            on_chunk,
        )  # fmt: skip
        if errors:
            raise ValueError(f"prefill refused: {errors[0]}")
        temporary = f"{key}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        reply = admin.call(f"/slots/{slot}?action=save", {"filename": temporary})
        if int(reply.get("n_saved", 0)) <= 0:
            (directory / temporary).unlink(missing_ok=True)
            return "failed"
        os.replace(directory / temporary, saved)
        log.info(
            "event=kv_prefix_saved key=%s tokens=%s took_ms=%.0f",
            key[:12], reply.get("n_saved"), (time.perf_counter() - started) * 1000,
        )  # fmt: skip
    _prune(directory)
    return "computed"
