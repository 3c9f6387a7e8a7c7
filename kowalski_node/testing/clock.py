"""Manually driven clocks: one global simulated time, plus per-node views with skew and drift."""

from __future__ import annotations


class FakeClock:
    """Global simulated time in seconds; only moves when told to."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)

    def now(self) -> float:
        return self._now

    def advance(self, dt: float) -> float:
        """Move forward by ``dt`` seconds (negative is refused: use a view's ``jump`` for that)."""
        if dt < 0:
            raise ValueError(f"FakeClock.advance: dt must be >= 0, got {dt}")
        self._now += dt
        return self._now

    def advance_to(self, t: float) -> float:
        """Move forward to ``t`` (a no-op if ``t`` is in the past)."""
        if t > self._now:
            self._now = t
        return self._now

    def view(self, offset: float = 0.0, drift: float = 0.0) -> NodeClock:
        """A node's local clock: ``local = global * (1 + drift) + offset``."""
        return NodeClock(self, offset, drift)


class NodeClock:
    """What one node believes the time is: skewed (``offset``), drifting, and able to jump."""

    def __init__(self, base: FakeClock, offset: float = 0.0, drift: float = 0.0) -> None:
        if drift <= -1.0:
            raise ValueError(f"NodeClock: drift must be > -1, got {drift}")
        self._base = base
        self.offset = offset
        self.drift = drift

    def now(self) -> float:
        return self.local(self._base.now())

    def local(self, global_t: float) -> float:
        """Local reading at global time ``global_t``."""
        return global_t * (1.0 + self.drift) + self.offset

    def to_global(self, local_t: float) -> float:
        """Global time at which this clock reads ``local_t``."""
        return (local_t - self.offset) / (1.0 + self.drift)

    def jump(self, dt: float) -> None:
        """Step the clock by ``dt`` (may be negative): an NTP correction or a bad RTC."""
        self.offset += dt
