"""A deterministic discrete-event driver for sans-IO cores over :class:`FakeNetwork`.

Any object with ``handle(now, src, msg)``, ``tick(now)`` and ``next_deadline()`` can be
driven. Its effects go through the node's own glue (``kowalski_node/glue.py``), as in the
runtime and the simulator: ``perform`` is the glue function for the core's effects
(``perform_membership_effects``, the default, or ``perform_gossip_effects``); the
messages it hands back go through the network, every other effect (a membership event,
a changed advert) to ``on_event``. Each node may have its own skewed
:class:`NodeClock`. Events at the same instant run in a fixed order, so a seed reproduces
a run exactly.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from kowalski_node.capabilities import AdvertChanged, GossipSend
from kowalski_node.glue import perform_membership_effects
from kowalski_node.membership import MembershipEvent, Send
from kowalski_node.testing.clock import FakeClock, NodeClock
from kowalski_node.testing.network import FakeNetwork

EventHook = Callable[[str, float, Any], None]
"""``(node, global time, event)`` for every effect that is not a message."""


class DrivenCore(Protocol):
    """The driving contract every pure core in this package follows."""

    def handle(self, now: float, src: str, msg: Any) -> list[Any]: ...

    def tick(self, now: float) -> list[Any]: ...

    def next_deadline(self) -> float: ...


class _NodeSink:
    """One node's end of the glue: a `glue.MembershipSink` and a `glue.GossipSink`."""

    __slots__ = ("harness", "node")

    def __init__(self, harness: CoreHarness, node: str) -> None:
        self.harness = harness
        self.node = node

    def send(self, eff: Send) -> None:
        h = self.harness
        h.network.send(h.clock.now(), self.node, eff.to, eff.message)

    def gossip_send(self, eff: GossipSend) -> None:
        h = self.harness
        h.network.send(h.clock.now(), self.node, eff.to, eff.message)

    def member_event(self, event: MembershipEvent) -> None:
        self._event(event)

    def advert_changed(self, eff: AdvertChanged) -> None:
        self._event(eff)

    def _event(self, event: object) -> None:
        hook = self.harness.on_event
        if hook is not None:
            hook(self.node, self.harness.clock.now(), event)


EffectPerformer = Callable[[_NodeSink, list[Any]], None]
"""A glue function: ``glue.perform_membership_effects`` or ``glue.perform_gossip_effects``."""


class StuckCoreError(RuntimeError):
    """A core kept asking to be ticked at the same instant without making progress."""


