"""The seeded discrete-event simulator: the node's real cores on N simulated devices.

One heap of events (deliveries, node wake-ups, job completions, scheduled actions),
ordered by (time, sequence number), so a seed replays a run byte for byte. Each node runs
the real pure cores: SWIM membership, capability gossip, the coordination protocol over
its task ledger, and a SmartScheduler for REPL jobs and sub-calls. Effects go through the
node's own glue (`kowalski_node/glue.py`): the coordination core's ledger writes are made
durable on the node's `InMemoryLedgerStore` before its other effects, as the node does on
SQLite. Durable state (that store, the advert version) survives a restart: the new core
loads its ledger from the store's snapshot; everything else is rebuilt.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, assert_never

from kowalski_node.capabilities import AdvertChanged, CapabilityGossip, GossipConfig, GossipSend
from kowalski_node.coordination import (
    AbortRun,
    CommitRequest,
    ContinueRun,
    CoordConfig,
    Coordinator,
    LeaderChanged,
    LeaderPhase,
    SendMessage,
    StartRun,
    TaskCommitted,
    TaskFailed,
    TaskQueued,
)
from kowalski_node.election import home_acceptors
from kowalski_node.errors import NoQuorum
from kowalski_node.glue import (
    membership_to_coordinator,
    membership_to_gossip,
    perform_coord_effects,
    perform_gossip_effects,
    perform_ledger_writes,
    perform_membership_effects,
)
from kowalski_node.membership import (
    LeaveComplete,
    MemberAlive,
    MemberDown,
    Membership,
    MembershipEvent,
    MemberSuspect,
    MemberUp,
    Send,
    SwimConfig,
)
from kowalski_node.placement import Requirement, SmartScheduler
from kowalski_node.tasks import InMemoryLedgerStore, LedgerState, TaskLedger
from simulations.devices import SUBCALL_MODEL, Device, make_device, profile_of
from simulations.metrics import Recorder
from simulations.network import (
    SimNetwork,
    bridge_connectivity,
    groups_connectivity,
    ring_connectivity,
)
from simulations.scenario import FaultSpec, Scenario
from simulations.workload import (
    Job,
    RunState,
    context_mb,
    expected_result,
    make_script,
    parse_script,
)

DELIVER, WAKE, JOB, ACTION = 0, 1, 2, 3
FORGET_DEAD_S = 30.0
CONTEXT_FETCH_DEADLINE_S = 90.0  # as `ContextConfig.fetch_deadline_s`: then the run fails
"""A node killed for good leaves the home sets of *new* keys this long after its death (at
most half the fault's repeat interval), modelling an operator removing it. Until then it
is one of the 3 acceptors of some new keys, which then survive no further death."""
MEMBERSHIP, GOSSIP, COORD = 0, 1, 2
JUSTIFY_WINDOW = 10.0
"""A "dead" verdict within this long after the peer was really down (or a partition) is not false."""
SETTLE_MAX = 300.0
"""After the run, at most this much more simulated time for unfinished tasks before they count as lost."""
REPL_REQ = Requirement(language="python")
SUB_REQ = Requirement(model=SUBCALL_MODEL)


class StuckSimulationError(RuntimeError):
    """A node asked to be woken at the same instant too many times."""


@dataclass(slots=True)
class SimNode:
    name: str
    idx: int
    dev: Device
    offset: float
    drift: float
    store: InMemoryLedgerStore
    membership: Membership
    gossip: CapabilityGossip
    coord: Coordinator
    scheduler: SmartScheduler
    adv_version: int = 0
    gen: int = 0
    up: bool = True
    paused: bool = False
    down_until: float = -math.inf
    """Global time the node last came back from a kill or pause (for judging verdicts)."""
    held: list[tuple[int, Any]] = field(default_factory=list)
    held_submits: list[tuple[str, bytes]] = field(default_factory=list)
    """Submissions that reached this node while it was paused: handled when it resumes."""
    dead_for_good: bool = False
    runs: dict[str, RunState] = field(default_factory=dict)
    wake_at: float = math.inf
    wake_local: float = math.inf
    jobs_running: int = 0
    peers_dirty: bool = False
    """Membership's live set changed since the gossip core was last told."""
    peers_pending: bool = False
    """A live-set change not yet handed to the gossip core (see ``_peers_changed``)."""
    gossip_has_peers: bool = False
    dl_m: float = 0.0
    dl_g: float = 0.0
    dl_c: float = 0.0
    dirty: int = 7
    """Which cached core deadlines to refresh: 1 membership, 2 gossip, 4 coordination."""
    driver: _NodeCoordDriver | None = None
    member_sink: _NodeMembershipSink | None = None
    gossip_sink: _NodeGossipSink | None = None
    """Performs this node's coordination effects (made on first use)."""

    def local(self, t: float) -> float:
        return t * (1.0 + self.drift) + self.offset

    def to_global(self, local: float) -> float:
        return (local - self.offset) / (1.0 + self.drift)


class Simulation:
    """Build with a :class:`Scenario`, call :meth:`run`, read :attr:`rec` and :meth:`results`."""

    MAX_WAKES_SAME_INSTANT = 5000

    def __init__(self, scn: Scenario) -> None:
        self.scn = scn
        master = random.Random(scn.seed)
        self.net_rng = random.Random(master.getrandbits(64))
        self.work_rng = random.Random(master.getrandbits(64))
        self.fault_rng = random.Random(master.getrandbits(64))
        self.dev_rng = random.Random(master.getrandbits(64))
        self.core_rng = random.Random(master.getrandbits(64))
        self.swim = SwimConfig.lan() if scn.membership == "lan" else SwimConfig.wan()
        self.gossip_cfg = GossipConfig.lan() if scn.membership == "lan" else GossipConfig.wan()
        self.coord_cfg = CoordConfig.lan() if scn.membership == "lan" else CoordConfig.wan()
        self.t = 0.0
        self.rec = Recorder()
        self._heap: list[tuple[float, int, int, Any]] = []
        self._seq = 0
        self._same_t = -1.0
        self._same_count = 0
        self.events = 0
        self.partition_until = -math.inf
        self.partition_active = False
        self.submitted = 0
        self.resubmits = 0
        self._task_of: dict[str, str] = {}
        self.context_holders: dict[bytes, set[str]] = {}
        """Context blob id -> nodes whose disk holds it (kept across restarts)."""
        self._forgotten: set[str] = set()
        self._acceptors_of: dict[str, tuple[str, ...]] = {}
        self.layer_plan: Any = None
        self.extra_time = 0.0
        n = scn.nodes
        self.names = [f"n{i:03d}" for i in range(n)]
        classes = self._assign_classes(n)
        devices = []
        for cls in classes:
            access = scn.network.access[cls].sample(self.dev_rng)
            devices.append(make_device(cls, self.dev_rng, access))
        self.net = SimNetwork(
            self.net_rng,
            scn.network,
            [d.access_latency for d in devices],
            [d.cls == "phone" for d in devices],
        )
        self.nodes: list[SimNode] = []
        self.by_name: dict[str, SimNode] = {}
        everyone = [(nm, nm) for nm in self.names]
        for i, (name, dev) in enumerate(zip(self.names, devices, strict=True)):
            offset = (
                self.dev_rng.uniform(-scn.clock_skew, scn.clock_skew) if scn.clock_skew else 0.0
            )
            drift = (
                self.dev_rng.uniform(-scn.clock_drift, scn.clock_drift) if scn.clock_drift else 0.0
            )
            store = InMemoryLedgerStore()
            node = self._new_node(name, i, dev, offset, drift, store, members=everyone)
            self.nodes.append(node)
            self.by_name[name] = node
        for node in self.nodes:
            now = node.local(0.0)
            for other in self.names:
                if other != node.name:
                    # the starting view (nothing to send yet; an empty ledger writes nothing)
                    perform_ledger_writes(node.store, node.coord.peer_up(now, other))
            node.gossip.set_peers(self.names)
            node.gossip_has_peers = len(self.names) > 1
            self._publish(node)
            self._reschedule(node)

    # ================================================================ construction

    def _assign_classes(self, n: int) -> list[str]:
        classes: list[str] = []
        fracs = list(self.scn.devices.items())
        for i, (cls, frac) in enumerate(fracs):
            k = n - len(classes) if i == len(fracs) - 1 else round(frac * n)
            classes.extend([cls] * max(0, min(k, n - len(classes))))
        self.dev_rng.shuffle(classes)
        return classes

    def _new_node(
        self,
        name: str,
        idx: int,
        dev: Device,
        offset: float,
        drift: float,
        store: InMemoryLedgerStore,
        *,
        members: list[tuple[str, str]],
        now: float | None = None,
    ) -> SimNode:
        """Fresh volatile cores for a node (at start, or after a restart) over its durable store."""
        rng = random.Random(self.core_rng.getrandbits(64))
        if now is None:
            now = offset  # the node's local time at global time 0
        membership = Membership(
            name,
            config=self.swim,
            rng=random.Random(rng.getrandbits(64)),
            now=now,
            addr=name,
            members=members,
        )
        gossip = CapabilityGossip(
            name, rng=random.Random(rng.getrandbits(64)), now=now, config=self.gossip_cfg
        )
        ledger = TaskLedger(LedgerState(store.load()), name, random.Random(rng.getrandbits(64)))
        coord = Coordinator(
            name, ledger, rng=random.Random(rng.getrandbits(64)), config=self.coord_cfg
        )
        return SimNode(
            name, idx, dev, offset, drift, store, membership, gossip, coord, SmartScheduler()
        )

    # ================================================================ event heap

    def _push(self, t: float, kind: int, data: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, data))

    def at(self, t: float, action: Callable[[], None]) -> None:
        self._push(t, ACTION, action)

    def run(self) -> None:
        scn = self.scn
        self._schedule_faults()
        self._schedule_submissions()
        self.at(scn.active_until, self._heal_all)
        self.at(0.0, self._sample)
        if scn.placement is not None:
            self.at(scn.placement.plan_at, self._placement_plan)
            self.at(scn.placement.leave_at, self._placement_leave)
        self._run_until(scn.duration)
        # Final settle (Jepsen's "final reads"): everything is healed; give unfinished tasks
        # time to finish before calling them lost, and say how long that took.
        end = scn.duration
        while self.unfinished_tasks() and end < scn.duration + SETTLE_MAX:
            end += 1.0
            self._run_until(end)
        self.extra_time = end - scn.duration

    def _run_until(self, end: float) -> None:
        heap = self._heap
        pop = heapq.heappop
        deliver = self._deliver
        wake = self._wake
        job_done = self._job_done
        events = 0
        try:
            while heap and heap[0][0] <= end:
                t, _, kind, data = pop(heap)
                self.t = t
                events += 1
                if kind == DELIVER:
                    deliver(data)
                elif kind == WAKE:
                    wake(t, data)
                elif kind == JOB:
                    job_done(data)
                else:
                    data()
        finally:
            self.events += events
        self.t = end

    def unfinished_tasks(self) -> list[str]:
        """Submitted tasks that have neither committed nor failed (yet)."""
        return [t for t, tt in self.rec.tasks.items() if not tt.commits and tt.failed is None]

    # ================================================================ network

    def _send(self, node: SimNode, to: str, chan: int, msg: Any) -> None:
        dst = self.by_name.get(to)
        if dst is None:
            return
        src_i = node.idx
        dst_i = dst.idx
        net = self.net
        if net.clean:  # the common case, inlined: exactly what ``delays`` would draw
            net.sent += 1
            access = net.access
            self._seq += 1
            heapq.heappush(
                self._heap,
                (
                    self.t + (access[src_i] + access[dst_i] + net.jitter()),
                    self._seq,
                    DELIVER,
                    (dst_i, dst.gen, src_i, chan, msg),
                ),
            )
            return
        delays = net.delays(src_i, dst_i)
        if not delays:
            return
        t = self.t
        heap = self._heap
        data = (dst_i, dst.gen, src_i, chan, msg)
        for d in delays:
            self._seq += 1
            heapq.heappush(heap, (t + d, self._seq, DELIVER, data))

    def _deliver(self, data: tuple[int, int, int, int, Any]) -> None:
        dst_i, gen, src_i, chan, msg = data
        node = self.nodes[dst_i]
        if not node.up or node.gen != gen:
            self.net.dropped_down += 1
            return
        talk = self.net.connectivity
        if talk is not None and src_i != dst_i and not talk(src_i, dst_i):
            self.net.dropped_partition += 1
            return
        if node.paused:
            node.held.append((DELIVER, data))
            return
        now = self.t * (1.0 + node.drift) + node.offset  # node.local(self.t), inlined
        src = self.names[src_i]
        if chan == MEMBERSHIP:
            node.dirty |= 1
            effects: list[Any] = node.membership.handle(now, src, msg)
            if effects:
                self._membership_effects(node, effects)
        elif chan == GOSSIP:
            effects = node.gossip.handle(now, src, msg)
            if not effects:
                # Capability gossip changes no state (so no deadline) without an effect: a
                # merge that changes the table emits AdvertChanged, a digest only answers.
                return
            self._gossip_effects(node, effects)
        else:
            node.dirty |= 4
            effects = node.coord.handle(now, src, msg)
            if effects:
                self._coord_effects(node, effects)
        if node.peers_dirty:
            self._peers_changed(node)
        self._reschedule(node)

    # ================================================================ node timers

    def _reschedule(self, node: SimNode) -> None:
        if not node.up or node.paused:
            return
        dirty = node.dirty
        if dirty:
            if dirty & 1:
                node.dl_m = node.membership.next_deadline()
            if dirty & 2:
                node.dl_g = node.gossip.next_deadline()
            if dirty & 4:
                node.dl_c = node.coord.next_deadline()
            node.dirty = 0
        dl = node.dl_m
        if node.dl_g < dl:
            dl = node.dl_g
        if node.dl_c < dl:
            dl = node.dl_c
        if dl == math.inf:
            return
        g = (dl - node.offset) / (1.0 + node.drift)  # node.to_global(dl), inlined
        t = self.t
        if g < t:
            g = t
        if g == node.wake_at:
            return
        node.wake_at = g
        node.wake_local = dl
        self._seq += 1
        heapq.heappush(self._heap, (g, self._seq, WAKE, (node.idx, node.gen)))

    def _peers_changed(self, node: SimNode) -> None:
        """Hand membership's live set to the gossip core, now or just before it next reads it.

        The gossip core reads its peer list only in ``tick``, and its deadline depends only
        on whether the list is empty. So while emptiness does not change, a burst of
        membership changes (a partition, a churn wave) costs one ``set_peers``, not one each.
        """
        node.peers_dirty = False
        if (node.membership.cluster_size() > 1) != node.gossip_has_peers:
            self._apply_peers(node)
        else:
            node.peers_pending = True

    def _apply_peers(self, node: SimNode) -> None:
        node.peers_pending = False
        peers = node.membership.live_peers(include_self=False)
        node.gossip.set_peers(peers)
        node.gossip_has_peers = bool(peers)
        node.dirty |= 2

    def _after(self, node: SimNode) -> None:
        if node.peers_dirty:
            self._peers_changed(node)
        self._reschedule(node)

    def _wake(self, t: float, data: tuple[int, int]) -> None:
        idx, gen = data
        node = self.nodes[idx]
        if node.gen != gen or node.wake_at != t or not node.up or node.paused:
            return
        node.wake_at = math.inf
        if self._same_t == t:
            count = self._same_count = self._same_count + 1
        else:
            self._same_t = t
            count = self._same_count = 1
        if count > self.MAX_WAKES_SAME_INSTANT:
            raise StuckSimulationError(
                f"node {node.name} keeps waking at t={t} (seed {self.scn.seed})"
            )
        now = t * (1.0 + node.drift) + node.offset  # node.local(t), inlined
        if now < node.wake_local:
            now = node.wake_local
        if node.dl_m <= now:
            node.dirty |= 1
            effects: list[Any] = node.membership.tick(now)
            if effects:
                self._membership_effects(node, effects)
        if node.dl_g <= now:
            node.dirty |= 2
            if node.peers_pending:
                self._apply_peers(node)
            effects = node.gossip.tick(now)
            if effects:
                self._gossip_effects(node, effects)
        if node.dl_c <= now:
            node.dirty |= 4
            effects = node.coord.tick(now)
            if effects:
                self._coord_effects(node, effects)
        if node.peers_dirty:
            self._peers_changed(node)
        self._reschedule(node)

    # ================================================================ effects

    def _membership_effects(self, node: SimNode, effects: list[Any]) -> None:
        node.dirty |= 1
        sink = node.member_sink
        if sink is None:
            sink = node.member_sink = _NodeMembershipSink(self, node)
        perform_membership_effects(sink, effects)

    def _member_event(self, node: SimNode, e: MembershipEvent) -> None:
        """What the simulator does when a node's membership reports an event, then the
        node's own glue to its coordinator (as `TaskEngine.member_event` does)."""
        match e:
            case MemberDown():
                node.peers_dirty = True
                node.dirty |= 4
                self._verdict(node, e.peer)
            case MemberUp():
                node.peers_dirty = True
                node.dirty |= 4
                self.rec.log(self.t, node.name, f"up {e.peer}")
            case MemberSuspect() | MemberAlive() | LeaveComplete():
                pass
            case _:
                assert_never(e)
        # as the node does (`Node._on_member_event`): capability gossip first, then the
        # coordinator; a peer that comes up gets this node's advert pushed at once
        gossip_effects = membership_to_gossip(node.gossip, node.local(self.t), e)
        if gossip_effects:
            self._gossip_effects(node, gossip_effects)
        coord_effects = membership_to_coordinator(
            node.coord, node.local(self.t), e, node.gossip.table.get
        )
        if coord_effects:
            self._coord_effects(node, coord_effects)

    def _gossip_effects(self, node: SimNode, effects: list[Any]) -> None:
        node.dirty |= 2
        sink = node.gossip_sink
        if sink is None:
            sink = node.gossip_sink = _NodeGossipSink(self, node)
        perform_gossip_effects(sink, effects)

    def _coord_effects(self, node: SimNode, effects: list[Any]) -> None:
        node.dirty |= 4
        driver = node.driver
        if driver is None:
            driver = node.driver = _NodeCoordDriver(self, node)
        perform_coord_effects(driver, node.store, effects)

    def _verdict(self, observer: SimNode, peer: str) -> None:
        target = self.by_name.get(peer)
        t = self.t
        justified = (
            target is None
            or not target.up
            or target.paused
            or target.down_until > t - JUSTIFY_WINDOW
        )
        partitioned = self.partition_active or self.partition_until > t - JUSTIFY_WINDOW
        self.rec.member_down(t, observer.name, peer, justified, partitioned)

    # ================================================================ capability adverts

    def _publish(self, node: SimNode) -> None:
        node.adv_version += 1
        load = min(1.0, node.jobs_running / node.dev.cores + 0.05 * len(node.runs))
        profile = profile_of(node.name, node.dev, node.adv_version, load)
        self.rec.published(self.t, node.name, node.adv_version)
        self._gossip_effects(node, node.gossip.publish(node.local(self.t), profile))

    def _republish_loop(self, node: SimNode, gen: int) -> None:
        if node.gen != gen or not node.up or self.scn.republish <= 0:
            return
        if not node.paused:
            self._publish(node)
            self._after(node)
        self.at(
            self.t + self.scn.republish * (0.75 + 0.5 * self.work_rng.random()),
            lambda: self._republish_loop(node, gen),
        )

    # ================================================================ runs (leader side)

    def _start_run(self, node: SimNode, e: StartRun) -> None:
        run = RunState(e.task_id, e.epoch, parse_script(e.payload), e.payload, e.resume_step)
        node.runs[e.task_id] = run
        self.rec.run_started(self.t, node.name, e.task_id, e.epoch, e.resume_step)
        mb = context_mb(e.payload)
        if mb > 0 and node.name not in self.context_holders.get(self._blob_id(e.payload), ()):
            self._fetch_context(node, run, mb, self.t, 0)  # the first step waits for it
            return
        self._begin_step(node, run)

    def _begin_step(self, node: SimNode, run: RunState) -> None:
        if run.step >= len(run.script):
            node.runs.pop(run.task_id, None)
            effects = node.coord.run_finished(
                node.local(self.t), run.task_id, run.epoch, expected_result(run.payload)
            )
            self._coord_effects(node, effects)
            return
        llm, repl, subs = run.script[run.step]
        segments = [[Job("llm", llm)]]
        segments.extend([Job("repl", r)] for r in repl)
        if subs:
            segments.append([Job("sub", s) for s in subs])
        run.segments = segments
        run.segment = 0
        self._start_segment(node, run)

    def _live_profiles(self, node: SimNode) -> list[Any]:
        table = node.gossip.table
        out = []
        for peer in node.membership.alive_peers():
            p = table.get(peer)
            if p is not None:
                out.append(p)
        own = table.get(node.name)
        if own is not None:
            out.append(own)
        return out

    def _start_segment(self, node: SimNode, run: RunState) -> None:
        jobs = run.segments[run.segment]
        run.token += 1
        run.outstanding = len(jobs)
        remote = [j for j in jobs if j.kind != "llm"]
        if remote:
            req = REPL_REQ if remote[0].kind == "repl" else SUB_REQ
            placement = node.scheduler.place(node.local(self.t), self._live_profiles(node), req)
            ranked = placement.best(len(remote)) or [node.name]
            for i, job in enumerate(remote):
                job.target = ranked[i % len(ranked)]
        for i, job in enumerate(jobs):
            if job.kind == "llm":
                job.target = node.name
            self._dispatch_job(node, run, i, job, 0.0)

    def _job_time(self, node: SimNode, job: Job) -> float:
        target = self.by_name[job.target]
        t = job.work / target.dev.speed
        if target is not node:
            t += 2.0 * (node.dev.access_latency + target.dev.access_latency)
        return t

    def _dispatch_job(self, node: SimNode, run: RunState, i: int, job: Job, extra: float) -> None:
        target = self.by_name[job.target]
        target.jobs_running += 1
        self._push(
            self.t + extra + self._job_time(node, job),
            JOB,
            (node.idx, node.gen, run.task_id, run.epoch, run.token, i),
        )

    def _job_done(self, data: tuple[int, int, str, int, int, int]) -> None:
        idx, gen, task_id, epoch, token, i = data
        node = self.nodes[idx]
        if node.gen != gen or not node.up:
            return
        if node.paused:
            node.held.append((JOB, data))
            return
        run = node.runs.get(task_id)
        if run is None or run.epoch != epoch or run.token != token:
            return
        job = run.segments[run.segment][i]
        target = self.by_name[job.target]
        target.jobs_running = max(0, target.jobs_running - 1)
        now = node.local(self.t)
        if target is not node:
            reachable = target.up and not target.paused and self.net.can_talk(node.idx, target.idx)
            if not reachable:
                node.scheduler.observe_failure(now, target.name)
                job.tried.append(target.name)
                req = REPL_REQ if job.kind == "repl" else SUB_REQ
                req = Requirement(
                    req.language, req.min_memory, req.model, req.backend, frozenset(job.tried)
                )
                ranked = node.scheduler.place(now, self._live_profiles(node), req).best(1)
                job.target = ranked[0] if ranked else node.name
                self._dispatch_job(node, run, i, job, self.scn.workload.job_timeout)
                return
            node.scheduler.observe_latency(
                now, target.name, 2000.0 * (node.dev.access_latency + target.dev.access_latency)
            )
            node.scheduler.observe_success(now, target.name)
        job.done = True
        run.outstanding -= 1
        if run.outstanding > 0:
            return
        run.segment += 1
        if run.segment < len(run.segments):
            self._start_segment(node, run)
            return
        run.step += 1
        run.waiting_ack = True
        snapshot = f"{task_id}:{run.step}".encode()
        self._coord_effects(node, node.coord.step_finished(now, task_id, epoch, run.step, snapshot))
        self._after(node)

    # ================================================================ workload

    def _schedule_submissions(self) -> None:
        rate = self.scn.workload.rate
        if rate <= 0:
            return
        self.at(self.work_rng.expovariate(rate), self._submit_one)

    def _submit_one(self) -> None:
        if self.t >= self.scn.active_until:
            return
        up = [n for n in self.nodes if n.up]
        if up:
            if self.rec.tasks and self.work_rng.random() < 0.05:
                self._resubmit()
            else:
                self.submitted += 1
                payload = make_script(self.work_rng, self.scn.workload, self.submitted)
                key = f"task-{self.submitted}"
                node = up[self.work_rng.randrange(len(up))]
                self._client_send(key, payload, node, 0)
        self.at(self.t + self.work_rng.expovariate(self.scn.workload.rate), self._submit_one)

    # The client: it sends a key to a node; the node forwards it to the key's home (the
    # first home member its membership believes alive) and answers once the task is on a
    # majority of its acceptors. A paused node holds the request (and handles it when it
    # resumes); a dead one, a refusal (no quorum) or no answer within client_timeout makes
    # the client retry the same key at another random node.

    def _client_send(self, key: str, payload: bytes, node: SimNode, attempt: int) -> None:
        deadline = self.t + self.scn.workload.client_timeout
        if attempt > 0:
            self.rec.client_retries += 1
            self.rec.log(self.t, node.name, f"client retry {key} #{attempt}")
        if not node.up:
            self.at(deadline, lambda: self._client_retry(key, payload, node, attempt))
            return
        if node.paused:
            node.held_submits.append((key, payload))
            self.at(deadline, lambda: self._client_retry(key, payload, node, attempt))
            return
        home = self._arrive(node, key, payload)
        self._client_wait(key, payload, node, home, attempt, deadline)

    def _arrive(self, node: SimNode, key: str, payload: bytes) -> SimNode | None:
        """A submission reaches ``node``: forward to the home and submit there; returns the
        node that holds the task now (None when it was refused or could not be handed on)."""
        acceptors = self._home(key)
        target = node
        if acceptors and node.name not in acceptors:
            live = set(node.coord.live_peers())
            home = [a for a in acceptors if a in live] or list(acceptors)
            target = self.by_name[home[0]]
            if not target.up:
                return None
            if target.paused:
                target.held_submits.append((key, payload))
                return None
        try:
            out, effects = target.coord.submit(
                target.local(self.t), payload, idempotency_key=key, acceptors=acceptors
            )
        except NoQuorum:
            self.rec.client_refusals += 1
            self.rec.log(self.t, target.name, f"no quorum for {key}")
            return None
        if out.task_id not in self.rec.tasks:
            if not out.created:
                self.rec.violation(self.t, out.task_id, f"fresh key {key} was reported as known")
            self.rec.submitted(self.t, target.name, out.task_id, expected_result(payload), key)
            self._acceptors_of[out.task_id] = out.record.acceptors
        self._store_context(target, payload)
        self._coord_effects(target, effects)
        self._after(target)
        return target

    # ================================================================ large contexts
    # A context is a content-addressed blob, never inside a coordination message: the node
    # that takes the submission stores it and copies it to `context_copies` live peers (in
    # rendezvous order of its id) before answering; a leader without it fetches it from a
    # live holder before its first step, the next holder if that one dies meanwhile.

    @staticmethod
    def _blob_id(payload: bytes) -> bytes:
        return hashlib.blake2b(payload, digest_size=8).digest()

    def _transfer_time(self, src: SimNode, dst: SimNode, mb: float) -> float:
        rate = self.scn.workload.context_rate_mb_s * min(src.dev.speed, dst.dev.speed)
        return 2.0 * (src.dev.access_latency + dst.dev.access_latency) + mb / max(rate, 1e-6)

    def _store_context(self, node: SimNode, payload: bytes) -> None:
        mb = context_mb(payload)
        if mb <= 0:
            return
        blob = self._blob_id(payload)
        held = self.context_holders.setdefault(blob, set())
        held.add(node.name)
        peers = [p for p in node.membership.alive_peers() if p != node.name]
        peers.sort(key=lambda p: hashlib.blake2b(blob + p.encode(), digest_size=8).digest())
        for peer in peers[: self.scn.workload.context_copies]:
            if peer in held:
                continue
            dst = self.by_name[peer]
            self.at(
                self.t + self._transfer_time(node, dst, mb),
                partial(self._context_copied, blob, node, node.gen, dst),
            )

    def _context_copied(self, blob: bytes, src: SimNode, gen: int, dst: SimNode) -> None:
        if src.gen == gen and src.up and dst.up and self.net.can_talk(src.idx, dst.idx):
            self.context_holders[blob].add(dst.name)

    def _context_ready(self, payload: bytes) -> bool:
        """The submission may be answered: its context is on a second node (when one is up)."""
        if context_mb(payload) <= 0:
            return True
        held = [
            h for h in self.context_holders.get(self._blob_id(payload), ()) if self.by_name[h].up
        ]
        return len(held) >= 2 or sum(1 for n in self.nodes if n.up) < 2

    def _fetch_context(
        self, node: SimNode, run: RunState, mb: float, started: float, attempt: int
    ) -> None:
        if not node.up or node.runs.get(run.task_id) is not run:
            return
        if node.paused:
            self.at(self.t + 0.05, lambda: self._fetch_context(node, run, mb, started, attempt))
            return
        blob = self._blob_id(run.payload)
        holders = sorted(
            h
            for h in self.context_holders.get(blob, ())
            if (src := self.by_name[h]).up
            and not src.paused
            and h != node.name
            and self.net.can_talk(node.idx, src.idx)
        )
        if not holders:
            if self.t - started > CONTEXT_FETCH_DEADLINE_S:
                self.rec.context_fetch_failures += 1
                node.runs.pop(run.task_id, None)
                self._coord_effects(
                    node,
                    node.coord.run_failed(
                        node.local(self.t), run.task_id, run.epoch, "context not found"
                    ),
                )
                self._after(node)
                return
            self.rec.context_fetch_retries += 1
            self.at(self.t + 0.25, lambda: self._fetch_context(node, run, mb, started, attempt + 1))
            return
        src = self.by_name[holders[attempt % len(holders)]]
        gen = node.gen

        def done() -> None:
            if node.gen != gen or node.runs.get(run.task_id) is not run:
                return
            if src.up and not src.paused and self.net.can_talk(node.idx, src.idx):
                self.context_holders[blob].add(node.name)
                self.rec.context_fetches.append(self.t - started)
                self._begin_step(node, run)
            else:  # the holder died or went away mid-transfer: the next one
                self.rec.context_fetch_retries += 1
                self._fetch_context(node, run, mb, started, attempt + 1)

        self.at(self.t + self._transfer_time(src, node, mb), done)

    def _home(self, key: str) -> tuple[str, ...]:
        """The key's acceptor set over the cluster's members, where a node killed for good
        is forgotten FORGET_DEAD_S after its death (an operator removing it, or a member
        table expiring it); a dead-but-remembered member would leave some keys with only
        one live acceptor and no majority."""
        forgotten = self._forgotten
        return home_acceptors(key, [n for n in self.names if n not in forgotten])

    def _forget(self, node: SimNode) -> None:
        if node.dead_for_good and not node.up:
            self._forgotten.add(node.name)
            self.rec.log(self.t, node.name, "forgotten (dead for good)")

    def _client_wait(
        self,
        key: str,
        payload: bytes,
        node: SimNode,
        holder: SimNode | None,
        attempt: int,
        deadline: float,
    ) -> None:
        task_id = self._task_of.get(key)
        if task_id is None:
            from kowalski_node.tasks.ledger import task_id_for_key

            task_id = self._task_of[key] = task_id_for_key(key)
        if (
            holder is not None
            and holder.up
            and not holder.paused
            and node.up
            and not node.paused
            and holder.coord.stored_on_majority(task_id)
            and self._context_ready(payload)
        ):
            self.rec.acked(self.t, holder.name, task_id)
            return
        if self.t >= deadline or holder is None or not holder.up:
            self.at(max(self.t, deadline), lambda: self._client_retry(key, payload, node, attempt))
            return
        self.at(
            self.t + 0.02,
            lambda: self._client_wait(key, payload, node, holder, attempt, deadline),
        )

    def _client_retry(self, key: str, payload: bytes, last: SimNode, attempt: int) -> None:
        if attempt >= 60:
            self.rec.log(self.t, last.name, f"client gives up on {key}")
            return
        others = [n for n in self.nodes if n.up and n is not last] or [last]
        self._client_send(key, payload, others[self.work_rng.randrange(len(others))], attempt + 1)

    def _resubmit(self) -> None:
        """Resubmit an earlier key at a random node: the same task, never run again."""
        ids = list(self.rec.tasks)
        tt = self.rec.tasks[ids[self.work_rng.randrange(len(ids))]]
        live = [n for n in self.nodes if n.up and not n.paused]
        if not live or not tt.key:
            return
        node = live[self.work_rng.randrange(len(live))]
        acceptors = self._home(tt.key)
        target = node
        if acceptors and node.name not in acceptors:
            alive = set(node.coord.live_peers())
            home = [a for a in acceptors if a in alive] or list(acceptors)
            target = self.by_name[home[0]]
            if not target.up or target.paused:
                return
        try:
            out, effects = target.coord.submit(
                target.local(self.t), b"ignored", idempotency_key=tt.key, acceptors=acceptors
            )
        except NoQuorum:
            return
        self.resubmits += 1
        if out.task_id != tt.task_id:
            self.rec.violation(
                self.t, tt.task_id, "resubmission with a known key named another task"
            )
        self._coord_effects(target, effects)
        self._after(target)

    # ================================================================ faults

    def _schedule_faults(self) -> None:
        for f in self.scn.faults:
            if f.kind == "churn":
                self.at(f.at, partial(self._churn, f))
                continue
            t = f.at
            while t < min(f.until, self.scn.active_until):
                self.at(t, partial(self._fault, f))
                if f.every <= 0:
                    break
                t += f.every

    def _candidates(self) -> list[SimNode]:
        return [n for n in self.nodes if n.up and not n.paused]

    def _pick(self, f: FaultSpec, k: int) -> list[SimNode]:
        live = self._candidates()
        if not live:
            return []
        rng = self.fault_rng
        if f.target in ("leader", "busiest-leader"):
            leaders = [n for n in live if n.coord.led_tasks()]
            if leaders:
                if f.target == "busiest-leader":
                    leaders.sort(key=lambda n: (-len(n.coord.led_tasks()), n.idx))
                    return leaders[:k]
                return rng.sample(leaders, min(k, len(leaders)))
        if f.target == "owner":
            owners = [n for n in live if n.coord.owned_tasks()]
            if owners:
                return rng.sample(owners, min(k, len(owners)))
        return rng.sample(live, min(k, len(live)))

    def _within_one_death(self, picked: list[SimNode], f: FaultSpec) -> list[SimNode]:
        """Kills for good stay within the promise, "a task survives any one death": a node
        is not killed for good while an unfinished task has it and an already dead node
        among its acceptors (another owner is picked instead, if any)."""
        dead = {n.name for n in self.nodes if n.dead_for_good}
        unfinished = self.unfinished_tasks()
        risky: set[str] = set()
        for task_id in unfinished:
            acc = self._acceptors_of.get(task_id, ())
            if dead & set(acc):
                risky.update(acc)
        ok = [n for n in picked if n.name not in risky]
        if len(ok) < len(picked):
            spare = [
                n
                for n in self._candidates()
                if n.name not in risky and n not in ok and n.coord.owned_tasks()
            ]
            ok.extend(spare[: len(picked) - len(ok)])
        return ok

    def _fault(self, f: FaultSpec) -> None:
        if self.t >= self.scn.active_until:
            return
        n = len(self.nodes)
        if f.kind == "kill":
            picked = self._pick(f, f.how_many(n))
            if f.permanent:
                picked = self._within_one_death(picked, f)
            for node in picked:
                self._kill(node, f"kill ({f.target}){' for good' if f.permanent else ''}")
                if f.permanent:
                    node.dead_for_good = True
                    forget = min(FORGET_DEAD_S, f.every / 2) if f.every else FORGET_DEAD_S
                    self.at(self.t + forget, partial(self._forget, node))
                elif f.restart_after is not None:
                    self.at(self.t + f.restart_after, partial(self._restart, node))
        elif f.kind == "pause":
            for node in self._pick(f, f.how_many(n)):
                self._pause(node)
                self.at(self.t + f.duration, partial(self._resume, node))
        elif f.kind == "partition":
            self._partition(f)
        elif f.kind == "network":
            self.net.set_faults(f.loss, f.duplicate, f.reorder)
            self.rec.log(
                self.t, "-", f"network loss={f.loss} dup={f.duplicate} reorder={f.reorder}"
            )
            self.rec.timeline_faults.append(
                (self.t, self.t + f.duration, "network", f"loss {f.loss:.0%}")
            )
            self.at(min(self.t + f.duration, self.scn.active_until), self._network_back)
        elif f.kind == "clock-jump":
            for node in self._pick(f, f.how_many(n)):
                node.offset += f.jump
                node.wake_at = math.inf
                self.rec.log(self.t, node.name, f"clock jump {f.jump:+.3f}s")
                self.rec.timeline_faults.append((self.t, self.t + 0.5, "clock-jump", node.name))
                self._reschedule(node)

    def _network_back(self) -> None:
        self.net.reset_faults()
        self.rec.log(self.t, "-", "network back to normal")

    def _churn(self, f: FaultSpec) -> None:
        if self.t >= min(f.until, self.scn.active_until):
            return
        downtime = f.duration or 5.0
        victims = self._pick(FaultSpec("kill", self.t), f.how_many(len(self.nodes)))
        self.rec.timeline_faults.append(
            (self.t, self.t + downtime, "churn", f"{len(victims)} restart")
        )
        for node in victims:
            self._kill(node, "churn", timeline=False)
            self.at(self.t + downtime, partial(self._restart, node))
        self.at(self.t + f.every, lambda: self._churn(f))

    def _partition(self, f: FaultSpec) -> None:
        n = len(self.nodes)
        rng = self.fault_rng
        order = list(range(n))
        rng.shuffle(order)
        if f.shape == "one":
            victim = self._pick(f, 1)
            x = victim[0].idx if victim else order[0]
            group = [0] * n
            group[x] = 1
            self.net.connectivity = groups_connectivity(group)
            desc = f"isolate {self.names[x]}"
        elif f.shape == "majority":
            k = max(1, round(f.minority * n))
            group = [0] * n
            for i in order[:k]:
                group[i] = 1
            self.net.connectivity = groups_connectivity(group)
            desc = f"minority of {k} / majority of {n - k}"
        elif f.shape == "ring":
            self.net.connectivity = ring_connectivity(n, order)
            desc = f"majorities ring (each sees {2 * max(1, n // 4) + 1})"
        else:
            group = [0] * n
            for i in order[: n // 2]:
                group[i] = 1
            bridge = order[-1]
            self.net.connectivity = bridge_connectivity(group, bridge)
            desc = f"two halves bridged by {self.names[bridge]}"
        self.partition_active = True
        self.rec.log(self.t, "-", f"partition {f.shape}: {desc}")
        end = min(self.t + f.duration, self.scn.active_until)
        self.rec.timeline_faults.append((self.t, end, "partition", f.shape))
        self.at(end, self._heal_partition)

    def _heal_partition(self) -> None:
        if self.partition_active:
            self.net.connectivity = None
            self.partition_active = False
            self.partition_until = self.t
            self.rec.log(self.t, "-", "partition healed")

    def _kill(self, node: SimNode, why: str, *, timeline: bool = True) -> None:
        if not node.up:
            return
        t = self.t
        self.rec.log(t, node.name, f"KILL {why}")
        if timeline:
            self.rec.timeline_faults.append((t, t, "kill", node.name))
        self._lost_leadership(node)
        self.rec.observer_gone(node.name)
        observers = [n.name for n in self.nodes if n.up and not n.paused and n is not node]
        self.rec.node_lost(t, node.name, "kill", observers)
        node.up = False
        node.paused = False
        self.rec.note_acceptors_down(self._is_down)
        node.held.clear()
        node.runs.clear()
        node.wake_at = math.inf
        node.jobs_running = 0
        node.gen += 1

    def _is_down(self, name: str) -> bool:
        n = self.by_name.get(name)
        return n is None or not n.up or n.paused

    def _lost_leadership(self, node: SimNode) -> None:
        for task_id in node.coord.led_tasks():
            led = node.coord.led(task_id)
            if led is not None:
                # Noted when the owner is down as well (a surviving acceptor takes its place).
                o = self.by_name.get(led.owner)
                owner_down = o is None or o is node or not o.up or o.paused
                owner = "" if owner_down else led.owner
                self.rec.leader_lost(self.t, node.name, task_id, led.epoch, owner, led.acceptors)
        self.rec.owner_was_down(node.name)
        for task_id in node.coord.owned_tasks():
            owned = node.coord.owned(task_id)
            if owned is not None:
                self.rec.owner_lost(self.t, node.name, task_id, owned.epoch)

    def _restart(self, node: SimNode) -> None:
        if node.up:
            return
        t = self.t
        node.up = True
        node.down_until = t
        node.gen += 1
        self.rec.node_back(node.name)
        self.rec.forget_observer(t, node.name)
        self.rec.log(t, node.name, "RESTART")
        now = node.local(t)
        # Volatile state is rebuilt from scratch; the ledger store and advert version survive.
        fresh = self._new_node(
            node.name, node.idx, node.dev, node.offset, node.drift, node.store, members=[], now=now
        )
        node.membership = fresh.membership
        node.gossip = fresh.gossip
        node.gossip_has_peers = False
        node.peers_pending = False
        node.coord = fresh.coord
        node.scheduler = SmartScheduler()
        node.wake_at = math.inf
        node.dirty = 7
        seeds = self.fault_rng.sample(
            [x for x in self.names if x != node.name], min(3, len(self.names) - 1)
        )
        self._membership_effects(node, node.membership.join(now, [(s, s) for s in seeds]))
        self._publish(node)
        gen = node.gen
        self.at(t + 0.3, lambda: self._recover(node, gen))
        self.at(
            t + max(self.scn.republish, 1.0) * self.work_rng.random(),
            lambda: self._republish_loop(node, gen),
        )
        self._after(node)

    def _recover(self, node: SimNode, gen: int) -> None:
        if node.gen != gen or not node.up:
            return
        self._coord_effects(node, node.coord.recover(node.local(self.t)))
        self._after(node)

    def _pause(self, node: SimNode) -> None:
        if not node.up or node.paused:
            return
        t = self.t
        self.rec.log(t, node.name, "PAUSE")
        self.rec.timeline_faults.append((t, t, "pause", node.name))
        self._lost_leadership(node)
        self.rec.observer_gone(node.name)
        observers = [n.name for n in self.nodes if n.up and not n.paused and n is not node]
        self.rec.node_lost(t, node.name, "pause", observers)
        node.paused = True
        self.rec.note_acceptors_down(self._is_down)

    def _resume(self, node: SimNode) -> None:
        if not node.up or not node.paused:
            return
        t = self.t
        node.paused = False
        node.down_until = t
        self.rec.log(t, node.name, "RESUME")
        self.rec.timeline_faults.append((t, t, "resume", node.name))
        self.rec.node_back(node.name)
        self.rec.leader_back(node.name)
        self.rec.owner_back(node.name)
        held, node.held = node.held, []
        for kind, data in held:
            self._push(t, kind, data)
        node.wake_at = math.inf
        node.dirty = 7
        self._reschedule(node)
        # the requests that arrived while it was frozen (their clients have moved on)
        submits, node.held_submits = node.held_submits, []
        for key, payload in submits:
            self._arrive(node, key, payload)

    def _heal_all(self) -> None:
        self.rec.log(self.t, "-", "drain: heal everything, restart the dead, stop submitting")
        self._heal_partition()
        self.net.reset_faults()
        for node in self.nodes:
            if not node.up:
                if not node.dead_for_good:
                    self._restart(node)
            elif node.paused:
                self._resume(node)

    # ================================================================ periodic sampling

    def _sample(self) -> None:
        live = sum(1 for n in self.nodes if n.up and not n.paused)
        self.rec.timeline_live.append((self.t, live))
        self.rec.node_seconds += live * 1.0
        if self.net.loss >= 0.05:
            self.rec.lossy_node_seconds += live * 1.0
        self.at(self.t + 1.0, self._sample)
        if self.t == 0.0:
            for node in self.nodes:
                self.at(
                    max(self.scn.republish, 1.0) * self.work_rng.random(),
                    partial(self._republish_loop, node, 0),
                )

    # ================================================================ placement study (671B)

    def _planner(self) -> SimNode | None:
        for n in self.nodes:
            if n.up and not n.paused and n.dev.cls == "desktop":
                return n
        return None

    def _placement_plan(self) -> None:
        from simulations.placement_study import make_plan

        planner = self._planner()
        if planner is None or self.scn.placement is None:
            return
        self.layer_plan = make_plan(self, planner, self.scn.placement)

    def _placement_leave(self) -> None:
        from simulations.placement_study import leave_and_replan

        if self.layer_plan is not None and self.scn.placement is not None:
            leave_and_replan(self, self.scn.placement)

    # ================================================================ end-of-run facts

    def stores(self) -> dict[str, InMemoryLedgerStore]:
        return {n.name: n.store for n in self.nodes}

    def conflicting_commits(self) -> int:
        """Tasks for which two stores hold different committed results (must be 0)."""
        seen: dict[str, bytes | None] = {}
        bad: set[str] = set()
        for node in self.nodes:
            for rec in node.store.tasks():
                if rec.state.value != "committed":
                    continue
                key = rec.result
                prev = seen.setdefault(rec.task_id, key)
                if prev != key:
                    bad.add(rec.task_id)
        return len(bad)

    def dissemination(self) -> dict[str, float | int]:
        """delivered / (published × live observers), judged on the final tables."""
        live = [n for n in self.nodes if n.up and not n.paused]
        settle = min(10.0, self.scn.drain / 2)
        cutoff = self.t - settle
        delivered = 0
        expected = 0
        for pub_node in live:
            pubs = self.rec.pubs.get(pub_node.name, [])
            versions = sorted(p.version for p in pubs if p.at <= cutoff)
            for obs in live:
                if obs is pub_node:
                    continue
                expected += len(versions)
                prof = obs.gossip.table.get(pub_node.name)
                have = prof.version if prof is not None else -1
                delivered += sum(1 for v in versions if v <= have)
        return {
            "judged_after_s": settle,
            "published": sum(len(self.rec.pubs.get(n.name, [])) for n in live),
            "observers": len(live),
            "delivered_pairs": delivered,
            "expected_pairs": expected,
            "ratio": round(delivered / expected, 6) if expected else 1.0,
        }


class _NodeCoordDriver:
    """What the simulator does with one node's coordination effects (a `glue.CoordDriver`)."""

    __slots__ = ("node", "sim")

    def __init__(self, sim: Simulation, node: SimNode) -> None:
        self.sim = sim
        self.node = node

    def send_message(self, eff: SendMessage) -> None:
        msg = eff.message
        if isinstance(msg, CommitRequest) and msg.error is None:
            led = self.node.coord.led(msg.task_id)
            if (
                led is not None
                and led.acceptors
                and led.epoch == msg.epoch
                and led.phase is LeaderPhase.COMMITTING
            ):
                self.sim.rec.value_chosen(msg.task_id, msg.epoch)
        self.sim._send(self.node, eff.to, COORD, msg)

    def start_run(self, eff: StartRun) -> None:
        self.sim._start_run(self.node, eff)

    def continue_run(self, eff: ContinueRun) -> None:
        run = self.node.runs.get(eff.task_id)
        if run is not None and run.epoch == eff.epoch and run.step == eff.step and run.waiting_ack:
            run.waiting_ack = False
            self.sim._begin_step(self.node, run)

    def abort_run(self, eff: AbortRun) -> None:
        node = self.node
        run = node.runs.get(eff.task_id)
        if run is not None and run.epoch == eff.epoch:
            del node.runs[eff.task_id]
        self.sim.rec.aborted(self.sim.t, node.name, eff.task_id, eff.epoch, eff.reason)

    def leader_changed(self, eff: LeaderChanged) -> None:
        self.sim.rec.leader_changed(
            self.sim.t, self.node.name, eff.task_id, eff.epoch, eff.leader, eff.resume_step,
            eff.failover,
        )  # fmt: skip

    def task_queued(self, eff: TaskQueued) -> None:
        self.sim.rec.log(self.sim.t, self.node.name, f"queued {eff.task_id}: {eff.reason}")

    def task_committed(self, eff: TaskCommitted) -> None:
        self.sim.rec.committed(
            self.sim.t, self.node.name, eff.task_id, eff.epoch, eff.leader, eff.result
        )

    def task_failed(self, eff: TaskFailed) -> None:
        self.sim.rec.failed(self.sim.t, self.node.name, eff.task_id, eff.reason)


class _NodeMembershipSink:
    """What the simulator does with one node's membership effects (a `glue.MembershipSink`)."""

    __slots__ = ("node", "sim")

    def __init__(self, sim: Simulation, node: SimNode) -> None:
        self.sim = sim
        self.node = node

    def send(self, eff: Send) -> None:
        self.sim._send(self.node, eff.to, MEMBERSHIP, eff.message)

    def member_event(self, event: MembershipEvent) -> None:
        self.sim._member_event(self.node, event)


class _NodeGossipSink:
    """What the simulator does with one node's capability gossip effects (a `glue.GossipSink`)."""

    __slots__ = ("node", "sim")

    def __init__(self, sim: Simulation, node: SimNode) -> None:
        self.sim = sim
        self.node = node

    def gossip_send(self, eff: GossipSend) -> None:
        self.sim._send(self.node, eff.to, GOSSIP, eff.message)

    def advert_changed(self, eff: AdvertChanged) -> None:
        node = self.node
        node.coord.update_profile(eff.profile)
        if eff.peer != node.name:
            self.sim.rec.advert_seen(self.sim.t, node.name, eff.peer, eff.profile.version)
