"""Scenario files (TOML): cluster size, devices, network, workload, fault schedule, checks.

See docs/simulation.md for the format. Loading validates every key and raises
:class:`ScenarioError` naming the offending key, so a typo never silently runs a
different experiment.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from simulations.distributions import Dist, ScenarioError, parse_dist

SCENARIO_DIR = Path(__file__).parent / "scenarios"
DEVICE_CLASSES = ("desktop", "laptop", "phone")
FAULT_KINDS = ("kill", "pause", "partition", "network", "clock-jump", "churn")
TARGETS = ("random", "leader", "owner", "busiest-leader")
SHAPES = ("one", "majority", "ring", "bridge")


_DEFAULT_JITTER = Dist("exp", 0.0003)
_DEFAULT_STEPS = Dist("int", 2, 6)
_DEFAULT_LLM = Dist("lognormal", 0.3, 0.4)
_DEFAULT_REPL_JOBS = Dist("int", 0, 2)
_DEFAULT_REPL_TIME = Dist("lognormal", 0.02, 0.5)
_DEFAULT_SUBCALLS = Dist("int", 0, 4)
_DEFAULT_SUBCALL_TIME = Dist("lognormal", 0.15, 0.4)
_NO_CONTEXT = Dist("const", 0.0)


@dataclass(frozen=True, slots=True)
class NetworkSpec:
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_delay: float = 0.005
    jitter: Dist = _DEFAULT_JITTER
    access: Mapping[str, Dist] = field(
        default_factory=lambda: {
            "desktop": Dist("lognormal", 0.0002, 0.3),
            "laptop": Dist("lognormal", 0.0008, 0.4),
            "phone": Dist("lognormal", 0.002, 0.5),
        }
    )
    """One-way latency of a device's access link; a link's base latency is the sum of both ends."""
    phone_extra_loss: float = 0.0


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    rate: float = 0.5
    """Tasks submitted per simulated second (Poisson), from random live peers."""
    steps: Dist = _DEFAULT_STEPS
    llm: Dist = _DEFAULT_LLM
    """Seconds of model time per RLM step on a desktop (divided by the leader's speed)."""
    repl_jobs: Dist = _DEFAULT_REPL_JOBS
    repl_time: Dist = _DEFAULT_REPL_TIME
    subcalls: Dist = _DEFAULT_SUBCALLS
    subcall_time: Dist = _DEFAULT_SUBCALL_TIME
    job_timeout: float = 1.0
    """A REPL job or sub-call on a peer that died is retried elsewhere after this long."""
    client_timeout: float = 1.0
    """The client gives up on a node that has not answered a submission after this long
    (paused, dead, or unable to reach a majority) and retries the same key at another."""
    context_mb: Dist = _NO_CONTEXT
    """Size of each task's context in MB (0: none). A context is a blob held by the node
    that took the submission and `context_copies` more peers; a leader that lacks it
    fetches it from a live holder before its first step (`context_rate_mb_s`)."""
    context_copies: int = 2
    context_rate_mb_s: float = 20.0
    """Blob transfer rate between two desktops, MB/s (scaled by the slower device's speed)."""


@dataclass(frozen=True, slots=True)
class FaultSpec:
    kind: str
    at: float
    duration: float = 0.0
    count: int = 1
    fraction: float = 0.0
    target: str = "random"
    restart_after: float | None = None
    permanent: bool = False
    """kill: never restarted, not even at the drain (killed for good)."""
    shape: str = "one"
    minority: float = 0.4
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    jump: float = 0.0
    every: float = 0.0
    until: float = math.inf

    def how_many(self, n: int) -> int:
        return max(1, round(self.fraction * n)) if self.fraction > 0 else self.count


@dataclass(frozen=True, slots=True)
class ChecksSpec:
    failover_p99_max: float | None = None
    detection_p99_max: float | None = None
    false_dead_max: int = 0
    dissemination_min: float = 1.0
    min_failovers: int = 0
    min_fenced: int = 0
    majority_down_failover_p99_max: float | None = None
    """Leader deaths while a majority of the task's acceptors was down too (beyond the
    one-death promise: the task waits for them to return), p99 limit (seconds)."""
    owner_failover_p99_max: float | None = None
    """Owner death -> a survivor leases the task, p99 limit (includes takeover_grace)."""
    min_owner_failovers: int = 0
    """The scenario must take over this many tasks whose owner died."""
    owner_completion_max: float | None = None
    """Owner death -> commit at a survivor, p99 limit (seconds)."""
    min_client_retries: int = 0
    min_context_fetches: int = 0
    """Leaders must have fetched a task context this many times (none may fail)."""


@dataclass(frozen=True, slots=True)
class PlacementSpec:
    params: float = 671e9
    bits: float = 4.5
    layers: int = 61
    reserve: float = 0.1
    plan_at: float = 20.0
    leave_fraction: float = 0.1
    leave_at: float = 30.0


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    description: str = ""
    nodes: int = 100
    duration: float = 120.0
    seed: int = 1
    drain: float = 30.0
    """Last seconds: faults healed, no new submissions; every task must finish by the end."""
    membership: str = "lan"
    devices: Mapping[str, float] = field(
        default_factory=lambda: {"desktop": 0.2, "laptop": 0.3, "phone": 0.5}
    )
    clock_skew: float = 0.0
    clock_drift: float = 0.0
    republish: float = 30.0
    """Each node re-advertises its capabilities (load, free memory) this often."""
    network: NetworkSpec = field(default_factory=NetworkSpec)
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    faults: tuple[FaultSpec, ...] = ()
    checks: ChecksSpec = field(default_factory=ChecksSpec)
    placement: PlacementSpec | None = None

    def with_overrides(
        self, *, nodes: int | None = None, seed: int | None = None, duration: float | None = None
    ) -> Scenario:
        s = self
        if nodes is not None:
            if nodes < 2:
                raise ScenarioError(f"--nodes must be >= 2, got {nodes}")
            s = replace(s, nodes=nodes)
        if seed is not None:
            s = replace(s, seed=seed)
        if duration is not None:
            if duration <= 0:
                raise ScenarioError(f"--duration must be > 0, got {duration}")
            # Scale the fault schedule and drain with the run so short CI passes keep every fault.
            f = duration / s.duration
            faults = tuple(_scale_fault(x, f) for x in s.faults)
            placement = s.placement
            if placement is not None:
                placement = replace(
                    placement, plan_at=placement.plan_at * f, leave_at=placement.leave_at * f
                )
            s = replace(
                s,
                duration=duration,
                drain=max(min(s.drain, duration * 0.4), min(s.drain * f, duration * 0.4)),
                faults=faults,
                placement=placement,
            )
        return s

    @property
    def active_until(self) -> float:
        """Faults and submissions stop here; the rest of the run drains."""
        return max(0.0, self.duration - self.drain)


def _scale_fault(x: FaultSpec, f: float) -> FaultSpec:
    if f >= 1.0:
        return x
    return replace(
        x,
        at=x.at * f,
        # Windows keep a floor so that a fault in a short run still outlasts failure detection.
        duration=max(x.duration * f, min(x.duration, 4.0)),
        every=max(x.every * f, min(x.every, 5.0)) if x.every else 0.0,
        until=x.until * f,
        restart_after=None
        if x.restart_after is None
        else max(x.restart_after * f, min(x.restart_after, 2.0)),
    )


# ---------------------------------------------------------------- loading


def _get(
    d: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any
) -> Any:
    if key not in d:
        return default
    v = d[key]
    if isinstance(v, bool) and kind is not bool:
        raise ScenarioError(f"{where}.{key}: expected {kind}, got a bool")
    if kind is float and isinstance(v, int):
        v = float(v)
    if not isinstance(v, kind):
        raise ScenarioError(
            f"{where}.{key}: expected {getattr(kind, '__name__', kind)}, got {type(v).__name__}"
        )
    return v


def _prob(d: Mapping[str, Any], key: str, where: str, default: float = 0.0) -> float:
    v = _get(d, key, float, where, default)
    if not 0.0 <= v <= 1.0:
        raise ScenarioError(f"{where}.{key}: must be a probability in [0, 1], got {v}")
    return float(v)


def _pos(d: Mapping[str, Any], key: str, where: str, default: float) -> float:
    v = _get(d, key, float, where, default)
    if not (v >= 0 and (math.isfinite(v) or v == math.inf)):
        raise ScenarioError(f"{where}.{key}: must be >= 0, got {v}")
    return float(v)


def _check_keys(d: Mapping[str, Any], allowed: set[str], where: str) -> None:
    extra = set(d) - allowed
    if extra:
        raise ScenarioError(f"{where}: unknown keys {sorted(extra)} (allowed: {sorted(allowed)})")


def _table(d: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    v = d.get(key, {})
    if not isinstance(v, Mapping):
        raise ScenarioError(f"{where}.{key}: expected a table")
    return v


def parse_scenario(data: Mapping[str, Any], default_name: str = "scenario") -> Scenario:
    """Validate a decoded TOML document and build a :class:`Scenario`."""
    top = {
        "name",
        "description",
        "nodes",
        "duration",
        "seed",
        "drain",
        "membership",
        "devices",
        "clock_skew",
        "clock_drift",
        "republish",
        "network",
        "workload",
        "faults",
        "checks",
        "placement",
    }
    _check_keys(data, top, "scenario")
    w = "scenario"
    nodes = _get(data, "nodes", int, w, 100)
    if nodes < 2:
        raise ScenarioError(f"scenario.nodes: need at least 2, got {nodes}")
    duration = _pos(data, "duration", w, 120.0)
    if duration <= 0:
        raise ScenarioError("scenario.duration must be > 0")
    membership = _get(data, "membership", str, w, "lan")
    if membership not in ("lan", "wan"):
        raise ScenarioError(f"scenario.membership: 'lan' or 'wan', got {membership!r}")
    devices_t = _table(data, "devices", w)
    devices: dict[str, float] = (
        {"desktop": 0.2, "laptop": 0.3, "phone": 0.5} if not devices_t else {}
    )
    for k in devices_t:
        if k not in DEVICE_CLASSES:
            raise ScenarioError(
                f"scenario.devices.{k}: unknown device class (use {DEVICE_CLASSES})"
            )
        devices[k] = _prob(devices_t, k, "scenario.devices")
    if abs(sum(devices.values()) - 1.0) > 1e-6:
        raise ScenarioError(
            f"scenario.devices: fractions must add up to 1, got {sum(devices.values())}"
        )

    nt = _table(data, "network", w)
    _check_keys(
        nt,
        {"loss", "duplicate", "reorder", "reorder_delay", "jitter", "access", "phone_extra_loss"},
        "network",
    )
    base = NetworkSpec()
    access = dict(base.access)
    acc_t = _table(nt, "access", "network")
    for k, v in acc_t.items():
        if k not in DEVICE_CLASSES:
            raise ScenarioError(f"network.access.{k}: unknown device class")
        access[k] = parse_dist(v, f"network.access.{k}")
    network = NetworkSpec(
        loss=_prob(nt, "loss", "network"),
        duplicate=_prob(nt, "duplicate", "network"),
        reorder=_prob(nt, "reorder", "network"),
        reorder_delay=_pos(nt, "reorder_delay", "network", base.reorder_delay),
        jitter=parse_dist(nt["jitter"], "network.jitter") if "jitter" in nt else base.jitter,
        access=access,
        phone_extra_loss=_prob(nt, "phone_extra_loss", "network"),
    )

    wt = _table(data, "workload", w)
    wb = WorkloadSpec()
    dist_keys = (
        "steps",
        "llm",
        "repl_jobs",
        "repl_time",
        "subcalls",
        "subcall_time",
        "context_mb",
    )
    _check_keys(
        wt,
        {
            "rate",
            "job_timeout",
            "client_timeout",
            "context_copies",
            "context_rate_mb_s",
            *dist_keys,
        },
        "workload",
    )
    dists = {
        k: parse_dist(wt[k], f"workload.{k}") if k in wt else getattr(wb, k) for k in dist_keys
    }
    workload = WorkloadSpec(
        rate=_pos(wt, "rate", "workload", wb.rate),
        job_timeout=_pos(wt, "job_timeout", "workload", wb.job_timeout),
        client_timeout=_pos(wt, "client_timeout", "workload", wb.client_timeout),
        context_copies=int(_pos(wt, "context_copies", "workload", wb.context_copies)),
        context_rate_mb_s=_pos(wt, "context_rate_mb_s", "workload", wb.context_rate_mb_s),
        **dists,
    )

    faults_raw = data.get("faults", [])
    if not isinstance(faults_raw, list):
        raise ScenarioError("scenario.faults: expected an array of tables ([[faults]])")
    faults = tuple(_parse_fault(f, i) for i, f in enumerate(faults_raw))

    ct = _table(data, "checks", w)
    _check_keys(
        ct,
        {
            "failover_p99_max",
            "detection_p99_max",
            "false_dead_max",
            "dissemination_min",
            "min_failovers",
            "min_fenced",
            "min_owner_failovers",
            "owner_failover_p99_max",
            "majority_down_failover_p99_max",
            "owner_completion_max",
            "min_client_retries",
            "min_context_fetches",
        },
        "checks",
    )
    checks = ChecksSpec(
        failover_p99_max=_get(ct, "failover_p99_max", float, "checks", None),
        detection_p99_max=_get(ct, "detection_p99_max", float, "checks", None),
        false_dead_max=_get(ct, "false_dead_max", int, "checks", 0),
        dissemination_min=_prob(ct, "dissemination_min", "checks", 1.0),
        min_failovers=_get(ct, "min_failovers", int, "checks", 0),
        min_fenced=_get(ct, "min_fenced", int, "checks", 0),
        min_owner_failovers=_get(ct, "min_owner_failovers", int, "checks", 0),
        owner_failover_p99_max=_get(ct, "owner_failover_p99_max", float, "checks", None),
        majority_down_failover_p99_max=_get(
            ct, "majority_down_failover_p99_max", float, "checks", None
        ),
        owner_completion_max=_get(ct, "owner_completion_max", float, "checks", None),
        min_client_retries=_get(ct, "min_client_retries", int, "checks", 0),
        min_context_fetches=_get(ct, "min_context_fetches", int, "checks", 0),
    )

    placement = None
    if "placement" in data:
        pt = _table(data, "placement", w)
        _check_keys(
            pt,
            {"params", "bits", "layers", "reserve", "plan_at", "leave_fraction", "leave_at"},
            "placement",
        )
        pb = PlacementSpec()
        placement = PlacementSpec(
            params=_pos(pt, "params", "placement", pb.params),
            bits=_pos(pt, "bits", "placement", pb.bits),
            layers=_get(pt, "layers", int, "placement", pb.layers),
            reserve=_prob(pt, "reserve", "placement", pb.reserve),
            plan_at=_pos(pt, "plan_at", "placement", pb.plan_at),
            leave_fraction=_prob(pt, "leave_fraction", "placement", pb.leave_fraction),
            leave_at=_pos(pt, "leave_at", "placement", pb.leave_at),
        )
        if placement.layers < 1 or placement.params <= 0 or placement.bits <= 0:
            raise ScenarioError("placement: layers, params and bits must be > 0")

    drain = _pos(data, "drain", w, min(30.0, duration * 0.4))
    if drain >= duration:
        raise ScenarioError(
            f"scenario.drain ({drain}) must be shorter than the duration ({duration})"
        )
    return Scenario(
        name=_get(data, "name", str, w, default_name),
        description=_get(data, "description", str, w, ""),
        nodes=nodes,
        duration=duration,
        seed=_get(data, "seed", int, w, 1),
        drain=drain,
        membership=membership,
        devices=devices,
        clock_skew=_pos(data, "clock_skew", w, 0.0),
        clock_drift=_pos(data, "clock_drift", w, 0.0),
        republish=_pos(data, "republish", w, 30.0),
        network=network,
        workload=workload,
        faults=faults,
        checks=checks,
        placement=placement,
    )


def _parse_fault(f: Any, i: int) -> FaultSpec:
    where = f"faults[{i}]"
    if not isinstance(f, Mapping):
        raise ScenarioError(f"{where}: expected a table")
    allowed = {
        "kind",
        "at",
        "duration",
        "count",
        "fraction",
        "target",
        "restart_after",
        "permanent",
        "shape",
        "minority",
        "loss",
        "duplicate",
        "reorder",
        "jump",
        "every",
        "until",
    }
    _check_keys(f, allowed, where)
    kind = _get(f, "kind", str, where, None)
    if kind not in FAULT_KINDS:
        raise ScenarioError(f"{where}.kind: must be one of {FAULT_KINDS}, got {kind!r}")
    target = _get(f, "target", str, where, "random")
    if target not in TARGETS:
        raise ScenarioError(f"{where}.target: must be one of {TARGETS}, got {target!r}")
    shape = _get(f, "shape", str, where, "one")
    if shape not in SHAPES:
        raise ScenarioError(f"{where}.shape: must be one of {SHAPES}, got {shape!r}")
    jump = _get(f, "jump", float, where, 0.0)
    if not math.isfinite(jump):
        raise ScenarioError(f"{where}.jump must be finite")
    restart = f.get("restart_after")
    if restart is not None:
        restart = _pos(f, "restart_after", where, 0.0)
    count = _get(f, "count", int, where, 1)
    if count < 1:
        raise ScenarioError(f"{where}.count must be >= 1")
    spec = FaultSpec(
        kind=kind,
        at=_pos(f, "at", where, 0.0),
        duration=_pos(f, "duration", where, 0.0),
        count=count,
        fraction=_prob(f, "fraction", where),
        target=target,
        restart_after=restart,
        permanent=_get(f, "permanent", bool, where, False),
        shape=shape,
        minority=_prob(f, "minority", where, 0.4),
        loss=_prob(f, "loss", where),
        duplicate=_prob(f, "duplicate", where),
        reorder=_prob(f, "reorder", where),
        jump=jump,
        every=_pos(f, "every", where, 0.0),
        until=_pos(f, "until", where, math.inf),
    )
    if kind in ("pause", "partition", "network") and spec.duration <= 0:
        raise ScenarioError(f"{where}: a {kind} fault needs duration > 0")
    if kind == "churn" and (spec.every <= 0 or spec.fraction <= 0):
        raise ScenarioError(f"{where}: churn needs every > 0 and fraction > 0")
    return spec


def load_scenario(name_or_path: str) -> Scenario:
    """Load ``simulations/scenarios/<name>.toml`` or a path to a TOML file."""
    p = Path(name_or_path)
    if not p.suffix:
        p = SCENARIO_DIR / f"{name_or_path}.toml"
    if not p.is_file():
        known = ", ".join(sorted(x.stem for x in SCENARIO_DIR.glob("*.toml")))
        raise ScenarioError(f"no scenario {name_or_path!r} (file {p} not found); built-in: {known}")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{p}: not valid TOML: {exc}") from None
    return parse_scenario(data, p.stem)


def builtin_scenarios() -> list[str]:
    return sorted(x.stem for x in SCENARIO_DIR.glob("*.toml"))