class CoreHarness:
    """Runs many cores in one process against one seeded network and one global clock."""

    MAX_TICKS_SAME_INSTANT = 1000

    def __init__(
        self,
        network: FakeNetwork,
        clock: FakeClock | None = None,
        *,
        perform: EffectPerformer = perform_membership_effects,
        on_event: EventHook | None = None,
        wire_codec: Callable[[Any], Any] | None = None,
    ) -> None:
        self.network = network
        self.clock = clock or FakeClock()
        self.on_event = on_event
        self._perform = perform
        self._sinks: dict[str, _NodeSink] = {}
        self._codec = wire_codec
        self._cores: dict[str, DrivenCore] = {}
        self._clocks: dict[str, NodeClock] = {}
        self._paused: set[str] = set()
        self._wake: list[tuple[float, int, str]] = []
        self._scheduled: dict[str, float] = {}
        self._scheduled_local: dict[str, float] = {}
        self._counter = 0
        self._same_instant: dict[str, tuple[float, int]] = {}
        self.events_processed = 0

    # ---------------------------------------------------------------- node management

    def add(self, node: str, core: DrivenCore, clock: NodeClock | None = None) -> None:
        """Start driving ``core`` as ``node`` (replaces a previous core of that name: a restart)."""
        self._cores[node] = core
        self._clocks[node] = clock or self.clock.view()
        self.network.add_node(node)
        self.network.restart(node)
        self._paused.discard(node)
        self._scheduled.pop(node, None)
        self._reschedule(node)

    def kill(self, node: str) -> None:
        """Crash ``node``: its core is dropped (state lost) and the network drops its traffic."""
        self._cores.pop(node, None)
        self._scheduled.pop(node, None)
        self._paused.discard(node)
        self.network.kill(node)

    def pause(self, node: str) -> None:
        """SIGSTOP: no ticks, and deliveries are held by the network until ``resume``."""
        self._paused.add(node)
        self.network.pause(node)

    def resume(self, node: str) -> None:
        self._paused.discard(node)
        self.network.resume(node, self.clock.now())
        if node in self._cores:
            self._scheduled.pop(node, None)
            self._reschedule(node)

    def core(self, node: str) -> DrivenCore:
        return self._cores[node]

    def nodes(self) -> list[str]:
        """Nodes currently running (not killed)."""
        return list(self._cores)

    def local_now(self, node: str) -> float:
        return self._clocks[node].local(self.clock.now())

    def node_clock(self, node: str) -> NodeClock:
        return self._clocks[node]

    def inject(self, node: str, effects: Iterable[Any]) -> None:
        """Carry out effects returned by a direct call on a core (``join``, ``leave``, ...)."""
        self._process(node, effects)
        if node in self._cores:
            self._reschedule(node)

    # ---------------------------------------------------------------- event loop

    def run_until(self, t_end: float) -> None:
        """Process every delivery and timer up to global time ``t_end``."""
        net = self.network
        wake = self._wake
        cores = self._cores
        while True:
            t_net = net.next_time()
            t_wake = wake[0][0] if wake else math.inf
            t = t_net if t_net <= t_wake else t_wake
            if t > t_end:
                break
            self.clock.advance_to(t)
            if t_net <= t_wake:
                d = net.pop(t)
                if d is None:
                    continue
                core = cores.get(d.dst)
                if core is None or d.dst in self._paused:
                    continue
                msg = d.message if self._codec is None else self._codec(d.message)
                self.events_processed += 1
                effects = core.handle(self._clocks[d.dst].local(t), d.src, msg)
                if effects:
                    self._process(d.dst, effects)
                self._reschedule(d.dst)
            else:
                deadline, _, node = heapq.heappop(wake)
                if self._scheduled.get(node) != deadline:
                    continue
                del self._scheduled[node]
                local_deadline = self._scheduled_local.pop(node, -math.inf)
                core = cores.get(node)
                if core is None or node in self._paused:
                    continue
                self._check_progress(node, t)
                self.events_processed += 1
                # Converting local -> global -> local can round just below the deadline.
                local = self._clocks[node].local(t)
                effects = core.tick(local if local >= local_deadline else local_deadline)
                if effects:
                    self._process(node, effects)
                self._reschedule(node)
        self.clock.advance_to(t_end)

    def run_for(self, dt: float) -> None:
        self.run_until(self.clock.now() + dt)

    def _process(self, node: str, effects: Iterable[Any]) -> None:
        sink = self._sinks.get(node)
        if sink is None:
            sink = self._sinks[node] = _NodeSink(self, node)
        self._perform(sink, list(effects))

    def _reschedule(self, node: str) -> None:
        core = self._cores.get(node)
        if core is None or node in self._paused:
            return
        local_deadline = core.next_deadline()
        if local_deadline == math.inf:
            self._scheduled.pop(node, None)
            return
        g = self._clocks[node].to_global(local_deadline)
        now = self.clock.now()
        if g < now:
            g = now
        if self._scheduled.get(node) == g:
            return
        self._scheduled[node] = g
        self._scheduled_local[node] = local_deadline
        self._counter += 1
        heapq.heappush(self._wake, (g, self._counter, node))

    def _check_progress(self, node: str, t: float) -> None:
        last = self._same_instant.get(node)
        count = last[1] + 1 if last is not None and last[0] == t else 1
        self._same_instant[node] = (t, count)
        if count > self.MAX_TICKS_SAME_INSTANT:
            raise StuckCoreError(
                f"core {node!r} asked for {count} ticks at t={t} without advancing its deadline"
            )
