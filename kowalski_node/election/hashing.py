"""Weighted rendezvous (highest-random-weight) hashing over a stable hash.

Every node ranks the same candidates the same way for a task without talking to anyone:
score(task, peer) = weight / -ln(u), with u in (0, 1) from blake2b(task, peer). A peer
with twice the weight wins twice as often, and removing a peer only moves the tasks it
ranked first (minimal disruption). Python's ``hash()`` is salted per process, so it is
never used here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from hashlib import blake2b

_TWO64 = float(2**64)


def stable_unit(task_id: str, peer: str) -> float:
    """A deterministic pseudo-random number in (0, 1) for the pair (task, peer)."""
    h = blake2b(digest_size=8, person=b"kowalski-hrw")
    h.update(task_id.encode("utf-8"))
    h.update(b"\x00")
    h.update(peer.encode("utf-8"))
    return (int.from_bytes(h.digest(), "big") + 0.5) / _TWO64


def hrw_score(task_id: str, peer: str, weight: float) -> float:
    """Weighted rendezvous score; higher wins. Non-positive weights never win (score -inf)."""
    if not weight > 0 or not math.isfinite(weight):
        return -math.inf
    return weight / -math.log(stable_unit(task_id, peer))


def rank_candidates(task_id: str, weights: Mapping[str, float]) -> list[str]:
    """Capable peers (weight > 0) best first: the leader, then its successors.

    Ties (practically impossible with 64-bit hashes) are broken by peer id so the order is total.
    """
    scored = [
        (hrw_score(task_id, p, w), p) for p, w in weights.items() if w > 0 and math.isfinite(w)
    ]
    scored.sort(key=lambda sp: (-sp[0], sp[1]))
    return [p for _, p in scored]


def choose_leader(task_id: str, weights: Mapping[str, float]) -> str | None:
    """The best-ranked capable peer, or ``None`` when nobody is capable."""
    best: tuple[float, str] | None = None
    for p, w in weights.items():
        s = hrw_score(task_id, p, w)
        if s == -math.inf:
            continue
        if best is None or s > best[0] or (s == best[0] and p < best[1]):
            best = (s, p)
    return best[1] if best is not None else None


def successors(
    task_id: str, weights: Mapping[str, float], k: int, leader: str | None = None
) -> list[str]:
    """The next ``k`` candidates after ``leader`` (default: after the top-ranked peer)."""
    order = rank_candidates(task_id, weights)
    if leader is None:
        return order[1 : 1 + k]
    return [p for p in order if p != leader][:k]


def home_acceptors(key: str, members: Iterable[str], size: int = 3) -> tuple[str, ...]:
    """The fixed acceptor set of an idempotency key: its ``size`` best rendezvous peers.

    Computed over every *known* member (live or down), never over the live ones only,
    so that two nodes which see different deaths still pick the same set. Fewer than
    ``size`` known members: ``()``, the owner arbitrates alone (today's 2-node behaviour).
    """
    peers = sorted(set(members))
    if len(peers) < size:
        return ()
    scored = sorted(((stable_unit(key, p), p) for p in peers), key=lambda sp: (-sp[0], sp[1]))
    return tuple(p for _, p in scored[:size])
