"""SmartScheduler: pick the best peer(s) for a piece of work, and say why when nobody fits.

score = w_load·load + w_latency·latency + w_cost·cost + w_spec·specialisation, each in [0, 1]:

* load = (1 - cpu_blend)·(1 - mem_used/mem_total) + cpu_blend·(1 - cpu_load)
* latency = 1 / (1 + avg_ms / 100), avg_ms an EWMA of observed round trips
* cost = 1 / (1 + cost_per_op)
* specialisation = mean of the fits that apply: language, model (full > partial),
  memory headroom (1 at twice the need), and tokens/s relative to the fastest candidate

Adaptation: the latency weight scales with how slow the observed network is (x0.5 on a
fast LAN up to x2 on slow links, then weights are renormalised), and every failure adds a
penalty that halves every ``failure_half_life`` seconds and divides a peer's score by
(1 + penalty). Hard requirements (language, memory, model, backend) filter first.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from kowalski_node.capabilities.profile import DeviceProfile
from kowalski_node.errors import ConfigError, NoCapableDevice

GIB = 1024**3


@dataclass(frozen=True, slots=True)
class Weights:
    load: float = 0.35
    latency: float = 0.25
    cost: float = 0.15
    specialisation: float = 0.25

    def __post_init__(self) -> None:
        vals = (self.load, self.latency, self.cost, self.specialisation)
        if any(v < 0 or not math.isfinite(v) for v in vals) or sum(vals) <= 0:
            raise ConfigError("scheduler weights must be finite, >= 0 and not all zero")

    def normalised(self) -> Weights:
        s = self.load + self.latency + self.cost + self.specialisation
        return Weights(self.load / s, self.latency / s, self.cost / s, self.specialisation / s)


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    weights: Weights = field(default_factory=Weights)
    cpu_blend: float = 0.5
    """Share of CPU idleness in the load score (the rest is free memory)."""
    latency_alpha: float = 0.3
    """EWMA factor for round-trip samples (higher = reacts faster)."""
    default_latency_ms: float = 10.0
    """Assumed round trip for a peer we have not measured yet."""
    adapt_latency_weight: bool = True
    latency_reference_ms: float = 20.0
    """Mean latency at which the latency weight stays as configured."""
    failure_penalty: float = 1.0
    """Penalty added per failure (score is divided by 1 + penalty)."""
    failure_half_life: float = 30.0
    """Seconds for a failure penalty to halve."""

    def __post_init__(self) -> None:
        if not 0 <= self.cpu_blend <= 1 or not 0 < self.latency_alpha <= 1:
            raise ConfigError("scheduler: cpu_blend must be in [0, 1] and latency_alpha in (0, 1]")
        if (
            self.failure_half_life <= 0
            or self.latency_reference_ms <= 0
            or self.default_latency_ms < 0
        ):
            raise ConfigError("scheduler: failure_half_life and latency_reference_ms must be > 0")


@dataclass(frozen=True, slots=True)
class Requirement:
    """Hard requirements of one piece of work; unmet ones disqualify a peer."""

    language: str | None = None
    min_memory: int = 0
    """Bytes of free memory the work needs."""
    model: str | None = None
    backend: str | None = None
    exclude: frozenset[str] = frozenset()
    """Peers not to use (e.g. the one that just failed this job)."""


@dataclass(frozen=True, slots=True)
class ScoreBreakdown:
    """A candidate's score and its parts, for logs and the dashboard."""

    peer: str
    total: float
    load: float
    latency: float
    cost: float
    specialisation: float
    penalty: float
    latency_ms: float


@dataclass(frozen=True, slots=True)
class Placement:
    """Qualified peers best first (the fallback order) and why the others were refused."""

    requirement: Requirement
    ranked: tuple[ScoreBreakdown, ...]
    rejected: dict[str, str]

    @property
    def ok(self) -> bool:
        return bool(self.ranked)

    def best(self, k: int = 1) -> list[str]:
        return [s.peer for s in self.ranked[:k]]

    def fallbacks(self, k: int = 1) -> list[str]:
        """Who to try, in order, after the first ``k`` choices fail."""
        return [s.peer for s in self.ranked[k:]]

    def explain(self) -> str:
        """One line: who was chosen, or why nobody qualifies (grouped by reason)."""
        if self.ranked:
            top = self.ranked[0]
            return f"chose {top.peer} (score {top.total:.3f}) out of {len(self.ranked)} qualified peers"
        if not self.rejected:
            return "no peers are known (the cluster is empty or everyone is down)"
        groups: dict[str, list[str]] = {}
        for peer, reason in sorted(self.rejected.items()):
            groups.setdefault(reason, []).append(peer)
        parts = [
            f"{len(peers)} {reason} ({', '.join(peers[:5])}{', ...' if len(peers) > 5 else ''})"
            for reason, peers in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        ]
        return f"no peer qualifies out of {len(self.rejected)}: " + "; ".join(parts)


