"""Every simulator scenario over several seeds, a few runs at a time, as one table.

    python bench/sim_sweep.py --nodes 100 --seeds 1 2 3 --jobs 2 --out /tmp/sweep

Each run is `python -m simulations run SCENARIO --nodes N --seed S --no-plot --out DIR`
(the scenario's default duration unless --duration), in its own process under `nice`.
Prints one JSON object on stdout, as every bench script ({"summary": ..., "runs": [...]}:
per run the pass or the failed checks, committed/submitted, lost, duplicate, failover
p99s, client retries, false verdicts, history hash, wall), and a markdown table of the
same on stderr and in OUT/sweep.md (OUT: --out, else a temporary directory). Exit status
0 when every run passed every checker.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from simulations.scenario import builtin_scenarios  # noqa: E402


def run_one(
    scenario: str, seed: int, nodes: int, duration: float | None, out: Path, timeout_s: float
) -> dict[str, Any]:
    """One scenario run in a child process; its report's figures, or why there is none."""
    run_dir = out / f"{scenario}-n{nodes}-s{seed}"
    cmd = ["nice", "-n", "10", sys.executable, "-m", "simulations", "run", scenario]
    cmd += ["--nodes", str(nodes), "--seed", str(seed), "--no-plot", "--out", str(run_dir)]
    if duration is not None:
        cmd += ["--duration", str(duration)]
    started = time.monotonic()
    row: dict[str, Any] = {"scenario": scenario, "seed": seed, "nodes": nodes}
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        return {**row, "passed": False, "failed": [f"no report within {timeout_s:.0f} s"]}
    row["wall_s"] = round(time.monotonic() - started, 1)
    reports = sorted(run_dir.glob("*.json"))
    if not reports:
        tail = (proc.stderr or proc.stdout)[-500:]
        return {**row, "passed": False, "failed": [f"no report (exit {proc.returncode}): {tail}"]}
    r = json.loads(reports[0].read_text())
    t, fo = r["tasks"], r["failover_s"]
    return {
        **row,
        "passed": bool(r["passed"]),
        "failed": [
            f"{c['name']} {c['value']} (limit {c['limit']})" for c in r["checks"] if not c["ok"]
        ],
        "submitted": t["submitted"],
        "committed": t["committed"],
        "lost": t["lost"],
        "duplicate": t["duplicate_commits"],
        "leader_p99": fo["leader_deaths"].get("p99"),
        "leader_n": fo["leader_deaths"]["n"],
        "majority_down_p99": fo.get("leader_deaths_acceptor_majority_down", {}).get("p99"),
        "owner_p99": fo["owner_deaths"].get("p99"),
        "owner_commit_p99": fo["owner_death_to_commit"].get("p99"),
        "client_retries": r["client"]["retries_at_another_node"],
        "false_dead": r["membership"]["false_dead_verdicts"],
        "history": r["history_sha256"],
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| scenario | seed | result | committed / submitted | lost | dup | leader-death p99 (n) "
        "| majority-down p99 | owner-death p99 | owner death → commit p99 | client retries "
        "| false dead | history | wall s |\n|" + "---|" * 14
    )
    lines = [head]
    for r in rows:
        if "history" not in r:
            lines.append(
                f"| {r['scenario']} | {r['seed']} | FAIL: {'; '.join(r['failed'])} |" + " |" * 11
            )
            continue
        result = "pass" if r["passed"] else "FAIL: " + "; ".join(r["failed"])
        lines.append(
            f"| {r['scenario']} | {r['seed']} | {result} | {r['committed']} / {r['submitted']} "
            f"| {r['lost']} | {r['duplicate']} | {r['leader_p99']} ({r['leader_n']}) "
            f"| {r['majority_down_p99']} | {r['owner_p99']} | {r['owner_commit_p99']} "
            f"| {r['client_retries']} | {r['false_dead']} | {r['history'][:8]}… | {r['wall_s']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--scenarios", nargs="+", help="default: every built-in scenario")
    ap.add_argument("--duration", type=float, help="simulated seconds (default: the scenario's)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time")
    ap.add_argument("--timeout", type=float, default=3600.0, help="wall seconds per run")
    ap.add_argument("--out", type=Path, help="run directories here (default: a temp dir)")
    args = ap.parse_args(argv)
    known = builtin_scenarios()
    scenarios = args.scenarios or sorted(known)
    unknown = [s for s in scenarios if s not in known]
    if unknown:
        ap.error(f"unknown scenario(s) {unknown}; known: {sorted(known)}")
    if args.jobs < 1 or args.nodes < 2 or args.timeout <= 0:
        ap.error("--jobs must be >= 1, --nodes >= 2 and --timeout > 0")
    if args.duration is not None and args.duration <= 0:
        ap.error("--duration must be > 0")
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="sim-sweep-"))
    args.out.mkdir(parents=True, exist_ok=True)
    plan = [(s, seed) for s in scenarios for seed in args.seeds]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(
            pool.map(
                lambda p: run_one(p[0], p[1], args.nodes, args.duration, args.out, args.timeout),
                plan,
            )
        )
    table = markdown(rows)
    (args.out / "sweep.md").write_text(table + "\n")
    print(table, file=sys.stderr)
    summary = {
        "runs": len(rows),
        "passed": sum(1 for r in rows if r["passed"]),
        "all_passed": all(r["passed"] for r in rows),
        "nodes": args.nodes,
        "seeds": args.seeds,
        "out": str(args.out),
    }
    print(json.dumps({"summary": summary, "runs": rows}))
    return 0 if summary["all_passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
