"""Turn a finished simulation into the report dict and the pass/fail checks."""

from __future__ import annotations

import hashlib
import math
from typing import Any

from simulations.engine import Simulation
from simulations.metrics import summary


def history_bytes(sim: Simulation) -> bytes:
    return ("\n".join(sim.rec.history) + "\n").encode("utf-8")


def build_report(sim: Simulation, wall_s: float) -> dict[str, Any]:
    scn = sim.scn
    rec = sim.rec
    tasks = rec.task_summary(sim.stores(), {n.name for n in sim.nodes if n.up})
    conflicting = sim.conflicting_commits()
    diss = sim.dissemination()
    node_hours = rec.node_seconds / 3600.0
    coord_totals: dict[str, int] = {}
    for n in sim.nodes:
        for k, v in n.coord.stats.as_dict().items():
            coord_totals[k] = coord_totals.get(k, 0) + v
    report: dict[str, Any] = {
        "scenario": scn.name,
        "description": scn.description,
        "seed": scn.seed,
        "nodes": scn.nodes,
        "duration_s": scn.duration,
        "drain_s": scn.drain,
        "settle_extra_s": sim.extra_time,
        "devices": {
            c: sum(1 for n in sim.nodes if n.dev.cls == c) for c in ("desktop", "laptop", "phone")
        },
        "wall_s": round(wall_s, 2),
        "events": sim.events,
        "events_per_s": round(sim.events / wall_s) if wall_s > 0 else None,
        "history_sha256": hashlib.sha256(history_bytes(sim)).hexdigest(),
        "tasks": {
            **tasks,
            "conflicting_commits_in_stores": conflicting,
            "resubmissions_deduplicated": sim.resubmits,
        },
        "task_latency_s": summary(rec.task_latency),
        "failover_s": {
            **summary(rec.failovers + rec.failovers_quorum_lost + rec.owner_failovers),
            "leader_deaths": summary(rec.failovers),
            "leader_deaths_acceptor_majority_down": summary(rec.failovers_quorum_lost),
            "owner_deaths": summary(rec.owner_failovers),
            "owner_death_to_commit": summary(rec.owner_completions),
            "leader_deaths_with_owner_down": rec.failovers_owner_down,
            "leader_back_before_takeover": rec.failovers_skipped,
        },
        "client": {
            "retries_at_another_node": rec.client_retries,
            "refused_no_quorum": rec.client_refusals,
        },
        "contexts": {
            "fetch_s": summary(rec.context_fetches),
            "fetch_retries": rec.context_fetch_retries,
            "fetch_failures": rec.context_fetch_failures,
        },
        "detection_all_s": summary(rec.detections_all),
        "detection_first_s": summary(rec.detections_first),
        "detection_per_observer_s": summary(rec.detections_per_observer),
        "undetected_short_faults": rec.undetected,
        "membership": {
            "false_dead_verdicts": len(rec.false_dead),
            "false_dead_examples": rec.false_dead[:10],
            "dead_verdicts_during_partitions": rec.partition_dead,
            "true_dead_verdicts": rec.true_dead,
            "node_hours": round(node_hours, 2),
            "node_hours_at_5pct_loss_or_more": round(rec.lossy_node_seconds / 3600.0, 2),
        },
        "dissemination": {**diss, "latency_s": summary(rec.advert_latency)},
        "coordination": coord_totals,
        "fenced_aborts_seen": rec.fenced,
        "network": {
            "sent": sim.net.sent,
            "lost": sim.net.lost,
            "duplicated": sim.net.duplicated,
            "dropped_partition": sim.net.dropped_partition,
            "dropped_down": sim.net.dropped_down,
        },
    }
    if rec.placement:
        report["placement"] = rec.placement
    report["checks"] = run_checks(sim, report)
    report["passed"] = all(c["ok"] for c in report["checks"])
    return report


def _check(name: str, ok: bool, value: Any, limit: Any) -> dict[str, Any]:
    return {"name": name, "ok": bool(ok), "value": value, "limit": limit}


