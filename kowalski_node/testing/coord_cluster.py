"""A small deterministic driver for Coordinator cores over :class:`FakeNetwork` (tests, examples).

Membership is an *oracle* here (every node learns of a kill or pause after
``detect_delay``), so protocol tests exercise the coordination rules alone; the simulator
(``simulations/``) drives the real SWIM core instead. Runs are scripted: a task payload
``b"steps=N"`` runs N steps of ``step_time`` seconds each, and its result is
``b"done:" + payload``. Kill/restart keeps each node's ledger store (durable) and loses
everything else (volatile), exactly like a process restart.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kowalski_node.coordination.config import CoordConfig
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
from kowalski_node.coordination.messages import decode_coord_message
from kowalski_node.election import home_acceptors
from kowalski_node.glue import (
    membership_to_coordinator,
    perform_coord_effects,
    perform_ledger_writes,
)
from kowalski_node.membership import MemberDown, MemberUp
from kowalski_node.tasks import InMemoryLedgerStore, LedgerState, TaskLedger
from kowalski_node.testing.network import FakeNetwork, LinkProfile


def scripted_steps(payload: bytes) -> int:
    """Steps of a scripted run: ``b"steps=N"`` → N (default 3)."""
    text = payload.decode("utf-8", "replace")
    if text.startswith("steps="):
        try:
            return max(1, int(text[6:].split(";")[0]))
        except ValueError:
            return 3
    return 3


def scripted_result(payload: bytes) -> bytes:
    return b"done:" + payload


def _no_advert(peer: str) -> None:
    """The harness has no adverts: every peer can lead every task."""
    return None


@dataclass(slots=True)
class _Run:
    task_id: str
    epoch: int
    total: int
    step: int
    payload: bytes
    waiting: bool = False
    """The last step is reported and the run waits for the core's ``ContinueRun``."""


@dataclass(slots=True)
class CoordNode:
    name: str
    store: InMemoryLedgerStore
    core: Coordinator
    up: bool = True
    paused: bool = False
    runs: dict[str, _Run] = field(default_factory=dict)
    wake: float = math.inf


@dataclass(slots=True)
class CommitEvent:
    at: float
    owner: str
    task_id: str
    epoch: int
    leader: str
    result: bytes


