"""The per-task coordination protocol as one pure state machine per node.

Roles (a node plays all three, for different tasks):

* **owner** — the node a task was submitted to. It stores the task durably (ledger),
  chooses the leader by weighted rendezvous ranking over live capable peers, grants
  strictly increasing fencing epochs, renews the leader's lease on every message from
  it, fails over (epoch + 1, from the latest checkpoint) when the leader dies, lapses or
  abandons the task, and accepts the commit exactly once.
* **leader** — runs the RLM loop (through the driver). After every step it sends the
  checkpoint to the owner and the replicas and waits for the owner's ack (replica acks
  are best effort, bounded) before the next step; at the end it sends the result to the
  replicas as a final checkpoint together with the commit, retried until answered. A
  fenced answer aborts the run.
* **replica** — stores records and checkpoints (fenced, merged), answers queries.

Drive it like the other cores: ``handle(now, src, msg)``, ``tick(now)`` when
``now >= next_deadline()``, plus the direct calls (``submit``, ``step_finished``,
``run_finished``, ``run_failed``, membership/capability updates, ``recover``). Every
call returns a list of effects (:mod:`.effects`).

The core owns its ledger state in memory (``TaskLedger`` over a ``LedgerState`` loaded
once from the durable store's snapshot) and never calls storage: each ledger write a call
makes comes back at the head of that call's effects (``PutRecord``, ``PutPending``,
``DeletePending``), before any message that could reflect it; the driver makes them
durable first (``glue.perform_ledger_writes``).
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, replace

from kowalski_node.capabilities.profile import DeviceProfile
from kowalski_node.coordination.config import CoordConfig
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
    Abandon,
    AckStatus,
    Cancel,
    CheckpointAck,
    CommitOutcome,
    CommitReply,
    CommitRequest,
    CoordMessage,
    Heartbeat,
    Offer,
    OfferReply,
    Prepare,
    Promise,
    Query,
    QueryReply,
    StepCheckpoint,
)
from kowalski_node.coordination.spec import (
    TaskSpec,
    final_snapshot,
    step_snapshot,
    unwrap_snapshot,
)
from kowalski_node.coordination.state import LeaderPhase, Led, Owned, OwnerPhase, Push
from kowalski_node.coordination.stats import CoordStats
from kowalski_node.election import home_acceptors, leader_weight, rank_candidates, stable_unit
from kowalski_node.errors import NoQuorum
from kowalski_node.placement.scheduler import Placement, Requirement, disqualification
from kowalski_node.tasks import (
    Checkpoint,
    ReplicateAck,
    ReplicateRecord,
    RetryPolicy,
    SubmitQueue,
    TaskLedger,
    TaskRecord,
    TaskState,
    WriteOutcome,
    replica_answer,
)

_EMPTY_REQ = Requirement()
ORPHAN_SCANS_AFTER_RECOVER = 3
ORPHAN_SCAN_EVERY_TTLS = 10.0


def majority(members: Collection[str]) -> int:
    """Votes needed out of ``members`` (a strict majority; 1 for a lone owner)."""
    return len(members) // 2 + 1


@dataclass(frozen=True, slots=True)
class SubmitOutcome:
    """What ``submit`` did. ``created`` False: the idempotency key was known; nothing runs again."""

    task_id: str
    created: bool
    record: TaskRecord
    payload_matches: bool = True

    @property
    def result(self) -> bytes | None:
        """The committed result, when the (resubmitted) task is already done."""
        return self.record.result if self.record.state is TaskState.COMMITTED else None


class Coordinator:
    """One node's side of the coordination protocol, over its own durable ledger."""

    def __init__(
        self,
        me: str,
        ledger: TaskLedger,
        *,
        rng: random.Random,
        config: CoordConfig | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.me = me
        self.ledger = ledger
        self.config = config or CoordConfig()
        self.queue = SubmitQueue(ledger.state, rng, retry)
        self.stats = CoordStats()
        self._rng = rng
        self._live: dict[str, None] = {me: None}
        self._known: dict[str, None] = {me: None}
        self._acceptor_of: dict[str, None] = {}
        self._stored_on: dict[str, set[str]] = {}
        self._orphan_since: dict[str, float] = {}
        """Tasks another node owns for which this node is an acceptor (watched for owner death)."""
        self._scan_at = math.inf
        self._scans_left = 0
        self._absent_check_due = False
        self._down: dict[str, float] = {}
        """Peers membership declared dead (and not back since): when."""
        self._reform_at = math.inf
        self._suspected: set[str] = set()
        self._profiles: dict[str, DeviceProfile] = {}
        self._owned: dict[str, Owned] = {}
        self._led: dict[str, Led] = {}
        self._pushes: dict[str, Push] = {}
        self._refuse_upto: dict[str, int] = {}
        self._timers: list[tuple[float, int, int, str]] = []
        self._seq = 0
        self._inbox: deque[tuple[str, CoordMessage]] = deque()
        self._out: list[CoordEffect] = []

    # ================================================================ driving contract

    def handle(self, now: float, src: str, msg: CoordMessage) -> list[CoordEffect]:
        """A message arrived from the authenticated peer ``src``."""
        self._dispatch(now, src, msg)
        return self._flush(now)

    def tick(self, now: float) -> list[CoordEffect]:
        """Run every timer that is due (call when ``now >= next_deadline()``)."""
        timers = self._timers
        while timers and timers[0][0] <= now:
            at, _, kind, task_id = heapq.heappop(timers)
            if kind == 0:
                o = self._owned.get(task_id)
                if o is not None and o.wake == at:
                    o.wake = math.inf
                    self._owner_timer(now, o)
            elif kind == 1:
                led = self._led.get(task_id)
                if led is not None and led.wake == at:
                    led.wake = math.inf
                    self._leader_timer(now, led)
            else:
                p = self._pushes.get(task_id)
                if p is not None and p.wake == at:
                    p.wake = math.inf
                    self._push_timer(now, p)
        for task_id in self.queue.due(now):
            self._queue_due(now, task_id)
        if now >= self._scan_at:
            self._scan_orphans(now)
        if now >= self._reform_at:
            self._reform_leased(now)
        return self._flush(now)

    def next_deadline(self) -> float:
        """When ``tick`` should next be called (``inf`` when nothing is scheduled)."""
        timers = self._timers
        while timers:
            at, _, kind, task_id = timers[0]
            holder: Owned | Led | Push | None
            if kind == 0:
                holder = self._owned.get(task_id)
            elif kind == 1:
                holder = self._led.get(task_id)
            else:
                holder = self._pushes.get(task_id)
            if holder is not None and holder.wake == at:
                break
            heapq.heappop(timers)
        first = timers[0][0] if timers else math.inf
        first = min(first, self._scan_at, self._reform_at)
        if not len(self.queue):
            return first
        return min(first, self.queue.next_deadline())

    # ================================================================ views from other cores

    def peer_up(
        self, now: float, peer: str, profile: DeviceProfile | None = None
    ) -> list[CoordEffect]:
        """Membership: ``peer`` is a live member (new, or back). Queued tasks are retried now."""
        self._live[peer] = None
        self._known[peer] = None
        self._suspected.discard(peer)
        self._down.pop(peer, None)
        if profile is not None:
            self._profiles[peer] = profile
        if len(self.queue):
            self.queue.kick(now)
        for p in self._pushes.values():
            if peer in p.targets:
                self._arm(2, p.task_id, p, now)
        for led in self._led.values():
            if led.owner == peer and led.owner_down:
                led.owner_down = False
                if led.phase is LeaderPhase.COMMITTING:
                    led.commit_delay = self.config.commit_retry
                    self._send_commit(now, led)
        return self._flush(now)

    def peer_down(self, now: float, peer: str) -> list[CoordEffect]:
        """Membership declared ``peer`` dead (or it left): fail over the tasks it led."""
        if peer == self.me:
            return []
        self._live.pop(peer, None)
        self._suspected.discard(peer)
        self._down[peer] = now
        for o in list(self._owned.values()):
            if o.leader == peer and o.phase in (OwnerPhase.OFFERING, OwnerPhase.LEASED):
                self._failover(now, o, f"leader {peer} is down", revivable=False)
            elif o.leader == peer and o.phase is OwnerPhase.PREPARING:
                o.excluded.add(peer)
                self._find_leader(now, o)
            elif o.phase is OwnerPhase.QUERYING and peer in o.query_pending:
                o.query_pending.discard(peer)
                if not o.query_pending:
                    self._find_leader(now, o)
        for led in list(self._led.values()):
            if led.owner == peer:
                led.owner_down = True
            if peer in led.pending:
                led.pending.discard(peer)
            if led.phase is LeaderPhase.ACKING:
                if led.owner_down:
                    led.owner_acked = True
                self._maybe_continue(now, led)
        for p in self._pushes.values():
            p.targets.discard(peer)
        # Owners declared dead are replaced after a short grace (a false verdict under load
        # is usually refuted within it, and a takeover costs a ballot) ...
        self._scan_at = min(self._scan_at, now + self.config.takeover_grace)
        # ... and so are dead acceptors of the tasks we own, sooner (a second death before
        # the set is re-formed would leave no majority).
        self._reform_at = min(self._reform_at, now + self.config.reform_grace)
        return self._flush(now)

    def peer_suspect(self, peer: str) -> None:
        """Membership suspects ``peer``: keep its lease, but do not pick it as a new leader."""
        if peer != self.me:
            self._suspected.add(peer)

    def peer_alive(self, peer: str) -> None:
        """A suspicion was refuted."""
        self._suspected.discard(peer)

    def update_profile(self, profile: DeviceProfile) -> None:
        """Capability gossip: the newest advert of a peer (live or not; kept to explain failures)."""
        self._profiles[profile.peer] = profile

    def live_peers(self) -> list[str]:
        return list(self._live)

    def remember_peers(self, peers: Collection[str]) -> None:
        """Peers known before a restart (persisted by the driver): they count for home sets."""
        for peer in peers:
            self._known[peer] = None

    def known_peers(self) -> list[str]:
        """Every peer seen alive since this core started (dead ones included)."""
        return list(self._known)

    def home_of(
        self, idempotency_key: str, members: Collection[str] | None = None
    ) -> tuple[str, ...]:
        """The key's acceptor set over ``members`` (default: every peer this core has known)."""
        return home_acceptors(idempotency_key, self._known if members is None else members)

    # ================================================================ submission (owner)

    def submit(
        self,
        now: float,
        payload: bytes,
        *,
        idempotency_key: str | None = None,
        requirement: Requirement | None = None,
        acceptors: tuple[str, ...] | None = None,
    ) -> tuple[SubmitOutcome, list[CoordEffect]]:
        """Accept a task durably and offer it to a leader; a known key returns the stored task.

        ``acceptors``: the acceptor set the task starts with (default: :meth:`home_of` the key over
        every known peer). A new task whose acceptors cannot form a majority among the
        live peers is refused with :class:`NoQuorum` (retryable) before anything is stored,
        so a minority side never creates a second record of a key.
        """
        spec = TaskSpec(payload, requirement or _EMPTY_REQ)
        key = idempotency_key
        if key is None:
            key = f"auto-{self.me}-{self._rng.getrandbits(128):032x}"
        if acceptors is None:
            acceptors = self.home_of(key)
        if acceptors and self.ledger.find(key) is None:
            reachable = [a for a in acceptors if a in self._live]
            if len(reachable) < majority(acceptors):
                self.stats.no_quorum_refusals += 1
                raise NoQuorum(
                    f"cannot accept key {key!r} now: {len(reachable)} of its acceptors "
                    f"({', '.join(acceptors)}) are reachable from {self.me}, "
                    f"{majority(acceptors)} are needed; retry shortly (here or at another node)"
                )
        res = self.ledger.submit(
            now, spec.encode(), submitter=self.me, idempotency_key=key, acceptors=acceptors
        )
        rec = res.record
        if not res.created:
            self.stats.deduplicated += 1
            return SubmitOutcome(rec.task_id, False, rec, res.payload_matches), []
        self.stats.submitted += 1
        o = Owned(rec.task_id, spec, acceptors=rec.quorum_set)
        self._owned[rec.task_id] = o
        self._spread_new(rec)
        self._find_leader(now, o)
        return SubmitOutcome(rec.task_id, True, self.ledger.get(rec.task_id) or rec), self._flush(
            now
        )

    def _spread_new(self, rec: TaskRecord) -> None:
        """Copy a new task to its acceptors at once, so an owner that dies right after
        accepting it loses nothing (a survivor takes it over)."""
        if not rec.acceptors:
            return
        self._stored_on[rec.task_id] = {self.me} & set(rec.acceptors)
        for a in rec.acceptors:
            if a != self.me:
                self._send(a, ReplicateRecord(rec))

    def stored_on_majority(self, task_id: str) -> bool:
        """A new task is on a majority of its acceptors (or needs none): safe to answer."""
        rec = self.ledger.get(task_id)
        if rec is None:
            return False
        if not rec.acceptors or rec.terminal:
            return True
        return task_id not in self._stored_on  # dropped once a majority has answered

    def submit_created(self, now: float, task_id: str) -> list[CoordEffect]:
        """A task stored by the caller outside :meth:`submit` (paced batches): spread it."""
        rec = self.ledger.get(task_id)
        if rec is not None:
            self._spread_new(rec)
        return self._flush(now)

    def enqueue(self, now: float, task_ids: Collection[str]) -> list[CoordEffect]:
        """Tasks stored earlier (paced batches) join the submit queue; offered when due."""
        for task_id in task_ids:
            self.queue.enqueue(now, task_id)
        return self._flush(now)

    def cancel(self, now: float, task_id: str) -> list[CoordEffect]:
        """The submitter cancels an unfinished task it owns; a commit that already happened stands."""
        o = self._owned.get(task_id)
        res = self.ledger.cancel(now, task_id)
        if res.ok:
            if o is not None:
                if o.leader:
                    self._send(o.leader, Cancel(task_id, o.epoch))
                self._owner_done(o)
            if res.record is not None and res.record.acceptors:
                self._start_push(now, res.record, res.record.acceptors, also="")
            self.queue.accepted(task_id)
            self._out.append(TaskFailed(task_id, "cancelled by the submitter"))
        return self._flush(now)

    def recover(self, now: float) -> list[CoordEffect]:
        """After a restart: rebuild volatile state from the durable ledger.

        Owned unfinished tasks wait one lease for their leader to speak up (or fail over at
        once if we led them ourselves); tasks we led elsewhere are abandoned so their owners
        re-offer them without waiting for the lease to lapse.
        """
        for rec in sorted(self.ledger.state.tasks(), key=lambda r: r.task_id):
            if rec.terminal:
                continue
            if rec.leader == self.me and rec.epoch > 0:
                self._refuse_upto[rec.task_id] = rec.epoch
            if rec.submitter != self.me and self.me in rec.acceptors:
                self._acceptor_of[rec.task_id] = None
                # catch up on what happened while we were down (a commit, a takeover)
                for peer in sorted({rec.submitter, *rec.acceptors} - {self.me}):
                    self._send(peer, Query(rec.task_id))
            if rec.submitter == self.me:
                try:
                    spec = TaskSpec.decode(rec.payload)
                except ValueError:
                    spec = TaskSpec(rec.payload)
                o = Owned(rec.task_id, spec, may_fail=False, epoch=rec.epoch, leader=rec.leader)
                o.acceptors = rec.quorum_set
                self._owned[rec.task_id] = o
                if rec.task_id in self.queue:
                    o.phase = OwnerPhase.QUEUED
                elif rec.leader == self.me or not rec.leader:
                    self._failover(now, o, "restarted", revivable=False)
                else:
                    o.phase = OwnerPhase.LEASED
                    o.lease_expires = now + self.config.lease_ttl
                    o.acceptors = rec.quorum_set
                    o.replicas = self._replicas_for(rec, o, {rec.leader})
                    self._arm_owner(o)
            elif rec.leader == self.me and rec.epoch > 0:
                self._send(rec.submitter, Abandon(rec.task_id, rec.epoch))
        # Owners that died while we were down never produce a peer_down here: look for
        # orphans once membership has had time to fill in, then now and then.
        self._scans_left = ORPHAN_SCANS_AFTER_RECOVER
        self._scan_at = now + 2 * self.config.lease_ttl
        self._absent_check_due = True
        return self._flush(now)

    # ================================================================ the run (leader)

    def step_finished(
        self, now: float, task_id: str, epoch: int, step: int, snapshot: bytes
    ) -> list[CoordEffect]:
        """The driver finished ``step`` of the run; checkpoint it before going on.
        ``epoch`` is the run's (`StartRun`); the checkpoint goes out at the current lease's."""
        led = self._led.get(task_id)
        if led is None or led.run_epoch != epoch or led.phase is not LeaderPhase.RUNNING:
            return []
        if step <= led.step:
            raise ValueError(
                f"task {task_id}: step {step} reported after step {led.step} (steps must increase)"
            )
        self._checkpoint_step(now, led, step, snapshot)
        return self._flush(now)

    def _checkpoint_step(self, now: float, led: Led, step: int, snapshot: bytes) -> None:
        """Store ``step``'s snapshot at the lease's epoch, send it to the owner and the
        replicas, and wait for their acks (``ACKING``)."""
        task_id, epoch = led.task_id, led.epoch
        wrapped = step_snapshot(snapshot)
        local = self.ledger.checkpoint(now, task_id, epoch, self.me, step, wrapped)
        if self._named_by_newer_ballot(led, local.record) and local.outcome in (
            WriteOutcome.STALE_EPOCH,
            WriteOutcome.CONFLICT,
        ):
            # our own copy holds a newer ballot that names us: keep the step, and store
            # and send it at that epoch once the offer comes (`_rebase`)
            led.phase = LeaderPhase.ACKING
            led.step = step
            led.checkpoint = snapshot
            led.pending = set()
            led.owner_acked = False
            led.replica_deadline = math.inf
            led.resend_at = math.inf
            self._await_ballot(now, led)
            return
        if local.outcome in (
            WriteOutcome.STALE_EPOCH,
            WriteOutcome.CONFLICT,
            WriteOutcome.TERMINAL,
        ):
            if local.outcome is not WriteOutcome.TERMINAL:
                self.stats.fenced_checkpoints += 1  # our own copy already follows a newer ballot
            self._abort(led, f"own ledger refused step {step}: {local.detail}")
            return
        led.phase = LeaderPhase.ACKING
        led.step = step
        led.checkpoint = snapshot
        led.owner_acked = led.owner_down
        targets = [p for p in (led.owner, *led.replicas) if p in self._live or p == led.owner]
        led.pending = {p for p in targets if not (p == led.owner and led.owner_down)}
        led.replica_deadline = now + self.config.replica_ack_wait
        led.resend_at = now + self.config.ack_retry
        msg = StepCheckpoint(task_id, epoch, step, snapshot)
        for p in sorted(led.pending):
            self._send(p, msg)
        self.stats.checkpoints_sent += 1
        led.last_owner_send = now
        self._arm_leader(led)
        self._maybe_continue(now, led)

    def run_finished(
        self, now: float, task_id: str, epoch: int, result: bytes
    ) -> list[CoordEffect]:
        """The run produced its result: replicate it as the final checkpoint and commit it."""
        led = self._led.get(task_id)
        if led is None or led.run_epoch != epoch or led.phase is not LeaderPhase.RUNNING:
            return []
        led.result = result
        self._start_final(now, led)
        return self._flush(now)

    def run_failed(self, now: float, task_id: str, epoch: int, error: str) -> list[CoordEffect]:
        """The task itself failed (not a node failure): report it to the owner as its outcome."""
        led = self._led.get(task_id)
        if led is None or led.run_epoch != epoch or led.phase is not LeaderPhase.RUNNING:
            return []
        led.error = error or "the run failed"
        self._start_commit(now, led)
        return self._flush(now)

    # ================================================================ queries

    def owned(self, task_id: str) -> Owned | None:
        return self._owned.get(task_id)

    def led(self, task_id: str) -> Led | None:
        return self._led.get(task_id)

    def owned_tasks(self) -> list[str]:
        return [t for t, o in self._owned.items() if o.phase is not OwnerPhase.DONE]

    def led_tasks(self) -> list[str]:
        return list(self._led)

    def task_status(self, task_id: str) -> dict[str, object]:
        """Role, leader, epoch, state and counters of one task, for status pages."""
        rec = self.ledger.get(task_id)
        out: dict[str, object] = {"task_id": task_id, "known": rec is not None}
        if rec is not None:
            out.update(
                state=rec.state.value,
                epoch=rec.epoch,
                leader=rec.leader,
                submitter=rec.submitter,
                executions=rec.executions,
                commits=rec.commits,
                rejected_commits=rec.rejected_commits,
                checkpoint_step=rec.checkpoint.step if rec.checkpoint else None,
            )
        o = self._owned.get(task_id)
        if o is not None:
            out["owner_phase"] = o.phase.value
        led = self._led.get(task_id)
        if led is not None:
            out["leader_phase"] = led.phase.value
        return out

    # ================================================================ internals: plumbing

    def _send(self, to: str, msg: CoordMessage) -> None:
        if to == self.me:
            self._inbox.append((to, msg))
        else:
            self._out.append(SendMessage(to, msg))

    def _flush(self, now: float) -> list[CoordEffect]:
        inbox = self._inbox
        while inbox:
            src, msg = inbox.popleft()
            self._dispatch(now, src, msg)
        out, self._out = self._out, []
        writes = self.ledger.state.take_writes()
        if writes:
            # first: the driver makes them durable before any message of this call leaves
            return [*writes, *out]
        return out

    def _arm(self, kind: int, task_id: str, holder: Owned | Led | Push, at: float) -> None:
        if at == holder.wake:
            return
        holder.wake = at
        if at < math.inf:
            self._seq += 1
            heapq.heappush(self._timers, (at, self._seq, kind, task_id))

    def _arm_owner(self, o: Owned) -> None:
        self._arm(0, o.task_id, o, o.next_wake())

    def _arm_leader(self, led: Led) -> None:
        if led.phase is LeaderPhase.RUNNING:
            at = led.last_owner_send + self.config.heartbeat_interval
        elif led.phase is LeaderPhase.ACKING:
            at = led.resend_at
            if led.owner_acked:
                at = min(at, led.replica_deadline)
        elif led.phase is LeaderPhase.FINALIZING:
            at = led.resend_at
        else:
            at = led.commit_at
        self._arm(1, led.task_id, led, min(at, led.awaiting_ballot))

    def _dispatch(self, now: float, src: str, msg: CoordMessage) -> None:
        if isinstance(msg, StepCheckpoint):
            self._on_checkpoint(now, src, msg)
        elif isinstance(msg, CheckpointAck):
            self._on_checkpoint_ack(now, src, msg)
        elif isinstance(msg, Heartbeat):
            self._on_heartbeat(now, src, msg)
        elif isinstance(msg, Offer):
            self._on_offer(now, src, msg)
        elif isinstance(msg, OfferReply):
            self._on_offer_reply(now, src, msg)
        elif isinstance(msg, CommitRequest):
            self._on_commit(now, src, msg)
        elif isinstance(msg, CommitReply):
            self._on_commit_reply(now, src, msg)
        elif isinstance(msg, ReplicateRecord):
            self._on_replicate(now, src, msg)
        elif isinstance(msg, ReplicateAck):
            self._on_replicate_ack(now, src, msg)
        elif isinstance(msg, Prepare):
            self._on_prepare(now, src, msg)
        elif isinstance(msg, Promise):
            self._on_promise(now, src, msg)
        elif isinstance(msg, Query):
            self._send(src, QueryReply(msg.task_id, self.ledger.get(msg.task_id)))
        elif isinstance(msg, QueryReply):
            self._on_query_reply(now, src, msg)
        elif isinstance(msg, Abandon):
            self._on_abandon(now, src, msg)
        elif isinstance(msg, Cancel):
            led = self._led.get(msg.task_id)
            if led is not None and src == led.owner and msg.epoch >= led.epoch:
                self._abort(led, "cancelled by the owner")
        else:  # pragma: no cover - the union is exhaustive; defends against driver bugs
            raise TypeError(f"not a coordination message: {type(msg).__name__}")

    # ================================================================ owner side

    def _capable_weights(self, req: Requirement, exclude: Collection[str]) -> dict[str, float]:
        weights: dict[str, float] = {}
        for peer in self._live:
            if peer in exclude or peer in self._suspected:
                continue
            profile = self._profiles.get(peer)
            if profile is None:
                if req == _EMPTY_REQ:
                    weights[peer] = 1.0
                continue
            if disqualification(profile, req) is not None:
                continue
            w = leader_weight(profile)
            if w > 0:
                weights[peer] = w
        return weights

    def _rank(self, task_id: str, req: Requirement, exclude: Collection[str]) -> list[str]:
        return rank_candidates(task_id, self._capable_weights(req, exclude))

    def _why_no_leader(self, req: Requirement) -> tuple[bool, str]:
        """(permanent, reason): permanent when no known peer, live or not, could ever lead."""
        rejected: dict[str, str] = {}
        waiting: list[str] = []
        for peer in sorted(set(self._live) | set(self._profiles)):
            profile = self._profiles.get(peer)
            if profile is None:
                if req == _EMPTY_REQ:
                    waiting.append(peer)
                else:
                    rejected[peer] = "have not advertised their capabilities yet"
                continue
            why = disqualification(profile, req)
            if why is None and leader_weight(profile) <= 0:
                why = "opted out of leading"
            if why is None:
                waiting.append(peer)
            else:
                rejected[peer] = why
        if waiting:
            return False, (
                f"no live candidate can lead it now ({len(waiting)} capable peer(s) are down, "
                f"suspected or did not answer: {', '.join(waiting[:5])}); queued and retried"
            )
        explained = Placement(req, (), rejected).explain()
        return True, f"no peer can run this task: {explained}"

    def _find_leader(self, now: float, o: Owned) -> None:
        rec = self.ledger.get(o.task_id)
        if rec is None or rec.terminal:
            self._owner_done(o)
            return
        req = o.spec.requirement
        ranking = self._rank(o.task_id, req, o.excluded)
        if not ranking:
            permanent, reason = self._why_no_leader(req)
            if permanent and o.may_fail and not o.excluded:
                epoch = max(rec.epoch, o.known_epoch) + 1
                self.ledger.fail(now, o.task_id, epoch, self.me, reason)
                self.stats.failed += 1
                self._out.append(TaskFailed(o.task_id, reason))
                self._owner_done(o)
                return
            o.phase = OwnerPhase.QUEUED
            o.leader = ""
            self.queue.enqueue(now, o.task_id)
            self.queue.attempt_failed(now, o.task_id, reason)
            if not o.queued_reported:
                o.queued_reported = True
                self.stats.queued += 1
                self._out.append(TaskQueued(o.task_id, reason))
            self._arm_owner(o)
            return
        leader = o.keep_leader if o.keep_leader in ranking else ranking[0]
        epoch = max(rec.epoch, o.known_epoch) + 1
        o.acceptors = rec.quorum_set if rec.acceptors else (self.me,)
        pending = rec.pending_acceptors
        o.next_acceptors = pending or self._reformed(rec)
        o.joint = bool(pending)
        o.installing = False
        o.replicas = self._replicas_for(rec, o, {leader}, ranking)
        o.epoch = epoch
        o.leader = leader
        o.queued_reported = False
        self._start_prepare(now, o, rec)

    def _replicas_for(
        self,
        rec: TaskRecord,
        o: Owned,
        exclude: Collection[str],
        ranking: list[str] | None = None,
    ) -> tuple[str, ...]:
        """Who gets every checkpoint besides the owner: the other acceptors (current set), or,
        for a task without acceptors, the next ``replicas`` peers in the ranking."""
        if rec.acceptors:
            return tuple(a for a in rec.acceptors if a != self.me)
        if ranking is None:
            ranking = self._rank(rec.task_id, o.spec.requirement, exclude)
        return tuple(p for p in ranking if p != self.me and p not in exclude)[
            : self.config.replicas
        ]

    def _reformed(self, rec: TaskRecord) -> tuple[str, ...]:
        """The acceptor set with its dead members replaced, or () if none is dead (or no
        live peer can replace one). Survivors keep their order; replacements are the
        best live non-members in the key's rendezvous order, so the owner that proposes
        it and anyone recomputing it agree."""
        current = rec.acceptors
        gone = [a for a in current if a in self._down and a not in self._live]
        if not current or not gone:
            return ()
        pool = [
            p
            for p in self._live
            if p not in current and p not in self._suspected and p not in self._down
        ]
        pool.sort(key=lambda p: (-stable_unit(rec.idempotency_key, p), p))
        if not pool:
            return ()
        replacing = set(gone[: len(pool)])
        kept = [a for a in current if a not in replacing]
        return (*kept, *pool[: len(replacing)])

    def _reform_leased(self, now: float) -> None:
        """Dead acceptors of running tasks we own: re-form their sets through a new ballot
        (the leader is usually chosen again and resumes from the last checkpoint), so a
        later second death still leaves a majority. Tasks between phases are checked again
        shortly; the others re-form at their next ballot (`_find_leader`)."""
        self._reform_at = math.inf
        grace = self.config.reform_grace
        for o in list(self._owned.values()):
            if not any(
                a in self._down and self._down[a] + grace <= now and a not in self._live
                for a in o.acceptors
            ):
                continue
            if o.phase is OwnerPhase.LEASED:
                rec = self.ledger.get(o.task_id)
                if rec is not None and not rec.terminal and self._reformed(rec):
                    o.keep_leader = o.leader
                    self._find_leader(now, o)
            elif o.phase in (OwnerPhase.OFFERING, OwnerPhase.PREPARING, OwnerPhase.QUERYING):
                self._reform_at = min(self._reform_at, now + self.config.offer_timeout)
        for since in self._down.values():
            if since + grace > now:
                self._reform_at = min(self._reform_at, since + grace)

    def _prepare_targets(self, o: Owned) -> tuple[str, ...]:
        if not (o.joint or o.installing):
            return o.acceptors
        return (*o.acceptors, *(a for a in o.next_acceptors if a not in o.acceptors))

    def _ballot_won(self, o: Owned) -> bool:
        """A majority promised (of the old and of the new set, while re-forming)."""
        if len(o.promised & set(o.acceptors)) < majority(o.acceptors):
            return False
        return not (o.joint or o.installing) or len(o.promised & set(o.next_acceptors)) >= majority(
            o.next_acceptors
        )

    def _ballot_lost(self, o: Owned) -> bool:
        """Refusals make a majority impossible (of either set, while re-forming); members
        not live count against it too (declared dead, or not seen since this node
        restarted: it never learns of deaths while it was away), so a refused ballot moves
        on to a higher one instead of waiting for a member that will not answer (two
        owners refusing each other's ballot at one epoch, each waiting for a dead third
        acceptor, waited forever: Hypothesis seed 551)."""
        sets = (o.acceptors, o.next_acceptors) if o.joint or o.installing else (o.acceptors,)
        for group in sets:
            against = {a for a in group if a in o.prepare_refused or a not in self._live}
            if len(against) > len(group) - majority(group):
                return True
        return False

    def _start_install(self, now: float, o: Owned, rec: TaskRecord) -> None:
        """Round two of a re-forming ballot: the merged record (everything a majority of
        the old set held), with the new set *staged* at this ballot, goes to the old and
        the new acceptors; a majority of each must store it. Then the new set holds the
        merged state, and any later prepare over the old set meets the staged set (old
        majorities intersect) and ballots over both before using it (`pending_acceptors`).
        Only after that is the new set used alone (`_prepared`)."""
        self.stats.reformations += 1
        staged = replace(rec, staged=o.next_acceptors, staged_epoch=o.epoch)
        rec = self.ledger.apply_replica(now, staged)
        o.installing = True
        o.promised = set()
        o.prepare_refused = set()
        o.prepare_deadline = now + self.config.offer_timeout
        o.resend_at = now + self.config.offer_retry
        self.stats.prepares_sent += 1
        msg = Prepare(o.task_id, o.epoch, o.leader, rec)
        for a in self._prepare_targets(o):
            self._send(a, msg)
        self._arm_owner(o)

    # ---------------------------------------------------------------- leases as ballots

    def _start_prepare(self, now: float, o: Owned, rec: TaskRecord) -> None:
        """Phase 1: a majority of the acceptors must store the lease (o.epoch, o.leader)."""
        if self.me not in o.acceptors:
            # an owner outside the acceptor set keeps its own copy at its ballot as well
            # (the offer carries it); the acceptors alone decide whether the ballot wins
            res = self.ledger.lease(now, o.task_id, o.epoch, o.leader, owner=self.me)
            if res.record is not None and res.record.terminal:
                self.queue.accepted(o.task_id)
                self._owner_done(o)
                return
            if not res.ok:
                o.known_epoch = max(o.known_epoch, res.record.epoch if res.record else 0)
                o.epoch = max(o.epoch, o.known_epoch) + 1
                res = self.ledger.lease(now, o.task_id, o.epoch, o.leader, owner=self.me)
            if res.record is not None:
                rec = res.record
        o.phase = OwnerPhase.PREPARING
        o.promised = set()
        o.prepare_refused = set()
        o.prepare_attempts = 0
        o.prepare_deadline = now + self.config.offer_timeout
        o.resend_at = now + self.config.offer_retry
        self.stats.prepares_sent += 1
        msg = Prepare(o.task_id, o.epoch, o.leader, rec)
        for a in o.acceptors:
            self._send(a, msg)
        self._arm_owner(o)

    def _resend_prepare(self, now: float, o: Owned) -> None:
        rec = self.ledger.get(o.task_id)
        if rec is None:
            return
        msg = Prepare(o.task_id, o.epoch, o.leader, rec)
        for a in self._prepare_targets(o):
            if a not in o.promised and a not in o.prepare_refused:
                self._send(a, msg)

    def _on_prepare(self, now: float, src: str, msg: Prepare) -> None:
        """Acceptor: store the lease if its ballot is new (or the same again), answer with
        the copy held before; refuse with the winning copy otherwise."""
        prior = self.ledger.get(msg.task_id)
        rec = prior if prior is not None else self.ledger.apply_replica(now, msg.record)
        if rec.terminal:
            self._send(src, Promise(msg.task_id, msg.epoch, False, rec))
            return
        res = self.ledger.lease(now, msg.task_id, msg.epoch, msg.leader, owner=src)
        if not res.ok or res.record is None:
            self.stats.fenced_checkpoints += 1
            self._send(src, Promise(msg.task_id, msg.epoch, False, res.record or rec))
            return
        self.stats.promises += 1
        stored = res.record
        if (
            msg.record.config_epoch > stored.config_epoch
            or msg.record.staged_epoch > stored.staged_epoch
        ):
            # an acceptor set staged (or installed) with this ballot: stored with it
            stored = self.ledger.apply_replica(now, msg.record)
        led = self._led.get(msg.task_id)
        if led is not None and led.epoch < msg.epoch and msg.leader != self.me:
            # (a ballot that names this node again keeps the run: its offer follows)
            self.stats.fenced_aborts += 1
            self._abort(led, f"{src} prepared epoch {msg.epoch}: fenced")
        if src != self.me:
            if self.me in stored.acceptors:
                self._acceptor_of[msg.task_id] = None
            o = self._owned.get(msg.task_id)
            if o is not None:
                self._yield(o, f"{src} holds epoch {msg.epoch}")
        self._send(src, Promise(msg.task_id, msg.epoch, True, prior))

    def _on_promise(self, now: float, src: str, msg: Promise) -> None:
        o = self._owned.get(msg.task_id)
        if (
            o is None
            or o.phase is not OwnerPhase.PREPARING
            or msg.epoch != o.epoch
            or src not in self._prepare_targets(o)
        ):
            if msg.record is not None and msg.record.terminal:
                self.ledger.apply_replica(now, msg.record)
            return
        if msg.ok:
            if msg.record is not None and src != self.me:
                self.ledger.apply_replica(now, msg.record)
            o.promised.add(src)
            spread = self._stored_on.get(o.task_id)
            if spread is not None:
                spread.add(src)
                if len(spread) >= majority(o.acceptors):
                    self._stored_on.pop(o.task_id, None)
            if self._ballot_won(o):
                self._prepared(now, o)
            return
        self.stats.prepare_refusals += 1
        o.prepare_refused.add(src)
        rec = msg.record
        assert rec is not None  # the decoder refuses a refusal without a record
        if rec.terminal:
            stored = self.ledger.apply_replica(now, rec)
            if stored.terminal:
                # the acceptors that promised this ballot hold it, not the outcome: tell them
                # (the owner that finished it may have died before its own push got out)
                self._start_push(now, stored, self._prepare_targets(o), also="")
                self.queue.accepted(o.task_id)
                self._owner_done(o)
                return
        o.known_epoch = max(o.known_epoch, rec.epoch)
        # Another owner holds a newer ballot, or the same one (two owners raced for one key):
        # the smaller id keeps it, the other yields, so exactly one of them goes on.
        if rec.submitter != self.me and (
            rec.epoch > o.epoch or (rec.epoch == o.epoch and rec.submitter < self.me)
        ):
            self.ledger.apply_replica(now, rec)
            self._yield(o, f"{rec.submitter} holds epoch {rec.epoch}")
            return
        if self._ballot_lost(o):
            self._find_leader(now, o)

    def _prepared(self, now: float, o: Owned) -> None:
        """A majority stored the lease; the merged copy holds the highest accepted state."""
        rec = self.ledger.get(o.task_id)
        if rec is None or rec.terminal:
            if rec is not None:
                self._start_push(now, rec, self._prepare_targets(o), also="")
            self.queue.accepted(o.task_id)
            self._owner_done(o)
            return
        if rec.submitter != self.me:
            self._yield(o, f"{rec.submitter} holds epoch {rec.epoch}")
            return
        if rec.epoch != o.epoch or rec.leader != o.leader:
            o.known_epoch = max(o.known_epoch, rec.epoch)
            self._find_leader(now, o)
            return
        if rec.acceptors and rec.quorum_set != o.acceptors:
            # the promises revealed a newer acceptor set: ballot over it instead
            self._find_leader(now, o)
            return
        if rec.pending_acceptors and rec.pending_acceptors != o.next_acceptors:
            # ... or a staged one that may have won: ballot over both sets
            self._find_leader(now, o)
            return
        if o.installing:
            # a majority of both sets stored the staged set: it is the acceptor set now
            rec = self.ledger.apply_replica(
                now, replace(rec, acceptors=o.next_acceptors, config_epoch=o.epoch)
            )
            o.acceptors, o.next_acceptors = rec.quorum_set, ()
            o.joint = o.installing = False
            o.replicas = tuple(a for a in rec.acceptors if a != self.me)
            # tell the new set at once (they watch the owner from now on); until a copy
            # with the installed set reaches them, a takeover ballots over both sets
            for a in o.replicas:
                if a in self._live:
                    self._send(a, ReplicateRecord(rec))
        elif o.next_acceptors:
            self._start_install(now, o, rec)
            return
        o.phase = OwnerPhase.OFFERING
        o.offer_deadline = now + self.config.offer_timeout
        o.resend_at = now + self.config.offer_retry
        self.stats.offers_sent += 1
        self._send(o.leader, Offer(o.task_id, o.epoch, o.replicas, rec))
        self._arm_owner(o)

    def _yield(self, o: Owned, reason: str) -> None:
        """Another owner holds a newer ballot: stop owning (its leader is fenced anyway)."""
        if o.phase is OwnerPhase.DONE:
            return
        self.stats.yields += 1
        self.queue.accepted(o.task_id)
        if self.me in o.acceptors:
            self._acceptor_of[o.task_id] = None
        self._owner_done(o)

    # ---------------------------------------------------------------- owner death

    def _takeover_orphans(self, now: float) -> None:
        """Take over the unfinished tasks whose owner is down.

        The live acceptors go in their recorded order, ``takeover_stagger`` apart: the
        first takes over at once; the next one only if the task is still orphaned then
        (the first may have no copy, e.g. it restarted after the task was created, or
        its membership view puts this node first).
        """
        stagger = self.config.takeover_stagger
        for task_id in list(self._acceptor_of):
            rec = self.ledger.get(task_id)
            if rec is None or rec.terminal or self.me not in rec.acceptors:
                self._acceptor_of.pop(task_id, None)
                self._orphan_since.pop(task_id, None)
                continue
            if rec.submitter == self.me or task_id in self._owned or rec.submitter in self._live:
                self._orphan_since.pop(task_id, None)
                continue
            live = [a for a in rec.acceptors if a in self._live]
            since = self._orphan_since.setdefault(task_id, now)
            due = since + live.index(self.me) * stagger
            if now < due:
                self._scan_at = min(self._scan_at, due)
                continue
            self._acceptor_of.pop(task_id, None)
            self._orphan_since.pop(task_id, None)
            self._take_over(now, rec)

    def _take_over(self, now: float, rec: TaskRecord) -> None:
        try:
            spec = TaskSpec.decode(rec.payload)
        except ValueError:
            spec = TaskSpec(rec.payload)
        o = Owned(
            rec.task_id,
            spec,
            may_fail=False,
            epoch=rec.epoch,
            leader=rec.leader,
            acceptors=rec.quorum_set,
        )
        o.failover = True
        o.keep_leader = rec.leader if rec.leader != rec.submitter else ""
        self._owned[rec.task_id] = o
        self.stats.takeovers += 1
        self.stats.failovers += 1
        self._find_leader(now, o)

    def _scan_orphans(self, now: float) -> None:
        if self._absent_check_due and len(self._live) > 1:  # not before a peer is up
            self._absent_check_due = False
            self._mark_absent(now)
        if self._scans_left > 0:
            self._scans_left -= 1
            self._scan_at = now + 2 * self.config.lease_ttl
        else:
            self._scan_at = now + ORPHAN_SCAN_EVERY_TTLS * self.config.lease_ttl
        self._takeover_orphans(now)

    def _mark_absent(self, now: float) -> None:
        """The first scan after a restart: peers that died while we were down never produce
        a `peer_down` here, so an acceptor set we own would keep a dead seat, and one more
        death would then leave it no majority. Membership has had two leases (or more: not
        before a first peer is up) to report every live peer; the known peers and acceptors
        it has not reported count as down from now (a `peer_up` undoes it), and their
        seats are re-formed after the grace."""
        seats = {a for o in self._owned.values() for a in o.acceptors}
        absent = [
            p
            for p in sorted(seats | set(self._known))
            if p != self.me and p not in self._live and p not in self._down
        ]
        for peer in absent:
            self._down[peer] = now
        if absent:
            self._reform_at = min(self._reform_at, now + self.config.reform_grace)

    def _failover(self, now: float, o: Owned, reason: str, *, revivable: bool) -> None:
        """Replace the leader: ask the replicas for their copies, then offer the next candidate."""
        self.stats.failovers += 1
        o.failover = True
        o.revivable = revivable
        o.phase = OwnerPhase.QUERYING
        ask = {p for p in (*o.replicas, o.leader) if p and p != self.me and p in self._live}
        if revivable and o.leader:
            o.excluded.add(o.leader)
        o.query_pending = ask
        if not ask:
            self._find_leader(now, o)
            return
        for p in sorted(ask):
            self._send(p, Query(o.task_id))
        o.query_deadline = now + self.config.query_timeout
        self._arm_owner(o)

    def _owner_done(self, o: Owned) -> None:
        o.phase = OwnerPhase.DONE
        self._arm_owner(o)
        self._owned.pop(o.task_id, None)

    def _owner_timer(self, now: float, o: Owned) -> None:
        cfg = self.config
        if o.phase is OwnerPhase.OFFERING:
            if now >= o.offer_deadline:
                self.stats.offer_timeouts += 1
                o.excluded.add(o.leader)
                self._find_leader(now, o)
                return
            if now >= o.resend_at:
                rec = self.ledger.get(o.task_id)
                if rec is not None and rec.epoch == o.epoch:
                    self._send(o.leader, Offer(o.task_id, o.epoch, o.replicas, rec))
                o.resend_at = now + cfg.offer_retry
        elif o.phase is OwnerPhase.LEASED:
            if now >= o.lease_expires:
                self.stats.lease_lapses += 1
                self._failover(now, o, f"lease of {o.leader} lapsed", revivable=True)
                return
        elif o.phase is OwnerPhase.QUERYING and now >= o.query_deadline:
            o.query_pending.clear()
            self._find_leader(now, o)
            return
        elif o.phase is OwnerPhase.PREPARING:
            if now >= o.prepare_deadline:
                # No majority yet (acceptors down or partitioned away): keep asking, slower.
                self.stats.prepare_timeouts += 1
                o.prepare_attempts += 1
                backoff = min(cfg.offer_timeout * 2**o.prepare_attempts, cfg.commit_retry_max * 4)
                o.prepare_deadline = now + backoff
                o.prepare_refused.clear()
                self._resend_prepare(now, o)
                o.resend_at = now + backoff / 2
            elif now >= o.resend_at:
                self._resend_prepare(now, o)
                o.resend_at = now + cfg.offer_retry * (1 + o.prepare_attempts)
        self._arm_owner(o)

    def _queue_due(self, now: float, task_id: str) -> None:
        o = self._owned.get(task_id)
        if o is None:
            rec = self.ledger.get(task_id)
            if rec is None or rec.terminal or rec.submitter != self.me:
                self.queue.accepted(task_id)
                return
            try:
                spec = TaskSpec.decode(rec.payload)
            except ValueError:
                spec = TaskSpec(rec.payload)
            o = Owned(task_id, spec, may_fail=False, epoch=rec.epoch)
            self._owned[task_id] = o
        if o.phase is not OwnerPhase.QUEUED:
            self.queue.accepted(task_id)
            return
        o.excluded.clear()
        self._find_leader(now, o)

    def _renew(self, now: float, src: str, epoch: int, task_id: str) -> None:
        """Any valid word from the current leader renews its lease (and revives a lapse)."""
        o = self._owned.get(task_id)
        if o is None or src != o.leader or epoch != o.epoch:
            return
        if o.phase is OwnerPhase.QUERYING and o.revivable:
            rec = self.ledger.get(task_id)
            if rec is not None and rec.epoch == epoch:
                o.phase = OwnerPhase.LEASED
                o.excluded.discard(src)
                o.query_pending.clear()
                self.stats.lapses_revived += 1
        if o.phase is OwnerPhase.LEASED:
            o.lease_expires = now + self.config.lease_ttl
            self._arm_owner(o)

    def _on_offer_reply(self, now: float, src: str, msg: OfferReply) -> None:
        o = self._owned.get(msg.task_id)
        if (
            o is None
            or o.phase is not OwnerPhase.OFFERING
            or msg.epoch != o.epoch
            or src != o.leader
        ):
            return
        if not msg.accepted:
            self.stats.offers_refused += 1
            o.known_epoch = max(o.known_epoch, msg.known_epoch)
            o.excluded.add(src)
            self._find_leader(now, o)
            return
        self.queue.accepted(o.task_id)
        rec = self.ledger.get(o.task_id)
        cp = rec.checkpoint if rec is not None else None
        resume_step = cp.step if cp is not None else 0
        adopted = cp is not None and unwrap_snapshot(cp.snapshot)[0]
        if not adopted:
            self.ledger.start_execution(now, o.task_id, o.epoch, src)
        o.phase = OwnerPhase.LEASED
        o.lease_expires = now + self.config.lease_ttl
        o.excluded.clear()
        self.stats.leader_changes += 1
        self._out.append(LeaderChanged(o.task_id, o.epoch, src, resume_step, o.failover))
        self._arm_owner(o)

    def _on_query_reply(self, now: float, src: str, msg: QueryReply) -> None:
        o = self._owned.get(msg.task_id)
        if msg.record is not None and self.ledger.get(msg.task_id) is not None:
            self.ledger.apply_replica(now, msg.record)
        if o is None or o.phase is not OwnerPhase.QUERYING or src not in o.query_pending:
            return
        o.query_pending.discard(src)
        if not o.query_pending:
            self._find_leader(now, o)

    def _on_abandon(self, now: float, src: str, msg: Abandon) -> None:
        o = self._owned.get(msg.task_id)
        if o is None or src != o.leader or msg.epoch != o.epoch:
            return
        if o.phase in (OwnerPhase.OFFERING, OwnerPhase.LEASED):
            self.stats.abandons += 1
            self._failover(now, o, f"{src} abandoned the task", revivable=False)

    def _on_commit(self, now: float, src: str, msg: CommitRequest) -> None:
        rec = self.ledger.get(msg.task_id)
        o = self._owned.get(msg.task_id)

        def reply(outcome: CommitOutcome, current: int, detail: str = "") -> None:
            self._send(src, CommitReply(msg.task_id, msg.epoch, outcome, current, detail))

        if rec is None or rec.submitter != self.me:
            reply(CommitOutcome.REFUSED, 0, "this node does not own the task")
            return
        if msg.error is not None:
            self._on_fail_report(now, src, msg, rec, o)
            return
        if rec.state is TaskState.COMMITTED:
            if rec.epoch == msg.epoch and rec.leader == src and rec.result == msg.result:
                self.stats.commit_retries += 1
                reply(CommitOutcome.ACCEPTED, rec.epoch)
                return
            res = self.ledger.commit(now, msg.task_id, msg.epoch, src, msg.result)
            self.stats.duplicate_commits_refused += 1
            reply(CommitOutcome.DUPLICATE, rec.epoch, res.detail)
            return
        if rec.terminal:
            reply(CommitOutcome.REFUSED, rec.epoch, f"the task is {rec.state.value}")
            return
        res = self.ledger.commit(now, msg.task_id, msg.epoch, src, msg.result)
        if res.outcome is WriteOutcome.ACCEPTED and res.record is not None:
            self.stats.commits += 1
            reply(CommitOutcome.ACCEPTED, msg.epoch)
            self._out.append(TaskCommitted(msg.task_id, msg.epoch, src, msg.result))
            replicas = o.replicas if o is not None else ()
            self._start_push(now, res.record, replicas, also=src)
            self.queue.accepted(msg.task_id)
            if o is not None:
                self._owner_done(o)
            return
        self.stats.fenced_commits += 1
        cur = res.record.epoch if res.record is not None else 0
        reply(CommitOutcome.FENCED, cur, res.detail)

    def _on_fail_report(
        self, now: float, src: str, msg: CommitRequest, rec: TaskRecord, o: Owned | None
    ) -> None:
        error = msg.error or "the run failed"
        if rec.state is TaskState.FAILED and rec.epoch == msg.epoch and rec.leader == src:
            self._send(src, CommitReply(msg.task_id, msg.epoch, CommitOutcome.ACCEPTED, rec.epoch))
            return
        res = self.ledger.fail(now, msg.task_id, msg.epoch, src, error)
        if res.ok:
            self.stats.failed += 1
            self._send(src, CommitReply(msg.task_id, msg.epoch, CommitOutcome.ACCEPTED, msg.epoch))
            self._out.append(TaskFailed(msg.task_id, error))
            if res.record is not None:
                self._start_push(now, res.record, o.replicas if o else (), also=src)
            if o is not None:
                self._owner_done(o)
            return
        outcome = (
            CommitOutcome.FENCED
            if res.outcome in (WriteOutcome.STALE_EPOCH, WriteOutcome.CONFLICT)
            else CommitOutcome.REFUSED
        )
        cur = res.record.epoch if res.record is not None else 0
        self._send(src, CommitReply(msg.task_id, msg.epoch, outcome, cur, res.detail))

    def _start_push(
        self, now: float, record: TaskRecord, replicas: tuple[str, ...], *, also: str
    ) -> None:
        # The leader gets the committed record too, so every copy ends in the same state.
        # Acceptors get it even while they are down: they are who answers for the task later.
        targets = {
            p
            for p in (*replicas, *record.acceptors, also)
            if p and p != self.me and (p in self._live or p in record.acceptors)
        }
        if not targets:
            return
        p = Push(record.task_id, targets)
        self._pushes[record.task_id] = p
        self._push_timer(now, p)

    def _push_timer(self, now: float, p: Push) -> None:
        rec = self.ledger.get(p.task_id)
        limit = self.config.replicate_attempts * (6 if rec is not None and rec.acceptors else 1)
        if rec is None or not p.targets or p.attempts >= limit:
            self._pushes.pop(p.task_id, None)
            return
        p.attempts += 1
        for t in sorted(p.targets):
            if t in self._live:
                self._send(t, ReplicateRecord(rec))
        delay = min(
            2 * self.config.ack_retry * 2 ** min(p.attempts, 6), self.config.commit_retry_max
        )
        self._arm(2, p.task_id, p, now + delay)

    # ================================================================ replica side (and owner storage)

    def _fenced_ack(
        self, msg: StepCheckpoint | Heartbeat, step: int, rec: TaskRecord
    ) -> CheckpointAck:
        return CheckpointAck(msg.task_id, msg.epoch, step, AckStatus.FENCED, rec.epoch, rec.state)

    def _on_checkpoint(self, now: float, src: str, msg: StepCheckpoint) -> None:
        rec = self.ledger.get(msg.task_id)
        if rec is None:
            self._send(src, CheckpointAck(msg.task_id, msg.epoch, msg.step, AckStatus.UNKNOWN))
            return
        if rec.terminal:
            self._send(
                src,
                CheckpointAck(
                    msg.task_id, msg.epoch, msg.step, AckStatus.TERMINAL, rec.epoch, rec.state
                ),
            )
            return
        if msg.epoch < rec.epoch or (msg.epoch == rec.epoch and rec.leader and rec.leader != src):
            self.stats.fenced_checkpoints += 1
            self._send(src, self._fenced_ack(msg, msg.step, rec))
            return
        wrapped = final_snapshot(msg.snapshot) if msg.final else step_snapshot(msg.snapshot)
        res = self.ledger.checkpoint(now, msg.task_id, msg.epoch, src, msg.step, wrapped)
        status = AckStatus.OK
        if res.outcome is WriteOutcome.REGRESSED:
            cur = rec.checkpoint
            if cur is not None and msg.epoch > cur.epoch:
                # A new leader resumed below a step that only this replica saw (the ledger's
                # checkpoint() refuses any lower step; its merge prefers the newer epoch).
                version = rec.version + 1 if msg.epoch == rec.epoch else 1
                newer = replace(
                    rec,
                    epoch=msg.epoch,
                    leader=src,
                    version=version,
                    updated_at=now,
                    checkpoint=Checkpoint(msg.step, msg.epoch, wrapped),
                )
                self.ledger.apply_replica(now, newer)
        elif res.outcome in (WriteOutcome.CONFLICT, WriteOutcome.STALE_EPOCH):
            status = AckStatus.FENCED
            self.stats.fenced_checkpoints += 1
        elif res.outcome is WriteOutcome.TERMINAL:
            status = AckStatus.TERMINAL
        stored = res.record or rec
        self._send(
            src, CheckpointAck(msg.task_id, msg.epoch, msg.step, status, stored.epoch, stored.state)
        )
        if status is AckStatus.OK:
            o = self._owned.get(msg.task_id)
            if o is not None and stored.acceptors and msg.epoch > o.epoch:
                # that leader's lease was granted by another owner: it took the task over
                self._yield(o, f"{src} leads epoch {msg.epoch} for another owner")
                return
            self._renew(now, src, msg.epoch, msg.task_id)

    def _on_heartbeat(self, now: float, src: str, msg: Heartbeat) -> None:
        rec = self.ledger.get(msg.task_id)
        if rec is None:
            self._send(src, CheckpointAck(msg.task_id, msg.epoch, -1, AckStatus.UNKNOWN))
            return
        if rec.terminal:
            self._send(
                src,
                CheckpointAck(msg.task_id, msg.epoch, -1, AckStatus.TERMINAL, rec.epoch, rec.state),
            )
            return
        if msg.epoch < rec.epoch or (msg.epoch == rec.epoch and rec.leader != src):
            self.stats.fenced_checkpoints += 1
            self._send(src, self._fenced_ack(msg, -1, rec))
            return
        self._send(
            src, CheckpointAck(msg.task_id, msg.epoch, -1, AckStatus.OK, rec.epoch, rec.state)
        )
        self._renew(now, src, msg.epoch, msg.task_id)

    def _on_replicate(self, now: float, src: str, msg: ReplicateRecord) -> None:
        stored = self.ledger.apply_replica(now, msg.record)
        if not stored.terminal and self.me in stored.acceptors and stored.submitter != self.me:
            self._acceptor_of[stored.task_id] = None
        o = self._owned.get(stored.task_id)
        if o is not None and stored.submitter != self.me and stored.epoch > o.epoch:
            self._yield(o, f"{stored.submitter} holds epoch {stored.epoch}")
        self._send(src, replica_answer(msg.record, stored))

    def _on_replicate_ack(self, now: float, src: str, msg: ReplicateAck) -> None:
        spread = self._stored_on.get(msg.task_id)
        rec = self.ledger.get(msg.task_id) if spread is not None else None
        if spread is not None and rec is not None and src in rec.acceptors:
            spread.add(src)
            if len(spread) >= majority(rec.acceptors):
                self._stored_on.pop(msg.task_id, None)
        p = self._pushes.get(msg.task_id)
        if p is not None and src in p.targets and msg.terminal:
            p.targets.discard(src)
            if not p.targets:
                self._pushes.pop(msg.task_id, None)
        led = self._led.get(msg.task_id)
        if led is None or src not in led.replicas:
            return
        if not msg.ok and msg.epoch > led.epoch:
            self._fenced(now, led, msg.epoch, f"replica {src} follows epoch {msg.epoch}")
        elif (
            msg.ok
            and msg.terminal
            and msg.epoch == led.epoch
            and led.phase is not LeaderPhase.COMMITTING
        ):
            self._abort(led, f"the task is already {msg.state.value}")

    # ================================================================ leader side

    def _on_offer(self, now: float, src: str, msg: Offer) -> None:
        task_id, epoch = msg.task_id, msg.epoch
        rec = msg.record
        if rec.submitter != src:
            self._send(
                src,
                OfferReply(
                    task_id, epoch, False, 0, "the offer must come from the task's submitter"
                ),
            )
            return
        led = self._led.get(task_id)
        if led is not None and led.epoch == epoch:
            self._send(src, OfferReply(task_id, epoch, True, epoch))
            return
        known = self.ledger.get(task_id)
        known_epoch = max(
            known.epoch if known else 0, led.epoch if led else 0, self._refuse_upto.get(task_id, 0)
        )
        if known is not None and known.terminal:
            self._send(
                src,
                OfferReply(
                    task_id, epoch, False, known_epoch, f"the task is already {known.state.value}"
                ),
            )
            return
        if epoch <= self._refuse_upto.get(task_id, 0) or (
            known is not None and known.epoch > epoch
        ):
            self.stats.offers_declined += 1
            self._send(
                src,
                OfferReply(
                    task_id,
                    epoch,
                    False,
                    known_epoch,
                    "a newer epoch exists or this run was lost in a restart",
                ),
            )
            return
        try:
            spec = TaskSpec.decode(rec.payload)
        except ValueError as exc:
            self._send(
                src, OfferReply(task_id, epoch, False, known_epoch, f"malformed task spec: {exc}")
            )
            return
        mine = self._profiles.get(self.me)
        if mine is not None and spec.requirement != _EMPTY_REQ:
            why = disqualification(mine, spec.requirement)
            if why is not None:
                self._send(
                    src,
                    OfferReply(
                        task_id, epoch, False, known_epoch, f"this peer cannot lead it: {why}"
                    ),
                )
                return
        if led is not None and self._keep_run(led, rec):
            self._rebase(now, src, led, msg)
            return
        if led is not None:
            self._abort(led, f"re-offered at epoch {epoch}")
        stored = self.ledger.apply_replica(now, rec)
        if stored.epoch != epoch or stored.leader != self.me or stored.terminal:
            self._send(
                src,
                OfferReply(
                    task_id,
                    epoch,
                    False,
                    stored.epoch,
                    "the stored record disagrees with the offer",
                ),
            )
            return
        led = Led(task_id, epoch, src, msg.replicas, owner_down=src not in self._live)
        led.acceptors = stored.quorum_set
        self._led[task_id] = led
        self._send(src, OfferReply(task_id, epoch, True, epoch))
        for p in msg.replicas:
            if p != self.me:
                self._send(p, ReplicateRecord(stored))
        cp = stored.checkpoint
        final, data = unwrap_snapshot(cp.snapshot) if cp is not None else (False, b"")
        led.step = cp.step if cp is not None else 0
        if final:
            self.stats.results_adopted += 1
            led.result = data
            self._start_final(now, led)
            return
        self.stats.runs_started += 1
        if cp is not None:
            self.stats.resumes += 1
        led.phase = LeaderPhase.RUNNING
        led.last_owner_send = now
        self._out.append(
            StartRun(task_id, epoch, spec.payload, led.step, data if cp is not None else None)
        )
        self._arm_leader(led)

    def _named_by_newer_ballot(self, led: Led, rec: TaskRecord | None) -> bool:
        return (
            rec is not None
            and not rec.terminal
            and rec.epoch > led.epoch
            and rec.leader == self.me
            and led.error is None
        )

    def _await_ballot(self, now: float, led: Led) -> None:
        if led.awaiting_ballot == math.inf:
            led.awaiting_ballot = now + self.config.offer_timeout
        self._arm_leader(led)

    def _fenced(self, now: float, led: Led, epoch: int, why: str) -> None:
        """A storage node follows a newer ballot. If our own copy shows it names someone
        else, abort now; otherwise it may be a takeover or a re-formed set that offers us
        the task again (the prepare and the offer are one round trip apart, a checkpoint
        sent meanwhile is fenced): wait `offer_timeout` for that offer, then abort."""
        if epoch <= led.epoch or led.phase is LeaderPhase.COMMITTING or led.error is not None:
            self.stats.fenced_aborts += 1
            self._abort(led, f"{why}: fenced")
            return
        own = self.ledger.get(led.task_id)
        if own is not None and own.epoch >= epoch and own.leader != self.me:
            self.stats.fenced_aborts += 1
            self._abort(led, f"{why}: fenced")
            return
        self._await_ballot(now, led)

    def _keep_run(self, led: Led, rec: TaskRecord) -> bool:
        """A re-offer at a newer ballot to the leader already running the task (a takeover
        after the owner died, a re-formed acceptor set) keeps the run when the offer's
        record holds nothing the run lacks: no result, and no checkpoint later than the
        run's own line (a newer epoch's, or a further step). Restarting would only cost
        the step in progress (the issue's 5 s from an owner's death)."""
        if led.error is not None or led.phase is LeaderPhase.COMMITTING:
            return False
        cp = rec.checkpoint
        if cp is None:
            return True
        final, _ = unwrap_snapshot(cp.snapshot)
        return not final and cp.step <= led.step and cp.epoch <= led.epoch

    def _rebase(self, now: float, src: str, led: Led, msg: Offer) -> None:
        """Lead the same run at the offer's epoch: store the lease, answer, and send what is
        in flight again at the new epoch (the acceptors that promised it refuse the old
        one). Safe for the same reasons as a fresh run: the ballot won a majority whose
        merged copy holds no result, so no result was chosen, and every later write of
        this run carries the new epoch."""
        stored = self.ledger.apply_replica(now, msg.record)
        if stored.epoch != msg.epoch or stored.leader != self.me or stored.terminal:
            self._abort(led, f"re-offered at epoch {msg.epoch}")
            self._send(
                src,
                OfferReply(
                    msg.task_id,
                    msg.epoch,
                    False,
                    stored.epoch,
                    "the stored record disagrees with the offer",
                ),
            )
            return
        self.stats.runs_kept += 1
        led.awaiting_ballot = math.inf
        led.epoch = msg.epoch
        led.owner = src
        led.replicas = msg.replicas
        led.acceptors = stored.quorum_set
        led.owner_down = src not in self._live
        led.final_acked = set()
        self._send(src, OfferReply(msg.task_id, msg.epoch, True, msg.epoch))
        for p in msg.replicas:
            if p != self.me:
                self._send(p, ReplicateRecord(stored))
        if led.phase is LeaderPhase.ACKING:
            # the step is stored again at the new epoch; the run waits for these acks
            self._checkpoint_step(now, led, led.step, led.checkpoint)
        elif led.phase is LeaderPhase.FINALIZING:
            self._start_final(now, led)
        else:
            led.last_owner_send = now
            self._arm_leader(led)

    def _on_checkpoint_ack(self, now: float, src: str, msg: CheckpointAck) -> None:
        led = self._led.get(msg.task_id)
        if led is None or msg.epoch != led.epoch:
            return
        if msg.status is AckStatus.FENCED:
            self._fenced(now, led, msg.current_epoch, f"{src} follows epoch {msg.current_epoch}")
            return
        if msg.status is AckStatus.TERMINAL:
            if led.phase is not LeaderPhase.COMMITTING or src == led.owner:
                self._abort(led, f"the task is already {msg.state.value}")
            return
        if msg.status is AckStatus.UNKNOWN:
            if src == led.owner:
                self._abort(led, "the owner does not know the task")
                return
            rec = self.ledger.get(msg.task_id)
            if rec is not None:
                self._send(src, ReplicateRecord(rec))
            return
        if src == led.owner:
            led.owner_down = False
        if led.phase is LeaderPhase.FINALIZING:
            if msg.step == led.step + 1 and src in led.acceptors:
                led.final_acked.add(src)
                if len(led.final_acked) >= majority(led.acceptors):
                    self._start_commit(now, led)
            return
        if led.phase is LeaderPhase.ACKING and msg.step == led.step and src in led.pending:
            led.pending.discard(src)
            if src == led.owner:
                led.owner_acked = True
            self._maybe_continue(now, led)

    def _maybe_continue(self, now: float, led: Led) -> None:
        if led.phase is not LeaderPhase.ACKING or not led.owner_acked:
            self._arm_leader(led)
            return
        if led.pending and now < led.replica_deadline:
            self._arm_leader(led)
            return
        if led.pending:
            self.stats.replica_acks_missed += 1
        led.pending.clear()
        led.phase = LeaderPhase.RUNNING
        self._out.append(ContinueRun(led.task_id, led.run_epoch, led.step))
        self._arm_leader(led)

    def _leader_timer(self, now: float, led: Led) -> None:
        cfg = self.config
        if now >= led.awaiting_ballot:
            self.stats.fenced_aborts += 1
            self._abort(led, "fenced by a newer ballot that did not offer this node the task")
            return
        if led.phase is LeaderPhase.RUNNING:
            if not led.owner_down and now >= led.last_owner_send + cfg.heartbeat_interval:
                self._send(led.owner, Heartbeat(led.task_id, led.epoch))
                self.stats.heartbeats_sent += 1
            led.last_owner_send = now
        elif led.phase is LeaderPhase.ACKING:
            if now >= led.resend_at:
                msg = StepCheckpoint(led.task_id, led.epoch, led.step, led.checkpoint)
                for p in sorted(led.pending):
                    if p in self._live or p == led.owner:
                        self._send(p, msg)
                led.resend_at = now + cfg.ack_retry
            self._maybe_continue(now, led)
            return
        elif led.phase is LeaderPhase.FINALIZING:
            if now >= led.resend_at:
                self._send_final(led, resend=True)
                led.resend_at = now + cfg.ack_retry
        else:
            if now >= led.commit_at:
                self._send_commit(now, led)
                return
        self._arm_leader(led)

    def _start_final(self, now: float, led: Led) -> None:
        """The result is a value to be chosen: a majority of the acceptors must store it as
        the final checkpoint at this epoch before the owner is asked to commit it, so a
        takeover's prepare always finds it (and no other result can be chosen)."""
        assert led.result is not None
        led.phase = LeaderPhase.FINALIZING
        led.pending.clear()
        led.final_acked = set()
        local = self.ledger.checkpoint(
            now, led.task_id, led.epoch, self.me, led.step + 1, final_snapshot(led.result)
        )
        if local.outcome in (WriteOutcome.STALE_EPOCH, WriteOutcome.CONFLICT):
            if self._named_by_newer_ballot(led, local.record):
                led.resend_at = math.inf  # `_rebase` stores it at the new epoch
                self._await_ballot(now, led)
                return
            self._abort(led, f"own ledger refused the result: {local.detail}")
            return
        if self.me in led.acceptors and local.outcome in (
            WriteOutcome.ACCEPTED,
            WriteOutcome.DUPLICATE,
        ):
            led.final_acked.add(self.me)
        if len(led.final_acked) >= majority(led.acceptors):
            self._start_commit(now, led)
            return
        self._send_final(led, resend=False)
        led.resend_at = now + self.config.ack_retry
        self._arm_leader(led)

    def _send_final(self, led: Led, *, resend: bool) -> None:
        assert led.result is not None
        final = StepCheckpoint(led.task_id, led.epoch, led.step + 1, led.result, final=True)
        for p in led.acceptors:
            if p != self.me and p not in led.final_acked:
                self._send(p, final)
                if resend:
                    self.stats.final_resends += 1

    def _start_commit(self, now: float, led: Led) -> None:
        led.phase = LeaderPhase.COMMITTING
        led.pending.clear()
        if led.result is not None:
            # Replicas outside the acceptor set (tasks without acceptors) get it too.
            final = StepCheckpoint(led.task_id, led.epoch, led.step + 1, led.result, final=True)
            for p in led.replicas:
                if p != self.me and p != led.owner and p not in led.acceptors and p in self._live:
                    self._send(p, final)
        led.commit_delay = self.config.commit_retry
        self._send_commit(now, led)

    def _send_commit(self, now: float, led: Led) -> None:
        if not led.owner_down:
            if led.error is not None:
                self._send(led.owner, CommitRequest(led.task_id, led.epoch, b"", led.error))
            else:
                self._send(led.owner, CommitRequest(led.task_id, led.epoch, led.result or b""))
            led.commit_sends += 1
            if led.commit_sends > 1:
                self.stats.commit_resends += 1
        led.commit_at = now + led.commit_delay
        led.commit_delay = min(led.commit_delay * 2, self.config.commit_retry_max)
        self._arm_leader(led)

    def _on_commit_reply(self, now: float, src: str, msg: CommitReply) -> None:
        led = self._led.get(msg.task_id)
        if led is None or src != led.owner or msg.epoch != led.epoch:
            return
        if led.phase is not LeaderPhase.COMMITTING:
            return
        if msg.outcome is CommitOutcome.ACCEPTED:
            self.stats.commits_acknowledged += 1
            self._led.pop(led.task_id, None)
            led.wake = math.inf
            return
        if msg.outcome is CommitOutcome.FENCED:
            self.stats.fenced_aborts += 1
        self._abort(led, f"commit {msg.outcome.value}: {msg.detail}")

    def _abort(self, led: Led, reason: str) -> None:
        self.stats.aborts += 1
        self._led.pop(led.task_id, None)
        led.wake = math.inf
        self._out.append(AbortRun(led.task_id, led.run_epoch, reason))
