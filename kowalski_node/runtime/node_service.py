"""`NodeServiceImpl`: the running node as the HTTP API sees it (the `NodeService` protocol).

It is given two narrow views, not the node: `TaskApi` (task calls, answered by the
`TaskEngine`) and `NodeFacts` (membership, adverts and the node's own status, answered
by `Node`). Everything runs on the trio thread and only reads in-memory state or does
short SQLite calls.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from kowalski_node.capabilities import DeviceProfile
from kowalski_node.membership import MemberInfo, Status
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
    from kowalski_node.inference.install import InferenceServices

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


class TaskApi(Protocol):
    """The task calls the HTTP API makes (`TaskEngine`)."""

    async def submit_many(self, subs: list[TaskSubmission]) -> list[TaskAccepted]: ...

    async def cancel(self, task_id: str) -> TaskView | None: ...

    def view(self, task_id: str, *, full: bool = True) -> TaskView | None: ...

    def list_views(self, limit: int, status: TaskStatus | None) -> list[TaskView]: ...

    def events(self, task_id: str) -> AsyncIterator[ProgressEvent]: ...

    def count_by_status(self) -> dict[str, int]: ...

    def counters(self) -> dict[str, int]: ...

    def active_by_peer(self) -> dict[str, int]: ...


class NodeFacts(Protocol):
    """What the HTTP API reads of the node itself (`Node`)."""

    peer_id: str
    api_url: str | None
    started_at: float
    draining: bool

    def members(self) -> list[MemberInfo]: ...

    def profiles(self) -> dict[str, DeviceProfile]: ...

    def latency_ms(self, peer: str) -> float | None: ...

    def listen_addrs(self) -> list[str]: ...

    def profile_name(self) -> str: ...

    def uptime(self) -> float: ...

    def diagnostics(self) -> dict[str, Any]: ...


class NodeServiceImpl:
    """Implements `kowalski_node.runtime.service.NodeService` over a running node."""

    def __init__(
        self, tasks: TaskApi, node: NodeFacts, *, inference: InferenceServices | None = None
    ) -> None:
        self.tasks = tasks
        self.node = node
        self.inference = inference
        """The pipelined-inference services behind `/v1/generate`, if this node runs them."""

    async def submit(self, submission: TaskSubmission) -> TaskAccepted:
        return (await self.tasks.submit_many([submission]))[0]

    async def submit_many(self, submissions: Sequence[TaskSubmission]) -> list[TaskAccepted]:
        return await self.tasks.submit_many(list(submissions))

    async def get_task(self, task_id: str) -> TaskView | None:
        return self.tasks.view(task_id)

    async def list_tasks(
        self, limit: int = 100, status: TaskStatus | None = None
    ) -> list[TaskView]:
        return self.tasks.list_views(limit, status)

    def task_events(self, task_id: str) -> AsyncIterator[ProgressEvent]:
        return self.tasks.events(task_id)

    async def cancel(self, task_id: str) -> TaskView | None:
        return await self.tasks.cancel(task_id)

    async def peers(self) -> list[PeerView]:
        node = self.node
        profiles = node.profiles()
        active = self.tasks.active_by_peer()
        now_wall = time.time()
        out: list[PeerView] = []
        for info in node.members():
            is_self = info.peer == node.peer_id
            out.append(
                peer_view(
                    info.peer,
                    addr=info.addr,
                    state=info.status.value,
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
        for info in node.members():
            by_state[info.status.value] = by_state.get(info.status.value, 0) + 1
        counters = self.tasks.counters()
        return NodeStatus(
            peer_id=node.peer_id,
            version=_version(),
            listen_addrs=node.listen_addrs(),
            api_addr=node.api_url or "",
            started_at=node.started_at,
            uptime_s=node.uptime(),
            tasks_by_status=self.tasks.count_by_status(),
            queue_depth=counters.get("queue_depth", 0),
            commits_total=counters.get("commits_total", 0),
            executions_total=counters.get("executions_total", 0),
            failovers_total=counters.get("failovers_total", 0),
            stale_rejections_total=counters.get("stale_rejections_total", 0),
            peers_by_state=by_state,
            **{
                "draining": node.draining,
                "profile": node.profile_name(),
                "diagnostics": node.diagnostics(),
            },
        )


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("kowalski-node")
    except Exception:  # noqa: BLE001 - no installed metadata: the version is unknown
        return ""
