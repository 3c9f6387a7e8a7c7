"""The submitter's durable retry queue: a task that reached no leader is never dropped.

Entries live in the ledger's :class:`LedgerState`, whose writes the driver makes durable
(so a restart keeps them). Retries back off
exponentially with jitter from the injected RNG, capped at ``max_delay``; there is no
attempt limit. ``kick`` makes every entry due at once (e.g. when membership reports a
new live peer after a partition heals).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

from kowalski_node.errors import ConfigError
from kowalski_node.tasks.store import LedgerState, PendingSubmit


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    base_delay: float = 0.2
    max_delay: float = 10.0
    multiplier: float = 2.0
    jitter: float = 0.2
    """Fraction of the delay added or removed at random, so submitters do not retry in lockstep."""

    def __post_init__(self) -> None:
        if (
            self.base_delay <= 0
            or self.max_delay < self.base_delay
            or self.multiplier < 1
            or not 0 <= self.jitter < 1
        ):
            raise ConfigError(
                "retry policy: need base_delay > 0, max_delay >= base_delay, multiplier >= 1, 0 <= jitter < 1"
            )

    def delay(self, attempts: int, rng: random.Random) -> float:
        """Delay before attempt number ``attempts + 1``."""
        raw = self.base_delay * self.multiplier ** max(0, attempts - 1)
        d = min(self.max_delay, raw)
        if self.jitter:
            d *= 1.0 + self.jitter * (2.0 * rng.random() - 1.0)
        return d


class SubmitQueue:
    """Tasks waiting for a leader to accept them."""

    def __init__(
        self, state: LedgerState, rng: random.Random, policy: RetryPolicy | None = None
    ) -> None:
        self.state = state
        self._rng = rng
        self.policy = policy or RetryPolicy()
        self._entries: dict[str, PendingSubmit] = {e.task_id: e for e in state.pending()}

    def enqueue(self, now: float, task_id: str) -> PendingSubmit:
        """Queue a task for its first attempt (now). Idempotent."""
        entry = self._entries.get(task_id)
        if entry is None:
            entry = PendingSubmit(task_id, now)
            self._entries[task_id] = entry
            self.state.put_pending(entry)
        return entry

    def due(self, now: float) -> list[str]:
        """Task ids whose next attempt is due, oldest deadline first."""
        ready = [e for e in self._entries.values() if e.next_attempt_at <= now]
        ready.sort(key=lambda e: (e.next_attempt_at, e.task_id))
        return [e.task_id for e in ready]

    def attempt_failed(self, now: float, task_id: str, reason: str) -> float:
        """The attempt found no leader (or timed out): schedule the next one; returns its time."""
        entry = self._entries.get(task_id) or PendingSubmit(task_id, now)
        attempts = entry.attempts + 1
        at = now + self.policy.delay(attempts, self._rng)
        entry = replace(entry, attempts=attempts, next_attempt_at=at, last_error=reason)
        self._entries[task_id] = entry
        self.state.put_pending(entry)
        return at

    def accepted(self, task_id: str) -> None:
        """A leader took the task (its replication acked): stop retrying."""
        if self._entries.pop(task_id, None) is not None:
            self.state.delete_pending(task_id)

    def kick(self, now: float) -> None:
        """Make every entry due now (a peer came back; waiting out the backoff helps nobody)."""
        for task_id, entry in list(self._entries.items()):
            if entry.next_attempt_at > now:
                entry = replace(entry, next_attempt_at=now)
                self._entries[task_id] = entry
                self.state.put_pending(entry)

    def next_deadline(self) -> float:
        return min((e.next_attempt_at for e in self._entries.values()), default=math.inf)

    def entry(self, task_id: str) -> PendingSubmit | None:
        return self._entries.get(task_id)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._entries
