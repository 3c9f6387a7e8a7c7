"""`NodeServiceImpl`: the running `Node` as the HTTP API sees it (the `NodeService` protocol).

Task calls go to the node's `TaskEngine`; peers and status are read from membership,
the capability table and the counters. Everything runs on the trio thread and only
reads in-memory state or does short SQLite calls.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

from kowalski_node.capabilities import DeviceProfile
from kowalski_node.membership import Status
from kowalski_node.rlm.types import ProgressEvent
from kowalski_node.runtime.service import (
    NodeStatus,
    PeerView,
    TaskAccepted,
    TaskStatus,
    TaskSubmission,
    TaskView,
)

if TYPE_CHECKING:
    from kowalski_node.runtime.node import Node

MB = 1024 * 1024


def peer_view(
    peer: str,
    *,
    addr: str,
    state: str,
    incarnation: int,
    is_self: bool,
    profile: DeviceProfile | None,
    latency_ms: float | None,
    last_seen: float | None,
    active_tasks: int,
) -> PeerView:
    view = PeerView(
        peer_id=peer,
        addrs=[addr] if addr else [],
        state=state,  # type: ignore[arg-type]
        is_self=is_self,
        incarnation=incarnation,
        latency_ms=latency_ms,
        last_seen=last_seen,
        active_tasks=active_tasks,
    )
    if profile is not None:
        view.device_class = profile.device_class
        view.cores = profile.cores
        view.ram_total_mb = profile.ram_total // MB
        view.ram_free_mb = profile.ram_free // MB
        view.cpu_load_pct = round(profile.cpu_load * 100.0, 1)
        view.backends = list(profile.backends)
        view.models = [
            m.name if m.full else f"{m.name}[{m.layer_start}:{m.end}]" for m in profile.models
        ]
        view.languages = list(profile.repl_languages)
        view.tokens_per_s = profile.tokens_per_s or None
        view.battery_pct = profile.battery_percent
        view.on_power = profile.power_plugged
        view.temperature_c = profile.temperature_c
    return view


class NodeServiceImpl:
    """Implements `kowalski_node.runtime.service.NodeService` over a running `Node`."""

    def __init__(self, node: Node) -> None:
        self.node = node

    async def submit(self, submission: TaskSubmission) -> TaskAccepted:
        return (await self.node.tasks.submit_many([submission]))[0]

    async def submit_many(self, submissions: Sequence[TaskSubmission]) -> list[TaskAccepted]:
        return await self.node.tasks.submit_many(list(submissions))

    async def get_task(self, task_id: str) -> TaskView | None:
        return self.node.tasks.view(task_id)

    async def list_tasks(
        self, limit: int = 100, status: TaskStatus | None = None
    ) -> list[TaskView]:
        return self.node.tasks.list_views(limit, status)

    def task_events(self, task_id: str) -> AsyncIterator[ProgressEvent]:
        return self.node.tasks.events(task_id)

    async def cancel(self, task_id: str) -> TaskView | None:
        return await self.node.tasks.cancel(task_id)

    async def peers(self) -> list[PeerView]:
        node = self.node
        profiles = node.profiles()
        out: list[PeerView] = []
        active = node.tasks.active_by_peer()
        membership = node.membership
        if membership is None:
            return out
        now_wall = time.time()
        for info in membership.core.members():
            is_self = info.peer == node.peer_id
            state = info.status.value
            out.append(
                peer_view(
                    info.peer,
                    addr=info.addr,
                    state=state,
                    incarnation=info.incarnation,
                    is_self=is_self,
                    profile=profiles.get(info.peer),
                    latency_ms=0.0 if is_self else node.latency_ms(info.peer),
                    last_seen=now_wall if (is_self or info.status is Status.ALIVE) else None,
                    active_tasks=active.get(info.peer, 0),
                )
            )
        return out

    async def status(self) -> NodeStatus:
        node = self.node
        by_state: dict[str, int] = {}
        if node.membership is not None:
            for info in node.membership.core.members():
                by_state[info.status.value] = by_state.get(info.status.value, 0) + 1
        counters = node.tasks.counters()
        return NodeStatus(
            peer_id=node.peer_id,
            version=_version(),
            listen_addrs=node.transport.listen_addrs,
            api_addr=node.api_url or "",
            started_at=node.started_at,
            uptime_s=node.uptime(),
            tasks_by_status=node.tasks.count_by_status(),
            queue_depth=counters.get("queue_depth", 0),
            commits_total=counters.get("commits_total", 0),
            executions_total=counters.get("executions_total", 0),
            failovers_total=counters.get("failovers_total", 0),
            stale_rejections_total=counters.get("stale_rejections_total", 0),
            peers_by_state=by_state,
            **{
                "draining": node.draining,
                "profile": node.profile.name,
                "diagnostics": node.diagnostics(),
            },
        )


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("kowalski-node")
    except Exception:  # noqa: BLE001 - no installed metadata: the version is unknown
        return ""
