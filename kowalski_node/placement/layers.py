"""Layer partitioning for pipeline sharding: contiguous layer ranges weighted by free memory.

:func:`plan_layers` orders peers by usable memory (largest first, then peer id) and gives
each a contiguous range whose size is proportional to its usable memory, never above it:
usable = min(free, max_bytes) · (1 - reserve_fraction), so every peer keeps at least
``reserve_fraction`` of its memory as headroom (KV cache, activations, the OS).

:func:`replan_layers` repairs a plan after peers leave or shrink with minimal movement:
survivors keep their ranges; each orphaned gap is absorbed by its pipeline neighbours
(split in proportion to their spare memory) and what is left goes to unused peers. Only
if that fails does it fall back to a full re-plan.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kowalski_node.errors import NoCapableDevice

GIB = 1024**3


class LayerPlanError(NoCapableDevice):
    """The model does not fit; the message gives the sizes involved."""

    def __init__(self, message: str, *, needed: int, usable: int) -> None:
        super().__init__(message)
        self.needed = needed
        self.usable = usable


@dataclass(frozen=True, slots=True)
class PeerMemory:
    """Memory a peer offers for layers: ``free_bytes``, optionally capped by ``max_bytes``."""

    peer: str
    free_bytes: int
    max_bytes: int | None = None

    def usable(self, reserve_fraction: float) -> int:
        cap = self.free_bytes if self.max_bytes is None else min(self.free_bytes, self.max_bytes)
        return max(0, int(cap * (1.0 - reserve_fraction)))


@dataclass(frozen=True, slots=True)
class LayerAssignment:
    """Layers [start, end) on ``peer``; ``capacity`` is the peer's usable memory."""

    peer: str
    start: int
    end: int
    bytes: int
    capacity: int
    free_bytes: int

    @property
    def n_layers(self) -> int:
        return self.end - self.start

    @property
    def headroom(self) -> int:
        """Free memory left on the peer after loading its layers."""
        return self.free_bytes - self.bytes

    @property
    def headroom_fraction(self) -> float:
        return self.headroom / self.free_bytes if self.free_bytes else 0.0


