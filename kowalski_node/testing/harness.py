"""A deterministic discrete-event driver for sans-IO cores over :class:`FakeNetwork`.

Any object with ``handle(now, src, msg)``, ``tick(now)`` and ``next_deadline()`` can be
driven. Send effects (by default membership ``Send``) go through the network; every other
effect is passed to ``on_effect``. Each node may have its own skewed :class:`NodeClock`.
Events at the same instant run in a fixed order, so a seed reproduces a run exactly.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from kowalski_node.membership.effects import Send
from kowalski_node.testing.clock import FakeClock, NodeClock
from kowalski_node.testing.network import FakeNetwork

EffectHook = Callable[[str, float, Any], None]


class DrivenCore(Protocol):
    """The driving contract every pure core in this package follows."""

    def handle(self, now: float, src: str, msg: Any) -> list[Any]: ...

    def tick(self, now: float) -> list[Any]: ...

    def next_deadline(self) -> float: ...


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
        on_effect: EffectHook | None = None,
        send_types: tuple[type, ...] = (Send,),
        wire_codec: Callable[[Any], Any] | None = None,
    ) -> None:
        self.network = network
        self.clock = clock or FakeClock()
        self.on_effect = on_effect
        self._send_types = send_types
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
        now = self.clock.now()
        send_types = self._send_types
        hook = self.on_effect
        for e in effects:
            if isinstance(e, send_types):
                send: Any = e
                self.network.send(now, node, send.to, send.message)
            if hook is not None:
                hook(node, now, e)

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
