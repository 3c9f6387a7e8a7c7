"""The shared glue (kowalski_node/glue.py): every coordination effect reaches the
driver's method for it, and membership events reach the coordinator as the runtime and
the simulator both need."""

from __future__ import annotations

import random

from kowalski_node.capabilities import DeviceProfile
from kowalski_node.coordination import Coordinator
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
from kowalski_node.coordination.messages import Heartbeat
from kowalski_node.glue import membership_to_coordinator, perform_coord_effects
from kowalski_node.membership import LeaveComplete, MemberAlive, MemberDown, MemberSuspect, MemberUp
from kowalski_node.tasks import InMemoryLedgerStore, TaskLedger

GIB = 1024**3


class Recorder:
    """A driver that records which of its methods got which effect."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, CoordEffect]] = []

    def send_message(self, eff: SendMessage) -> None:
        self.calls.append(("send_message", eff))

    def start_run(self, eff: StartRun) -> None:
        self.calls.append(("start_run", eff))

    def continue_run(self, eff: ContinueRun) -> None:
        self.calls.append(("continue_run", eff))

    def abort_run(self, eff: AbortRun) -> None:
        self.calls.append(("abort_run", eff))

    def leader_changed(self, eff: LeaderChanged) -> None:
        self.calls.append(("leader_changed", eff))

    def task_queued(self, eff: TaskQueued) -> None:
        self.calls.append(("task_queued", eff))

    def task_committed(self, eff: TaskCommitted) -> None:
        self.calls.append(("task_committed", eff))

    def task_failed(self, eff: TaskFailed) -> None:
        self.calls.append(("task_failed", eff))


def test_every_effect_reaches_its_method_in_order() -> None:
    effects: list[CoordEffect] = [
        SendMessage("b", Heartbeat("t1", 2)),
        StartRun("t1", 2, b"payload", 0, None),
        ContinueRun("t1", 2, 1),
        AbortRun("t1", 2, "fenced"),
        LeaderChanged("t1", 3, "c", 1, True),
        TaskQueued("t2", "no capable peer yet"),
        TaskCommitted("t1", 3, "c", b"result"),
        TaskFailed("t2", "no peer can run it"),
    ]
    driver = Recorder()
    perform_coord_effects(driver, effects)
    assert [eff for _, eff in driver.calls] == effects
    assert [name for name, _ in driver.calls] == [
        "send_message", "start_run", "continue_run", "abort_run",
        "leader_changed", "task_queued", "task_committed", "task_failed",
    ]  # fmt: skip


def test_membership_events_reach_the_coordinator() -> None:
    coord = Coordinator(
        "a", TaskLedger(InMemoryLedgerStore(), "a", random.Random(1)), rng=random.Random(2)
    )
    profile = DeviceProfile("b", 1, cores=4, ram_total=8 * GIB, ram_free=4 * GIB)
    asked: list[str] = []

    def profile_of(peer: str) -> DeviceProfile | None:
        asked.append(peer)
        return profile if peer == "b" else None

    assert membership_to_coordinator(coord, 0.0, MemberUp("b", "", 1), profile_of) == []
    assert asked == ["b"] and "b" in coord.known_peers()
    membership_to_coordinator(coord, 0.1, MemberSuspect("b", 1), profile_of)
    assert "b" in coord._suspected
    membership_to_coordinator(coord, 0.2, MemberAlive("b", 2), profile_of)
    assert "b" not in coord._suspected
    membership_to_coordinator(coord, 0.3, MemberDown("b", 2, False), profile_of)
    assert membership_to_coordinator(coord, 0.4, LeaveComplete(), profile_of) == []
