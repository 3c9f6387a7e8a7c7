"""The leader's tools for running a task's RLM loop: backends and a REPL, started lazily.

A node that never leads a task never loads a model or starts a sandbox worker; the
first task pays for it once and every later task reuses them. The REPL executor can be
replaced (`repl_wrapper`) by one that sends code blocks to other peers; it is asked for
which peers did the work so task views can say who did what.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import trio

from kowalski_node.config import Settings
from kowalski_node.llm.factory import Backends, make_backends
from kowalski_node.repl.base import ReplExecutor
from kowalski_node.repl.lazy import LazyRepl
from kowalski_node.rlm.config import RlmConfig
from kowalski_node.runtime.payload import TaskPayload
from kowalski_node.runtime.rlm_runner import session_task_id

log = logging.getLogger("kowalski_node.runtime.execution")

ReplFactory = Callable[[Settings], Awaitable[ReplExecutor]]
BackendsFactory = Callable[[Settings], Backends]
ReplWrapper = Callable[[ReplExecutor], ReplExecutor]


async def default_repl_factory(settings: Settings) -> ReplExecutor:
    from kowalski_node.runtime.task_setup import open_sandbox_repl

    return await open_sandbox_repl(settings)


class ExecutionEnv:
    """Backends + REPL shared by every task this node leads."""

    def __init__(
        self,
        settings: Settings,
        *,
        backends_factory: BackendsFactory | None = None,
        repl_factory: ReplFactory | None = None,
        repl_wrapper: ReplWrapper | None = None,
    ) -> None:
        self.settings = settings
        self._backends_factory = backends_factory or make_backends
        self._repl_factory = repl_factory or default_repl_factory
        self._backends: Backends | None = None
        self.me = ""
        self._usage: dict[str, dict[str, set[str]]] = {}
        self.local_repl = LazyRepl(
            lambda: self._repl_factory(self.settings),
            on_execute=lambda task_id: self.record_usage(task_id, "repl_peers", self.me),
        )
        self.repl: ReplExecutor = (
            repl_wrapper(self.local_repl) if repl_wrapper is not None else self.local_repl
        )

    def set_repl_wrapper(self, wrapper: ReplWrapper) -> None:
        """Route code blocks through `wrapper(local_repl)` (e.g. remote REPL peers)."""
        self.repl = wrapper(self.local_repl)

    def record_usage(self, task_id: str, kind: str, peer: str) -> None:
        """Note that `peer` did work of `kind` (repl_peers / subcall_peers) for a task.

        `task_id` may be a REPL session id ("<task>~<run>"): usage counts per task.
        """
        if peer:
            key = session_task_id(task_id)
            self._usage.setdefault(key, {}).setdefault(kind, set()).add(peer)

    def usage(self, task_id: str) -> dict[str, set[str]]:
        return self._usage.get(session_task_id(task_id), {})

    def forget_usage(self, task_id: str) -> None:
        self._usage.pop(session_task_id(task_id), None)

    def backends(self) -> Backends:
        if self._backends is None:
            self._backends = self._backends_factory(self.settings)
        return self._backends

    def task_settings(self, payload: TaskPayload) -> Settings:
        """This node's settings with the task's own limits and model choices applied."""
        overrides: dict[str, Any] = {}
        for key, value in (payload.rlm or {}).items():
            overrides[f"rlm.{key}"] = value
        if not overrides:
            return self.settings
        return self.settings.with_overrides(overrides)

    def rlm_config(self, payload: TaskPayload) -> RlmConfig:
        from kowalski_node.runtime.task_setup import rlm_config_from

        config = rlm_config_from(self.task_settings(payload), self.backends())
        if payload.model:
            config = replace(config, root_model=payload.model)
        if payload.sub_model:
            config = replace(config, sub_model=payload.sub_model)
        return config

    def default_root_prompt(self, context_type: str = "str") -> str:
        """The root system prompt a task with this node's settings and a `context_type`
        context gets (what `_warm_root_prompt` prefills before the first task)."""
        from kowalski_node.rlm.machine import root_system_prompt
        from kowalski_node.runtime.task_setup import rlm_config_from

        config = rlm_config_from(self.settings, self.backends())
        return root_system_prompt(config, {"type": context_type})

    async def aclose(self) -> None:
        try:
            await self.local_repl.aclose()
        finally:
            backends, self._backends = self._backends, None
            if backends is not None:
                with trio.CancelScope(shield=True):
                    await backends.aclose()
