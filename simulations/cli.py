"""``python -m simulations run SCENARIO [--nodes N] [--seed S] [--duration SECONDS] [--out DIR]``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from simulations.distributions import ScenarioError
from simulations.engine import Simulation
from simulations.report import write_outputs
from simulations.results import build_report, minimal_history
from simulations.scenario import Scenario, builtin_scenarios, load_scenario


def run_scenario(scn: Scenario) -> tuple[Simulation, dict[str, Any]]:
    sim = Simulation(scn)
    t0 = time.perf_counter()
    sim.run()
    wall = time.perf_counter() - t0
    return sim, build_report(sim, wall)


def _fmt(s: dict[str, Any]) -> str:
    if not s.get("n"):
        return "n=0"
    return f"p50 {s['p50']} p99 {s['p99']} max {s['max']} (n={s['n']})"


def _print_summary(report: dict[str, Any]) -> None:
    r = report
    t = r["tasks"]
    print(
        f"{r['scenario']}: {r['nodes']} nodes, {r['duration_s']} s simulated, seed {r['seed']}, "
        f"wall {r['wall_s']} s ({r['events']} events)"
    )
    print(
        f"  tasks: submitted {t['submitted']} committed {t['committed']} failed {t['failed']} lost {t['lost']} "
        f"duplicate {t['duplicate_commits']} unexpected {t['unexpected']} stale {t['stale_epoch_commits']} "
        f"executions {t['executions']}"
    )
    print(f"  failover (leader lost -> resumed): {_fmt(r['failover_s'])}")
    print(f"  detection (all observers): {_fmt(r['detection_all_s'])}")
    m = r["membership"]
    print(
        f"  false dead verdicts: {m['false_dead_verdicts']} over {m['node_hours']} node-hours "
        f"({m['node_hours_at_5pct_loss_or_more']} at >= 5% loss)"
    )
    d = r["dissemination"]
    print(f"  dissemination ratio {d['ratio']} latency {_fmt(d['latency_s'])}")
    if "placement" in r:
        pl = r["placement"]
        plan = pl.get("plan", {})
        leave = pl.get("leave", {})
        print(
            f"  placement: {plan.get('model_gib')} GiB in {plan.get('layers')} layers over "
            f"{plan.get('stages')} devices {plan.get('stages_by_class')}, min headroom "
            f"{plan.get('min_headroom_fraction')}"
        )
        rp = leave.get("replan", {})
        print(
            f"  {len(leave.get('left', []))} devices left ({len(leave.get('left_holding_layers', []))} holding "
            f"layers): re-plan moved {rp.get('moved_layers')} layers (full re-plan {rp.get('full_replan_moved_layers')})"
        )
    for c in r["checks"]:
        mark = "ok  " if c["ok"] else "FAIL"
        print(f"  [{mark}] {c['name']}: {c['value']} (limit {c['limit']})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run one scenario")
    run.add_argument(
        "scenario", help=f"built-in name ({', '.join(builtin_scenarios())}) or a .toml path"
    )
    run.add_argument("--nodes", type=int)
    run.add_argument("--seed", type=int)
    run.add_argument(
        "--duration", type=float, help="simulated seconds (the fault schedule is scaled to fit)"
    )
    run.add_argument("--out", type=Path, default=Path("sim-out"))
    run.add_argument("--no-plot", action="store_true", help="skip the PNG")
    sub.add_parser("list", help="list the built-in scenarios")
    args = parser.parse_args(argv)
    if args.cmd == "list":
        for name in builtin_scenarios():
            print(f"{name}: {load_scenario(name).description}")
        return 0
    try:
        scn = load_scenario(args.scenario).with_overrides(
            nodes=args.nodes, seed=args.seed, duration=args.duration
        )
    except ScenarioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sim, report = run_scenario(scn)
    paths = write_outputs(sim, report, args.out, plot=not args.no_plot)
    _print_summary(report)
    print("  wrote " + ", ".join(str(p) for p in paths.values()))
    if not report["passed"]:
        print(
            f"\nFAILED: scenario {scn.name} seed {scn.seed} nodes {scn.nodes} duration {scn.duration}",
            file=sys.stderr,
        )
        print(
            f"reproduce: python -m simulations run {args.scenario} --nodes {scn.nodes} --seed {scn.seed} "
            f"--duration {scn.duration}",
            file=sys.stderr,
        )
        hist = minimal_history(sim)
        if hist:
            print("history around the first violation:", file=sys.stderr)
            for line in hist:
                print("  " + line, file=sys.stderr)
        return 1
    return 0
