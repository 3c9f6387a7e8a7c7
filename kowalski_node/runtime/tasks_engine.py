"""Tasks on a node: the driver of the coordination core.

One `Coordinator` (pure) per node plays owner, leader and replica for different tasks.
`TaskEngine` owns it, runs its timers, hands it membership events and received messages,
and performs its effects through the shared glue: first the ledger writes the core
returns (`glue.perform_ledger_writes`, on `SqliteLedgerStore` in one transaction per
core call), then the rest (`glue.perform_coord_effect`), so a message that reflects a
write leaves only once the write is durable. The core's ledger state lives in its memory,
loaded once from SQLite here (`LedgerStore.load`); the core never calls storage. The
rest of the task side lives in three parts, each with only what it needs:

* `leader_runs.LeaderRuns`: the RLM runs this node leads (`StartRun`, `ContinueRun`,
  `AbortRun`, checkpoints, hand-over on drain);
* `task_intake.SubmissionIntake`: submissions as their owner, forwarding a keyed one to
  its key's home, paced offering of big batches, cancel;
* `task_views.TaskViews`: the read model users see over HTTP (views, lists, counters,
  progress streams), fed by `LeaderChanged`, `TaskQueued`, `TaskCommitted`, `TaskFailed`.

Messages on `/kowalski/task/1.0.0`: the core's own (type = the message tag, ordered per
peer by `PeerSender`), plus `progress` and `usage` (leader → owner), `cancel_request`
(a non-owner forwards a cancel) and `submit_forward` (a keyed submission handed to the
key's home).

Time: the core gets `clock()` = trio's clock shifted to wall time at start, so records
carry meaningful timestamps while timers stay monotonic (and MockClock still drives
tests).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, assert_never

import trio

from kowalski_node.adapters.libp2p import protocol_ids
from kowalski_node.adapters.libp2p.api import Request, TransportPort
from kowalski_node.adapters.libp2p.errors import RequestRejected
from kowalski_node.capabilities import DeviceProfile
from kowalski_node.coordination.config import CoordConfig
from kowalski_node.coordination.core import Coordinator
from kowalski_node.coordination.effects import (
    AbortRun,
    ContinueRun,
    CoordAction,
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
    Offer,
    OfferReply,
    decode_coord_message,
)
from kowalski_node.glue import (
    membership_to_coordinator,
    perform_coord_effect,
    perform_ledger_writes,
)
from kowalski_node.membership import (
    LeaveComplete,
    MemberAlive,
    MemberDown,
    MembershipEvent,
    MemberSuspect,
    MemberUp,
)
from kowalski_node.rlm.types import ProgressEvent
from kowalski_node.runtime.contexts import ContextStore
from kowalski_node.runtime.core_timer import CoreTimer
from kowalski_node.runtime.execution import ExecutionEnv
from kowalski_node.runtime.leader_runs import PROGRESS, USAGE, LeaderRuns
from kowalski_node.runtime.ports import AdvertView, TaskMetadataStore
from kowalski_node.runtime.sender import PeerSender
from kowalski_node.runtime.service import TaskAccepted, TaskStatus, TaskSubmission, TaskView
from kowalski_node.runtime.task_intake import CANCEL_REQUEST, SUBMIT_FORWARD, SubmissionIntake
from kowalski_node.runtime.task_views import TaskViews
from kowalski_node.tasks import LedgerState, LedgerStore, TaskLedger
from kowalski_node.wire import WireError

log = logging.getLogger("kowalski_node.runtime.tasks")

EXTRA_TYPES = (PROGRESS, USAGE, CANCEL_REQUEST, SUBMIT_FORWARD)
KNOWN_MEMBERS_KEY = "coord.known_members"


class TaskEngine:
    """The task side of a node (owner, leader, replica), over one durable ledger."""

    def __init__(
        self,
        me: str,
        *,
        ledger_store: LedgerStore,
        metadata: TaskMetadataStore,
        transport: TransportPort,
        adverts: AdvertView,
        execution: ExecutionEnv,
        contexts: ContextStore,
        coord_config: CoordConfig,
        max_runs: int,
        default_max_iterations: int,
        trajectories_dir: Path | None,
        rng: random.Random,
        draining: Callable[[], bool],
    ) -> None:
        """`ledger_store` and `metadata` must be one database: `metadata.batch()` groups
        an accepted task's ledger writes with its metadata in one transaction (the node
        passes one `SqliteLedgerStore` as both). The ledger is read from it once, here."""
        self.me = me
        self.transport = transport
        self.adverts = adverts
        self.draining = draining
        self.store = metadata
        self.ledger_store = ledger_store
        self.ledger = TaskLedger(LedgerState(ledger_store.load()), me, rng)
        self.coord = Coordinator(me, self.ledger, rng=rng, config=coord_config)
        self.sender = PeerSender(transport, protocol_ids.TASK, queue_size=1 << 17)
        self._offset = 0.0
        self.timer = self._new_timer()
        self.views = TaskViews(
            me, self.ledger, self.coord, metadata, default_max_iterations=default_max_iterations
        )
        self.runs = LeaderRuns(
            me,
            self.coord,
            self,
            self.sender,
            self.views,
            execution=execution,
            contexts=contexts,
            max_runs=max_runs,
            trajectories_dir=trajectories_dir,
        )
        self.intake = SubmissionIntake(
            me,
            self.coord,
            self.ledger,
            self,
            metadata,
            self.views,
            transport=transport,
            contexts=contexts,
            rng=rng,
            max_runs=max_runs,
            draining=draining,
        )
        self._known_saved: set[str] = set()
        self.coord.remember_peers(self._load_known())

    # ================================================================ clock, wiring

    def clock(self) -> float:
        return trio.current_time() + self._offset

    def wake(self) -> None:
        self.timer.wake()

    def _new_timer(self) -> CoreTimer:
        return CoreTimer(
            self.coord.next_deadline,
            lambda now: self.apply(self.coord.tick(now)),
            offset=self._offset,
        )

    def install(self) -> None:
        self._offset = time.time() - trio.current_time()
        self.timer = self._new_timer()  # the core's clock is wall time from here on
        self.transport.register_handler(
            protocol_ids.TASK, self._on_request, types=(*MESSAGE_TAGS, *EXTRA_TYPES)
        )
        self.adverts.on_change(self._on_profile)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.runs.nursery = nursery
            nursery.start_soon(self.sender.run)
            nursery.start_soon(self.intake.feed)
            own = self.adverts.own
            if own is not None:
                self.coord.update_profile(own)
            self.apply(self.coord.recover(self.clock()))
            try:
                await self.timer.run()
            finally:
                self.runs.nursery = None
                nursery.cancel_scope.cancel()

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
            membership_to_coordinator(self.coord, self.clock(), event, self.adverts.profile_of)
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

    def write_ledger(self, effects: Sequence[CoordEffect]) -> list[CoordAction]:
        """Make the ledger writes among `effects` durable now, in one transaction (inside
        an open `metadata.batch()`, that one); returns the other effects, for `apply`.
        If SQLite fails, this raises and nothing else of these effects is performed (the
        store keeps the writes and performs them first next time)."""
        return perform_ledger_writes(self.ledger_store, effects)

    def apply(self, effects: Sequence[CoordEffect]) -> None:
        """Perform the core's effects: its ledger writes first, then the rest; re-arm the
        timer."""
        for eff in self.write_ledger(effects):
            try:
                perform_coord_effect(self, eff)
            except Exception:
                log.exception("applying %s failed", type(eff).__name__)
        self.timer.wake()

    # the `glue.CoordDriver` methods: what this node does with each coordination effect

    def send_message(self, eff: SendMessage) -> None:
        msg = eff.message
        self.sender.send(eff.to, msg.TAG, msg.to_wire())

    def start_run(self, eff: StartRun) -> None:
        self.runs.start_run(eff)

    def continue_run(self, eff: ContinueRun) -> None:
        self.runs.continue_run(eff)

    def abort_run(self, eff: AbortRun) -> None:
        self.runs.abort_run(eff)

    def leader_changed(self, eff: LeaderChanged) -> None:
        self.views.leader_changed(eff)
        log.info(
            "event=leader_changed task=%s epoch=%d leader=%s resume_step=%d failover=%s",
            eff.task_id,
            eff.epoch,
            eff.leader,
            eff.resume_step,
            eff.failover,
        )

    def task_queued(self, eff: TaskQueued) -> None:
        self.views.task_queued(eff)
        log.info("event=task_queued task=%s reason=%r", eff.task_id, eff.reason)

    def task_committed(self, eff: TaskCommitted) -> None:
        self.views.task_committed(eff)
        log.info(
            "event=task_committed task=%s epoch=%d leader=%s", eff.task_id, eff.epoch, eff.leader
        )

    def task_failed(self, eff: TaskFailed) -> None:
        self.views.task_failed(eff)
        log.info("event=task_failed task=%s reason=%r", eff.task_id, eff.reason)

    # ================================================================ messages

    async def _on_request(self, req: Request) -> Any:
        if req.type == PROGRESS:
            self.views.progress_from(req.peer_id, req.payload)
            return None
        if req.type == USAGE:
            self.views.usage_from(req.peer_id, req.payload)
            return None
        if req.type == CANCEL_REQUEST:
            return await self.intake.on_cancel_request(req.peer_id, req.payload)
        if req.type == SUBMIT_FORWARD:
            return await self.intake.on_submit_forward(req.peer_id, req.payload)
        try:
            msg = decode_coord_message(req.payload)
        except WireError as exc:
            raise RequestRejected("bad_message", str(exc)) from None
        if isinstance(msg, Offer):
            why = self.runs.refuse_offer(msg, draining=self.draining())
            if why:
                # the owner excludes us and tries its next candidate (or queues the task)
                reply = OfferReply(msg.task_id, msg.epoch, False, 0, why)
                self.sender.send(req.peer_id, reply.TAG, reply.to_wire())
                return None
        self.apply(self.coord.handle(self.clock(), req.peer_id, msg))
        return None

    # ================================================================ the node's task API

    async def submit_many(self, subs: list[TaskSubmission]) -> list[TaskAccepted]:
        return await self.intake.submit_many(subs)

    async def cancel(self, task_id: str) -> TaskView | None:
        return await self.intake.cancel(task_id)

    def view(self, task_id: str, *, full: bool = True) -> TaskView | None:
        return self.views.view(task_id, full=full)

    def list_views(self, limit: int, status: TaskStatus | None) -> list[TaskView]:
        return self.views.list_views(limit, status)

    def count_by_status(self) -> dict[str, int]:
        return self.views.count_by_status()

    def counters(self) -> dict[str, int]:
        return self.views.counters(backlog=len(self.intake.backlog))

    def active_by_peer(self) -> dict[str, int]:
        return self.views.active_by_peer(running_here=len(self.runs))

    def events(self, task_id: str) -> AsyncIterator[ProgressEvent]:
        return self.views.events(task_id)

    def diagnostics(self) -> dict[str, int]:
        """What `/status` shows of the task side (sends, runs, tasks led and owned)."""
        return {
            "task_sends_dropped": self.sender.dropped,
            "task_sends_failed": self.sender.failed,
            "runs_active": len(self.runs),
            "tasks_led": len(self.coord.led_tasks()),
            "tasks_owned_in_flight": len(self.coord.owned_tasks()),
        }

    # ================================================================ drain

    async def drain(self) -> None:
        """Hand over what we lead for others, then wait for the tasks we own to finish."""
        self.runs.hand_over()
        while self.intake.busy():  # noqa: ASYNC110 - owned tasks and the backlog change in many places; a 50 ms check while draining
            await trio.sleep(0.05)
        # give queued messages (commit replies, abandons) a moment to leave
        await trio.sleep(0.1)