class CoordCluster:
    """N coordinators, one seeded network, oracle membership, scripted runs."""

    def __init__(
        self,
        n: int,
        *,
        seed: int = 0,
        link: LinkProfile | None = None,
        config: CoordConfig | None = None,
        step_time: float = 0.05,
        detect_delay: float = 0.3,
        wire: bool = True,
    ) -> None:
        self.rng = random.Random(seed)
        self.net = FakeNetwork(random.Random(self.rng.getrandbits(64)), link or LinkProfile())
        self.config = config or CoordConfig()
        self.step_time = step_time
        self.detect_delay = detect_delay
        self.wire = wire
        self.now = 0.0
        self.nodes: dict[str, CoordNode] = {}
        self._events: list[tuple[float, int, str, Any]] = []
        self._seq = 0
        self.commits: list[CommitEvent] = []
        self.failures: list[tuple[float, str, str]] = []
        self.leader_changes: list[tuple[float, LeaderChanged]] = []
        self.starts: list[tuple[float, str, StartRun]] = []
        self.aborts: list[tuple[float, str, AbortRun]] = []
        self.log: list[str] = []
        names = [f"n{i:02d}" for i in range(n)]
        for name in names:
            self._create(name)
        for name in names:
            for other in names:
                if other != name:
                    perform_ledger_writes(
                        self.nodes[name].store, self.nodes[name].core.peer_up(0.0, other)
                    )

    # ---------------------------------------------------------------- setup

    def _create(self, name: str, store: InMemoryLedgerStore | None = None) -> CoordNode:
        if store is None:  # (an empty store is falsy: `or` would replace a restarted one)
            store = InMemoryLedgerStore()
        rng = random.Random(self.rng.getrandbits(64))
        ledger = TaskLedger(LedgerState(store.load()), name, random.Random(rng.getrandbits(64)))
        core = Coordinator(name, ledger, rng=rng, config=self.config)
        node = CoordNode(name, store, core)
        self.nodes[name] = node
        self.net.add_node(name)
        return node

    def _push(self, at: float, kind: str, data: Any) -> None:
        self._seq += 1
        heapq.heappush(self._events, (at, self._seq, kind, data))

    def at(self, t: float, action: Callable[[], None]) -> None:
        """Run ``action`` at simulated time ``t`` (fault schedules)."""
        self._push(t, "call", action)

    # ---------------------------------------------------------------- client + faults

    def submit(self, node: str, payload: bytes, key: str | None = None) -> SubmitOutcome:
        """Submit at ``node``. A keyed task's acceptors come from every node of the cluster
        (the static membership a real node persists), so a restarted node that has not
        yet heard of a dead one still picks the same set."""
        n = self.nodes[node]
        acceptors = home_acceptors(key, self.nodes) if key is not None else None
        out, effects = n.core.submit(self.now, payload, idempotency_key=key, acceptors=acceptors)
        self._apply(n, effects)
        return out

    def kill(self, node: str) -> None:
        n = self.nodes[node]
        n.up = False
        n.paused = False
        n.runs.clear()
        n.wake = math.inf
        self.net.kill(node)
        self.log.append(f"{self.now:.3f} kill {node}")
        self._push(self.now + self.detect_delay, "down", node)

    def restart(self, node: str) -> None:
        old = self.nodes[node]
        n = self._create(node, old.store)
        self.net.restart(node)
        for other, o in self.nodes.items():
            if other != node and o.up:
                # only its ledger writes (a queue kick): the oracle's view, not an event
                perform_ledger_writes(n.store, n.core.peer_up(self.now, other))
        self.log.append(f"{self.now:.3f} restart {node}")
        self._apply(n, n.core.recover(self.now))
        self._push(self.now + self.detect_delay, "up", node)

    def pause(self, node: str) -> None:
        n = self.nodes[node]
        n.paused = True
        self.net.pause(node)
        self.log.append(f"{self.now:.3f} pause {node}")
        self._push(self.now + self.detect_delay, "down", node)

    def resume(self, node: str) -> None:
        n = self.nodes[node]
        n.paused = False
        self.net.resume(node, self.now)
        self.log.append(f"{self.now:.3f} resume {node}")
        n.wake = math.inf  # a tick that fell due while paused was dropped
        self._reschedule(n)
        for run in list(n.runs.values()):
            if run.waiting:  # no step was running: it waits for its ContinueRun
                continue
            self._push(
                self.now + self.step_time, "step", (node, run.task_id, run.epoch, run.step + 1)
            )
        self._push(self.now + self.detect_delay, "up", node)

    # ---------------------------------------------------------------- event loop

    def run_until(self, t_end: float) -> None:
        while True:
            t_net = self.net.next_time()
            t_ev = self._events[0][0] if self._events else math.inf
            t = min(t_net, t_ev)
            if t > t_end:
                break
            self.now = max(self.now, t)
            if t_net <= t_ev:
                d = self.net.pop(t)
                if d is None:
                    continue
                n = self.nodes.get(d.dst)
                if n is None or not n.up or n.paused:
                    continue
                msg = d.message
                if self.wire:
                    msg = decode_coord_message(msg)
                self._apply(n, n.core.handle(self.now, d.src, msg))
                continue
            _, _, kind, data = heapq.heappop(self._events)
            self._event(kind, data)
        self.now = max(self.now, t_end)

    def run_for(self, dt: float) -> None:
        self.run_until(self.now + dt)

    def _event(self, kind: str, data: Any) -> None:
        if kind == "call":
            data()
        elif kind == "tick":
            name, at = data
            n = self.nodes[name]
            if n.up and not n.paused and n.wake == at:
                n.wake = math.inf
                self._apply(n, n.core.tick(self.now))
        elif kind == "step":
            name, task_id, epoch, step = data
            n = self.nodes[name]
            run = n.runs.get(task_id)
            if not n.up or n.paused or run is None or run.epoch != epoch or run.step + 1 != step:
                return
            if step > run.total:
                del n.runs[task_id]
                self._apply(
                    n, n.core.run_finished(self.now, task_id, epoch, scripted_result(run.payload))
                )
                return
            run.step = step
            run.waiting = True
            snap = f"{task_id}:{step}".encode()
            self._apply(n, n.core.step_finished(self.now, task_id, epoch, step, snap))
        elif kind in ("down", "up"):
            name = data
            target = self.nodes[name]
            really_down = not target.up or target.paused
            if (kind == "down") != really_down:
                return
            for other, o in self.nodes.items():
                if other == name or not o.up:
                    continue
                # the oracle's verdict reaches the core through the node's own glue
                event = MemberDown(name, 0, False) if kind == "down" else MemberUp(name, "", 0)
                self._apply(o, membership_to_coordinator(o.core, self.now, event, _no_advert))

    def _apply(self, n: CoordNode, effects: list[CoordEffect]) -> None:
        perform_coord_effects(_HarnessDriver(self, n), n.store, effects)
        self._reschedule(n)

    def _reschedule(self, n: CoordNode) -> None:
        if not n.up or n.paused:
            return
        at = n.core.next_deadline()
        if at == n.wake or at == math.inf:
            n.wake = at if at != math.inf else n.wake
            return
        at = max(at, self.now)
        n.wake = at
        self._push(at, "tick", (n.name, at))

    # ---------------------------------------------------------------- checks

    def commits_for(self, task_id: str) -> list[CommitEvent]:
        return [c for c in self.commits if c.task_id == task_id]

    def executions_for(self, task_id: str) -> int:
        return sum(1 for _, _, s in self.starts if s.task_id == task_id)


