"""The read model of tasks for users (HTTP views, lists, counters, event streams).

The coordination core keeps the ledger; what a user asks about a task (its public id,
status, who led it when, its history, live progress) is kept beside it in the
`TaskMetadataStore` and in memory here. `TaskEngine` feeds it the core's effects
(`leader_changed`, `task_queued`, `task_committed`, `task_failed`) and the leaders'
`progress` / `usage` messages; `NodeServiceImpl` reads it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import trio

from kowalski_node.coordination.core import Coordinator
from kowalski_node.coordination.effects import LeaderChanged, TaskCommitted, TaskFailed, TaskQueued
from kowalski_node.coordination.spec import TaskSpec
from kowalski_node.rlm.types import ProgressEvent
from kowalski_node.runtime.payload import TaskPayload, decode_result
from kowalski_node.runtime.ports import TaskMetadataStore
from kowalski_node.runtime.service import (
    TaskHistoryEntry,
    TaskStatus,
    TaskView,
    prompt_preview,
)
from kowalski_node.tasks import TaskLedger, TaskRecord, TaskState
from kowalski_node.wire import WireError

EVENT_BUFFER = 256
STATUS_OF = {
    TaskState.QUEUED: TaskStatus.QUEUED,
    TaskState.LEASED: TaskStatus.RUNNING,
    TaskState.RUNNING: TaskStatus.RUNNING,
    TaskState.COMMITTED: TaskStatus.DONE,
    TaskState.FAILED: TaskStatus.FAILED,
    TaskState.CANCELLED: TaskStatus.CANCELLED,
}
COUNTERS = (
    "commits_total",
    "executions_total",
    "failovers_total",
    "stale_rejections_total",
    "runs_aborted_total",
)


class TaskViews:
    """What users see of tasks: built from the ledger, the metadata store and progress."""

    def __init__(
        self,
        me: str,
        ledger: TaskLedger,
        coord: Coordinator,
        store: TaskMetadataStore,
        *,
        default_max_iterations: int,
    ) -> None:
        self.me = me
        self.ledger = ledger
        self.coord = coord
        self.store = store
        self.default_max_iterations = default_max_iterations
        self._subscribers: dict[str, list[trio.MemorySendChannel[ProgressEvent]]] = {}
        self._last_progress: dict[str, ProgressEvent] = {}
        self._counters = {name: self.store.get_int(name) for name in COUNTERS}

    # ================================================================ bookkeeping

    def bump(self, name: str, delta: int = 1) -> None:
        self._counters[name] = self.store.add_int(name, delta)

    def history(
        self, task_id: str, peer: str, action: str, epoch: int | None, detail: str = ""
    ) -> None:
        self.store.add_history(task_id, time.time(), peer, action, epoch, detail)

    def leader_changed(self, eff: LeaderChanged) -> None:
        info = self.store.get_info(eff.task_id)
        leaders = list(info.get("leaders", []))
        leaders.append([eff.epoch, eff.leader])
        changes: dict[str, Any] = {"leaders": leaders}
        if "started_at" not in info:
            changes["started_at"] = time.time()
        o = self.coord.owned(eff.task_id)
        if o is not None:
            changes["replicas"] = list(o.replicas)
        if eff.failover:
            changes["failovers"] = int(info.get("failovers", 0)) + 1
            self.bump("failovers_total")
            self.history(
                eff.task_id,
                eff.leader,
                "failover",
                eff.epoch,
                f"resumes after step {eff.resume_step}",
            )
        self.store.update_info(eff.task_id, **changes)
        self.history(eff.task_id, eff.leader, "leased", eff.epoch)

    def task_queued(self, eff: TaskQueued) -> None:
        self.history(eff.task_id, self.me, "queued", None, eff.reason)
        self.store.update_info(eff.task_id, last_error=eff.reason)

    def task_committed(self, eff: TaskCommitted) -> None:
        self.bump("commits_total")
        self.history(eff.task_id, eff.leader, "committed", eff.epoch)
        self.store.update_info(eff.task_id, finished_at=time.time())
        self.finished(eff.task_id)

    def task_failed(self, eff: TaskFailed) -> None:
        self.history(eff.task_id, self.me, "failed", None, eff.reason)
        self.store.update_info(eff.task_id, finished_at=time.time(), last_error=eff.reason)
        self.finished(eff.task_id)

    def finished(self, task_id: str) -> None:
        """The task ended: its event streams end too."""
        for channel in self._subscribers.pop(task_id, []):
            channel.close()

    # ================================================================ progress and usage

    def progress_from(self, src: str, payload: Any) -> None:
        """A `progress` message: kept and fanned out if it comes from the task's leader."""
        if not isinstance(payload, dict):
            return
        task_id = payload.get("task_id")
        if not isinstance(task_id, str):
            return
        o = self.coord.owned(task_id)
        if o is None or src != o.leader:
            return  # only the current leader of a task we own reports its progress
        try:
            event = ProgressEvent.from_dict(payload)
        except ValueError:
            return
        self._publish(task_id, event)

    def _publish(self, task_id: str, event: ProgressEvent) -> None:
        self._last_progress[task_id] = event
        for channel in list(self._subscribers.get(task_id, [])):
            try:
                channel.send_nowait(event)
            except trio.WouldBlock:
                pass  # a slow subscriber misses events rather than slowing the task
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers[task_id].remove(channel)

    def usage_from(self, src: str, payload: Any) -> None:
        """A `usage` message: which peers ran REPL blocks and sub-calls for a task."""
        if not isinstance(payload, dict):
            return
        task_id = payload.get("task_id")
        rec = self.ledger.get(task_id) if isinstance(task_id, str) else None
        if rec is None or not isinstance(task_id, str):
            return  # kept by any holder: the owner may have changed since the run began
        info = self.store.get_info(task_id)
        changes: dict[str, Any] = {}
        for kind in ("repl_peers", "subcall_peers"):
            got = payload.get(kind)
            if isinstance(got, list):
                merged = list(dict.fromkeys([*info.get(kind, []), *(str(p) for p in got[:64])]))
                changes[kind] = merged
        if changes:
            self.store.update_info(task_id, **changes)

    # ================================================================ views

    def record(self, task_id: str) -> TaskRecord | None:
        """The ledger record behind a public id (a client's alias or the ledger id)."""
        real = self.store.resolve_alias(task_id) or task_id
        return self.ledger.get(real)

    def public_id(self, task_id: str) -> str:
        alias = self.store.get_info(task_id).get("alias")
        return alias if isinstance(alias, str) and alias else task_id

    def status(self, rec: TaskRecord) -> TaskStatus:
        status = STATUS_OF[rec.state]
        if status is TaskStatus.DONE and rec.result is not None:
            result = decode_result(rec.result, rec.task_id)
            if result is not None and result.error and result.stop_reason == "error":
                return TaskStatus.FAILED
        if not status.final and self.store.get_info(rec.task_id).get("cancel_requested"):
            return TaskStatus.CANCELLING
        return status

    def view(self, task_id: str, *, full: bool = True) -> TaskView | None:
        rec = self.record(task_id)
        return None if rec is None else self._view(rec, full=full)

    def _view(self, rec: TaskRecord, *, full: bool) -> TaskView:
        info = self.store.get_info(rec.task_id)
        public = self.public_id(rec.task_id)
        status = self.status(rec)
        progress = self._last_progress.get(rec.task_id)
        replicas = info.get("replicas") or []
        o = self.coord.owned(rec.task_id)
        if o is not None:
            replicas = list(o.replicas)
        preview = info.get("preview") or ""
        max_iter = 0
        if not preview or not max_iter:
            try:
                payload = TaskPayload.decode(payload_of(rec))
                preview = preview or prompt_preview(payload.prompt)
                max_iter = int((payload.rlm or {}).get("max_iterations") or 0)
            except (WireError, ValueError):
                pass
        if not max_iter:
            max_iter = self.default_max_iterations
        result = decode_result(rec.result, public) if rec.state is TaskState.COMMITTED else None
        created = float(info.get("created_wall") or rec.created_at)
        view = TaskView(
            task_id=public,
            status=status,
            prompt_preview=preview,
            idempotency_key=None
            if rec.idempotency_key.startswith("auto-")
            else rec.idempotency_key,
            owner=rec.submitter,
            leader=rec.leader or None,
            epoch=rec.epoch,
            replicas=[str(p) for p in replicas],
            executions=rec.executions,
            commits=rec.commits,
            failovers=int(info.get("failovers", 0)),
            iteration=progress.iteration if progress else (result.iterations if result else 0),
            max_iterations=progress.max_iterations if progress else max_iter,
            result=result if full else None,
            error=rec.error or (result.error if result else None),
            created_at=created,
            started_at=info.get("started_at"),
            finished_at=info.get("finished_at")
            or (rec.updated_at if rec.terminal and rec.updated_at > 1e9 else None),
            updated_at=rec.updated_at if rec.updated_at > 1e9 else created,
            **self._extra_fields(rec, info),
        )
        if full:
            # the submission itself is not logged (one write less per accepted task)
            submitted = TaskHistoryEntry(at=created, peer=rec.submitter, action="submitted")
            view.history = [submitted] + [
                TaskHistoryEntry(
                    at=h.at, peer=h.peer, action=h.action, epoch=h.epoch, detail=h.detail
                )
                for h in self.store.history(rec.task_id)
            ]
        return view

    @staticmethod
    def _extra_fields(rec: TaskRecord, info: dict[str, Any]) -> dict[str, Any]:
        """Fields beyond the base view: who did what, and the ledger's own counters."""
        return {
            "ledger_id": rec.task_id,
            "rejected_commits": rec.rejected_commits,
            "leaders": [{"epoch": e, "peer": p} for e, p in info.get("leaders", [])],
            "repl_peers": list(info.get("repl_peers", [])),
            "subcall_peers": list(info.get("subcall_peers", [])),
            "checkpoint_step": rec.checkpoint.step if rec.checkpoint else None,
        }

    def list_views(self, limit: int, status: TaskStatus | None) -> list[TaskView]:
        states = None
        if status is not None:
            states = [s.value for s, st in STATUS_OF.items() if st is status]
            if status is TaskStatus.CANCELLING:
                states = [TaskState.QUEUED.value, TaskState.LEASED.value, TaskState.RUNNING.value]
        records = self.store.recent(limit if status is None else limit * 4, states)
        views = [self._view(r, full=False) for r in records]
        if status is not None:
            views = [v for v in views if v.status is status]
        return views[:limit]

    def count_by_status(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for state, n in self.store.count_by_state().items():
            key = STATUS_OF[TaskState(state)].value
            out[key] = out.get(key, 0) + n
        return out

    def counters(self, *, backlog: int) -> dict[str, int]:
        """The persistent counters, plus the queue depth (`backlog`: tasks not yet offered)."""
        out = dict(self._counters)
        out["queue_depth"] = len(self.coord.queue) + backlog
        st = self.coord.stats
        out["stale_rejections_total"] = out.get("stale_rejections_total", 0) + int(
            getattr(st, "fenced_checkpoints", 0)
            + getattr(st, "fenced_commits", 0)
            + getattr(st, "duplicate_commits_refused", 0)
        )
        return out

    def active_by_peer(self, *, running_here: int) -> dict[str, int]:
        """Tasks each peer leads for us (this node: at least the runs it leads now)."""
        out: dict[str, int] = {}
        for task_id in self.coord.owned_tasks():
            o = self.coord.owned(task_id)
            if o is not None and o.leader:
                out[o.leader] = out.get(o.leader, 0) + 1
        out[self.me] = max(out.get(self.me, 0), running_here)
        return out

    async def events(self, task_id: str) -> AsyncIterator[ProgressEvent]:
        rec = self.record(task_id)
        if rec is None or rec.terminal:
            return
        real = rec.task_id
        send, receive = trio.open_memory_channel[ProgressEvent](EVENT_BUFFER)
        self._subscribers.setdefault(real, []).append(send)
        last = self._last_progress.get(real)
        if last is not None:
            send.send_nowait(last)
        try:
            async with receive:
                while True:
                    event: ProgressEvent | None = None
                    ended = False
                    with trio.move_on_after(0.5):
                        try:
                            event = await receive.receive()
                        except trio.EndOfChannel:
                            ended = True
                    if ended:
                        return
                    if event is not None:
                        # yielded outside any cancel scope (async generator rule)
                        yield replace(event, task_id=self.public_id(real))
                        continue
                    current = self.ledger.get(real)
                    if current is None or current.terminal:
                        return
        finally:
            subs = self._subscribers.get(real)
            if subs is not None and send in subs:
                subs.remove(send)
            send.close()


def payload_of(rec: TaskRecord) -> bytes:
    """The submission's payload inside a ledger record (older records hold it bare)."""
    try:
        return TaskSpec.decode(rec.payload).payload
    except ValueError:
        return rec.payload


def fingerprint_of(rec: TaskRecord) -> str:
    """The fingerprint of the submission a record holds ('' if it cannot be read)."""
    try:
        return TaskPayload.decode(payload_of(rec)).fingerprint
    except (WireError, ValueError):
        return ""