def disqualification(profile: DeviceProfile, req: Requirement) -> str | None:
    """Why ``profile`` cannot take the work, or ``None`` if it can."""
    if profile.peer in req.exclude:
        return "excluded by the caller"
    if req.language is not None and req.language not in profile.repl_languages:
        return f"lack REPL language {req.language!r}"
    if req.model is not None and not profile.has_model(req.model):
        return f"lack model {req.model!r}"
    if req.backend is not None and req.backend not in profile.backends:
        return f"lack backend {req.backend!r}"
    if req.min_memory > 0 and profile.ram_free < req.min_memory:
        return f"have less than {req.min_memory / GIB:.1f} GiB free"
    return None


@dataclass(slots=True)
class _PeerStats:
    ewma_ms: float | None = None
    penalty: float = 0.0
    penalty_at: float = 0.0
    failures: int = 0
    successes: int = 0


class SmartScheduler:
    """Scores peers from their adverts plus what this node observed talking to them."""

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        self.config = config or SchedulerConfig()
        self._stats: dict[str, _PeerStats] = {}
        # What ``place`` derives from an advert alone (disqualification, load, cost, fits),
        # per requirement and peer, reused while the peer's advert is the same object:
        # adverts change every few seconds, placements happen many times a second.
        self._static: dict[Requirement, dict[str, _Static]] = {}
        self._static_config = self.config

    # ------------------------------------------------------------ observations

    def observe_latency(self, now: float, peer: str, ms: float) -> None:
        """Feed one round-trip sample (milliseconds)."""
        if not math.isfinite(ms) or ms < 0:
            raise ValueError(f"latency sample for {peer} must be finite and >= 0, got {ms}")
        st = self._stats.setdefault(peer, _PeerStats())
        a = self.config.latency_alpha
        st.ewma_ms = ms if st.ewma_ms is None else (1 - a) * st.ewma_ms + a * ms

    def observe_failure(self, now: float, peer: str) -> None:
        """The peer failed or timed out on a job: penalise it (decays over time)."""
        st = self._stats.setdefault(peer, _PeerStats())
        st.penalty = self._decayed(st, now) + self.config.failure_penalty
        st.penalty_at = now
        st.failures += 1

    def observe_success(self, now: float, peer: str) -> None:
        st = self._stats.setdefault(peer, _PeerStats())
        st.successes += 1

    def forget(self, peer: str) -> None:
        self._stats.pop(peer, None)

    def latency_ms(self, peer: str) -> float:
        st = self._stats.get(peer)
        if st is None or st.ewma_ms is None:
            return self.config.default_latency_ms
        return st.ewma_ms

    def penalty(self, now: float, peer: str) -> float:
        st = self._stats.get(peer)
        return self._decayed(st, now) if st is not None else 0.0

    def _decayed(self, st: _PeerStats, now: float) -> float:
        if st.penalty <= 0:
            return 0.0
        dt = max(0.0, now - st.penalty_at)
        return st.penalty * 0.5 ** (dt / self.config.failure_half_life)

    def effective_weights(self) -> Weights:
        """The configured weights after adapting to the observed network (normalised)."""
        w = self.config.weights
        if self.config.adapt_latency_weight:
            samples = [s.ewma_ms for s in self._stats.values() if s.ewma_ms is not None]
            if samples:
                mean = sum(samples) / len(samples)
                factor = min(2.0, max(0.5, mean / self.config.latency_reference_ms))
                w = Weights(w.load, w.latency * factor, w.cost, w.specialisation)
        return w.normalised()

    # ------------------------------------------------------------ scoring

    def score(
        self,
        now: float,
        profile: DeviceProfile,
        req: Requirement,
        *,
        best_tps: float = 0.0,
        weights: Weights | None = None,
    ) -> ScoreBreakdown:
        """Score one (qualified) peer."""
        w = weights or self.effective_weights()
        static = _static_part(profile, req, self.config.cpu_blend)
        return self._score(now, static, best_tps, w)

    def _score(self, now: float, static: _Static, best_tps: float, w: Weights) -> ScoreBreakdown:
        profile, _, load, cost, fits = static
        cfg = self.config
        # latency_ms() and penalty(), inlined (place() scores every candidate per job)
        st = self._stats.get(profile.peer)
        if st is None:
            lat_ms = cfg.default_latency_ms
            pen = 0.0
        else:
            lat_ms = cfg.default_latency_ms if st.ewma_ms is None else st.ewma_ms
            pen = self._decayed(st, now)
        latency = 1.0 / (1.0 + lat_ms / 100.0)
        if best_tps > 0:
            fits = [*fits, min(1.0, profile.tokens_per_s / best_tps)]
        spec = sum(fits) / len(fits) if fits else 0.5
        total = (w.load * load + w.latency * latency + w.cost * cost + w.specialisation * spec) / (
            1.0 + pen
        )
        return ScoreBreakdown(profile.peer, total, load, latency, cost, spec, pen, lat_ms)

    def place(
        self, now: float, profiles: Iterable[DeviceProfile], req: Requirement | None = None
    ) -> Placement:
        """Filter by hard requirements, score the rest, rank best first (ties: peer id)."""
        req = req or Requirement()
        cache = self._static_cache(req)
        blend = self.config.cpu_blend
        qualified: list[_Static] = []
        rejected: dict[str, str] = {}
        for p in profiles:
            static = cache.get(p.peer)
            if static is None or static[0] is not p:
                static = cache[p.peer] = _static_part(p, req, blend)
            why = static[1]
            if why is None:
                qualified.append(static)
            else:
                rejected[p.peer] = why
        best_tps = max((st[0].tokens_per_s for st in qualified), default=0.0)
        w = self.effective_weights()
        score = self._score
        ranked = sorted(
            [score(now, st, best_tps, w) for st in qualified], key=lambda s: (-s.total, s.peer)
        )
        return Placement(req, tuple(ranked), rejected)

    def _static_cache(self, req: Requirement) -> dict[str, _Static]:
        if self._static_config is not self.config:  # reconfigured: derived values are stale
            self._static.clear()
            self._static_config = self.config
        cache = self._static.get(req)
        if cache is None:
            if len(self._static) >= 32:  # one-off requirements (exclusions): keep it bounded
                self._static.clear()
            cache = self._static[req] = {}
        return cache

    def choose(
        self,
        now: float,
        profiles: Iterable[DeviceProfile],
        req: Requirement | None = None,
        k: int = 1,
    ) -> list[str]:
        """The best ``k`` peers; raises :class:`NoCapableDevice` explaining why when none qualifies."""
        placement = self.place(now, profiles, req)
        if not placement.ok:
            raise NoCapableDevice(placement.explain())
        return placement.best(k)


