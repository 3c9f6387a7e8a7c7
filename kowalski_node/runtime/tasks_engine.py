"""Tasks on a node: drives the coordination core and runs the RLM loop as a leader.

One `Coordinator` (pure) per node plays owner, leader and replica for different tasks.
This module maps its effects to I/O and back:

* `SendMessage` → a one-way message on `/kowalski/task/1.0.0` (type = the message tag),
  ordered per peer (`PeerSender`); received messages are decoded and handed to the core.
* `StartRun` → `run_rlm(..., resume=snapshot, on_checkpoint=hook)` in its own cancel
  scope. The hook reports each step (`step_finished`) and then waits for the core's
  `ContinueRun`: the checkpoint is acknowledged by the owner (and, bounded, by the k
  replicas) before the next step runs. The result goes to `run_finished`, a failure of
  the task itself to `run_failed`. `AbortRun` (fenced, cancelled, re-offered) cancels the
  run's scope, so a fenced leader stops at once and never commits.
* `LeaderChanged`, `TaskQueued`, `TaskCommitted`, `TaskFailed` → the owner's task views,
  history and counters, and the end of event streams.

Progress travels leader → owner as `progress` messages on the same protocol; the owner
fans them out to SSE subscribers. Extra message types: `progress`, `usage` (which peers
ran REPL blocks and sub-calls), `cancel_request` (a non-owner forwards a cancel),
`submit_forward` (a keyed submission handed to the key's home, see below).

Cluster-wide idempotency: a keyed submission belongs to its key's home acceptor set
(rendezvous over every member this node has ever known, persisted across restarts).
A node outside that set forwards the submission to the first home member that answers
and returns its answer, so a retry of the key at any node finds the same task. A new
task is answered only once it is stored on a majority of its acceptors; when that
cannot happen (too few reachable) the submission is refused with `NoQuorum`, which is
safe to retry anywhere.

Time: the core gets `clock()` = trio's clock shifted to wall time at start, so records
carry meaningful timestamps while timers stay monotonic (and MockClock still drives
tests).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, assert_never

import msgpack
import trio

from kowalski_node.adapters.libp2p import protocol_ids
from kowalski_node.adapters.libp2p.api import Request
from kowalski_node.adapters.libp2p.errors import RequestRejected
from kowalski_node.capabilities import DeviceProfile
from kowalski_node.coordination.core import Coordinator, SubmitOutcome
from kowalski_node.coordination.effects import (
    AbortRun,
    ContinueRun,
    CoordEffect,
    LeaderChanged,
    SendMessage,
    StartRun,
    TaskCommitted,
    TaskFailed,
    TaskQueued,
)
from kowalski_node.coordination.messages import (
    MESSAGE_TAGS,
    Abandon,
    Offer,
    OfferReply,
    decode_coord_message,
)
from kowalski_node.coordination.spec import TaskSpec
from kowalski_node.errors import NoCapableDevice, NoQuorum, TaskError
from kowalski_node.glue import membership_to_coordinator, perform_coord_effect
from kowalski_node.membership import (
    LeaveComplete,
    MemberAlive,
    MemberDown,
    MembershipEvent,
    MemberSuspect,
    MemberUp,
)
from kowalski_node.placement.scheduler import Requirement
from kowalski_node.rlm.types import PROGRESS_KEYS, ProgressEvent
from kowalski_node.runtime.contexts import approx_size
from kowalski_node.runtime.payload import TaskPayload, decode_result, encode_result
from kowalski_node.runtime.ports import TaskMetadataStore
from kowalski_node.runtime.sender import PeerSender
from kowalski_node.runtime.service import (
    IdempotencyConflict,
    TaskAccepted,
    TaskHistoryEntry,
    TaskStatus,
    TaskSubmission,
    TaskView,
    prompt_preview,
)
from kowalski_node.tasks import TaskLedger, TaskRecord, TaskState
from kowalski_node.wire import WireError

if TYPE_CHECKING:
    from kowalski_node.runtime.node import Node

log = logging.getLogger("kowalski_node.runtime.tasks")

PROGRESS = "progress"
USAGE = "usage"
CANCEL_REQUEST = "cancel_request"
SUBMIT_FORWARD = "submit_forward"
EXTRA_TYPES = (PROGRESS, USAGE, CANCEL_REQUEST, SUBMIT_FORWARD)
FORWARD_TIMEOUT_S = 3.0
FORWARD_MAX_BYTES = 3 << 20  # one forward frame's items (frames are 4 MiB); contexts go as blobs
MAJORITY_WAIT_S = 3.0
KNOWN_MEMBERS_KEY = "coord.known_members"
EVENT_BUFFER = 256
SUBMIT_CHUNK = 32
PACE_ABOVE = 64  # batches larger than this are offered as room frees up
INFLIGHT_FACTOR = 4  # an owner's tasks being offered or run, per live peer, x max_runs
FEED_GROUP = 16
FEED_INTERVAL_S = 0.01
LEAD_CAPACITY_FACTOR = 2
_STATUS_OF = {
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


@dataclass
class _Run:
    """A run of one task this node leads at one epoch."""

    task_id: str
    epoch: int
    owner: str
    step: int
    acked: int
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    changed: trio.Event = field(default_factory=trio.Event)
    abort_reason: str = ""
    started: float = field(default_factory=time.monotonic)
    done: trio.Event = field(default_factory=trio.Event)
    """Set when the run has fully stopped (its REPL session closed)."""
    after: _Run | None = None
    """The aborted run of the same task this one replaces: it starts once that one is done,
    so the old run's cleanup never closes the session the new run opened (same id)."""


