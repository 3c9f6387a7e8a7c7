"""Fencing epochs: the guard every replica runs before accepting a step or a commit.

A leader's writes carry the epoch of its lease. Each replica remembers, per task, the
highest epoch it has seen and who claimed it. Anything older is stale; a second holder
claiming an epoch that is already taken is a conflict. Both are refused, so a paused old
leader that wakes up after a takeover cannot write.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from kowalski_node.errors import TaskError


class FenceVerdict(StrEnum):
    """Outcome of a fencing check."""

    OK = "ok"
    STALE = "stale"
    CONFLICT = "conflict"


class StaleEpochError(TaskError):
    """A write carried an epoch older than (or conflicting with) the one this replica follows."""

    def __init__(
        self, task_id: str, epoch: int, holder: str, current_epoch: int, current_holder: str
    ) -> None:
        super().__init__(
            f"task {task_id}: write from {holder} at epoch {epoch} refused; "
            f"this replica follows {current_holder} at epoch {current_epoch}"
        )
        self.task_id = task_id
        self.epoch = epoch
        self.holder = holder
        self.current_epoch = current_epoch
        self.current_holder = current_holder


@dataclass(frozen=True, slots=True)
class EpochClaim:
    """The highest (epoch, holder) a replica has accepted for one task."""

    epoch: int
    holder: str


class FencingGuard:
    """Per-task highest epoch; monotonic: it never goes back."""

    def __init__(self) -> None:
        self._highest: dict[str, EpochClaim] = {}
        self.rejected = 0

    def check(self, task_id: str, epoch: int, holder: str) -> FenceVerdict:
        """Would a write at (epoch, holder) be accepted? Does not record anything."""
        cur = self._highest.get(task_id)
        if cur is None or epoch > cur.epoch:
            return FenceVerdict.OK
        if epoch == cur.epoch:
            return FenceVerdict.OK if holder == cur.holder else FenceVerdict.CONFLICT
        return FenceVerdict.STALE

    def admit(self, task_id: str, epoch: int, holder: str) -> FenceVerdict:
        """Check and, when OK, raise the task's fence to (epoch, holder)."""
        if epoch < 0:
            raise ValueError(f"task {task_id}: epoch must be >= 0, got {epoch}")
        verdict = self.check(task_id, epoch, holder)
        if verdict is FenceVerdict.OK:
            cur = self._highest.get(task_id)
            if cur is None or epoch > cur.epoch:
                self._highest[task_id] = EpochClaim(epoch, holder)
        else:
            self.rejected += 1
        return verdict

    def require(self, task_id: str, epoch: int, holder: str) -> None:
        """Like :meth:`admit`, but raise :class:`StaleEpochError` on refusal."""
        verdict = self.admit(task_id, epoch, holder)
        if verdict is not FenceVerdict.OK:
            cur = self._highest[task_id]
            raise StaleEpochError(task_id, epoch, holder, cur.epoch, cur.holder)

    def highest(self, task_id: str) -> EpochClaim | None:
        return self._highest.get(task_id)

    def forget(self, task_id: str) -> None:
        """Drop a finished task's fence (only once its record is terminal and durable)."""
        self._highest.pop(task_id, None)
