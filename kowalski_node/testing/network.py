"""A seeded, pure event-queue network for driving sans-IO cores in tests and simulations.

No trio, no sockets: ``send`` schedules a delivery at ``now + delay`` on a heap and the
driver pops deliveries in time order. Everything random (delay, loss, duplication,
reordering) comes from the injected ``random.Random``, so a seed replays a run exactly.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class LinkProfile:
    """How one directed link behaves. Delay = ``latency`` + Exp(mean ``jitter``) (+ reorder extra)."""

    latency: float = 0.0005
    jitter: float = 0.0002
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_delay: float = 0.005

    def __post_init__(self) -> None:
        for name in ("latency", "jitter", "reorder_delay"):
            if getattr(self, name) < 0:
                raise ValueError(f"LinkProfile.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("loss", "duplicate", "reorder"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"LinkProfile.{name} must be a probability in [0, 1], got {v}")


@dataclass(slots=True)
class Delivery:
    """A message arriving at ``dst`` at time ``at``."""

    at: float
    src: str
    dst: str
    message: Any


@dataclass(slots=True)
class NetworkStats:
    """What happened to every message handed to the network."""

    sent: int = 0
    delivered: int = 0
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    dropped_partition: int = 0
    dropped_down: int = 0


@dataclass(slots=True)
class _Node:
    up: bool = True
    paused: bool = False
    held: list[Delivery] = field(default_factory=list)


class FakeNetwork:
    """Per-link delays, loss, duplication, reordering, partitions, kill/restart and pause/resume.

    Partitions are a list of groups: two nodes can talk only if they are in the same group.
    Nodes not named in any group form one extra group together ("the rest"). A partition
    applies to messages *delivered* while it is in place, including ones already in flight.
    """

    def __init__(self, rng: random.Random, default: LinkProfile | None = None) -> None:
        self._rng = rng
        self.default = default or LinkProfile()
        self._links: dict[tuple[str, str], LinkProfile] = {}
        self._node_links: dict[str, LinkProfile] = {}
        self._nodes: dict[str, _Node] = {}
        self._group: dict[str, int] | None = None
        self._heap: list[tuple[float, int, Delivery]] = []
        self._counter = 0
        self.stats = NetworkStats()

    # ---------------------------------------------------------------- topology & faults

    def add_node(self, node: str) -> None:
        """Register ``node`` (sending from or to an unknown node registers it implicitly)."""
        self._nodes.setdefault(node, _Node())

    def set_link(self, src: str, dst: str, profile: LinkProfile, *, both_ways: bool = True) -> None:
        """Give the link src→dst (and dst→src unless ``both_ways`` is False) its own profile."""
        self._links[(src, dst)] = profile
        if both_ways:
            self._links[(dst, src)] = profile

    def set_node_profile(self, node: str, profile: LinkProfile) -> None:
        """Profile for every link touching ``node`` that has no per-link profile (e.g. a phone on Wi-Fi)."""
        self._node_links[node] = profile

    def set_default(self, profile: LinkProfile) -> None:
        """Change the profile of all links without their own (e.g. turn on 5 % loss)."""
        self.default = profile

    def partition(self, groups: Iterable[Iterable[str]]) -> None:
        """Split the network into ``groups``; replaces any previous partition."""
        mapping: dict[str, int] = {}
        for i, group in enumerate(groups):
            for node in group:
                if node in mapping:
                    raise ValueError(f"partition: node {node!r} is in more than one group")
                mapping[node] = i
        self._group = mapping

    def heal(self) -> None:
        """Remove the partition."""
        self._group = None

    def can_talk(self, a: str, b: str) -> bool:
        """Whether a partition currently allows a→b (ignores node liveness)."""
        if self._group is None:
            return True
        return self._group.get(a, -1) == self._group.get(b, -1)

    def kill(self, node: str) -> None:
        """Crash ``node``: it sends nothing, and messages to it (also in flight) are dropped."""
        n = self._nodes.setdefault(node, _Node())
        n.up = False
        n.paused = False
        self.stats.dropped_down += len(n.held)
        n.held.clear()

    def restart(self, node: str) -> None:
        """Bring a killed node back (the driver gives it a fresh core)."""
        self._nodes.setdefault(node, _Node()).up = True

    def is_up(self, node: str) -> bool:
        n = self._nodes.get(node)
        return n is None or n.up

    def pause(self, node: str) -> None:
        """Freeze ``node`` (SIGSTOP): deliveries to it are held until ``resume``."""
        self._nodes.setdefault(node, _Node()).paused = True

    def resume(self, node: str, now: float) -> None:
        """Unfreeze ``node``; held messages arrive now, in their original order."""
        n = self._nodes.setdefault(node, _Node())
        n.paused = False
        held, n.held = n.held, []
        for d in held:
            self._push(Delivery(now, d.src, d.dst, d.message))

    def is_paused(self, node: str) -> bool:
        n = self._nodes.get(node)
        return n is not None and n.paused

    # ---------------------------------------------------------------- traffic

    def profile(self, src: str, dst: str) -> LinkProfile:
        """The profile used for src→dst."""
        p = self._links.get((src, dst))
        if p is not None:
            return p
        return self._node_links.get(dst) or self._node_links.get(src) or self.default

    def send(self, now: float, src: str, dst: str, message: Any) -> None:
        """Hand a message to the network; it may be lost, duplicated, delayed or reordered."""
        stats = self.stats
        stats.sent += 1
        sn = self._nodes.get(src)
        if sn is not None and (not sn.up or sn.paused):
            stats.dropped_down += 1
            return
        p = self.profile(src, dst)
        rng = self._rng
        if p.loss and rng.random() < p.loss:
            stats.lost += 1
            return
        copies = 1
        if p.duplicate and rng.random() < p.duplicate:
            copies = 2
            stats.duplicated += 1
        for _ in range(copies):
            delay = p.latency
            if p.jitter:
                delay += rng.expovariate(1.0 / p.jitter)
            if p.reorder and rng.random() < p.reorder:
                delay += p.reorder_delay * rng.random() + p.reorder_delay
                stats.reordered += 1
            self._push(Delivery(now + delay, src, dst, message))

    def _push(self, d: Delivery) -> None:
        self._counter += 1
        heapq.heappush(self._heap, (d.at, self._counter, d))

    def next_time(self) -> float:
        """Time of the next pending delivery (``inf`` when none)."""
        return self._heap[0][0] if self._heap else float("inf")

    def pending(self) -> int:
        """Messages still in flight."""
        return len(self._heap)

    def pop(self, until: float = float("inf")) -> Delivery | None:
        """Remove and return the next delivery arriving at or before ``until`` (drops are skipped)."""
        heap = self._heap
        while heap and heap[0][0] <= until:
            _, _, d = heapq.heappop(heap)
            dn = self._nodes.get(d.dst)
            if dn is not None and not dn.up:
                self.stats.dropped_down += 1
                continue
            if self._group is not None and not self.can_talk(d.src, d.dst):
                self.stats.dropped_partition += 1
                continue
            if dn is not None and dn.paused:
                dn.held.append(d)
                continue
            self.stats.delivered += 1
            return d
        return None

    def pop_due(self, now: float) -> list[Delivery]:
        """Every delivery that arrives at or before ``now``, in order."""
        out: list[Delivery] = []
        while True:
            d = self.pop(now)
            if d is None:
                return out
            out.append(d)
