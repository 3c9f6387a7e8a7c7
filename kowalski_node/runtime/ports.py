"""The runtime's own ports: what the node keeps about tasks besides the ledger, the task
engine's loop as its parts see it, and the adverts as the engine reads them.

The ledger's records go through `tasks.LedgerStore` (the coordination core's port). The
node also keeps a read model for users (aliases of task ids, per-task info for views,
history lines, counters): that is `TaskMetadataStore`. `adapters.sqlite_store`
implements both in one database, so one transaction (`batch`) can cover a ledger write
and the metadata that goes with it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from kowalski_node.capabilities import DeviceProfile
from kowalski_node.coordination.effects import CoordAction, CoordEffect
from kowalski_node.tasks import TaskRecord


@dataclass(frozen=True, slots=True)
class HistoryRow:
    """One line of a task's history (what one peer did, when)."""

    task_id: str
    at: float
    peer: str
    action: str
    epoch: int | None
    detail: str


class TaskMetadataStore(Protocol):
    """The node's read model of tasks: views, aliases, history and counters."""

    def batch(self) -> AbstractContextManager[None]:
        """Group the writes inside into one atomic transaction."""
        ...

    def recent(self, limit: int, states: Iterable[str] | None = None) -> list[TaskRecord]: ...

    def count_by_state(self) -> dict[str, int]: ...

    def put_aliases(self, pairs: Iterable[tuple[str, str]]) -> None: ...

    def resolve_alias(self, alias: str) -> str | None: ...

    def get_info(self, task_id: str) -> dict[str, Any]: ...

    def put_infos(self, items: Iterable[tuple[str, dict[str, Any]]]) -> None: ...

    def update_info(self, task_id: str, **changes: Any) -> dict[str, Any]: ...

    def add_history(
        self,
        task_id: str,
        at: float,
        peer: str,
        action: str,
        epoch: int | None = None,
        detail: str = "",
    ) -> None: ...

    def history(self, task_id: str, limit: int = 500) -> list[HistoryRow]: ...

    def get_value(self, key: str, default: str | None = None) -> str | None: ...

    def set_value(self, key: str, value: str) -> None: ...

    def get_int(self, key: str, default: int = 0) -> int: ...

    def add_int(self, key: str, delta: int = 1) -> int: ...


class CoordinatorLoop(Protocol):
    """The task engine's loop around the coordination core, as its parts see it: the
    parts (leader runs, submission intake) call the core and hand its effects back here."""

    def clock(self) -> float:
        """The core's `now` (wall-based, monotonic)."""
        ...

    def apply(self, effects: Sequence[CoordEffect]) -> None:
        """Perform the core's effects, its ledger writes first (and re-arm its timer)."""
        ...

    def write_ledger(self, effects: Sequence[CoordEffect]) -> list[CoordAction]:
        """Make the ledger writes among `effects` durable now (inside a `batch`, they join
        that transaction); returns the other effects, to `apply` after the batch."""
        ...

    def wake(self) -> None:
        """Re-arm the core's timer: its next deadline may have moved."""
        ...


class AdvertView(Protocol):
    """The capability adverts as the task engine reads them (`CapabilityDriver`)."""

    own: DeviceProfile | None
    """This node's latest advert (None before the first)."""

    def on_change(self, listener: Callable[[DeviceProfile], None]) -> None:
        """Call `listener` with this node's advert whenever it changes."""
        ...

    def profile_of(self, peer: str) -> DeviceProfile | None:
        """A peer's latest advert, if one has been heard."""
        ...