_Static = tuple[DeviceProfile, str | None, float, float, list[float]]
"""(advert, why it is disqualified or None, load score, cost score, static specialisation fits)"""


def _static_part(profile: DeviceProfile, req: Requirement, cpu_blend: float) -> _Static:
    """The parts of a peer's score that depend only on its advert and the requirement."""
    why = disqualification(profile, req)
    b = cpu_blend
    load = (1 - b) * (1 - profile.mem_used_fraction) + b * (1 - profile.cpu_load)
    cost = 1.0 / (1.0 + profile.cost_per_op)
    return (profile, why, load, cost, _static_fits(profile, req))


def _static_fits(profile: DeviceProfile, req: Requirement) -> list[float]:
    """Specialisation fits that do not depend on the other candidates: language, model, memory."""
    fits: list[float] = []
    if req.language is not None:
        fits.append(1.0 if req.language in profile.repl_languages else 0.0)
    if req.model is not None:
        m = next((m for m in profile.models if m.name == req.model), None)
        fits.append(0.0 if m is None else (1.0 if m.full else 0.5))
    if req.min_memory > 0:
        fits.append(min(1.0, max(0.0, (profile.ram_free - req.min_memory) / req.min_memory)))
    return fits


def _specialisation(profile: DeviceProfile, req: Requirement, best_tps: float) -> float:
    fits = _static_fits(profile, req)
    if best_tps > 0:
        fits.append(min(1.0, profile.tokens_per_s / best_tps))
    return sum(fits) / len(fits) if fits else 0.5