class TaskEngine:
    """The task side of a node (owner, leader, replica), over one durable ledger."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.me = node.peer_id
        # two ports of one database: the ledger's records, and the node's read model
        self.store: TaskMetadataStore = node.metadata
        self.ledger = TaskLedger(node.store, self.me, node.rng)
        self.coord = Coordinator(self.me, self.ledger, rng=node.rng, config=node.profile.coord)
        self.sender = PeerSender(node.transport, protocol_ids.TASK, queue_size=1 << 17)
        self._offset = 0.0
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._runs: dict[str, _Run] = {}
        self._subscribers: dict[str, list[trio.MemorySendChannel[ProgressEvent]]] = {}
        self._last_progress: dict[str, ProgressEvent] = {}
        self._counters = {name: self.store.get_int(name) for name in COUNTERS}
        self._run_slots = trio.Semaphore(node.profile.max_runs)
        self._backlog: deque[str] = deque()
        self._backlog_changed = trio.Event()
        self._accepting = 0
        self._known_saved: set[str] = set()
        self.coord.remember_peers(self._load_known())

    # ================================================================ clock, wiring

    def clock(self) -> float:
        return trio.current_time() + self._offset

    def install(self) -> None:
        self._offset = time.time() - trio.current_time()
        self.node.transport.register_handler(
            protocol_ids.TASK, self._on_request, types=(*MESSAGE_TAGS, *EXTRA_TYPES)
        )
        self.node.caps.on_change(self._on_profile)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self.sender.run)
            nursery.start_soon(self._feed)
            own = self.node.caps.own
            if own is not None:
                self.coord.update_profile(own)
            self.apply(self.coord.recover(self.clock()))
            try:
                await self._timer_loop()
            finally:
                self._nursery = None
                nursery.cancel_scope.cancel()

    async def _timer_loop(self) -> None:
        while True:
            deadline = self.coord.next_deadline()
            now = self.clock()
            if deadline > now:
                self._wake = trio.Event()
                limit = deadline - self._offset if math.isfinite(deadline) else None
                if limit is None:
                    await self._wake.wait()
                else:
                    with trio.move_on_at(limit):
                        await self._wake.wait()
                continue
            self.apply(self.coord.tick(self.clock()))

    @property
    def active_runs(self) -> int:
        """RLM runs this node is leading right now."""
        return len(self._runs)

    # ================================================================ membership / adverts

    def member_event(self, event: MembershipEvent) -> None:
        """Membership saw a change: the node's own bookkeeping, then the shared glue."""
        match event:
            case MemberUp():
                pass
            case MemberDown():
                self.sender.forget(event.peer)
            case MemberSuspect() | MemberAlive() | LeaveComplete():
                pass
            case _:
                assert_never(event)
        self.apply(
            membership_to_coordinator(self.coord, self.clock(), event, self.node.caps.table.get)
        )
        if isinstance(event, MemberUp) and event.peer not in self._known_saved:
            self._save_known()

    def _load_known(self) -> list[str]:
        """Members seen before a restart: a key's home set must not shrink because a dead
        member has not been heard of since."""
        raw = self.store.get_value(KNOWN_MEMBERS_KEY)
        try:
            peers = json.loads(raw) if raw else []
        except ValueError:
            peers = []
        known = [p for p in peers if isinstance(p, str)] if isinstance(peers, list) else []
        self._known_saved = set(known)
        return known

    def _save_known(self) -> None:
        known = sorted(set(self.coord.known_peers()) | self._known_saved)
        self._known_saved = set(known)
        self.store.set_value(KNOWN_MEMBERS_KEY, json.dumps(known))

    def _on_profile(self, profile: DeviceProfile) -> None:
        self.coord.update_profile(profile)

    # ================================================================ effects

    def apply(self, effects: list[CoordEffect]) -> None:
        for eff in effects:
            try:
                self._apply_one(eff)
            except Exception:
                log.exception("applying %s failed", type(eff).__name__)
        self._wake.set()

    def _apply_one(self, eff: CoordEffect) -> None:
        perform_coord_effect(self, eff)

    # the `glue.CoordDriver` methods: what this node does with each coordination effect

    def send_message(self, eff: SendMessage) -> None:
        msg = eff.message
        self.sender.send(eff.to, msg.TAG, msg.to_wire())

    def start_run(self, eff: StartRun) -> None:
        self._start_run(eff)

    def continue_run(self, eff: ContinueRun) -> None:
        run = self._runs.get(eff.task_id)
        if run is not None and run.epoch == eff.epoch:
            run.acked = max(run.acked, eff.step)
            led = self.coord.led(eff.task_id)
            if led is not None:  # a takeover may have kept this run under a new owner
                run.owner = led.owner
            run.changed.set()

    def abort_run(self, eff: AbortRun) -> None:
        run = self._runs.get(eff.task_id)
        if run is not None and run.epoch == eff.epoch:
            run.abort_reason = eff.reason
            run.scope.cancel()
        self._bump("runs_aborted_total")
        log.info("event=run_aborted task=%s epoch=%d reason=%r", eff.task_id, eff.epoch, eff.reason)

    def leader_changed(self, eff: LeaderChanged) -> None:
        self._leader_changed(eff)

    def task_queued(self, eff: TaskQueued) -> None:
        self._history(eff.task_id, self.me, "queued", None, eff.reason)
        self.store.update_info(eff.task_id, last_error=eff.reason)
        log.info("event=task_queued task=%s reason=%r", eff.task_id, eff.reason)

    def task_committed(self, eff: TaskCommitted) -> None:
        self._bump("commits_total")
        self._history(eff.task_id, eff.leader, "committed", eff.epoch)
        self.store.update_info(eff.task_id, finished_at=time.time())
        log.info(
            "event=task_committed task=%s epoch=%d leader=%s", eff.task_id, eff.epoch, eff.leader
        )
        self._finished(eff.task_id)

    def task_failed(self, eff: TaskFailed) -> None:
        self._history(eff.task_id, self.me, "failed", None, eff.reason)
        self.store.update_info(eff.task_id, finished_at=time.time(), last_error=eff.reason)
        log.info("event=task_failed task=%s reason=%r", eff.task_id, eff.reason)
        self._finished(eff.task_id)

    def _bump(self, name: str, delta: int = 1) -> None:
        self._counters[name] = self.store.add_int(name, delta)

    def _history(
        self, task_id: str, peer: str, action: str, epoch: int | None, detail: str = ""
    ) -> None:
        self.store.add_history(task_id, time.time(), peer, action, epoch, detail)

    def _leader_changed(self, eff: LeaderChanged) -> None:
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
            self._bump("failovers_total")
            self._history(
                eff.task_id,
                eff.leader,
                "failover",
                eff.epoch,
                f"resumes after step {eff.resume_step}",
            )
        self.store.update_info(eff.task_id, **changes)
        self._history(eff.task_id, eff.leader, "leased", eff.epoch)
        log.info(
            "event=leader_changed task=%s epoch=%d leader=%s resume_step=%d failover=%s",
            eff.task_id,
            eff.epoch,
            eff.leader,
            eff.resume_step,
            eff.failover,
        )

    def _finished(self, task_id: str) -> None:
        for channel in self._subscribers.pop(task_id, []):
            channel.close()

    # ================================================================ messages

    async def _on_request(self, req: Request) -> Any:
        if req.type == PROGRESS:
            self._on_progress(req.peer_id, req.payload)
            return None
        if req.type == USAGE:
            self._on_usage(req.peer_id, req.payload)
            return None
        if req.type == CANCEL_REQUEST:
            return await self._on_cancel_request(req.peer_id, req.payload)
        if req.type == SUBMIT_FORWARD:
            return await self._on_submit_forward(req.peer_id, req.payload)
        try:
            msg = decode_coord_message(req.payload)
        except WireError as exc:
            raise RequestRejected("bad_message", str(exc)) from None
        if isinstance(msg, Offer):
            why = self._refuse_offer(msg)
            if why:
                # the owner excludes us and tries its next candidate (or queues the task)
                reply = OfferReply(msg.task_id, msg.epoch, False, 0, why)
                self.sender.send(req.peer_id, reply.TAG, reply.to_wire())
                return None
        self.apply(self.coord.handle(self.clock(), req.peer_id, msg))
        return None

    def _refuse_offer(self, msg: Offer) -> str:
        """Why we decline to lead (draining, or already leading our capacity), else ''.

        Every led task costs lease heartbeats and bookkeeping even while it waits for a
        run slot, so a leader with `LEAD_CAPACITY_FACTOR` x `max_runs` runs started or
        waiting declines more (tasks only waiting for their commit reply do not count): the work stays durably queued at its owner (backpressure) instead of piling
        up here until this node is too busy to answer membership probes.
        """
        if self.node.draining:
            return "this peer is shutting down"
        if self.coord.led(msg.task_id) is not None:
            return ""
        capacity = self.node.profile.max_runs * LEAD_CAPACITY_FACTOR
        if len(self._runs) >= capacity:
            return f"this peer already runs or queues {capacity} tasks"
        return ""

    def _on_progress(self, src: str, payload: Any) -> None:
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

    def _on_usage(self, src: str, payload: Any) -> None:
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

    async def _on_cancel_request(self, src: str, payload: Any) -> Any:
        task_id = payload.get("task_id") if isinstance(payload, dict) else None
        if not isinstance(task_id, str):
            raise RequestRejected("bad_message", "cancel_request needs a task_id")
        rec = self.ledger.get(task_id)
        if rec is None or rec.submitter != self.me:
            raise RequestRejected("unknown_task", f"{self.me} does not own task {task_id}")
        self._cancel_owned(task_id, src)
        after = self.ledger.get(task_id)
        return {"state": after.state.value if after else "unknown"}

    # ================================================================ leading a run

    def _start_run(self, eff: StartRun) -> None:
        old = self._runs.get(eff.task_id)
        if old is not None:
            old.abort_reason = f"replaced by epoch {eff.epoch}"
            old.scope.cancel()
        if self._nursery is None:
            return
        led = self.coord.led(eff.task_id)
        owner = led.owner if led is not None else ""
        run = _Run(eff.task_id, eff.epoch, owner, eff.resume_step, eff.resume_step)
        run.after = old
        self._runs[eff.task_id] = run
        self._bump("executions_total")
        log.info(
            "event=run_started task=%s epoch=%d owner=%s resume_step=%d",
            eff.task_id,
            eff.epoch,
            owner,
            eff.resume_step,
        )
        self._nursery.start_soon(self._run_task, run, eff)

    async def _run_task(self, run: _Run, eff: StartRun) -> None:
        from kowalski_node.results import ExecutionResult
        from kowalski_node.runtime.rlm_runner import run_rlm

        env = self.node.execution
        outcome: tuple[str, Any] | None = None
        slot = False
        with run.scope:
            try:
                if run.after is not None:
                    await run.after.done.wait()
                    run.after = None
                payload = TaskPayload.decode(eff.payload)
                context = await self.node.contexts.resolve(payload, run.owner)  # maybe fetched
                snapshot = (
                    msgpack.unpackb(eff.snapshot, raw=False, strict_map_key=False)
                    if eff.snapshot
                    else None
                )
                await self._run_slots.acquire()
                slot = True
                backends = env.backends()
                config = env.rlm_config(payload)

                async def on_checkpoint(snap: dict[str, Any]) -> None:
                    await self._checkpoint(run, snap)

                result = await run_rlm(
                    payload.prompt,
                    context,
                    root=backends.root,
                    sub=self.node.remote.fanout(backends.sub)
                    if self.node.remote is not None
                    else backends.sub,
                    repl=env.repl,
                    config=config,
                    task_id=eff.task_id,
                    on_progress=lambda ev: self._progress_out(run, ev.to_dict()),
                    trajectory_dir=self.node.settings.paths.trajectories_dir,
                    resume=snapshot,
                    on_checkpoint=on_checkpoint,
                )
                if result.sub_calls and not env.usage(eff.task_id).get("subcall_peers"):
                    env.record_usage(eff.task_id, "subcall_peers", self.me)
                data = ExecutionResult.from_dict(result.to_dict(), executed_on="network").to_dict()
                outcome = ("ok", data)
            except (WireError, ValueError, TaskError) as exc:
                outcome = ("failed", f"{type(exc).__name__}: {exc}")
            except Exception as exc:  # noqa: BLE001 - the task failed (model unreachable, sandbox error, ...)
                log.warning("event=run_failed task=%s error=%r", eff.task_id, str(exc)[:300])
                outcome = ("failed", f"{type(exc).__name__}: {exc}")
            finally:
                if slot:
                    self._run_slots.release()
        run.done.set()
        if self._runs.get(run.task_id) is run:
            del self._runs[run.task_id]
        if run.scope.cancelled_caught or outcome is None:
            log.info(
                "event=run_stopped task=%s epoch=%d reason=%r",
                run.task_id,
                run.epoch,
                run.abort_reason or "cancelled",
            )
            return
        self._send_usage(run)
        now = self.clock()
        kind, value = outcome
        if kind == "ok" and isinstance(value, dict):
            self.apply(self.coord.run_finished(now, run.task_id, run.epoch, encode_result(value)))
        else:
            self.apply(self.coord.run_failed(now, run.task_id, run.epoch, str(value)))

    async def _checkpoint(self, run: _Run, snap: dict[str, Any]) -> None:
        """After each step: checkpoint through the core, wait until it is acknowledged."""
        run.step += 1
        packed: bytes = msgpack.packb(snap, use_bin_type=True)
        self.apply(self.coord.step_finished(self.clock(), run.task_id, run.epoch, run.step, packed))
        if self.coord.led(run.task_id) is None and run.acked < run.step:
            run.abort_reason = run.abort_reason or "the core no longer leads this task"
            run.scope.cancel()
        while run.acked < run.step:
            run.changed = trio.Event()
            await run.changed.wait()

    def _progress_out(self, run: _Run, event: dict[str, Any]) -> None:
        usage = self.node.execution.usage(run.task_id)
        peers = {self.me, *usage.get("repl_peers", ()), *usage.get("subcall_peers", ())}
        payload = {k: v for k, v in event.items() if k in PROGRESS_KEYS}
        payload.update(
            task_id=run.task_id, active_devices=len(peers), peer=self.me, epoch=run.epoch
        )
        if run.owner == self.me:
            self._on_progress(self.me, payload)
        elif run.owner:
            self.sender.send(run.owner, PROGRESS, payload)

    def _send_usage(self, run: _Run) -> None:
        usage = self.node.execution.usage(run.task_id)
        payload = {
            "task_id": run.task_id,
            "repl_peers": sorted(usage.get("repl_peers", ())),
            "subcall_peers": sorted(usage.get("subcall_peers", ())),
        }
        if run.owner == self.me:
            self._on_usage(self.me, payload)
        elif run.owner:
            self.sender.send(run.owner, USAGE, payload)
        self.node.execution.forget_usage(run.task_id)

    # ================================================================ owner API

    async def submit_many(
        self,
        subs: list[TaskSubmission],
        *,
        forwarded: bool = False,
        payloads: list[TaskPayload | None] | None = None,
        hop: int = 1,
    ) -> list[TaskAccepted]:
        """Store durably (one transaction per chunk), then offer; answers in order.

        Keyed submissions whose home acceptor set excludes this node are forwarded to it
        (unless ``forwarded``: we are that home; ``payloads`` then holds, per item, the
        forwarder's payload of a large context, already a verified local blob). Large batches are written in chunks
        with a yield to the event loop in between, so membership keeps answering probes
        while thousands of tasks are accepted. A crash mid-batch leaves a prefix
        accepted; the client's retry with the same keys is idempotent.
        """
        if self.node.draining:
            raise TaskError(f"node {self.me} is shutting down and accepts no new tasks")
        if not forwarded:
            routes = [self._route(sub, sub.dedup_key) for sub in subs]
            if any(routes):
                return await self._submit_routed(subs, routes, hop)
        prepared = await self.node.contexts.prepare(subs)  # large contexts → files, off-loop
        if payloads is not None:
            prepared = [
                (s, p if given is None else given, k)
                for (s, p, k), given in zip(prepared, payloads, strict=True)
            ]
        self._check_conflicts(prepared)
        await self.node.contexts.replicate(prepared)  # ... copied to replicas before the ack
        answers: list[TaskAccepted] = []
        failed_now: dict[str, str] = {}
        started = time.perf_counter()
        busy = 0.0
        self._accepting += 1  # the feeder holds back offers until the batch is answered
        try:
            for start in range(0, len(prepared), SUBMIT_CHUNK):
                if start:
                    await trio.lowlevel.checkpoint()
                chunk = prepared[start : start + SUBMIT_CHUNK]
                t0 = time.perf_counter()
                answers.extend(self._submit_chunk(chunk, failed_now, len(prepared) > PACE_ABOVE))
                busy += time.perf_counter() - t0
        finally:
            self._accepting -= 1
        if len(prepared) > 1:
            log.info(
                "event=batch_accepted tasks=%d took_ms=%.1f busy_ms=%.1f",
                len(prepared),
                (time.perf_counter() - started) * 1000,
                busy * 1000,
            )
        if len(subs) == 1 and failed_now:
            ((task_id, reason),) = failed_now.items()
            raise NoCapableDevice(f"task {task_id}: {reason}")
        await self._await_majority(answers, single=len(subs) == 1)
        return answers

    # ---------------------------------------------------------------- cluster-wide keys

    def _route(self, sub: TaskSubmission, key: str | None) -> list[str]:
        """Where a keyed submission must go: [] = here, else the live home members in order.

        A key we hold a finished copy of, or own, is answered here. A copy of an unfinished
        task owned elsewhere may be stale (an old leader is not sent the commit), so the
        current owner and the acceptors are asked first.
        """
        if key is None:
            return []
        known = self.ledger.find(key)
        if known is not None:
            if known.terminal or known.submitter == self.me or not known.acceptors:
                return []
            live = set(self.coord.live_peers())
            ask = [known.submitter, *(a for a in known.acceptors if a != known.submitter)]
            return [p for p in ask if p != self.me and p in live]
        home = self.coord.home_of(key)
        if not home or self.me in home:
            return []
        live = set(self.coord.live_peers())
        return [p for p in home if p in live] or list(home)

    async def _submit_routed(
        self, subs: list[TaskSubmission], routes: list[list[str]], hop: int = 1
    ) -> list[TaskAccepted]:
        """Submit the local items here and forward the others to their homes, in order."""
        answers: list[TaskAccepted | None] = [None] * len(subs)
        local = [i for i, r in enumerate(routes) if not r]
        if local:
            got = await self.submit_many([subs[i] for i in local], forwarded=True)
            for i, acc in zip(local, got, strict=True):
                answers[i] = acc
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, r in enumerate(routes):
            if r:
                groups.setdefault(tuple(r), []).append(i)
        for targets, idx in groups.items():
            items = [subs[i] for i in idx]
            try:
                got_remote = await self._forward(items, targets, hop)
            except NoQuorum:
                if not all(s.dedup_key and self.ledger.find(s.dedup_key) for s in items):
                    raise
                got_remote = await self.submit_many(items, forwarded=True)  # our copy, then
            for i, acc in zip(idx, got_remote, strict=True):
                answers[i] = acc
        return [a for a in answers if a is not None]

    async def _forward(
        self, subs: list[TaskSubmission], targets: tuple[str, ...], hop: int = 1
    ) -> list[TaskAccepted]:
        """Forward `subs` in frames of at most `FORWARD_MAX_BYTES` (answers in order)."""
        out: list[TaskAccepted] = []
        frame: list[TaskSubmission] = []
        size = 0
        for sub in subs:
            item = len(sub.prompt) + approx_size(sub.context, FORWARD_MAX_BYTES)
            if frame and size + item > FORWARD_MAX_BYTES:
                out.extend(await self._forward_frame(frame, targets, hop))
                frame, size = [], 0
            frame.append(sub)
            size += item
        if frame:
            out.extend(await self._forward_frame(frame, targets, hop))
        return out

    async def _forward_frame(
        self, subs: list[TaskSubmission], targets: tuple[str, ...], hop: int
    ) -> list[TaskAccepted]:
        """One `submit_forward` request. A large context is not sent inline: it is stored
        here as a blob and the item carries its encoded payload (`ContextRef` + the
        fingerprint of the whole submission); the home fetches the verified blob from us.
        So a submission of any size reaches its key's home, and one key stays one task."""
        contexts = self.node.contexts
        items: list[dict[str, Any]] = []
        encoded: list[bytes | None] = []
        timeout = FORWARD_TIMEOUT_S
        for sub in subs:
            if not contexts.needs_blob(sub):
                items.append(sub.model_dump(mode="json", exclude_none=True))
                encoded.append(None)
                continue
            ((_s, payload, _k),) = await contexts.prepare([sub])  # file + ref, off the loop
            items.append(
                sub.model_dump(
                    mode="json", exclude_none=True, exclude={"context", "context_encoding"}
                )
            )
            encoded.append(payload.encode())
            if payload.context_ref is not None:  # fetched by the home, then copied on
                timeout += 2 * contexts.transfer_timeout(payload.context_ref)
        body: dict[str, Any] = {"subs": items, "hop": hop}
        if any(e is not None for e in encoded):
            body["payloads"] = encoded
        errors: list[str] = []
        for peer in targets:
            try:
                reply = await self.node.transport.request(
                    peer, protocol_ids.TASK, SUBMIT_FORWARD, body, timeout=timeout
                )
            except Exception as exc:  # noqa: BLE001 - any failure of this hop: classified below, then the next home
                code = getattr(exc, "code", "")
                message = getattr(exc, "remote_message", str(exc))
                if code == "no_capable_device":
                    raise NoCapableDevice(message) from None
                if code == "task_rejected":
                    raise TaskError(message) from None
                errors.append(f"{peer}: {message or type(exc).__name__}")
                continue
            answered = reply.get("accepted") if isinstance(reply, dict) else None
            if not isinstance(answered, list) or len(answered) != len(subs):
                errors.append(f"{peer}: malformed answer")
                continue
            log.info("event=submission_forwarded tasks=%d home=%s", len(subs), peer)
            return [TaskAccepted.model_validate(a) for a in answered]
        raise NoQuorum(
            f"the home of this idempotency key ({', '.join(targets)}) did not accept it: "
            f"{'; '.join(errors)[:400]}; nothing was stored, retry the same key"
        )

    async def _on_submit_forward(self, src: str, payload: Any) -> Any:
        """A peer forwards keyed submissions whose home we are: accept them as our own."""
        items = payload.get("subs") if isinstance(payload, dict) else None
        if not isinstance(items, list) or not items:
            raise RequestRejected("bad_message", "submit_forward needs a non-empty 'subs' list")
        try:
            subs = [TaskSubmission.model_validate(d) for d in items]
            payloads = self._forwarded_payloads(payload.get("payloads"), subs)
        except ValueError as exc:
            raise RequestRejected("bad_message", f"submit_forward: {exc}") from None
        try:
            for given in payloads or ():
                if given is not None and given.context_ref is not None:
                    await self.node.contexts.ensure(given.context_ref, src)  # verified blob
            # A home member holding only a copy of an unfinished task owned elsewhere (it
            # missed the commit while down) must not answer from it: it routes the item on
            # once more, to the owner and the acceptors (`hop` bounds the chain).
            hop = payload.get("hop", 1)
            again = payloads is None and isinstance(hop, int) and hop < 2
            answers = await self.submit_many(
                subs, forwarded=not again, payloads=payloads, hop=2 if again else 1
            )
        except NoQuorum as exc:
            raise RequestRejected("no_quorum", str(exc)) from None
        except NoCapableDevice as exc:
            raise RequestRejected("no_capable_device", str(exc)) from None
        except TaskError as exc:
            raise RequestRejected("task_rejected", str(exc)) from None
        return {"accepted": [a.model_dump(mode="json") for a in answers]}

    @staticmethod
    def _forwarded_payloads(
        raw: Any, subs: list[TaskSubmission]
    ) -> list[TaskPayload | None] | None:
        """The forwarder's payloads of large-context items (`None` for inline items).

        Such an item's submission carries no context; its payload must match it (prompt,
        alias) and reference the context by hash. Raises ValueError (WireError) if not."""
        if raw is None:
            return None
        if not isinstance(raw, list) or len(raw) != len(subs):
            raise ValueError("'payloads' must be a list as long as 'subs'")
        out: list[TaskPayload | None] = []
        for sub, data in zip(subs, raw, strict=True):
            if data is None:
                out.append(None)
                continue
            if not isinstance(data, bytes):
                raise ValueError("a forwarded payload must be bytes")
            given = TaskPayload.decode(data)
            if given.context_ref is None or not given.fingerprint:
                raise ValueError("a forwarded payload must reference its context and fingerprint")
            if sub.context is not None or given.prompt != sub.prompt or given.alias != sub.task_id:
                raise ValueError("a forwarded payload does not match its submission")
            out.append(given)
        return out

    async def _await_majority(self, answers: list[TaskAccepted], *, single: bool) -> None:
        """Answer only once new tasks are stored on a majority of their acceptors, so an
        owner that dies right after answering loses nothing; if that does not happen in
        time the client is told to retry (a retry of the key is safe anywhere)."""
        pending = [
            real
            for a in answers
            if a.created and (real := self.store.resolve_alias(a.task_id) or a.task_id)
        ]
        deadline = trio.current_time() + MAJORITY_WAIT_S
        while pending and trio.current_time() < deadline:
            pending = [t for t in pending if not self.coord.stored_on_majority(t)]
            if pending:
                await trio.sleep(0.01)
        if pending and single:
            raise NoQuorum(
                f"task {pending[0]} is stored at {self.me} but not yet on a majority of its "
                "acceptors; retry the same key (here or at another node)"
            )

    def _submit_chunk(
        self,
        chunk: list[tuple[TaskSubmission, TaskPayload, str | None]],
        failed_now: dict[str, str],
        paced: bool,
    ) -> list[TaskAccepted]:
        now = self.clock()
        wall = time.time()
        effects: list[CoordEffect] = []
        infos: list[tuple[str, dict[str, Any]]] = []
        made: list[tuple[TaskSubmission, SubmitOutcome]] = []
        with self.store.batch():
            for sub, payload, key in chunk:
                if paced and sub.model is None:
                    outcome, effs = self._submit_paced(now, payload, key)
                else:
                    outcome, effs = self.coord.submit(
                        now, payload.encode(), idempotency_key=key, requirement=_requirement(sub)
                    )
                effects.extend(effs)
                for eff in effs:
                    if isinstance(eff, TaskFailed) and eff.task_id == outcome.task_id:
                        failed_now[outcome.task_id] = eff.reason
                if outcome.created:
                    infos.append(
                        (
                            outcome.task_id,
                            {
                                "owner": self.me,
                                "preview": prompt_preview(sub.prompt),
                                "priority": sub.priority,
                                "created_wall": wall,
                                "alias": sub.task_id,
                            },
                        )
                    )
                made.append((sub, outcome))
            self.store.put_infos(infos)
            self.store.put_aliases(
                (sub.task_id, o.task_id) for sub, o in made if o.created and sub.task_id
            )
        self.apply(effects)
        return [self._accepted(sub, outcome, failed_now) for sub, outcome in made]

    def _submit_paced(
        self, now: float, payload: TaskPayload, key: str | None
    ) -> tuple[SubmitOutcome, list[CoordEffect]]:
        """Store the task durably now; offer it when the cluster has room (big batches).

        Acceptance is one ledger write per task. The task then waits in `_backlog` and
        `_feed` hands it to the core's submit queue while fewer than `max_runs` x
        `INFLIGHT_FACTOR` x live peers of this owner's tasks are being offered or run, so a burst of
        thousands of tasks never floods the leaders, or this node's own event loop, which
        must keep answering membership probes. A restart loses nothing: `recover()`
        offers every unfinished owned task again. Only tasks without a model requirement
        take this path: any live peer, this one included, can lead them, so they can
        never be impossible (those with a requirement go through `Coordinator.submit`,
        which reports a missing capability at once).
        """
        spec = TaskSpec(payload.encode())
        if key is None:
            key = f"auto-{self.me}-{self.node.rng.getrandbits(128):032x}"
        res = self.ledger.submit(
            now,
            spec.encode(),
            submitter=self.me,
            idempotency_key=key,
            acceptors=self.coord.home_of(key),
        )
        rec = res.record
        effects: list[CoordEffect] = []
        if res.created:
            self._backlog.append(rec.task_id)
            self._backlog_changed.set()
            effects = self.coord.submit_created(now, rec.task_id)
        return SubmitOutcome(rec.task_id, res.created, rec, res.payload_matches), effects

    async def _feed(self) -> None:
        """Release backlog tasks to the core as in-flight work completes."""
        while True:
            if not self._backlog:
                self._backlog_changed = trio.Event()
                await self._backlog_changed.wait()
                continue
            per_peer = self.node.profile.max_runs * INFLIGHT_FACTOR
            room = per_peer * max(1, len(self.coord.live_peers()))
            room -= len(self.coord.owned_tasks())
            if room > 0 and not self._accepting:
                now = self.clock()
                with self.store.batch():
                    for _ in range(min(room, len(self._backlog), FEED_GROUP)):
                        self.coord.queue.enqueue(now, self._backlog.popleft())
                self._wake.set()
            await trio.sleep(FEED_INTERVAL_S)

    def _check_conflicts(
        self, prepared: list[tuple[TaskSubmission, TaskPayload, str | None]]
    ) -> None:
        """Refuse the whole batch before writing anything if a key names a different task."""
        seen: dict[str, str] = {}
        for sub, payload, key in prepared:
            if key is None:
                continue
            if key in seen and seen[key] != payload.fingerprint:
                raise IdempotencyConflict(key, "(earlier in this batch)")
            seen[key] = payload.fingerprint
            existing = self.ledger.find(key)
            if existing is not None and _fingerprint(existing) != payload.fingerprint:
                raise IdempotencyConflict(key, self._public_id(existing.task_id))
            if sub.task_id:
                mapped = self.store.resolve_alias(sub.task_id)
                if mapped is not None and (existing is None or existing.task_id != mapped):
                    raise IdempotencyConflict(key, sub.task_id)

    def _accepted(
        self, sub: TaskSubmission, outcome: SubmitOutcome, failed_now: dict[str, str]
    ) -> TaskAccepted:
        """The answer for one item, from what the core returned (no extra reads for new tasks)."""
        task_id = outcome.task_id
        if outcome.created:
            rec = outcome.record
            public = sub.task_id or task_id
        else:
            rec = self.ledger.get(task_id) or outcome.record
            public = self._public_id(task_id)
        if task_id in failed_now:
            status = TaskStatus.FAILED
        elif outcome.created:
            status = _STATUS_OF[rec.state]
        else:
            status = self._status(rec)
        acc = TaskAccepted(
            task_id=public,
            status=status,
            created=outcome.created,
            idempotency_key=sub.idempotency_key,
            owner=rec.submitter,
            leader=rec.leader or None,
        )
        if rec.state is TaskState.COMMITTED:
            acc.result = decode_result(rec.result, public)
        error = failed_now.get(task_id) or rec.error
        if error:
            acc.error = error
        return acc

    async def cancel(self, task_id: str) -> TaskView | None:
        rec = self._record(task_id)
        if rec is None:
            return None
        if not rec.terminal:
            if rec.submitter == self.me:
                self._cancel_owned(rec.task_id, self.me)
            else:
                self.store.update_info(rec.task_id, cancel_requested=True)
                try:
                    await self.node.transport.request(
                        rec.submitter,
                        protocol_ids.TASK,
                        CANCEL_REQUEST,
                        {"task_id": rec.task_id},
                        timeout=3.0,
                    )
                except Exception as exc:  # noqa: BLE001 - the owner is unreachable, whatever the transport raised
                    raise TaskError(
                        f"task {task_id} is owned by {rec.submitter}, which could not be reached "
                        f"to cancel it: {exc}"
                    ) from None
        return self.view(task_id)

    def _cancel_owned(self, task_id: str, by: str) -> None:
        self._history(task_id, by, "cancel_requested", None)
        self.apply(self.coord.cancel(self.clock(), task_id))
        rec = self.ledger.get(task_id)
        if rec is not None and rec.state is TaskState.CANCELLED:
            self._finished(task_id)

    # ================================================================ views

    def _record(self, task_id: str) -> TaskRecord | None:
        real = self.store.resolve_alias(task_id) or task_id
        return self.ledger.get(real)

    def _public_id(self, task_id: str) -> str:
        alias = self.store.get_info(task_id).get("alias")
        return alias if isinstance(alias, str) and alias else task_id

    def _status(self, rec: TaskRecord) -> TaskStatus:
        status = _STATUS_OF[rec.state]
        if status is TaskStatus.DONE and rec.result is not None:
            result = decode_result(rec.result, rec.task_id)
            if result is not None and result.error and result.stop_reason == "error":
                return TaskStatus.FAILED
        if not status.final and self.store.get_info(rec.task_id).get("cancel_requested"):
            return TaskStatus.CANCELLING
        return status

    def view(self, task_id: str, *, full: bool = True) -> TaskView | None:
        rec = self._record(task_id)
        return None if rec is None else self._view(rec, full=full)

    def _view(self, rec: TaskRecord, *, full: bool) -> TaskView:
        info = self.store.get_info(rec.task_id)
        public = self._public_id(rec.task_id)
        status = self._status(rec)
        progress = self._last_progress.get(rec.task_id)
        replicas = info.get("replicas") or []
        o = self.coord.owned(rec.task_id)
        if o is not None:
            replicas = list(o.replicas)
        preview = info.get("preview") or ""
        max_iter = 0
        if not preview or not max_iter:
            try:
                payload = TaskPayload.decode(_payload_of(rec))
                preview = preview or prompt_preview(payload.prompt)
                max_iter = int((payload.rlm or {}).get("max_iterations") or 0)
            except (WireError, ValueError):
                pass
        if not max_iter:
            max_iter = self.node.settings.rlm.max_iterations
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
            states = [s.value for s, st in _STATUS_OF.items() if st is status]
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
            key = _STATUS_OF[TaskState(state)].value
            out[key] = out.get(key, 0) + n
        return out

    def counters(self) -> dict[str, int]:
        out = dict(self._counters)
        out["queue_depth"] = len(self.coord.queue) + len(self._backlog)
        st = self.coord.stats
        out["stale_rejections_total"] = out.get("stale_rejections_total", 0) + int(
            getattr(st, "fenced_checkpoints", 0)
            + getattr(st, "fenced_commits", 0)
            + getattr(st, "duplicate_commits_refused", 0)
        )
        return out

    def active_by_peer(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for task_id in self.coord.owned_tasks():
            o = self.coord.owned(task_id)
            if o is not None and o.leader:
                out[o.leader] = out.get(o.leader, 0) + 1
        out[self.me] = max(out.get(self.me, 0), len(self._runs))
        return out

    async def events(self, task_id: str) -> AsyncIterator[ProgressEvent]:
        rec = self._record(task_id)
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
                        yield replace(event, task_id=self._public_id(real))
                        continue
                    current = self.ledger.get(real)
                    if current is None or current.terminal:
                        return
        finally:
            subs = self._subscribers.get(real)
            if subs is not None and send in subs:
                subs.remove(send)
            send.close()

    # ================================================================ drain

    async def drain(self) -> None:
        """Hand over what we lead for others, then wait for the tasks we own to finish."""
        for task_id, run in list(self._runs.items()):
            if run.owner and run.owner != self.me:
                run.abort_reason = "draining: handed over"
                run.scope.cancel()
                led = self.coord.led(task_id)
                msg = Abandon(task_id, led.epoch if led is not None else run.epoch)
                self.sender.send(run.owner, msg.TAG, msg.to_wire())
                self._runs.pop(task_id, None)
                log.info(
                    "event=run_handed_over task=%s epoch=%d owner=%s", task_id, run.epoch, run.owner
                )
        while self.coord.owned_tasks() or self._backlog:  # noqa: ASYNC110 - both change in many places; a 50 ms check while draining
            await trio.sleep(0.05)
        # give queued messages (commit replies, abandons) a moment to leave
        await trio.sleep(0.1)


def _requirement(sub: TaskSubmission) -> Requirement | None:
    return Requirement(model=sub.model) if sub.model else None


def _payload_of(rec: TaskRecord) -> bytes:
    from kowalski_node.coordination.spec import TaskSpec

    try:
        return TaskSpec.decode(rec.payload).payload
    except ValueError:
        return rec.payload


def _fingerprint(rec: TaskRecord) -> str:
    try:
        return TaskPayload.decode(_payload_of(rec)).fingerprint
    except (WireError, ValueError):
        return ""
