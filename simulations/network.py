"""The simulated network: per-link latency from both ends' access links, loss, duplication,
reordering, and partitions of any shape (groups, ring, bridge) checked at delivery time.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from simulations.scenario import NetworkSpec

Connectivity = Callable[[int, int], bool]


class SimNetwork:
    """Computes delivery delays; the engine owns the event heap."""

    def __init__(
        self, rng: random.Random, spec: NetworkSpec, access: list[float], phone: list[bool]
    ) -> None:
        self._rng = rng
        self.spec = spec
        self.access = access
        self.phone = phone
        self.loss = spec.loss
        self.duplicate = spec.duplicate
        self.reorder = spec.reorder
        self.connectivity: Connectivity | None = None
        self.partition_name = ""
        self.sent = 0
        self.lost = 0
        self.duplicated = 0
        self.dropped_partition = 0
        self.dropped_down = 0
        self.jitter = spec.jitter.sampler(rng)
        """One jitter draw (seconds) from the network's RNG."""
        self._phone_extra = spec.phone_extra_loss
        self.clean = False
        """No loss, duplication or reordering right now: every message is one copy, delayed
        by both access links plus one jitter draw (the engine's fast path)."""
        self._update_clean()

    def set_faults(self, loss: float, duplicate: float, reorder: float) -> None:
        self.loss, self.duplicate, self.reorder = loss, duplicate, reorder
        self._update_clean()

    def _update_clean(self) -> None:
        self.clean = not (self.loss or self.duplicate or self.reorder or self._phone_extra)

    def reset_faults(self) -> None:
        self.set_faults(self.spec.loss, self.spec.duplicate, self.spec.reorder)

    def can_talk(self, a: int, b: int) -> bool:
        c = self.connectivity
        return c is None or a == b or c(a, b)

    def delays(self, src: int, dst: int) -> tuple[float, ...]:
        """Delivery delays for one message: () when lost, two values when duplicated.

        Hot path (every simulated message): the fault-free case draws one jitter value and
        returns at once; the draws from the seeded RNG are the same in every case.
        """
        self.sent += 1
        rng = self._rng
        loss = self.loss
        extra = self._phone_extra
        if extra and (self.phone[src] or self.phone[dst]):
            loss = 1.0 - (1.0 - loss) * (1.0 - extra)
        if loss and rng.random() < loss:
            self.lost += 1
            return ()
        access = self.access
        base = access[src] + access[dst]
        duplicate = self.duplicate
        reorder = self.reorder
        jitter = self.jitter
        if not duplicate and not reorder:
            return (base + jitter(),)
        copies = 2 if duplicate and rng.random() < duplicate else 1
        if copies == 2:
            self.duplicated += 1
        out = []
        for _ in range(copies):
            d = base + jitter()
            if reorder and rng.random() < reorder:
                d += self.spec.reorder_delay * (1.0 + rng.random())
            out.append(d)
        return tuple(out)


def groups_connectivity(group_of: list[int]) -> Connectivity:
    """Nodes talk only inside their group."""
    return lambda a, b: group_of[a] == group_of[b]


def ring_connectivity(n: int, order: list[int]) -> Connectivity:
    """Majorities ring: node i sees the nodes within n//4 positions on either side of it in
    ``order``, so each node sees a majority, but no two nodes see the same majority."""
    pos = [0] * n
    for i, node in enumerate(order):
        pos[node] = i
    reach = max(1, n // 4)

    def talk(a: int, b: int) -> bool:
        d = abs(pos[a] - pos[b])
        return min(d, n - d) <= reach

    return talk


def bridge_connectivity(group_of: list[int], bridge: int) -> Connectivity:
    """Two halves that cannot talk, and one bridge node that talks to both."""
    return lambda a, b: a == bridge or b == bridge or group_of[a] == group_of[b]