@dataclass(frozen=True, slots=True)
class LayerPlan:
    """Pipeline stages in layer order; every layer appears exactly once."""

    n_layers: int
    total_bytes: int
    assignments: tuple[LayerAssignment, ...]

    def peers(self) -> list[str]:
        return [a.peer for a in self.assignments]

    def owner(self, layer: int) -> str:
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} is outside 0..{self.n_layers - 1}")
        starts = [a.start for a in self.assignments]
        return self.assignments[bisect.bisect_right(starts, layer) - 1].peer

    def owners(self) -> list[str]:
        """Peer of every layer, in order."""
        out: list[str] = []
        for a in self.assignments:
            out.extend([a.peer] * a.n_layers)
        return out

    @property
    def min_headroom(self) -> int:
        return min((a.headroom for a in self.assignments), default=0)

    @property
    def min_headroom_fraction(self) -> float:
        return min((a.headroom_fraction for a in self.assignments), default=0.0)

    @property
    def total_headroom(self) -> int:
        return sum(a.headroom for a in self.assignments)

    def validate(self) -> None:
        """Raise if the plan does not cover every layer exactly once, contiguously."""
        pos = 0
        seen: set[str] = set()
        for a in self.assignments:
            if a.start != pos or a.end <= a.start:
                raise ValueError(
                    f"plan gap or overlap at layer {pos}: {a.peer} has [{a.start}, {a.end})"
                )
            if a.peer in seen:
                raise ValueError(f"peer {a.peer} appears twice in the plan")
            if a.bytes > a.capacity:
                raise ValueError(
                    f"peer {a.peer} is given {a.bytes} bytes but can hold {a.capacity}"
                )
            seen.add(a.peer)
            pos = a.end
        if pos != self.n_layers:
            raise ValueError(f"plan covers layers up to {pos}, model has {self.n_layers}")

    def moved_layers(self, other: LayerPlan) -> int:
        """How many layers changed peer between two plans of the same model."""
        return sum(1 for a, b in zip(self.owners(), other.owners(), strict=True) if a != b)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for reports (JSON)."""
        return {
            "n_layers": self.n_layers,
            "total_bytes": self.total_bytes,
            "stages": len(self.assignments),
            "min_headroom_bytes": self.min_headroom,
            "min_headroom_fraction": round(self.min_headroom_fraction, 4),
            "total_headroom_bytes": self.total_headroom,
            "assignments": [
                {
                    "peer": a.peer,
                    "start": a.start,
                    "end": a.end,
                    "bytes": a.bytes,
                    "free_bytes": a.free_bytes,
                    "headroom_bytes": a.headroom,
                }
                for a in self.assignments
            ],
        }


def uniform_layer_sizes(n_layers: int, total_bytes: int) -> list[int]:
    """Split ``total_bytes`` over ``n_layers`` as evenly as integers allow."""
    if n_layers <= 0:
        raise ValueError(f"n_layers must be > 0, got {n_layers}")
    base, rem = divmod(total_bytes, n_layers)
    return [base + (1 if i < rem else 0) for i in range(n_layers)]


def model_bytes(n_params: float, bits_per_weight: float) -> int:
    """Weight memory of a model: parameters x bits / 8."""
    return int(n_params * bits_per_weight / 8)


class _Prefix:
    """Prefix sums of layer sizes, for O(log n) range sums and 'how far does this fit'."""

    def __init__(self, sizes: Sequence[int]) -> None:
        self.sizes = list(sizes)
        self.cum = [0, *itertools.accumulate(self.sizes)]

    def bytes(self, start: int, end: int) -> int:
        return self.cum[end] - self.cum[start]

    def reach(self, start: int, capacity: int) -> int:
        """Largest end such that layers [start, end) fit in ``capacity``."""
        return bisect.bisect_right(self.cum, self.cum[start] + capacity) - 1

    def nearest_boundary(self, target_bytes: float) -> int:
        """Layer boundary whose cumulative size is closest to ``target_bytes``."""
        i = bisect.bisect_left(self.cum, target_bytes)
        if i >= len(self.cum):
            return len(self.cum) - 1
        if i > 0 and target_bytes - self.cum[i - 1] <= self.cum[i] - target_bytes:
            return i - 1
        return i


def _fits_greedily(prefix: _Prefix, start: int, caps: Sequence[int]) -> bool:
    pos = start
    n = len(prefix.sizes)
    for cap in caps:
        if pos >= n:
            return True
        pos = max(pos, prefix.reach(pos, cap))
    return pos >= n


def _check_sizes(layer_bytes: Sequence[int]) -> None:
    if not layer_bytes:
        raise ValueError("a model needs at least one layer")
    if any(b < 0 for b in layer_bytes):
        raise ValueError("layer sizes must be >= 0")


def plan_layers(
    layer_bytes: Sequence[int],
    peers: Sequence[PeerMemory],
    *,
    reserve_fraction: float = 0.1,
    max_peers: int | None = None,
) -> LayerPlan:
    """Memory-weighted contiguous split of the layers over ``peers`` (see module docstring).

    ``max_peers`` limits the pipeline to that many stages (the roomiest peers), trading
    memory spread for fewer network hops. Raises :class:`LayerPlanError` if it cannot fit.
    """
    _check_sizes(layer_bytes)
    if not 0.0 <= reserve_fraction < 1.0:
        raise ValueError(f"reserve_fraction must be in [0, 1), got {reserve_fraction}")
    if len({p.peer for p in peers}) != len(peers):
        raise ValueError("plan_layers: duplicate peer ids")
    prefix = _Prefix(layer_bytes)
    n = len(prefix.sizes)
    total = prefix.cum[-1]
    smallest = min(prefix.sizes)
    ordered = sorted(peers, key=lambda p: (-p.usable(reserve_fraction), p.peer))
    ordered = [
        p
        for p in ordered
        if p.usable(reserve_fraction) >= smallest and p.usable(reserve_fraction) > 0
    ]
    if max_peers is not None:
        ordered = ordered[: max(1, max_peers)]
    caps = [p.usable(reserve_fraction) for p in ordered]
    usable_total = sum(caps)
    if not _fits_greedily(prefix, 0, caps):
        biggest = max(prefix.sizes)
        if usable_total < total:
            msg = (
                f"model does not fit: needs {total / GIB:.1f} GiB for {n} layers, the {len(ordered)} usable peers "
                f"offer {usable_total / GIB:.1f} GiB after keeping {reserve_fraction:.0%} headroom "
                f"({len(peers) - len(ordered)} peers cannot hold even one layer)"
            )
        else:
            msg = (
                f"model does not fit contiguously: {usable_total / GIB:.1f} GiB usable in total but split into pieces "
                f"too small for whole layers (largest layer {biggest / GIB:.2f} GiB, {n} layers, {len(ordered)} peers)"
            )
        raise LayerPlanError(msg, needed=total, usable=usable_total)
    assignments: list[LayerAssignment] = []
    pos = 0
    cum_cap = 0
    for i, (peer, cap) in enumerate(zip(ordered, caps, strict=True)):
        if pos >= n:
            break
        cum_cap += cap
        hi = prefix.reach(pos, cap)
        if i == len(ordered) - 1:
            end = n
        else:
            target = prefix.nearest_boundary(total * cum_cap / usable_total)
            # smallest end that still lets the remaining peers take the rest (binary search:
            # a later end only makes the remainder easier to place)
            rest = caps[i + 1 :]
            lo_search, hi_search = pos, hi
            while lo_search < hi_search:
                mid = (lo_search + hi_search) // 2
                if _fits_greedily(prefix, mid, rest):
                    hi_search = mid
                else:
                    lo_search = mid + 1
            end = min(hi, max(lo_search, target))
        if end > pos:
            assignments.append(
                LayerAssignment(peer.peer, pos, end, prefix.bytes(pos, end), cap, peer.free_bytes)
            )
        pos = end
    plan = LayerPlan(n, total, tuple(assignments))
    plan.validate()
    return plan


def replan_layers(
    old: LayerPlan,
    layer_bytes: Sequence[int],
    peers: Sequence[PeerMemory],
    *,
    reserve_fraction: float = 0.1,
) -> LayerPlan:
    """Repair ``old`` for the current ``peers`` moving as few layers as possible."""
    _check_sizes(layer_bytes)
    if len(layer_bytes) != old.n_layers:
        raise ValueError(
            f"replan: the old plan has {old.n_layers} layers, got sizes for {len(layer_bytes)}"
        )
    prefix = _Prefix(layer_bytes)
    n = old.n_layers
    info = {p.peer: p for p in peers}
    cap = {p.peer: p.usable(reserve_fraction) for p in peers}
    owner: list[str | None] = [None] * n
    used: dict[str, int] = {}
    for a in old.assignments:
        if a.peer in cap and prefix.bytes(a.start, a.end) <= cap[a.peer]:
            for layer in range(a.start, a.end):
                owner[layer] = a.peer
            used[a.peer] = prefix.bytes(a.start, a.end)

    def spare(peer: str) -> int:
        return cap[peer] - used.get(peer, 0)

    unused = sorted((p for p in cap if p not in used), key=lambda p: (-cap[p], p))
    layer = 0
    while layer < n:
        if owner[layer] is not None:
            layer += 1
            continue
        g0 = layer
        while layer < n and owner[layer] is None:
            layer += 1
        g1 = layer
        left = owner[g0 - 1] if g0 > 0 else None
        right = owner[g1] if g1 < n else None
        gap = prefix.bytes(g0, g1)
        s_left = spare(left) if left is not None else 0
        s_right = spare(right) if right is not None else 0
        x, y = g0, g1
        if left is not None and s_left > 0:
            share = gap * s_left / (s_left + s_right) if (s_left + s_right) else 0
            budget = min(s_left, int(share) if right is not None else s_left)
            while x < g1 and prefix.sizes[x] <= budget:
                budget -= prefix.sizes[x]
                used[left] += prefix.sizes[x]
                owner[x] = left
                x += 1
        if right is not None:
            while y > x and prefix.sizes[y - 1] <= spare(right):
                used[right] += prefix.sizes[y - 1]
                owner[y - 1] = right
                y -= 1
        if left is not None:  # the right neighbour may have left room the left one can still use
            while x < y and prefix.sizes[x] <= spare(left):
                used[left] += prefix.sizes[x]
                owner[x] = left
                x += 1
        while x < y:
            if not unused:
                return plan_layers(layer_bytes, peers, reserve_fraction=reserve_fraction)
            newcomer = unused.pop(0)
            end = prefix.reach(x, cap[newcomer])
            end = min(end, y)
            if end == x:
                continue
            for i in range(x, end):
                owner[i] = newcomer
            used[newcomer] = prefix.bytes(x, end)
            x = end
    assignments: list[LayerAssignment] = []
    start = 0
    for i in range(1, n + 1):
        if i == n or owner[i] != owner[start]:
            peer = owner[start]
            assert peer is not None
            assignments.append(
                LayerAssignment(
                    peer, start, i, prefix.bytes(start, i), cap[peer], info[peer].free_bytes
                )
            )
            start = i
    plan = LayerPlan(n, prefix.cum[-1], tuple(assignments))
    try:
        plan.validate()
    except ValueError:
        # A peer ended up with two separate ranges (it bridged two gaps): re-plan from scratch.
        return plan_layers(layer_bytes, peers, reserve_fraction=reserve_fraction)
    return plan
