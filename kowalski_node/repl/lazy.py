"""A `ReplExecutor` that starts the real one on first use, so code-free tasks cost no worker.

Starting the sandbox spawns worker processes (about 90 ms of CPU each on the 2-core
development machine). A batch of tasks the model answers without code should not pay
that at all, and a batch that does run code should pay it once for a shared pool, not
once per task.
"""

from __future__ import annotations

import shutil
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from kowalski_node.errors import SandboxError
from kowalski_node.repl.base import ExecRequest, ExecResult, ReplExecutor, SubCallHandler
from kowalski_node.repl.config import SandboxConfig


def sandbox_languages(config: SandboxConfig | None = None) -> tuple[str, ...]:
    """The languages a sandbox worker will offer, known before one starts.

    A worker offers `shell` when it finds bash or sh on its PATH; it sees this machine's
    files (read-only), so the same lookup here gives the same answer.
    """
    path = (config or SandboxConfig()).sandbox_env()["PATH"]
    shell = shutil.which("bash", path=path) or shutil.which("sh", path=path)
    return ("python", "shell") if shell else ("python",)


class LazyRepl:
    """Wraps a factory of started `ReplExecutor`s; calls it when a session first opens.

    `languages` is what the wrapped executor will support (the RLM loop needs it before any
    code runs); once started, the real executor's list is reported instead. `on_execute`
    hears the session id of every block (the node records which peer ran what).
    """

    def __init__(
        self,
        factory: Callable[[], Awaitable[ReplExecutor]],
        *,
        languages: tuple[str, ...] = ("python",),
        on_execute: Callable[[str], None] | None = None,
    ) -> None:
        self._factory = factory
        self._on_execute = on_execute
        self.languages: tuple[str, ...] = languages
        self._inner: ReplExecutor | None = None
        self._lock = trio.Lock()
        self._closed = False

    @property
    def started(self) -> bool:
        return self._inner is not None

    async def _get(self) -> ReplExecutor:
        if self._inner is None:
            async with self._lock:
                if self._closed:
                    raise SandboxError("the REPL executor is closed")
                if self._inner is None:
                    inner = await self._factory()
                    found = getattr(inner, "languages", None)
                    if found:
                        self.languages = tuple(found)
                    self._inner = inner
        return self._inner

    async def open_session(self, session_id: str, context: Any) -> None:
        await (await self._get()).open_session(session_id, context)

    async def execute(self, request: ExecRequest, sub_calls: SubCallHandler) -> ExecResult:
        if self._on_execute is not None:
            self._on_execute(request.session_id)
        return await (await self._get()).execute(request, sub_calls)

    async def close_session(self, session_id: str) -> None:
        if self._inner is not None:
            await self._inner.close_session(session_id)

    async def aclose(self) -> None:
        self._closed = True
        inner, self._inner = self._inner, None
        if inner is not None:
            with trio.CancelScope(shield=True):
                await inner.aclose()
