"""Placement: SmartScheduler scoring/adaptation/filters, and layer partitioning incl. 671B over 100 devices."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kowalski_node.capabilities import DeviceProfile, ServedModel
from kowalski_node.errors import ConfigError, NoCapableDevice
from kowalski_node.placement import (
    LayerPlanError,
    PeerMemory,
    Requirement,
    SchedulerConfig,
    SmartScheduler,
    Weights,
    model_bytes,
    plan_layers,
    replan_layers,
    uniform_layer_sizes,
)

GIB = 1024**3


def _dev(
    peer: str,
    *,
    free: float = 8,
    total: float = 16,
    load: float = 0.2,
    langs: tuple[str, ...] = ("python",),
    **kw: object,
) -> DeviceProfile:
    return DeviceProfile(
        peer,
        1,
        cores=8,
        ram_total=int(total * GIB),
        ram_free=int(free * GIB),
        cpu_load=load,
        repl_languages=langs,
        **kw,  # type: ignore[arg-type]
    )


# --------------------------------------------------------------------------- scheduler


def test_score_follows_the_formula() -> None:
    s = SmartScheduler(
        SchedulerConfig(
            weights=Weights(1, 1, 1, 1), adapt_latency_weight=False, default_latency_ms=100
        )
    )
    p = _dev("a", free=4, total=16, load=0.5, cost_per_op=1.0)
    b = s.score(0.0, p, Requirement())
    assert b.load == pytest.approx(0.5 * 0.25 + 0.5 * 0.5)
    assert b.latency == pytest.approx(1 / (1 + 100 / 100))
    assert b.cost == pytest.approx(0.5)
    assert b.specialisation == pytest.approx(0.5)  # nothing to specialise on
    assert b.total == pytest.approx((b.load + b.latency + b.cost + b.specialisation) / 4)


def test_prefers_idle_roomy_close_free_devices() -> None:
    s = SmartScheduler()
    busy = _dev("busy", free=1, load=0.95)
    idle = _dev("idle", free=14, load=0.05)
    phone = _dev("phone", free=14, load=0.05, cost_per_op=3.0)
    assert s.place(0.0, [busy, idle, phone]).best(3) == ["idle", "phone", "busy"]


def test_latency_ewma_and_failure_penalty_adapt_and_decay() -> None:
    s = SmartScheduler(SchedulerConfig(failure_half_life=10.0))
    a, b = _dev("a"), _dev("b")
    for _ in range(5):
        s.observe_latency(0.0, "a", 200.0)
        s.observe_latency(0.0, "b", 2.0)
    assert s.latency_ms("a") > 150 and s.latency_ms("b") == pytest.approx(2.0)
    assert s.place(0.0, [a, b]).best() == ["b"]
    # slow network observed: latency matters more than configured
    assert s.effective_weights().latency > Weights().normalised().latency
    s.observe_failure(0.0, "b")
    assert s.place(0.0, [a, b]).best() == ["a"]
    assert s.penalty(10.0, "b") == pytest.approx(0.5)
    assert s.place(100.0, [a, b]).best() == ["b"]  # forgiven after the penalty decayed
    with pytest.raises(ValueError, match="finite"):
        s.observe_latency(0.0, "a", float("nan"))


def test_hard_requirements_filter_with_a_clear_explanation() -> None:
    s = SmartScheduler()
    peers = [
        _dev("js1", langs=("js",)),
        _dev("js2", langs=("js",)),
        _dev("small", free=1, models=(ServedModel("mistral", 32),)),
        _dev("ok", free=10, models=(ServedModel("llama", 32),)),
    ]
    req = Requirement(language="python", min_memory=4 * GIB, model="llama")
    assert s.choose(0.0, peers, req) == ["ok"]
    with pytest.raises(NoCapableDevice) as exc:
        s.choose(0.0, peers, Requirement(language="python", min_memory=4 * GIB, model="mistral"))
    msg = str(exc.value)
    assert msg.startswith("no peer qualifies out of 4:")
    assert "2 lack REPL language 'python' (js1, js2)" in msg
    assert "lack model 'mistral' (ok)" in msg
    assert "less than 4.0 GiB free (small)" in msg
    assert "cluster is empty" in s.place(0.0, [], req).explain()
    # fallback order: everyone qualified, best first, excluding the one that just failed
    placement = s.place(0.0, peers, Requirement(exclude=frozenset({"ok"})))
    assert "ok" in placement.rejected and len(placement.ranked) == 3
    assert placement.fallbacks(1) == placement.best(3)[1:]


def test_specialisation_prefers_full_model_and_headroom() -> None:
    s = SmartScheduler()
    full = _dev("full", free=8, models=(ServedModel("m", 30),))
    part = _dev("part", free=8, models=(ServedModel("m", 30, 0, 15),))
    req = Requirement(model="m")
    ranked = s.place(0.0, [part, full], req).ranked
    assert [r.peer for r in ranked] == ["full", "part"] and ranked[0].specialisation > ranked[
        1
    ].specialisation


def test_weights_validation() -> None:
    with pytest.raises(ConfigError):
        Weights(0, 0, 0, 0)
    with pytest.raises(ConfigError):
        SchedulerConfig(cpu_blend=2.0)


# --------------------------------------------------------------------------- layer partitioning


def test_memory_weighted_contiguous_split() -> None:
    sizes = uniform_layer_sizes(30, 30 * GIB)
    peers = [PeerMemory("a", 40 * GIB), PeerMemory("b", 20 * GIB), PeerMemory("c", 10 * GIB)]
    plan = plan_layers(sizes, peers, reserve_fraction=0.0)
    plan.validate()
    assert [(a.peer, a.n_layers) for a in plan.assignments] == [("a", 17), ("b", 9), ("c", 4)]
    assert plan.owner(0) == "a" and plan.owner(29) == "c"
    assert plan.min_headroom >= 0


def test_reserve_and_max_bytes_are_respected() -> None:
    sizes = uniform_layer_sizes(10, 10 * GIB)
    peers = [PeerMemory("a", 100 * GIB, max_bytes=4 * GIB), PeerMemory("b", 20 * GIB)]
    plan = plan_layers(sizes, peers, reserve_fraction=0.25)
    a = next(x for x in plan.assignments if x.peer == "a")
    assert a.bytes <= 3 * GIB
    for x in plan.assignments:
        assert (x.bytes <= x.capacity and x.headroom_fraction >= 0.25 - 1e-9) or x.peer == "a"


def test_does_not_fit_is_explained() -> None:
    sizes = uniform_layer_sizes(8, 80 * GIB)
    with pytest.raises(LayerPlanError, match=r"needs 80\.0 GiB for 8 layers") as exc:
        plan_layers(
            sizes, [PeerMemory("a", 30 * GIB), PeerMemory("b", 30 * GIB)], reserve_fraction=0.1
        )
    assert exc.value.needed == 80 * GIB and isinstance(exc.value, NoCapableDevice)
    # enough bytes in total, but no piece holds a whole 10 GiB layer
    with pytest.raises(LayerPlanError, match="cannot hold even one layer"):
        plan_layers(sizes, [PeerMemory(f"p{i}", 9 * GIB) for i in range(20)], reserve_fraction=0.0)


peer_sets = st.lists(st.integers(1, 64), min_size=1, max_size=12)


@given(st.integers(1, 80), peer_sets, st.floats(0.0, 0.5), st.integers(0, 2**32))
@settings(max_examples=300, deadline=None)
def test_partition_plan_covers_all_layers_exactly_once(
    n: int, frees: list[int], reserve: float, seed: int
) -> None:
    rnd = random.Random(seed)
    sizes = [rnd.randint(1, 4) * GIB // 4 for _ in range(n)]
    peers = [PeerMemory(f"p{i}", f * GIB // 2) for i, f in enumerate(frees)]
    try:
        plan = plan_layers(sizes, peers, reserve_fraction=reserve)
    except LayerPlanError:
        return
    plan.validate()
    assert plan.owners() and len(plan.owners()) == n
    assert sum(a.bytes for a in plan.assignments) == sum(sizes)
    # re-plan after a random subset leaves: still exactly once, survivors not moved unnecessarily
    leaving = {p.peer for p in peers if rnd.random() < 0.3}
    rest = [p for p in peers if p.peer not in leaving]
    try:
        new = replan_layers(plan, sizes, rest, reserve_fraction=reserve)
    except LayerPlanError:
        return
    new.validate()
    assert all(a.peer not in leaving for a in new.assignments)


def test_671b_over_100_heterogeneous_devices_and_10pct_leaving() -> None:
    rnd = random.Random(671)
    peers = []
    for i in range(100):
        r = rnd.random()
        if r < 0.2:
            free, kind = rnd.randint(48, 120), "desktop"
        elif r < 0.5:
            free, kind = rnd.randint(10, 28), "laptop"
        else:
            free, kind = rnd.randint(2, 6), "phone"
        peers.append(PeerMemory(f"{kind}-{i:03d}", free * GIB))
    sizes = uniform_layer_sizes(
        61, model_bytes(671e9, 4.5)
    )  # DeepSeek-V3-like: 61 layers, ~4.5 bits/weight
    plan = plan_layers(sizes, peers, reserve_fraction=0.1)
    plan.validate()
    assert plan.total_bytes == model_bytes(671e9, 4.5)
    assert plan.min_headroom_fraction >= 0.1  # every stage keeps its reserve
    assert all(
        not a.peer.startswith("phone") for a in plan.assignments
    )  # phones cannot hold a 5.8 GiB layer
    gone = set(rnd.sample([a.peer for a in plan.assignments], max(1, len(plan.assignments) // 10)))
    gone |= set(rnd.sample([p.peer for p in peers if p.peer not in gone], 10 - len(gone)))
    rest = [p for p in peers if p.peer not in gone]
    new = replan_layers(plan, sizes, rest, reserve_fraction=0.1)
    new.validate()
    must_move = sum(a.n_layers for a in plan.assignments if a.peer in gone)
    assert must_move > 0
    assert plan.moved_layers(new) == must_move  # minimal movement: only the departed peers' layers
    assert plan.moved_layers(plan_layers(sizes, rest, reserve_fraction=0.1)) > must_move
