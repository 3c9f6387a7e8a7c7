"""The merged view of every peer's latest advert: a last-writer-wins map keyed by peer.

Merge rule for two adverts of the same peer: the higher ``version`` wins; at equal
versions the one with the larger content digest wins (a deterministic tie-break, so a
peer that reused a version number cannot split the cluster's view). This is a join, so
every node that has received the same set of adverts holds the same table, whatever
the order and however many duplicates arrived.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from kowalski_node.capabilities.profile import DeviceProfile


def newer(a: DeviceProfile, b: DeviceProfile) -> DeviceProfile:
    """The winner between two adverts of the same peer."""
    if a.version != b.version:
        return a if a.version > b.version else b
    if a is b or a == b:
        return a
    return a if a.digest() >= b.digest() else b


class CapabilityTable:
    """Latest advert per peer; ``forget`` keeps a version floor so old adverts cannot resurrect a peer."""

    def __init__(self) -> None:
        self._profiles: dict[str, DeviceProfile] = {}
        self._floor: dict[str, int] = {}
        self._sorted: list[str] | None = []
        """Peer ids in sorted order (None = re-sort): adverts change often, the peer set rarely."""
        self.stale_ignored = 0
        self.generation = 0
        """Bumped on every change, so a reader can cache what it derives from the table."""

    def merge(self, advert: DeviceProfile) -> bool:
        """Apply one advert; True if the table changed (i.e. worth re-gossiping)."""
        cur = self._profiles.get(advert.peer)
        if cur is advert:
            return False  # the very advert we hold (a gossip duplicate): nothing to do
        floor = self._floor.get(advert.peer)
        if floor is not None and advert.version <= floor:
            self.stale_ignored += 1
            return False
        if cur is None:
            self._profiles[advert.peer] = advert
            self._sorted = None
            self.generation += 1
            return True
        win = newer(cur, advert)
        if win is cur:
            if advert.version < cur.version:
                self.stale_ignored += 1
            return False
        self._profiles[advert.peer] = win
        self.generation += 1
        return True

    def merge_all(self, adverts: Iterable[DeviceProfile]) -> list[str]:
        """Apply many adverts; returns the peers whose entry changed."""
        return [a.peer for a in adverts if self.merge(a)]

    def get(self, peer: str) -> DeviceProfile | None:
        return self._profiles.get(peer)

    def profiles(self) -> dict[str, DeviceProfile]:
        """Current adverts, sorted by peer id."""
        profiles = self._profiles
        return {p: profiles[p] for p in self._sorted_peers()}

    def peers(self) -> list[str]:
        return list(self._sorted_peers())

    def _sorted_peers(self) -> list[str]:
        order = self._sorted
        if order is None:
            order = self._sorted = sorted(self._profiles)
        return order

    def forget(self, peer: str) -> None:
        """Drop a peer that left or died; only a strictly newer advert brings it back."""
        cur = self._profiles.pop(peer, None)
        if cur is not None:
            self._sorted = None
            self.generation += 1
            self._floor[peer] = max(self._floor.get(peer, -1), cur.version)

    def snapshot(self) -> list[DeviceProfile]:
        """Every current advert (push-pull anti-entropy)."""
        profiles = self._profiles
        return [profiles[p] for p in self._sorted_peers()]

    def digest(self) -> bytes:
        """Hash of the whole table: two nodes with equal digests hold the same view."""
        h = hashlib.blake2b(digest_size=16)
        for p in self._sorted_peers():
            h.update(p.encode("utf-8"))
            h.update(self._profiles[p].digest())
        return h.digest()

    def __len__(self) -> int:
        return len(self._profiles)

    def __contains__(self, peer: object) -> bool:
        return peer in self._profiles