class _HarnessDriver:
    """What the harness does with one node's coordination effects (a `glue.CoordDriver`):
    messages go over the fake network, runs are scripted steps, outcomes are recorded."""

    def __init__(self, cluster: CoordCluster, node: CoordNode) -> None:
        self.cluster = cluster
        self.node = node

    def send_message(self, eff: SendMessage) -> None:
        c = self.cluster
        msg: Any = eff.message.to_wire() if c.wire else eff.message
        c.net.send(c.now, self.node.name, eff.to, msg)

    def start_run(self, eff: StartRun) -> None:
        c, n = self.cluster, self.node
        c.starts.append((c.now, n.name, eff))
        total = scripted_steps(eff.payload)
        n.runs[eff.task_id] = _Run(eff.task_id, eff.epoch, total, eff.resume_step, eff.payload)
        c._push(c.now + c.step_time, "step", (n.name, eff.task_id, eff.epoch, eff.resume_step + 1))

    def continue_run(self, eff: ContinueRun) -> None:
        c, n = self.cluster, self.node
        run = n.runs.get(eff.task_id)
        if run is not None and run.epoch == eff.epoch:
            run.waiting = False
            c._push(c.now + c.step_time, "step", (n.name, eff.task_id, eff.epoch, eff.step + 1))

    def abort_run(self, eff: AbortRun) -> None:
        c, n = self.cluster, self.node
        c.aborts.append((c.now, n.name, eff))
        run = n.runs.get(eff.task_id)
        if run is not None and run.epoch == eff.epoch:
            del n.runs[eff.task_id]

    def leader_changed(self, eff: LeaderChanged) -> None:
        self.cluster.leader_changes.append((self.cluster.now, eff))

    def task_queued(self, eff: TaskQueued) -> None:
        pass  # the task waits in its owner's durable queue; nothing for the harness to do

    def task_committed(self, eff: TaskCommitted) -> None:
        c = self.cluster
        c.commits.append(
            CommitEvent(c.now, self.node.name, eff.task_id, eff.epoch, eff.leader, eff.result)
        )

    def task_failed(self, eff: TaskFailed) -> None:
        self.cluster.failures.append((self.cluster.now, eff.task_id, eff.reason))
