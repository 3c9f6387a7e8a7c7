"""The one glue between the pure cores and a driver: how effects reach the driver and
how membership events reach the coordination core.

The trio runtime (`runtime/tasks_engine.py`), the simulator (`simulations/engine.py`)
and the test harnesses all drive the same cores; what differs is how they send a message
or run a step, not which core call follows which event. So that part lives here, once:

* `perform_ledger_writes(store, effects)`: the coordination core's ledger writes
  (`PutRecord`, `PutPending`, `DeletePending`: it owns its ledger in memory and never calls
  storage) to the driver's durable `LedgerStore` port, all of one call (or one batch of
  calls) in one `apply`, before anything else of those calls is performed: a message
  that reflects a write never leaves before the write is durable. The node's port is
  SQLite, the simulator's and the test drivers' an `InMemoryLedgerStore`;
* `perform_coord_effect(driver, action)`: every other coordination effect to the
  driver's one method for it, matched with `match` + `assert_never`, so a new effect that
  a driver does not handle is a mypy error, not a silently ignored effect;
  `perform_coord_effects(driver, store, effects)` does both, in that order;
* `membership_to_coordinator(coord, now, event, profile_of)`: what the coordinator must
  hear when membership reports a peer up, down, suspected or alive;
* `perform_membership_effects(driver, effects)`: membership's effects to the driver (a
  message to send, or an event for the node), matched the same way;
* `perform_gossip_effects(driver, effects)`: capability gossip's effects (an advert
  message to send, or a changed advert) to the driver, matched the same way;
* `membership_to_gossip(gossip, now, event)`: what capability gossip hears when a peer
  comes up (our advert is pushed to it at once).

Pure: no trio, no clock (`now` is an argument).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, assert_never

from kowalski_node.capabilities import (
    AdvertChanged,
    CapabilityGossip,
    DeviceProfile,
    GossipEffect,
    GossipSend,
)
from kowalski_node.coordination.core import Coordinator
from kowalski_node.coordination.effects import (
    AbortRun,
    ContinueRun,
    CoordAction,
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
from kowalski_node.membership import (
    LeaveComplete,
    MemberAlive,
    MemberDown,
    MembershipEffect,
    MembershipEvent,
    MemberSuspect,
    MemberUp,
    Send,
)
from kowalski_node.tasks import LedgerStore


class CoordDriver(Protocol):
    """What a driver of the coordination core does with each of its effects."""

    def send_message(self, eff: SendMessage) -> None: ...

    def start_run(self, eff: StartRun) -> None: ...

    def continue_run(self, eff: ContinueRun) -> None: ...

    def abort_run(self, eff: AbortRun) -> None: ...

    def leader_changed(self, eff: LeaderChanged) -> None: ...

    def task_queued(self, eff: TaskQueued) -> None: ...

    def task_committed(self, eff: TaskCommitted) -> None: ...

    def task_failed(self, eff: TaskFailed) -> None: ...


def perform_ledger_writes(store: LedgerStore, effects: Iterable[CoordEffect]) -> list[CoordAction]:
    """Make the ledger writes among `effects` durable (one `store.apply`); returns the rest.

    The core puts a call's writes before its other effects; a driver that concatenates
    several calls' effects (a batch of submissions) gets all their writes in one
    transaction, still before any message of theirs."""
    writes: list[LedgerWrite] = []
    actions: list[CoordAction] = []
    for eff in effects:
        match eff:
            case PutRecord() | PutPending() | DeletePending():
                writes.append(eff)
            case _:
                actions.append(eff)
    if writes:
        store.apply(writes)
    return actions


def perform_coord_effect(driver: CoordDriver, eff: CoordAction) -> None:
    """Hand one coordination effect (not a ledger write) to the driver's method for it."""
    match eff:
        case SendMessage():
            driver.send_message(eff)
        case StartRun():
            driver.start_run(eff)
        case ContinueRun():
            driver.continue_run(eff)
        case AbortRun():
            driver.abort_run(eff)
        case LeaderChanged():
            driver.leader_changed(eff)
        case TaskQueued():
            driver.task_queued(eff)
        case TaskCommitted():
            driver.task_committed(eff)
        case TaskFailed():
            driver.task_failed(eff)
        case _:
            assert_never(eff)


def perform_coord_effects(
    driver: CoordDriver, store: LedgerStore, effects: Sequence[CoordEffect]
) -> None:
    """The ledger writes first (durable), then every other effect in order."""
    for action in perform_ledger_writes(store, effects):
        perform_coord_effect(driver, action)


def membership_to_coordinator(
    coord: Coordinator,
    now: float,
    event: MembershipEvent,
    profile_of: Callable[[str], DeviceProfile | None],
) -> list[CoordEffect]:
    """Tell the coordinator what membership saw; returns the coordinator's effects.

    A peer that comes up brings its latest advert (`profile_of`), so the coordinator can
    place work on it at once; a suspected peer keeps its leases but is not picked as a
    new leader until the suspicion is refuted.
    """
    match event:
        case MemberUp():
            return coord.peer_up(now, event.peer, profile_of(event.peer))
        case MemberDown():
            return coord.peer_down(now, event.peer)
        case MemberSuspect():
            coord.peer_suspect(event.peer)
            return []
        case MemberAlive():
            coord.peer_alive(event.peer)
            return []
        case LeaveComplete():
            return []
        case _:
            assert_never(event)


class MembershipSink(Protocol):
    """What a driver of the membership core does with its effects."""

    def send(self, eff: Send) -> None:
        """Send `eff.message` to `eff.to` (lossy: SWIM recovers from drops)."""
        ...

    def member_event(self, event: MembershipEvent) -> None:
        """A peer came up, was suspected, refuted it or went down; or the leave is done."""
        ...


def perform_membership_effects(driver: MembershipSink, effects: Iterable[MembershipEffect]) -> None:
    """Hand each membership effect, in order, to the driver's method for it."""
    for eff in effects:
        if type(eff) is Send:  # the hot path: most effects are sends
            driver.send(eff)
            continue
        match eff:
            case Send():
                driver.send(eff)
            case MemberUp() | MemberSuspect() | MemberAlive() | MemberDown() | LeaveComplete():
                driver.member_event(eff)
            case _:
                assert_never(eff)


class GossipSink(Protocol):
    """What a driver of the capability gossip core does with its effects."""

    def gossip_send(self, eff: GossipSend) -> None:
        """Send `eff.message` to `eff.to` (lossy: pushes repeat and syncs repair)."""
        ...

    def advert_changed(self, eff: AdvertChanged) -> None:
        """The table holds a new or newer advert for `eff.peer` (ours included)."""
        ...


def perform_gossip_effects(driver: GossipSink, effects: Iterable[GossipEffect]) -> None:
    """Hand each capability gossip effect, in order, to the driver's method for it."""
    for eff in effects:
        match eff:
            case GossipSend():
                driver.gossip_send(eff)
            case AdvertChanged():
                driver.advert_changed(eff)
            case _:
                assert_never(eff)


def membership_to_gossip(
    gossip: CapabilityGossip, now: float, event: MembershipEvent
) -> list[GossipEffect]:
    """Tell capability gossip what membership saw (the live peer list is set separately,
    with `set_peers`, because drivers batch it): a peer that comes up gets our advert."""
    match event:
        case MemberUp():
            return gossip.peer_up(now, event.peer)
        case MemberDown() | MemberSuspect() | MemberAlive() | LeaveComplete():
            return []
        case _:
            assert_never(event)