def run_checks(sim: Simulation, report: dict[str, Any]) -> list[dict[str, Any]]:
    c = sim.scn.checks
    t = report["tasks"]
    out = [
        _check("lost tasks", t["lost"] == 0, t["lost"], 0),
        _check("unexpected commits/results", t["unexpected"] == 0, t["unexpected"], 0),
        _check("duplicate commits", t["duplicate_commits"] == 0, t["duplicate_commits"], 0),
        _check(
            "commits from a stale epoch", t["stale_epoch_commits"] == 0, t["stale_epoch_commits"], 0
        ),
        _check(
            "different commits held by two stores",
            t["conflicting_commits_in_stores"] == 0,
            t["conflicting_commits_in_stores"],
            0,
        ),
        _check(
            "no violation in the history",
            sim.rec.first_violation is None,
            None if sim.rec.first_violation is None else sim.rec.first_violation[2],
            None,
        ),
        _check(
            "false dead verdicts",
            report["membership"]["false_dead_verdicts"] <= c.false_dead_max,
            report["membership"]["false_dead_verdicts"],
            c.false_dead_max,
        ),
        _check(
            "dissemination ratio once healed",
            report["dissemination"]["ratio"] >= c.dissemination_min,
            report["dissemination"]["ratio"],
            c.dissemination_min,
        ),
    ]
    fo = report["failover_s"]
    # p99 limits over latency summaries: leader deaths (the one-death promise), leader
    # deaths while an acceptor majority was down too (a wait for restarts), owner deaths
    # (they add the takeover grace), detection by every observer.
    p99_limits = (
        ("failover p99, leader deaths (s)", fo["leader_deaths"], c.failover_p99_max),
        (
            "failover p99, leader deaths with an acceptor majority down (s)",
            fo["leader_deaths_acceptor_majority_down"],
            c.majority_down_failover_p99_max,
        ),
        ("failover p99, owner deaths (s)", fo["owner_deaths"], c.owner_failover_p99_max),
        ("detection p99, all observers (s)", report["detection_all_s"], c.detection_p99_max),
    )
    for name, latency, limit in p99_limits:
        if limit is not None and latency["n"]:
            out.append(_check(name, latency["p99"] <= limit, latency["p99"], limit))
    if c.min_failovers:
        out.append(
            _check("failovers measured", fo["n"] >= c.min_failovers, fo["n"], c.min_failovers)
        )
    if c.min_owner_failovers:
        n = fo["owner_deaths"]["n"]
        out.append(
            _check("owner deaths taken over", n >= c.min_owner_failovers, n, c.min_owner_failovers)
        )
    done = fo["owner_death_to_commit"]
    if c.owner_completion_max is not None and done["n"]:
        out.append(
            _check(
                "owner death -> commit at a survivor, p99 (s)",
                done["p99"] <= c.owner_completion_max,
                done["p99"],
                c.owner_completion_max,
            )
        )
    if c.min_context_fetches:
        ctx = report["contexts"]
        n = ctx["fetch_s"]["n"]
        out.append(
            _check(
                "context fetches by leaders", n >= c.min_context_fetches, n, c.min_context_fetches
            )
        )
        out.append(
            _check(
                "context fetches that failed", ctx["fetch_failures"] == 0, ctx["fetch_failures"], 0
            )
        )
    if c.min_client_retries:
        n = report["client"]["retries_at_another_node"]
        out.append(
            _check(
                "client retries at another node", n >= c.min_client_retries, n, c.min_client_retries
            )
        )
    if c.min_fenced:
        fenced = (
            report["coordination"]["fenced_checkpoints"]
            + report["coordination"]["fenced_commits"]
            + report["coordination"]["fenced_aborts"]
        )
        out.append(_check("stale writes fenced", fenced >= c.min_fenced, fenced, c.min_fenced))
    if "placement" in report:
        pl = report["placement"]
        ok = "error" not in pl.get("plan", {}) and "replan" in pl.get("leave", {})
        out.append(
            _check(
                "671B plan and re-plan after departures",
                ok,
                pl.get("leave", {}).get("replan", {}).get("moved_layers"),
                None,
            )
        )
    for item in out:
        v = item["value"]
        if isinstance(v, float) and math.isnan(v):
            item["value"] = None
    return out


def minimal_history(sim: Simulation, window: float = 2.0, limit: int = 40) -> list[str]:
    """The lines around the first violation: everything about its subject, and faults nearby."""
    fv = sim.rec.first_violation
    if fv is None:
        return []
    t, subject, _ = fv
    picked = []
    for line in sim.rec.history:
        parts = line.split(" ", 2)
        lt = float(parts[0])
        if subject in line or (
            abs(lt - t) <= window
            and any(
                k in line for k in ("KILL", "PAUSE", "RESUME", "RESTART", "partition", "VIOLATION")
            )
        ):
            picked.append(line)
    return picked[-limit:]
