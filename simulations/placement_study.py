"""placement-671b: plan a huge model's layers over the simulated devices by the free memory
they advertise, then see what happens when a fraction of the devices leave.

The planner uses only what its own cores know: adverts from its capability-gossip table
for the peers its membership core believes alive.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kowalski_node.placement import (
    LayerPlan,
    LayerPlanError,
    PeerMemory,
    model_bytes,
    plan_layers,
    replan_layers,
    uniform_layer_sizes,
)
from simulations.scenario import PlacementSpec

if TYPE_CHECKING:
    from simulations.engine import SimNode, Simulation

GIB = 1024**3


def _peers(sim: Simulation, planner: SimNode) -> list[PeerMemory]:
    table = planner.gossip.table
    out = []
    for peer in [planner.name, *planner.membership.alive_peers()]:
        p = table.get(peer)
        if p is not None:
            out.append(PeerMemory(peer, p.ram_free))
    return out


def _describe(sim: Simulation, plan: LayerPlan) -> dict[str, Any]:
    by_class: dict[str, int] = {}
    for a in plan.assignments:
        cls = sim.by_name[a.peer].dev.cls
        by_class[cls] = by_class.get(cls, 0) + 1
    return {
        "stages": len(plan.assignments),
        "stages_by_class": dict(sorted(by_class.items())),
        "min_headroom_gib": round(plan.min_headroom / GIB, 2),
        "min_headroom_fraction": round(plan.min_headroom_fraction, 4),
        "total_headroom_gib": round(plan.total_headroom / GIB, 1),
        "assignments": [
            [
                a.peer,
                sim.by_name[a.peer].dev.cls,
                a.start,
                a.end,
                round(a.bytes / GIB, 2),
                round(a.free_bytes / GIB, 1),
            ]
            for a in plan.assignments
        ],
    }


def make_plan(sim: Simulation, planner: SimNode, spec: PlacementSpec) -> LayerPlan | None:
    total = model_bytes(spec.params, spec.bits)
    sizes = uniform_layer_sizes(spec.layers, total)
    peers = _peers(sim, planner)
    info: dict[str, Any] = {
        "planner": planner.name,
        "model_params": spec.params,
        "bits_per_weight": spec.bits,
        "model_gib": round(total / GIB, 1),
        "layers": spec.layers,
        "layer_gib": round(sizes[0] / GIB, 2),
        "reserve_fraction": spec.reserve,
        "devices_known": len(peers),
        "free_gib_known": round(sum(p.free_bytes for p in peers) / GIB, 1),
    }
    sim.rec.placement["plan"] = info
    try:
        plan = plan_layers(sizes, peers, reserve_fraction=spec.reserve)
        plan.validate()
    except LayerPlanError as exc:
        info["error"] = str(exc)
        sim.rec.violation(sim.t, planner.name, f"layer plan failed: {exc}")
        return None
    info.update(_describe(sim, plan))
    sim.rec.log(
        sim.t,
        planner.name,
        f"layer plan: {len(plan.assignments)} stages, min headroom "
        f"{info['min_headroom_fraction']:.1%}",
    )
    return plan


def leave_and_replan(sim: Simulation, spec: PlacementSpec) -> None:
    plan: LayerPlan = sim.layer_plan
    planner_name = sim.rec.placement["plan"]["planner"]
    rng = sim.fault_rng
    others = [n for n in sim.nodes if n.up and not n.paused and n.name != planner_name]
    k = max(1, round(spec.leave_fraction * len(sim.nodes)))
    gone = rng.sample(others, min(k, len(others)))
    holders = {a.peer for a in plan.assignments}
    if not any(n.name in holders for n in gone):
        cands = [n for n in others if n.name in holders and n not in gone]
        if cands:
            gone[0] = rng.choice(cands)
    t0 = sim.t
    for node in gone:
        sim._kill(node, "placement: device leaves")
    names = sorted(n.name for n in gone)
    sim.rec.placement["leave"] = {
        "at": round(t0, 3),
        "left": names,
        "left_holding_layers": sorted(x for x in names if x in holders),
        "orphaned_layers": sum(a.n_layers for a in plan.assignments if a.peer in set(names)),
    }
    sizes = uniform_layer_sizes(spec.layers, model_bytes(spec.params, spec.bits))

    def check() -> None:
        planner = sim.by_name[planner_name]
        alive = set(planner.membership.alive_peers())
        pending = [x for x in names if x in alive]
        if pending and sim.t < t0 + 10.0:
            sim.at(sim.t + 0.05, check)
            return
        leave = sim.rec.placement["leave"]
        leave["planner_saw_all_leave_s"] = None if pending else round(sim.t - t0, 3)
        survivors = _peers(sim, planner)
        try:
            new = replan_layers(plan, sizes, survivors, reserve_fraction=spec.reserve)
            new.validate()
            full = plan_layers(sizes, survivors, reserve_fraction=spec.reserve)
        except LayerPlanError as exc:
            leave["replan_error"] = str(exc)
            sim.rec.violation(sim.t, planner_name, f"re-plan failed: {exc}")
            return
        leave["replan"] = _describe(sim, new)
        leave["replan"]["moved_layers"] = plan.moved_layers(new)
        leave["replan"]["full_replan_moved_layers"] = plan.moved_layers(full)
        leave["replan"]["uses_departed"] = sorted({a.peer for a in new.assignments} & set(names))
        sim.rec.log(
            sim.t,
            planner_name,
            f"re-plan after {len(names)} left: moved {plan.moved_layers(new)} layers "
            f"(full re-plan would move {plan.moved_layers(full)})",
        )

    sim.at(sim.t + 0.05, check)
