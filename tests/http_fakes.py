"""An in-memory `NodeService` for the HTTP API tests: real dedup, events and counters.

Tasks stay queued until a test moves them (`start`, `progress`, `finish`, `fail`), or
run on their own when `auto_steps` > 0 and the fake has a nursery (`await nursery.start(
fake.run)`). `fail_next` makes the next call of a named method raise, to check that a
service failure is a 500 and not a dead server.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from kowalski_node.adapters.http import ApiEndpoint, serve_api
from kowalski_node.errors import NoCapableDevice
from kowalski_node.rlm.types import ExecutionResult, ProgressEvent
from kowalski_node.runtime.service import (
    IdempotencyConflict,
    NodeStatus,
    PeerView,
    TaskAccepted,
    TaskHistoryEntry,
    TaskStatus,
    TaskSubmission,
    TaskView,
    prompt_preview,
)

if TYPE_CHECKING:
    from trio_typing import TaskStatus as TrioTaskStatus

SELF_ID = "12D3KooWFakeSelfPeer000000000000000000000000000001"
OTHER_ID = "12D3KooWFakeOtherPeer00000000000000000000000000002"


@dataclass
class _Task:
    view: TaskView
    fingerprint: str
    events: list[ProgressEvent] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)


class FakeNodeService:
    """Implements `NodeService` in memory; see the module docstring."""

    def __init__(self, *, auto_steps: int = 0, step_delay: float = 0.0) -> None:
        self.auto_steps = auto_steps
        self.step_delay = step_delay
        self.started_at = time.time()
        self.tasks: dict[str, _Task] = {}
        self.keys: dict[str, str] = {}
        self.order: list[str] = []
        self.fail_next: dict[str, Exception] = {}
        self.no_capable_device = False
        self.slow_cancel = False
        self.submit_calls = 0
        self.submissions: list[TaskSubmission] = []
        self.event_error: Exception | None = None
        self.executions_total = 0
        self.commits_total = 0
        self._counter = 0
        self._nursery: trio.Nursery | None = None

    # -- driving ----------------------------------------------------------------

    async def run(self, task_status: TrioTaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Give the fake a nursery so `auto_steps` tasks run by themselves."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def _maybe_fail(self, method: str) -> None:
        exc = self.fail_next.pop(method, None)
        if exc is not None:
            raise exc

    def _touch(self, task: _Task) -> None:
        task.view.updated_at = time.time()
        old, task.changed = task.changed, trio.Event()
        old.set()

    def start(self, task_id: str, leader: str = OTHER_ID) -> None:
        task = self.tasks[task_id]
        task.view.status = TaskStatus.RUNNING
        task.view.leader = leader
        task.view.epoch += 1
        task.view.executions += 1
        task.view.started_at = task.view.started_at or time.time()
        task.view.history.append(
            TaskHistoryEntry(at=time.time(), peer=leader, action="leased", epoch=task.view.epoch)
        )
        self.executions_total += 1
        self._touch(task)

    def progress(self, task_id: str, iteration: int, tokens: int = 10) -> None:
        task = self.tasks[task_id]
        task.view.iteration = iteration
        task.events.append(
            ProgressEvent(
                task_id=task_id,
                stage="model_response",
                iteration=iteration,
                max_iterations=task.view.max_iterations,
                active_devices=2,
                avg_latency_ms=12.5,
                tokens_in=tokens,
                tokens_out=tokens // 2,
                peer=task.view.leader,
                epoch=task.view.epoch,
            )
        )
        self._touch(task)

    def finish(self, task_id: str, content: str | None = None) -> None:
        task = self.tasks[task_id]
        view = task.view
        view.status = TaskStatus.DONE
        view.commits += 1
        view.finished_at = time.time()
        view.result = ExecutionResult(
            task_id=task_id,
            content=content if content is not None else f"answer to: {view.prompt_preview}",
            iterations=view.iteration,
            stop_reason="final",
            tokens_in=10,
            tokens_out=5,
            executed_on="network",
        )
        view.history.append(
            TaskHistoryEntry(
                at=time.time(), peer=view.leader or SELF_ID, action="committed", epoch=view.epoch
            )
        )
        self.commits_total += 1
        self._touch(task)

    def fail(self, task_id: str, error: str) -> None:
        task = self.tasks[task_id]
        task.view.status = TaskStatus.FAILED
        task.view.error = error
        task.view.finished_at = time.time()
        self._touch(task)

    async def _auto_run(self, task_id: str) -> None:
        self.start(task_id)
        for i in range(1, self.auto_steps + 1):
            await trio.sleep(self.step_delay)
            if self.tasks[task_id].view.status.final:
                return
            self.progress(task_id, i)
        await trio.sleep(self.step_delay)
        if not self.tasks[task_id].view.status.final:
            self.finish(task_id)

    # -- NodeService --------------------------------------------------------------

    def _accept(self, sub: TaskSubmission) -> TaskAccepted:
        self.submissions.append(sub)
        key = sub.dedup_key
        fingerprint = sub.fingerprint()
        known = self.keys.get(key) if key is not None else None
        if known is None and sub.task_id is not None and sub.task_id in self.tasks:
            known = sub.task_id
        if known is not None:
            existing = self.tasks[known]
            if existing.fingerprint != fingerprint:
                raise IdempotencyConflict(key or known, existing.view.task_id)
            view = existing.view
            return TaskAccepted(
                task_id=view.task_id,
                status=view.status,
                created=False,
                idempotency_key=key,
                owner=SELF_ID,
                result=view.result,
                error=view.error,
            )
        self._counter += 1
        task_id = sub.task_id or f"task-{self._counter:08d}"
        now = time.time()
        max_iter = int((sub.rlm or {}).get("max_iterations", 20))
        view = TaskView(
            task_id=task_id,
            status=TaskStatus.QUEUED,
            prompt_preview=prompt_preview(sub.prompt),
            idempotency_key=key,
            owner=SELF_ID,
            replicas=[OTHER_ID],
            max_iterations=max_iter,
            created_at=now,
            updated_at=now,
            history=[TaskHistoryEntry(at=now, peer=SELF_ID, action="submitted")],
        )
        self.tasks[task_id] = _Task(view=view, fingerprint=fingerprint)
        self.order.append(task_id)
        if key is not None:
            self.keys[key] = task_id
        if self.auto_steps > 0 and self._nursery is not None:
            self._nursery.start_soon(self._auto_run, task_id)
        return TaskAccepted(
            task_id=task_id, status=view.status, created=True, idempotency_key=key, owner=SELF_ID
        )

    def cancel_requested(self, task_id: str) -> None:
        """What a real node reports while the leader has not stopped yet."""
        self.tasks[task_id].view.status = TaskStatus.CANCELLING
        self._touch(self.tasks[task_id])

    async def submit(self, submission: TaskSubmission) -> TaskAccepted:
        self.submit_calls += 1
        self._maybe_fail("submit")
        if self.no_capable_device:
            raise NoCapableDevice("no live peer has model 'huge-70b' (needs 40 GB RAM)")
        return self._accept(submission)

    async def submit_many(self, submissions: Sequence[TaskSubmission]) -> list[TaskAccepted]:
        self._maybe_fail("submit_many")
        return [self._accept(sub) for sub in submissions]

    async def get_task(self, task_id: str) -> TaskView | None:
        self._maybe_fail("get_task")
        task = self.tasks.get(task_id)
        return task.view.model_copy(deep=True) if task else None

    async def list_tasks(
        self, limit: int = 100, status: TaskStatus | None = None
    ) -> list[TaskView]:
        self._maybe_fail("list_tasks")
        out: list[TaskView] = []
        for task_id in reversed(self.order):
            view = self.tasks[task_id].view
            if status is None or view.status == status:
                out.append(view.model_copy(deep=True))
                if len(out) >= limit:
                    break
        return out

    async def task_events(self, task_id: str) -> AsyncIterator[ProgressEvent]:
        task = self.tasks.get(task_id)
        if task is None:
            return
        if self.event_error is not None:
            raise self.event_error
        sent = 0
        while True:
            changed = task.changed
            while sent < len(task.events):
                yield task.events[sent]
                sent += 1
            if task.view.status.final:
                return
            await changed.wait()

    async def cancel(self, task_id: str) -> TaskView | None:
        self._maybe_fail("cancel")
        task = self.tasks.get(task_id)
        if task is None:
            return None
        if task.view.status == TaskStatus.RUNNING and self.slow_cancel:
            self.cancel_requested(task_id)
        elif not task.view.status.final:
            task.view.status = TaskStatus.CANCELLED
            task.view.finished_at = time.time()
            task.view.error = "cancelled by the submitter"
            self._touch(task)
        return task.view.model_copy(deep=True)

    async def peers(self) -> list[PeerView]:
        self._maybe_fail("peers")
        return [
            PeerView(
                peer_id=SELF_ID,
                addrs=["/ip4/127.0.0.1/tcp/7470"],
                is_self=True,
                device_class="desktop",
                cores=8,
                ram_total_mb=32768,
                ram_free_mb=20000,
                cpu_load_pct=12.5,
                backends=["builtin"],
                models=["smollm2-135m"],
                languages=["python"],
                tokens_per_s=30.2,
            ),
            PeerView(
                peer_id=OTHER_ID,
                addrs=["/ip4/127.0.0.1/tcp/7480"],
                state="suspect",
                device_class="laptop",
                cores=4,
                ram_total_mb=8192,
                ram_free_mb=2048,
                cpu_load_pct=80.0,
                models=["smollm2-135m"],
                languages=["python", "javascript"],
                tokens_per_s=12.0,
                latency_ms=1.4,
            ),
        ]

    async def status(self) -> NodeStatus:
        self._maybe_fail("status")
        by_status: dict[str, int] = {}
        for task in self.tasks.values():
            by_status[task.view.status.value] = by_status.get(task.view.status.value, 0) + 1
        return NodeStatus(
            peer_id=SELF_ID,
            version="test",
            listen_addrs=["/ip4/127.0.0.1/tcp/7470"],
            api_addr="http://127.0.0.1:0",
            started_at=self.started_at,
            uptime_s=time.time() - self.started_at,
            tasks_by_status=by_status,
            queue_depth=by_status.get("queued", 0),
            commits_total=self.commits_total,
            executions_total=self.executions_total,
            failovers_total=0,
            peers_by_state={"alive": 1, "suspect": 1},
        )


@asynccontextmanager
async def serve_fake(
    fake: FakeNodeService, token: str | None = None, **options: Any
) -> AsyncIterator[ApiEndpoint]:
    """The real server on 127.0.0.1 with an ephemeral port, over `fake`."""
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.run)
        endpoint: ApiEndpoint = await nursery.start(
            partial(serve_api, fake, "127.0.0.1", 0, token, **options)
        )
        try:
            yield endpoint
        finally:
            nursery.cancel_scope.cancel()
