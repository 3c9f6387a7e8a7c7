"""Build and drive a cluster of membership cores over the fake network (tests, benches, sims)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import msgpack

from kowalski_node.membership import (
    Membership,
    MembershipMessage,
    MemberSuspect,
    Status,
    SwimConfig,
    decode_message,
)
from kowalski_node.testing.clock import FakeClock
from kowalski_node.testing.harness import CoreHarness
from kowalski_node.testing.network import FakeNetwork, LinkProfile


@dataclass(slots=True)
class EventRecord:
    """A non-send effect emitted by a node at global time ``t``."""

    t: float
    node: str
    event: Any


def msgpack_roundtrip(msg: MembershipMessage) -> MembershipMessage:
    """Encode to bytes and decode again, as the real transport would."""
    raw = msgpack.packb(msg.to_wire(), use_bin_type=True)
    return decode_message(msgpack.unpackb(raw, raw=False))


class MembershipCluster:
    """N membership cores, a seeded network, an event log; kill/restart/partition helpers."""

    def __init__(
        self,
        n: int,
        *,
        seed: int,
        config: SwimConfig | None = None,
        link: LinkProfile | None = None,
        prepopulate: bool = True,
        wire: bool = False,
        clock_skew: float = 0.0,
        name: Callable[[int], str] = lambda i: f"n{i:03d}",
    ) -> None:
        """``clock_skew``: each node's clock is offset by U(-skew, skew) s and drifts by U(-1e-4, 1e-4)."""
        self.seed = seed
        self.config = config or SwimConfig.lan()
        self._rng = random.Random(seed)
        self.network = FakeNetwork(random.Random(self._rng.getrandbits(64)), link or LinkProfile())
        self.clock = FakeClock()
        self.events: list[EventRecord] = []
        codec = msgpack_roundtrip if wire else None
        self.harness = CoreHarness(
            self.network, self.clock, on_event=self._record, wire_codec=codec
        )
        self.ids = [name(i) for i in range(n)]
        known = [(i, i) for i in self.ids] if prepopulate else []
        for node in self.ids:
            view = None
            if clock_skew:
                view = self.clock.view(
                    offset=self._rng.uniform(-clock_skew, clock_skew),
                    drift=self._rng.uniform(-1e-4, 1e-4),
                )
            self.harness.add(
                node, self._new_core(node, known, view.local(0.0) if view else 0.0), view
            )

    def _new_core(
        self, node: str, known: Iterable[tuple[str, str]], now: float | None = None
    ) -> Membership:
        return Membership(
            node,
            addr=node,
            config=self.config,
            rng=random.Random(self._rng.getrandbits(64)),
            now=self.clock.now() if now is None else now,
            members=known,
        )

    def _record(self, node: str, t: float, event: Any) -> None:
        self.events.append(EventRecord(t, node, event))

    def core(self, node: str) -> Membership:
        core = self.harness.core(node)
        assert isinstance(core, Membership)
        return core

    def run_until(self, t: float) -> None:
        self.harness.run_until(t)

    def run_for(self, dt: float) -> None:
        self.harness.run_for(dt)

    @property
    def now(self) -> float:
        return self.clock.now()

    def join_all(self, seeds: list[str]) -> None:
        """Every node (seeds included) joins through ``seeds``."""
        for node in self.ids:
            core = self.core(node)
            self.harness.inject(
                node, core.join(self.harness.local_now(node), [(s, s) for s in seeds if s != node])
            )

    def kill(self, node: str) -> None:
        self.harness.kill(node)

    def restart(self, node: str, seeds: list[str]) -> None:
        """Start a fresh core (incarnation 0, empty table) under the same id and join via ``seeds``."""
        view = self.harness.node_clock(node)
        local = view.local(self.now)
        core = self._new_core(node, [], local)
        self.harness.add(node, core, view)
        self.harness.inject(node, core.join(local, [(s, s) for s in seeds if s != node]))

    def leave(self, node: str) -> None:
        self.harness.inject(node, self.core(node).leave(self.harness.local_now(node)))

    def running(self) -> list[str]:
        return [n for n in self.harness.nodes() if not self.core(n).stopped]

    def views_agree(self, expected_live: set[str]) -> bool:
        """True when every running node sees exactly ``expected_live`` as alive (plus itself)."""
        for node in self.running():
            core = self.core(node)
            live = {p for p in core.alive_peers()} | {node}
            if live != expected_live:
                return False
        return True

    def status_matrix(self) -> dict[str, dict[str, Status | None]]:
        """For every running node: how it sees every id."""
        return {node: {p: self.core(node).status(p) for p in self.ids} for node in self.running()}

    def events_of(
        self, kind: type, peer: str | None = None, since: float = 0.0
    ) -> list[EventRecord]:
        return [
            r
            for r in self.events
            if isinstance(r.event, kind)
            and r.t >= since
            and (peer is None or getattr(r.event, "peer", None) == peer)
        ]

    def suspicion_count(self) -> int:
        return len(self.events_of(MemberSuspect))
