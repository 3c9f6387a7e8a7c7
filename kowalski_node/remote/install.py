"""Wiring the remote services into a running node, in one call.

    remote = install_remote(node)          # after the transport runs, before tasks start
    sub = remote.fanout(backends.sub)      # the `sub=` backend for run_rlm on this leader

`install_remote` registers the peer-side services (REPL jobs, sub-call batches,
folding) on the node's transport, and routes the leader's code blocks through a
`RemoteReplExecutor` (via `ExecutionEnv.set_repl_wrapper`). Which peer ran what is
recorded with `ExecutionEnv.record_usage(task_id, "repl_peers" | "subcall_peers", peer)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from kowalski_node.adapters.libp2p.api import TransportPort
from kowalski_node.capabilities.profile import DeviceProfile
from kowalski_node.llm.base import LlmBackend
from kowalski_node.remote.fold import FoldClient, FoldService, register_fold_service
from kowalski_node.remote.llm_service import (
    FanoutBackend,
    FanoutConfig,
    LlmService,
    LlmServiceConfig,
    register_llm_service,
)
from kowalski_node.remote.placement import SchedulerChooser
from kowalski_node.remote.remote_repl import RemoteReplConfig, RemoteReplExecutor
from kowalski_node.remote.repl_service import ReplService, ReplServiceConfig, register_repl_service
from kowalski_node.repl.base import ReplExecutor


class ExecutionLike(Protocol):
    """The part of `runtime.execution.ExecutionEnv` the remote services use."""

    local_repl: Any

    def backends(self) -> Any: ...

    def record_usage(self, task_id: str, kind: str, peer: str) -> None: ...

    def forget_usage(self, task_id: str) -> None: ...

    def set_repl_wrapper(self, wrapper: Any) -> None: ...


class NodeLike(Protocol):
    """The part of `runtime.node.Node` the remote services use."""

    peer_id: str
    transport: TransportPort
    execution: Any

    def live_peers(self) -> list[str]: ...

    def profiles(self) -> Mapping[str, DeviceProfile]: ...

    def latency_ms(self, peer: str) -> float | None: ...


@dataclass(frozen=True)
class RemoteConfig:
    repl: RemoteReplConfig = field(default_factory=RemoteReplConfig)
    repl_service: ReplServiceConfig = field(default_factory=ReplServiceConfig)
    llm_service: LlmServiceConfig = field(default_factory=LlmServiceConfig)
    fanout: FanoutConfig = field(default_factory=FanoutConfig)
    remote_repl: bool = True
    """Send the leader's code blocks to peers (False: they always run locally)."""
    local_weight: float = 1.0
    """Multiplier of this node's own placement score (< 1 prefers peers)."""


class RemoteServices:
    """The node's remote-work pieces; `fanout()` wraps a sub backend for the leader."""

    def __init__(
        self,
        node: NodeLike,
        chooser: SchedulerChooser,
        repl_service: ReplService,
        llm_service: LlmService,
        fold_service: FoldService,
        config: RemoteConfig,
    ) -> None:
        self.node = node
        self.chooser = chooser
        self.repl_service = repl_service
        self.llm_service = llm_service
        self.fold_service = fold_service
        self.config = config
        self.remote_repl: RemoteReplExecutor | None = None
        self._fanouts: dict[int, FanoutBackend] = {}

    def wrap_repl(self, local: ReplExecutor) -> ReplExecutor:
        env = self.node.execution
        self.remote_repl = RemoteReplExecutor(
            self.node.transport,
            self.chooser,
            local,
            self.config.repl,
            on_usage=lambda task_id, peer: env.record_usage(task_id, "repl_peers", peer),
        )
        return self.remote_repl

    def fanout(self, local_sub: LlmBackend) -> FanoutBackend:
        """A FanoutBackend around `local_sub` (one per backend object, reused)."""
        existing = self._fanouts.get(id(local_sub))
        if existing is not None and existing.local is local_sub:
            return existing
        env = self.node.execution
        backend = FanoutBackend(
            self.node.transport,
            self.chooser,
            local_sub,
            self.config.fanout,
            on_usage=lambda task_id, peer: env.record_usage(task_id, "subcall_peers", peer),
        )
        self._fanouts[id(local_sub)] = backend
        return backend

    def fold_client(self, local: LlmBackend) -> FoldClient:
        return FoldClient(self.node.transport, self.chooser, local)

    def stats(self) -> dict[str, Any]:
        """Counters for status pages: what this node did for others and asked of others."""
        out: dict[str, Any] = {
            "repl_service": dict(self.repl_service.stats),
            "llm_service": dict(self.llm_service.stats),
            "folds_served": self.fold_service.folds,
        }
        if self.remote_repl is not None:
            out["remote_repl"] = dict(self.remote_repl.stats)
        for fan in self._fanouts.values():
            out.setdefault("fanout", {}).update(fan.stats)
            out.setdefault("subcall_peers", {}).update(fan.per_peer)
        return out

    async def aclose(self) -> None:
        await self.repl_service.aclose()
        if self.remote_repl is not None:
            await self.remote_repl.aclose()


def install_remote(node: NodeLike, config: RemoteConfig | None = None) -> RemoteServices:
    """Register the remote-work services on `node` and route its code blocks through peers."""
    cfg = config or RemoteConfig()
    env = node.execution
    chooser = SchedulerChooser(
        node.peer_id,
        node.profiles,
        node.live_peers,
        probe_latency_ms=node.latency_ms,
        local_weight=cfg.local_weight,
    )
    repl_service = register_repl_service(
        node.transport, env.local_repl, cfg.repl_service, on_session_closed=env.forget_usage
    )
    llm_service = register_llm_service(node.transport, lambda: env.backends().sub, cfg.llm_service)
    fold_service = register_fold_service(node.transport, lambda: env.backends().sub)
    services = RemoteServices(node, chooser, repl_service, llm_service, fold_service, cfg)
    if cfg.remote_repl:
        env.set_repl_wrapper(services.wrap_repl)
    return services
