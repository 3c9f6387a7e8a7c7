"""Measure the membership core over FakeNetwork: detection time and false verdicts under loss.

    python -m kowalski_node.testing.membership_bench detect --nodes 20 --trials 300
    python -m kowalski_node.testing.membership_bench loss --nodes 100 --duration 600 --loss 0.05

``detect``: per trial, run a cluster for 3 s, kill one node, and record when *every* other
node has marked it dead. ``loss``: run for ``--duration`` simulated seconds at ``--loss``
and count false dead verdicts (every node stays alive, so any ``MemberDown`` is false).
Any ``SwimConfig`` field can be overridden with ``--set name=value``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import fields, replace
from typing import Any

from kowalski_node.membership import MemberDown, MemberSuspect, SwimConfig
from kowalski_node.testing.membership_cluster import MembershipCluster
from kowalski_node.testing.network import LinkProfile


def _config(overrides: list[str]) -> SwimConfig:
    cfg = SwimConfig.lan()
    types = {f.name: type(getattr(cfg, f.name)) for f in fields(cfg)}
    changes: dict[str, Any] = {}
    for item in overrides:
        name, _, raw = item.partition("=")
        if name not in types:
            raise SystemExit(
                f"unknown SwimConfig field {name!r}; known: {', '.join(sorted(types))}"
            )
        kind = types[name]
        changes[name] = (raw.lower() in ("1", "true", "yes")) if kind is bool else kind(raw)
    return replace(cfg, **changes)


def _pct(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return math.nan
    return sorted_vals[min(len(sorted_vals) - 1, int(q * len(sorted_vals)))]


def detect(
    nodes: int, trials: int, seed: int, cfg: SwimConfig, link: LinkProfile
) -> dict[str, Any]:
    """Kill one node per trial; time until all others mark it dead."""
    all_dead: list[float] = []
    first_dead: list[float] = []
    false_downs = 0
    for trial in range(trials):
        c = MembershipCluster(nodes, seed=seed + trial, config=cfg, link=link)
        c.run_until(3.0)
        victim = c.ids[trial % nodes]
        t0 = c.now
        c.kill(victim)
        c.run_until(t0 + 5.0)
        downs = {r.node: r.t - t0 for r in c.events_of(MemberDown, victim, since=t0)}
        false_downs += len(
            [r for r in c.events_of(MemberDown) if getattr(r.event, "peer", None) != victim]
        )
        all_dead.append(max(downs.values()) if len(downs) == nodes - 1 else math.inf)
        first_dead.append(min(downs.values()) if downs else math.inf)
    all_dead.sort()
    first_dead.sort()
    return {
        "nodes": nodes,
        "trials": trials,
        "all_marked_dead_s": {
            q: round(_pct(all_dead, p), 3) for q, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
        }
        | {"max": round(all_dead[-1], 3)},
        "first_marked_dead_s": {
            "p50": round(_pct(first_dead, 0.5), 3),
            "max": round(first_dead[-1], 3),
        },
        "false_dead_verdicts": false_downs,
    }


def loss(
    nodes: int, duration: float, seed: int, cfg: SwimConfig, link: LinkProfile
) -> dict[str, Any]:
    """Everyone stays alive for ``duration`` seconds; count false verdicts."""
    c = MembershipCluster(nodes, seed=seed, config=cfg, link=link)
    c.run_until(duration)
    return {
        "nodes": nodes,
        "sim_seconds": duration,
        "node_hours": round(nodes * duration / 3600, 2),
        "loss": link.loss,
        "false_dead_verdicts": len(c.events_of(MemberDown)),
        "suspect_events": len(c.events_of(MemberSuspect)),
        "messages_sent": c.network.stats.sent,
        "messages_lost": c.network.stats.lost,
        "views_agree": c.views_agree(set(c.ids)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("mode", choices=["detect", "loss"])
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--duration", type=float, default=600.0)
    ap.add_argument("--loss", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    args = ap.parse_args(argv)
    cfg = _config(args.set)
    link = LinkProfile(latency=0.0005, jitter=0.0003, loss=args.loss)
    t0 = time.perf_counter()
    if args.mode == "detect":
        out = detect(args.nodes, args.trials, args.seed, cfg, link)
    else:
        out = loss(args.nodes, args.duration, args.seed, cfg, link)
    out["wall_s"] = round(time.perf_counter() - t0, 2)
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
