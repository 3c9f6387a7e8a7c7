"""Who should run a piece of remote work: the SmartScheduler over live peers' adverts.

`PeerChooser` is what the remote executors ask: `rank(requirement)` gives qualified live
peers best first (this node may be among them; it is the local option), and the
executors report back what they saw (`record_success` with the network overhead of a
job, `record_failure` when a peer died, timed out or refused), so scores adapt: a peer
that failed is penalised (the penalty halves every `failure_half_life` seconds) and the
latency weight follows the observed network.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

from kowalski_node.capabilities.profile import DeviceProfile
from kowalski_node.placement import Placement, Requirement, SchedulerConfig, SmartScheduler


@runtime_checkable
class PeerChooser(Protocol):
    """What RemoteReplExecutor, FanoutBackend and FoldClient need to place work."""

    me: str

    def rank(self, requirement: Requirement) -> Placement:
        """Qualified live peers best first (maybe including `me`), and why others were not."""
        ...

    def profile(self, peer: str) -> DeviceProfile | None: ...

    def is_live(self, peer: str) -> bool: ...

    def record_success(self, peer: str, overhead_ms: float) -> None: ...

    def record_failure(self, peer: str) -> None: ...


@dataclass
class PeerOutcomes:
    """Counters per peer, for status pages and the bench."""

    successes: int = 0
    failures: int = 0
    last_overhead_ms: float | None = None


class SchedulerChooser:
    """A `PeerChooser` over a live-peer view, a capability table and a SmartScheduler.

    `profiles()` returns the merged adverts (peer -> DeviceProfile), `live()` the peers
    membership considers alive (this node included), and `probe_latency_ms(peer)` the
    membership probe round trip when known; it seeds the scheduler's latency estimate for
    peers this chooser has not yet measured itself. `clock` is monotonic seconds.
    `local_weight` scales this node's own score (1.0: no preference).
    """

    def __init__(
        self,
        me: str,
        profiles: Callable[[], Mapping[str, DeviceProfile]],
        live: Callable[[], Collection[str]],
        *,
        probe_latency_ms: Callable[[str], float | None] | None = None,
        scheduler: SmartScheduler | None = None,
        config: SchedulerConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        local_weight: float = 1.0,
    ) -> None:
        if not math.isfinite(local_weight) or local_weight < 0:
            raise ValueError(f"local_weight must be a finite number >= 0, got {local_weight}")
        self.me = me
        self.local_weight = local_weight
        self._profiles = profiles
        self._live = live
        self._probe = probe_latency_ms
        self.scheduler = scheduler or SmartScheduler(config)
        self._clock = clock
        self._measured: set[str] = set()
        self.outcomes: dict[str, PeerOutcomes] = {}
        # Running here costs no network round trip.
        self.scheduler.observe_latency(clock(), me, 0.0)
        self._measured.add(me)

    def _candidates(self) -> Iterable[DeviceProfile]:
        live = set(self._live())
        live.add(self.me)
        profiles = self._profiles()
        for peer in sorted(live):
            p = profiles.get(peer)
            if p is None:
                continue
            if peer not in self._measured and self._probe is not None:
                rtt = self._probe(peer)
                if rtt is not None and math.isfinite(rtt) and rtt >= 0:
                    self.scheduler.observe_latency(self._clock(), peer, rtt)
            yield p

    def rank(self, requirement: Requirement) -> Placement:
        placement = self.scheduler.place(self._clock(), list(self._candidates()), requirement)
        if self.local_weight == 1.0:
            return placement
        # < 1 offloads work this node could do itself (its cores are busy with the root
        # model, or it runs on battery); > 1 keeps work home.
        ranked = sorted(
            (
                replace(s, total=s.total * self.local_weight) if s.peer == self.me else s
                for s in placement.ranked
            ),
            key=lambda s: (-s.total, s.peer),
        )
        return Placement(placement.requirement, tuple(ranked), placement.rejected)

    def profile(self, peer: str) -> DeviceProfile | None:
        return self._profiles().get(peer)

    def is_live(self, peer: str) -> bool:
        return peer == self.me or peer in set(self._live())

    def record_success(self, peer: str, overhead_ms: float) -> None:
        stats = self.outcomes.setdefault(peer, PeerOutcomes())
        stats.successes += 1
        now = self._clock()
        if peer != self.me and math.isfinite(overhead_ms) and overhead_ms >= 0:
            self.scheduler.observe_latency(now, peer, overhead_ms)
            self._measured.add(peer)
            stats.last_overhead_ms = overhead_ms
        self.scheduler.observe_success(now, peer)

    def record_failure(self, peer: str) -> None:
        self.outcomes.setdefault(peer, PeerOutcomes()).failures += 1
        self.scheduler.observe_failure(self._clock(), peer)
