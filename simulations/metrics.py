"""Ground truth, history and checkers of a simulation run.

The recorder sees what really happened (kills, pauses, partitions, every effect a core
emitted) and judges the cores against it: lost/unexpected/duplicate commits, stale-epoch
commits, failover latency, detection time and false "dead" verdicts, and capability
dissemination.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); nan for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100.0 * len(s)) - 1))
    return s[k]


def summary(values: list[float]) -> dict[str, float | int]:
    return {
        "n": len(values),
        "p50": _r(percentile(values, 50)),
        "p90": _r(percentile(values, 90)),
        "p99": _r(percentile(values, 99)),
        "max": _r(max(values) if values else math.nan),
    }


def _r(x: float) -> float:
    return round(x, 4) if math.isfinite(x) else math.nan


@dataclass(slots=True)
class TaskTruth:
    task_id: str
    owner: str
    submitted_at: float
    expected: bytes
    commits: list[tuple[float, int, str]] = field(default_factory=list)
    failed: str | None = None
    max_leased_epoch: int = 0
    chosen_epochs: set[int] = field(default_factory=set)
    """Epochs at which a result was chosen: a leader with an acceptor set had a majority
    of them store its final checkpoint and asked the owner to commit it."""
    executions: int = 0
    stale_commit: bool = False
    unexpected_result: bool = False
    key: str = ""
    acked: bool = False
    """The client got an answer for it (stored on a majority): from then on it must not be lost."""
    results: set[bytes] = field(default_factory=set)
    committers: list[str] = field(default_factory=list)


@dataclass(slots=True)
class PendingFailover:
    at: float
    leader: str
    epoch: int
    owner: str
    acceptors: tuple[str, ...] = ()
    quorum_lost: bool = False
    """A majority of the task's acceptors was down at some point while it waited: no
    survivor may lease it before they return (a second death beyond the one-death
    promise), so the wait is measured apart from the one-death failovers."""


@dataclass(slots=True)
class PendingDetection:
    at: float
    kind: str
    observers: set[str]
    first: float = math.nan


@dataclass(slots=True)
class Publication:
    version: int
    at: float


class Recorder:
    """Collects the history and the measurements; ``verdict()`` runs the checkers."""

    def __init__(self) -> None:
        self.history: list[str] = []
        self.tasks: dict[str, TaskTruth] = {}
        self.unexpected_commits: list[str] = []
        self.failovers: list[float] = []
        """Leader deaths: the task runs again at a higher epoch (owner alive or not), while
        a majority of its acceptors stayed up (the one-death promise)."""
        self.failovers_quorum_lost: list[float] = []
        """Leader deaths during which a majority of the task's acceptors was down too."""
        self.owner_failovers: list[float] = []
        """Owner deaths: a survivor leases the task at a higher epoch (or commits it)."""
        self.owner_completions: list[float] = []
        """Owner deaths: the task is committed at a survivor."""
        self._pending_owner: dict[str, tuple[float, str, int]] = {}
        self._pending_owner_done: dict[str, tuple[float, str]] = {}
        self.relearned_commits = 0
        self.client_retries = 0
        self.client_refusals = 0
        self.failovers_owner_down = 0
        self.failovers_skipped = 0
        self._pending_fo: dict[str, PendingFailover] = {}
        self.detections_all: list[float] = []
        self.detections_first: list[float] = []
        self.detections_per_observer: list[float] = []
        self.undetected = 0
        self._pending_det: dict[str, PendingDetection] = {}
        self.false_dead: list[str] = []
        self.partition_dead = 0
        self.true_dead = 0
        self.node_seconds = 0.0
        self.lossy_node_seconds = 0.0
        self.pubs: dict[str, list[Publication]] = {}
        self._seen_version: dict[str, dict[str, int]] = {}
        """observer -> peer -> newest advert version it has seen (per observer: cheap to reset)."""
        self._observer_since: dict[str, float] = {}
        self.advert_latency: list[float] = []
        self.task_latency: list[float] = []
        self.timeline_faults: list[tuple[float, float, str, str]] = []
        self.timeline_leaders: list[tuple[float, bool]] = []
        self.timeline_commits: list[float] = []
        self.timeline_live: list[tuple[float, int]] = []
        self.fenced = 0
        self.aborts = 0
        self.context_fetches: list[float] = []
        """Seconds a leader waited for a task's context blob (run start -> first step)."""
        self.context_fetch_retries = 0
        self.context_fetch_failures = 0
        self.placement: dict[str, Any] = {}
        self.first_violation: tuple[float, str, str] | None = None

    # ---------------------------------------------------------------- history

    def log(self, t: float, node: str, what: str) -> None:
        self.history.append(f"{t:.6f} {node} {what}")

    def violation(self, t: float, task_or_node: str, what: str) -> None:
        self.log(t, task_or_node, f"VIOLATION {what}")
        if self.first_violation is None:
            self.first_violation = (t, task_or_node, what)

    # ---------------------------------------------------------------- tasks

    def submitted(self, t: float, owner: str, task_id: str, expected: bytes, key: str = "") -> None:
        self.tasks[task_id] = TaskTruth(task_id, owner, t, expected, key=key)
        self.log(t, owner, f"submit {task_id}")

    def acked(self, t: float, node: str, task_id: str) -> None:
        tt = self.tasks.get(task_id)
        if tt is not None and not tt.acked:
            tt.acked = True
            self.log(t, node, f"ack {task_id}")

    def leader_changed(
        self, t: float, owner: str, task_id: str, epoch: int, leader: str, step: int, failover: bool
    ) -> None:
        tt = self.tasks.get(task_id)
        if tt is not None:
            tt.max_leased_epoch = max(tt.max_leased_epoch, epoch)
        self.timeline_leaders.append((t, failover))
        self.log(
            t,
            owner,
            f"leader {task_id} e{epoch} {leader} from-step {step}{' failover' if failover else ''}",
        )
        self._failover_done(t, task_id, leader, epoch)
        self._owner_failover_done(t, task_id, owner, epoch)

    def run_started(self, t: float, node: str, task_id: str, epoch: int, step: int) -> None:
        tt = self.tasks.get(task_id)
        if tt is not None:
            tt.executions += 1
        self.log(t, node, f"start {task_id} e{epoch} step {step}")
        self._failover_done(t, task_id, node, epoch)

    def aborted(self, t: float, node: str, task_id: str, epoch: int, reason: str) -> None:
        self.aborts += 1
        if "fenced" in reason:
            self.fenced += 1
        self.log(t, node, f"abort {task_id} e{epoch}: {reason}")

    def committed(
        self, t: float, owner: str, task_id: str, epoch: int, leader: str, result: bytes
    ) -> None:
        tt = self.tasks.get(task_id)
        self.log(t, owner, f"commit {task_id} e{epoch} by {leader}")
        if tt is None:
            self.unexpected_commits.append(task_id)
            self.violation(t, task_id, "commit of a task that was never submitted")
            return
        tt.commits.append((t, epoch, leader))
        first = len(tt.commits) == 1
        if first:
            self.timeline_commits.append(t)
            self.task_latency.append(t - tt.submitted_at)
        elif result in tt.results and owner not in tt.committers:
            # An owner that died right after committing and the acceptor that took over both
            # learned the one chosen result: the same decision, not a second value.
            self.relearned_commits += 1
        else:
            self.violation(
                t,
                task_id,
                f"duplicate commit #{len(tt.commits)} (epochs {[c[1] for c in tt.commits]})",
            )
        tt.results.add(result)
        tt.committers.append(owner)
        done = self._pending_owner_done.pop(task_id, None)
        if done is not None and owner != done[1]:
            self.owner_completions.append(t - done[0])
        self._owner_failover_done(t, task_id, owner, epoch)
        if first and epoch < tt.max_leased_epoch and epoch not in tt.chosen_epochs:
            # A newer ballot was leased and nothing was chosen at this epoch: fencing failed.
            # (A result chosen at this epoch may be committed there still: every later
            # ballot's prepare finds it and can only carry the same result; an owner that
            # was down when the newer ballot began commits it when it returns.)
            tt.stale_commit = True
            self.violation(
                t, task_id, f"commit from stale epoch {epoch} < leased {tt.max_leased_epoch}"
            )
        if result != tt.expected:
            tt.unexpected_result = True
            self.violation(t, task_id, "committed result differs from the task's script")
        self._failover_done(t, task_id, leader, epoch)

    def value_chosen(self, task_id: str, epoch: int) -> None:
        """A leader asks the owner to commit a result that a majority of the task's
        acceptors stored as the final checkpoint at ``epoch``."""
        tt = self.tasks.get(task_id)
        if tt is not None:
            tt.chosen_epochs.add(epoch)

    def failed(self, t: float, owner: str, task_id: str, reason: str) -> None:
        tt = self.tasks.get(task_id)
        if tt is not None:
            tt.failed = reason
        self.log(t, owner, f"failed {task_id}: {reason}")

    # ---------------------------------------------------------------- failover latency

    def leader_lost(
        self,
        t: float,
        leader: str,
        task_id: str,
        epoch: int,
        owner: str,
        acceptors: tuple[str, ...] = (),
    ) -> None:
        """``leader`` (running ``task_id`` at ``epoch``) was killed or paused at ``t``."""
        if task_id not in self._pending_fo:
            self._pending_fo[task_id] = PendingFailover(t, leader, epoch, owner, acceptors)

    def note_acceptors_down(self, is_down: Callable[[str], bool]) -> None:
        """Called after each death or pause: mark the waiting failovers whose acceptor
        majority is down now (see `PendingFailover.quorum_lost`)."""
        for p in self._pending_fo.values():
            if p.quorum_lost or not p.acceptors:
                continue
            if sum(1 for a in p.acceptors if is_down(a)) > len(p.acceptors) // 2:
                p.quorum_lost = True

    def leader_back(self, leader: str) -> None:
        """A paused leader resumed before anyone took over: no failover to measure."""
        for task_id in [k for k, p in self._pending_fo.items() if p.leader == leader]:
            del self._pending_fo[task_id]
            self.failovers_skipped += 1

    def owner_was_down(self, owner: str) -> None:
        for p in self._pending_fo.values():
            if p.owner == owner:
                p.owner = ""

    def owner_lost(self, t: float, owner: str, task_id: str, epoch: int) -> None:
        """``owner`` (owning unfinished ``task_id`` at ``epoch``) was killed or paused at ``t``."""
        if task_id not in self._pending_owner:
            self._pending_owner[task_id] = (t, owner, epoch)
        if task_id not in self._pending_owner_done:
            self._pending_owner_done[task_id] = (t, owner)

    def owner_back(self, owner: str) -> None:
        """A paused owner resumed: its tasks may go on under it; nothing more to measure."""
        for task_id in [k for k, p in self._pending_owner.items() if p[1] == owner]:
            del self._pending_owner[task_id]
        for task_id in [k for k, p in self._pending_owner_done.items() if p[1] == owner]:
            del self._pending_owner_done[task_id]

    def _owner_failover_done(self, t: float, task_id: str, node: str, epoch: int) -> None:
        p = self._pending_owner.get(task_id)
        if p is None or node == p[1] or epoch <= p[2]:
            return
        del self._pending_owner[task_id]
        self.owner_failovers.append(t - p[0])

    def _failover_done(self, t: float, task_id: str, node: str, epoch: int) -> None:
        p = self._pending_fo.get(task_id)
        if p is None or epoch <= p.epoch:
            return
        del self._pending_fo[task_id]
        if not p.owner:
            self.failovers_owner_down += 1  # still measured: a survivor took the owner's place
        if p.quorum_lost:
            self.failovers_quorum_lost.append(t - p.at)
        else:
            self.failovers.append(t - p.at)

    # ---------------------------------------------------------------- membership

    def node_lost(self, t: float, node: str, kind: str, observers: list[str]) -> None:
        self._pending_det[node] = PendingDetection(t, kind, set(observers))

    def node_back(self, node: str) -> None:
        p = self._pending_det.pop(node, None)
        if p is not None and p.observers:
            self.undetected += 1

    def observer_gone(self, node: str) -> None:
        for target, p in list(self._pending_det.items()):
            if node in p.observers:
                p.observers.discard(node)
                self._maybe_detected(target, p, math.nan)

    def member_down(
        self, t: float, observer: str, peer: str, justified: bool, partitioned: bool
    ) -> None:
        self.log(t, observer, f"dead {peer}")
        p = self._pending_det.get(peer)
        if p is not None and observer in p.observers:
            self.true_dead += 1
            lat = t - p.at
            self.detections_per_observer.append(lat)
            if math.isnan(p.first):
                p.first = lat
            p.observers.discard(observer)
            self._maybe_detected(peer, p, lat)
            return
        if justified:
            self.true_dead += 1
        elif partitioned:
            self.partition_dead += 1
        else:
            self.false_dead.append(f"{t:.3f} {observer} declared {peer} dead while it was up")
            self.violation(t, peer, f"false dead verdict by {observer}")

    def _maybe_detected(self, target: str, p: PendingDetection, lat: float) -> None:
        if p.observers:
            return
        del self._pending_det[target]
        if not math.isnan(p.first):
            self.detections_first.append(p.first)
            self.detections_all.append(lat if not math.isnan(lat) else p.first)

    # ---------------------------------------------------------------- dissemination

    def published(self, t: float, peer: str, version: int) -> None:
        self.pubs.setdefault(peer, []).append(Publication(version, t))

    def advert_seen(self, t: float, observer: str, peer: str, version: int) -> None:
        seen = self._seen_version.get(observer)
        if seen is None:
            seen = self._seen_version[observer] = {}
        last = seen.get(peer, -1)
        if version <= last:
            return
        seen[peer] = version
        since = self._observer_since.get(observer, 0.0)
        for pub in reversed(self.pubs.get(peer, ())):
            if pub.version <= last:
                break
            if pub.version <= version:
                # A restarted observer can only learn from the moment it is back.
                self.advert_latency.append(t - max(pub.at, since))

    def forget_observer(self, t: float, observer: str) -> None:
        """A restarted node starts with an empty table: its deliveries count again, from ``t``."""
        self._observer_since[observer] = t
        self._seen_version.pop(observer, None)

    # ---------------------------------------------------------------- checks

    def task_summary(self, stores: dict[str, Any], live: set[str]) -> dict[str, Any]:
        """Jepsen-style final read: an acknowledged task not committed (with its script's
        result) in the store of at least one live node is lost."""
        lost: list[str] = []
        dup = 0
        stale = 0
        unexpected = len(self.unexpected_commits)
        failed = 0
        executions = 0
        for task_id, tt in self.tasks.items():
            executions += tt.executions
            if len(tt.results) > 1 or len(tt.committers) != len(set(tt.committers)):
                dup += len(tt.commits) - 1
            if tt.stale_commit:
                stale += 1
            if tt.unexpected_result:
                unexpected += 1
            if tt.failed is not None:
                failed += 1
                continue
            if not tt.acked:
                continue
            at_survivor = False
            for name in live:
                rec = stores[name].get(task_id)
                if rec is not None and rec.state.value == "committed":
                    at_survivor = rec.result == tt.expected
                    if at_survivor:
                        break
            if not tt.commits or not at_survivor:
                lost.append(task_id)
        return {
            "submitted": len(self.tasks),
            "committed": sum(1 for t in self.tasks.values() if t.commits),
            "failed": failed,
            "lost": len(lost),
            "lost_ids": lost[:20],
            "acknowledged": sum(1 for t in self.tasks.values() if t.acked),
            "never_acknowledged": sum(1 for t in self.tasks.values() if not t.acked),
            "relearned_commits": self.relearned_commits,
            "duplicate_commits": dup,
            "stale_epoch_commits": stale,
            "unexpected": unexpected,
            "executions": executions,
        }
