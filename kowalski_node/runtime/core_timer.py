"""The one timer loop for the pure cores the node drives (membership, capability adverts,
coordination).

A core says when it next needs time (`next_deadline()`, in its own clock, `math.inf` when
nothing is scheduled); this loop sleeps until then and calls `on_due(now)` (which ticks
the core and performs its effects). An input that may move the deadline earlier (a
message, a membership event) calls `wake()`, so the loop reads the deadline again.

The core's clock is `trio.current_time() + offset`, so `trio.testing.MockClock` drives
it in tests.
"""

from __future__ import annotations

from collections.abc import Callable

import trio


class CoreTimer:
    """`await run()` in a nursery; `wake()` after every input the core was given."""

    def __init__(
        self,
        next_deadline: Callable[[], float],
        on_due: Callable[[float], object],
        *,
        stopped: Callable[[], bool] = lambda: False,
        offset: float = 0.0,
    ) -> None:
        self._next_deadline = next_deadline
        self._on_due = on_due
        self._stopped = stopped
        self._offset = offset
        self._wake = trio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Until cancelled, or until `stopped()` is true when a deadline is checked."""
        while not self._stopped():
            deadline = self._next_deadline()
            if deadline > trio.current_time() + self._offset:
                self._wake = trio.Event()
                with trio.move_on_at(deadline - self._offset):
                    await self._wake.wait()
                continue
            self._on_due(trio.current_time() + self._offset)
