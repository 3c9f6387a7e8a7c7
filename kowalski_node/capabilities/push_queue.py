"""Adverts waiting to be pushed, in push order: least sent first, ties by peer id.

Capability gossip takes up to ``max_per_push`` adverts per push and pushes each one a
bounded number of times. Sorting the whole queue for every push costs O(n log n) per push,
which at 1,000 peers was two thirds of a simulation's time (every received advert changes
the queue). Here the queue is kept as one sorted list per send count, so a push reads the
front of the lowest levels and moves what it took one level up.
"""

from __future__ import annotations

from bisect import bisect_left, insort


class PushQueue:
    """Peers whose advert still has pushes left, ordered by (times sent, peer id)."""

    __slots__ = ("_level_of", "_levels")

    def __init__(self) -> None:
        self._levels: list[list[str]] = []  # level i: peers sent i times, sorted
        self._level_of: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._level_of)

    def __bool__(self) -> bool:
        return bool(self._level_of)

    def __contains__(self, peer: object) -> bool:
        return peer in self._level_of

    def sent(self, peer: str) -> int | None:
        """How many times the peer's advert was pushed (None when not queued)."""
        return self._level_of.get(peer)

    def reset(self, peer: str) -> None:
        """Queue the peer's (new) advert as never sent."""
        level = self._level_of.get(peer)
        if level == 0:
            return
        if level is not None:
            self._remove(peer, level)
        if not self._levels:
            self._levels.append([])
        insort(self._levels[0], peer)
        self._level_of[peer] = 0

    def discard(self, peer: str) -> bool:
        """Drop the peer from the queue; whether it was queued."""
        level = self._level_of.pop(peer, None)
        if level is None:
            return False
        self._remove(peer, level)
        return True

    def take(self, n: int, limit: int) -> list[str]:
        """The next ``n`` peers in push order; each counts one more send and leaves the queue
        once it has been sent ``limit`` times."""
        picked: list[tuple[int, list[str]]] = []
        room = n
        for level, peers in enumerate(self._levels):
            if not peers:
                continue
            chunk = peers[:room]
            picked.append((level, chunk))
            room -= len(chunk)
            if room <= 0:
                break
        out: list[str] = []
        for _, chunk in picked:
            out.extend(chunk)
        # Highest level first, so nothing taken here is moved twice.
        levels = self._levels
        level_of = self._level_of
        for level, chunk in reversed(picked):
            del levels[level][: len(chunk)]
            nxt = level + 1
            if nxt >= limit:
                for peer in chunk:
                    del level_of[peer]
                continue
            if len(levels) <= nxt:
                levels.append([])
            up = levels[nxt]
            for peer in chunk:
                level_of[peer] = nxt
            if not up:
                levels[nxt] = chunk
            elif up[-1] < chunk[0]:
                up.extend(chunk)
            else:
                for peer in chunk:
                    insort(up, peer)
        while levels and not levels[-1]:
            levels.pop()
        return out

    def _remove(self, peer: str, level: int) -> None:
        peers = self._levels[level]
        del peers[bisect_left(peers, peer)]
