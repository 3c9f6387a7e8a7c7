"""The shared glue (kowalski_node/glue.py): the coordination core's ledger writes reach the
driver's store port first, in one `apply`, then every other effect reaches the driver's
method for it; membership events reach the coordinator as the runtime and the simulator
both need; capability gossip's effects and membership events likewise."""

from __future__ import annotations

import random
from collections.abc import Sequence

from kowalski_node.capabilities import (
    AdvertChanged,
    AdvertPush,
    CapabilityGossip,
    DeviceProfile,
    GossipEffect,
    GossipSend,
)
from kowalski_node.coordination import Coordinator
from kowalski_node.coordination.effects import (
    AbortRun,
    ContinueRun,
    CoordEffect,
    DeletePending,
    LeaderChanged,
    LedgerWrite,
    PutPending,
    PutRecord,
    SendMessage,
    StartRun,
    TaskCommitted,
    TaskFailed,
    TaskQueued,
)
from kowalski_node.coordination.messages import Heartbeat
from kowalski_node.glue import (
    membership_to_coordinator,
    membership_to_gossip,
    perform_coord_effects,
    perform_gossip_effects,
    perform_ledger_writes,
)
from kowalski_node.membership import LeaveComplete, MemberAlive, MemberDown, MemberSuspect, MemberUp
from kowalski_node.tasks import (
    InMemoryLedgerStore,
    LedgerState,
    PendingSubmit,
    TaskLedger,
    TaskRecord,
)

GIB = 1024**3


class Recorder(InMemoryLedgerStore):
    """A driver (and its ledger store port) that records which of its methods got which
    effect, in one log."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, object]] = []

    def apply(self, writes: Sequence[LedgerWrite]) -> None:
        self.calls.append(("apply", list(writes)))
        super().apply(writes)

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
    record = TaskRecord("t1", "k1", "a", b"payload", 0.0)
    writes: list[CoordEffect] = [
        PutRecord(record),
        PutPending(PendingSubmit("t1", 0.5)),
        DeletePending("t1"),
    ]
    driver = Recorder()
    perform_coord_effects(driver, driver, [*writes, *effects])
    assert driver.calls[0] == ("apply", writes)  # all writes, in one call, before the rest
    assert [eff for _, eff in driver.calls[1:]] == effects
    assert [name for name, _ in driver.calls[1:]] == [
        "send_message", "start_run", "continue_run", "abort_run",
        "leader_changed", "task_queued", "task_committed", "task_failed",
    ]  # fmt: skip
    assert driver.get("t1") == record and driver.pending() == []


def test_concatenated_calls_get_all_their_writes_in_one_apply_before_any_message() -> None:
    """A driver that batches several core calls (a chunk of submissions) still makes every
    write durable, in one transaction, before the first message of any of them."""
    rec = TaskRecord("t1", "k1", "a", b"p", 0.0)
    first: list[CoordEffect] = [PutRecord(rec), SendMessage("b", Heartbeat("t1", 1))]
    second: list[CoordEffect] = [PutPending(PendingSubmit("t1", 1.0)), TaskQueued("t1", "x")]
    store = Recorder()
    actions = perform_ledger_writes(store, [*first, *second])
    assert store.calls == [("apply", [PutRecord(rec), PutPending(PendingSubmit("t1", 1.0))])]
    assert actions == [first[1], second[1]]
    assert perform_ledger_writes(store, actions) == actions and len(store.calls) == 1


def test_membership_events_reach_the_coordinator() -> None:
    coord = Coordinator("a", TaskLedger(LedgerState(), "a", random.Random(1)), rng=random.Random(2))
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


class GossipRecorder:
    """A `GossipSink` that records which of its methods got which effect."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def gossip_send(self, eff: GossipSend) -> None:
        self.calls.append(("gossip_send", eff))

    def advert_changed(self, eff: AdvertChanged) -> None:
        self.calls.append(("advert_changed", eff))


def test_gossip_effects_reach_their_methods_in_order() -> None:
    prof = DeviceProfile("b", 2)
    effects: list[GossipEffect] = [
        AdvertChanged("b", prof),
        GossipSend("c", AdvertPush([prof])),
        AdvertChanged("b", prof),
    ]
    sink = GossipRecorder()
    perform_gossip_effects(sink, effects)
    assert [name for name, _ in sink.calls] == ["advert_changed", "gossip_send", "advert_changed"]
    assert [eff for _, eff in sink.calls] == effects


def test_a_peer_that_comes_up_gets_our_advert_and_nothing_else_sends() -> None:
    """The node and the simulator both greet a new member with our advert (one push);
    suspicion, refutation, death and our own leave send nothing."""
    gossip = CapabilityGossip("a", rng=random.Random(1), now=0.0)
    assert membership_to_gossip(gossip, 0.0, MemberUp("b", "", 1)) == []  # nothing published yet
    own = DeviceProfile("a", 5)
    gossip.publish(0.0, own)
    assert membership_to_gossip(gossip, 1.0, MemberUp("b", "", 1)) == [
        GossipSend("b", AdvertPush([own]))
    ]
    for event in (
        MemberSuspect("b", 1),
        MemberAlive("b", 2),
        MemberDown("b", 2, left=False),
        LeaveComplete(),
    ):
        assert membership_to_gossip(gossip, 2.0, event) == []
