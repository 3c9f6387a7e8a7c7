"""Submission intake: accepting tasks as their owner, forwarding keyed ones to their home,
and cancelling.

Cluster-wide idempotency: a keyed submission belongs to its key's home acceptor set
(rendezvous over every member this node has ever known, persisted across restarts).
A node outside that set forwards the submission (`submit_forward`) to the first home
member that answers and returns its answer, so a retry of the key at any node finds the
same task. A new task is answered only once it is stored on a majority of its acceptors;
when that cannot happen (too few reachable) the submission is refused with `NoQuorum`,
which is safe to retry anywhere.

Large batches are stored in chunks and offered as room frees up (`feed`), so a burst of
thousands of tasks never floods the leaders or this node's own event loop.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import trio

from kowalski_node.adapters.libp2p import protocol_ids
from kowalski_node.adapters.libp2p.api import TransportPort
from kowalski_node.adapters.libp2p.errors import RequestRejected
from kowalski_node.coordination.core import Coordinator, SubmitOutcome
from kowalski_node.coordination.effects import CoordEffect, TaskFailed
from kowalski_node.coordination.spec import TaskSpec
from kowalski_node.errors import NoCapableDevice, NoQuorum, TaskError
from kowalski_node.placement.scheduler import Requirement
from kowalski_node.runtime.contexts import ContextStore, approx_size
from kowalski_node.runtime.payload import TaskPayload, decode_result
from kowalski_node.runtime.ports import CoordinatorLoop, TaskMetadataStore
from kowalski_node.runtime.service import (
    IdempotencyConflict,
    TaskAccepted,
    TaskStatus,
    TaskSubmission,
    TaskView,
    prompt_preview,
)
from kowalski_node.runtime.task_views import STATUS_OF, TaskViews, fingerprint_of
from kowalski_node.tasks import TaskLedger, TaskState

log = logging.getLogger("kowalski_node.runtime.tasks")

CANCEL_REQUEST = "cancel_request"
SUBMIT_FORWARD = "submit_forward"
FORWARD_TIMEOUT_S = 3.0
FORWARD_MAX_BYTES = 3 << 20  # one forward frame's items (frames are 4 MiB); contexts go as blobs
MAJORITY_WAIT_S = 3.0
SUBMIT_CHUNK = 32
PACE_ABOVE = 64  # batches larger than this are offered as room frees up
INFLIGHT_FACTOR = 4  # an owner's tasks being offered or run, per live peer, x max_runs
FEED_GROUP = 16
FEED_INTERVAL_S = 0.01


class SubmissionIntake:
    """The owner's side of submitting and cancelling tasks."""

    def __init__(
        self,
        me: str,
        coord: Coordinator,
        ledger: TaskLedger,
        loop: CoordinatorLoop,
        store: TaskMetadataStore,
        views: TaskViews,
        *,
        transport: TransportPort,
        contexts: ContextStore,
        rng: random.Random,
        max_runs: int,
        draining: Callable[[], bool],
    ) -> None:
        self.me = me
        self.coord = coord
        self.ledger = ledger
        self.loop = loop
        self.store = store
        self.views = views
        self.transport = transport
        self.contexts = contexts
        self.rng = rng
        self.max_runs = max_runs
        self.draining = draining
        self.backlog: deque[str] = deque()
        """Accepted tasks not yet handed to the core's submit queue (see `_submit_paced`)."""
        self._backlog_changed = trio.Event()
        self._accepting = 0

    def busy(self) -> bool:
        """Tasks this node owns are still in flight or waiting to be offered."""
        return bool(self.coord.owned_tasks() or self.backlog)

    # ================================================================ submit

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
        if self.draining():
            raise TaskError(f"node {self.me} is shutting down and accepts no new tasks")
        if not forwarded:
            routes = [self._route(sub, sub.dedup_key) for sub in subs]
            if any(routes):
                return await self._submit_routed(subs, routes, hop)
        prepared = await self.contexts.prepare(subs)  # large contexts → files, off-loop
        if payloads is not None:
            prepared = [
                (s, p if given is None else given, k)
                for (s, p, k), given in zip(prepared, payloads, strict=True)
            ]
        self._check_conflicts(prepared)
        # ... copied to replicas before the ack; a retry of a key this node already holds
        # is answered from the ledger, and its context was copied when it was accepted
        await self.contexts.replicate(
            [item for item in prepared if item[2] is None or self.ledger.find(item[2]) is None]
        )
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
        contexts = self.contexts
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
                reply = await self.transport.request(
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

    async def on_submit_forward(self, src: str, payload: Any) -> Any:
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
                    await self.contexts.ensure(given.context_ref, src)  # verified blob
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

    # ---------------------------------------------------------------- storing and offering

    def _submit_chunk(
        self,
        chunk: list[tuple[TaskSubmission, TaskPayload, str | None]],
        failed_now: dict[str, str],
        paced: bool,
    ) -> list[TaskAccepted]:
        now = self.loop.clock()
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
            # the records join their metadata's transaction, before any message leaves
            actions = self.loop.write_ledger(effects)
        self.loop.apply(actions)
        return [self._accepted(sub, outcome, failed_now) for sub, outcome in made]

    def _submit_paced(
        self, now: float, payload: TaskPayload, key: str | None
    ) -> tuple[SubmitOutcome, list[CoordEffect]]:
        """Store the task durably now; offer it when the cluster has room (big batches).

        Acceptance is one ledger write per task. The task then waits in `backlog` and
        `feed` hands it to the core's submit queue while fewer than `max_runs` x
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
            key = f"auto-{self.me}-{self.rng.getrandbits(128):032x}"
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
            self.backlog.append(rec.task_id)
            self._backlog_changed.set()
            effects = self.coord.submit_created(now, rec.task_id)
        return SubmitOutcome(rec.task_id, res.created, rec, res.payload_matches), effects

    async def feed(self) -> None:
        """Release backlog tasks to the core as in-flight work completes."""
        while True:
            if not self.backlog:
                self._backlog_changed = trio.Event()
                await self._backlog_changed.wait()
                continue
            per_peer = self.max_runs * INFLIGHT_FACTOR
            room = per_peer * max(1, len(self.coord.live_peers()))
            room -= len(self.coord.owned_tasks())
            if room > 0 and not self._accepting:
                count = min(room, len(self.backlog), FEED_GROUP)
                released = [self.backlog.popleft() for _ in range(count)]
                self.loop.apply(self.coord.enqueue(self.loop.clock(), released))
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
            if existing is not None and fingerprint_of(existing) != payload.fingerprint:
                raise IdempotencyConflict(key, self.views.public_id(existing.task_id))
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
            public = self.views.public_id(task_id)
        if task_id in failed_now:
            status = TaskStatus.FAILED
        elif outcome.created:
            status = STATUS_OF[rec.state]
        else:
            status = self.views.status(rec)
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

    # ================================================================ cancel

    async def cancel(self, task_id: str) -> TaskView | None:
        rec = self.views.record(task_id)
        if rec is None:
            return None
        if not rec.terminal:
            if rec.submitter == self.me:
                self._cancel_owned(rec.task_id, self.me)
            else:
                self.store.update_info(rec.task_id, cancel_requested=True)
                try:
                    await self.transport.request(
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
        return self.views.view(task_id)

    async def on_cancel_request(self, src: str, payload: Any) -> Any:
        """A non-owner forwards a user's cancel of a task we own."""
        task_id = payload.get("task_id") if isinstance(payload, dict) else None
        if not isinstance(task_id, str):
            raise RequestRejected("bad_message", "cancel_request needs a task_id")
        rec = self.ledger.get(task_id)
        if rec is None or rec.submitter != self.me:
            raise RequestRejected("unknown_task", f"{self.me} does not own task {task_id}")
        self._cancel_owned(task_id, src)
        after = self.ledger.get(task_id)
        return {"state": after.state.value if after else "unknown"}

    def _cancel_owned(self, task_id: str, by: str) -> None:
        self.views.history(task_id, by, "cancel_requested", None)
        self.loop.apply(self.coord.cancel(self.loop.clock(), task_id))
        rec = self.ledger.get(task_id)
        if rec is not None and rec.state is TaskState.CANCELLED:
            self.views.finished(task_id)


def _requirement(sub: TaskSubmission) -> Requirement | None:
    return Requirement(model=sub.model) if sub.model else None
