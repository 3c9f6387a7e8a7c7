"""Per-peer redial backoff: how often a gone peer is dialled again, and when that is logged.

A peer that left keeps being wanted (membership gossip, bootstrap, requests), and each
want used to dial at once: ~2.6 failed dials a second per gone peer, each logged by
py-libp2p. Now the first failure opens a window of 0.2 s that doubles per failure up to
60 s (±20 % jitter so a cluster's nodes do not redial in step). Inside the window,
on-demand dials fail fast without touching the network; a failure is a *step* only when
the window has passed, and each step is logged once, as one structured line. A
connection from or to the peer resets it.

Pure bookkeeping: time comes in as `now`, randomness from the injected `rng`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

REDIAL_MIN_S = 0.2
REDIAL_MAX_S = 60.0
REDIAL_JITTER = 0.2


@dataclass
class _PeerState:
    steps: int = 0
    next_dial_at: float = 0.0
    delay_s: float = 0.0


@dataclass(frozen=True)
class Step:
    """A new backoff step: log it (once) and wait `retry_in_s` before the next dial."""

    peer: str
    attempt: int
    retry_in_s: float


class RedialBackoff:
    """Backoff state for every peer whose dials failed; see the module docstring."""

    def __init__(
        self,
        *,
        min_s: float = REDIAL_MIN_S,
        max_s: float = REDIAL_MAX_S,
        jitter: float = REDIAL_JITTER,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < min_s <= max_s:
            raise ValueError(f"need 0 < min_s <= max_s, got {min_s}, {max_s}")
        self.min_s = min_s
        self.max_s = max_s
        self.jitter = jitter
        self._rng = rng or random.Random()
        self._peers: dict[str, _PeerState] = {}

    def wait_s(self, peer: str, now: float) -> float:
        """Seconds until `peer` may be dialled again (0 when it may be dialled now)."""
        state = self._peers.get(peer)
        return 0.0 if state is None else max(0.0, state.next_dial_at - now)

    def failed(self, peer: str, now: float) -> Step | None:
        """Record a failed dial; a Step when it opens a new window, None inside the current."""
        state = self._peers.setdefault(peer, _PeerState())
        if state.steps and now < state.next_dial_at:
            return None
        state.steps += 1
        base = min(self.max_s, self.min_s * 2 ** (state.steps - 1))
        spread = 1.0 + self.jitter * (2 * self._rng.random() - 1)
        state.delay_s = min(self.max_s, base * spread)
        state.next_dial_at = now + state.delay_s
        return Step(peer, state.steps, state.delay_s)

    def succeeded(self, peer: str) -> int:
        """The peer is connected: forget its backoff; returns how many steps it had failed."""
        state = self._peers.pop(peer, None)
        return 0 if state is None else state.steps

    def attempts(self, peer: str) -> int:
        state = self._peers.get(peer)
        return 0 if state is None else state.steps
