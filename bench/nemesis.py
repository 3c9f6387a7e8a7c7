"""Real-process nemesis, long: many seeded runs of tests/nemesis.py (5 nodes, a client that
retries the same key at other nodes on timeout, random SIGKILL/restart and SIGSTOP/SIGCONT,
a distinct checkable answer per task). Stops at the first failing run unless --keep-going.

    python bench/nemesis.py --runs 20 --seed 100 --duration 60 --tasks 30 --json out.json

Each run's report (seed, faults injected, lost/wrong/duplicate/stuck/failed, client retries,
task latency p50/p99) goes to stderr as one JSON line as it finishes; stdout gets one JSON
object at the end ({"summary": ..., "runs": [...]}, as every bench script). The exit
status is 0 when every run passed. Run it under `nice` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.nemesis import Nemesis


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=100, help="first seed; run i uses seed + i")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of faults per run")
    ap.add_argument("--tasks", type=int, default=30)
    ap.add_argument("--latency-ms", type=int, default=250, help="scripted model latency per turn")
    ap.add_argument("--settle", type=float, default=180.0, help="seconds to finish after faults")
    ap.add_argument(
        "--aim-at-paused",
        type=float,
        default=0.5,
        help="share of new keys sent first to the SIGSTOPped node, if one is paused",
    )
    ap.add_argument("--json", type=Path, help="write every run's report here")
    ap.add_argument("--keep-going", action="store_true")
    args = ap.parse_args(argv)
    if args.runs < 1 or args.tasks < 1 or args.duration <= 0 or args.settle < 0:
        ap.error("--runs and --tasks must be >= 1, --duration > 0, --settle >= 0")
    if not 0.0 <= args.aim_at_paused <= 1.0:
        ap.error("--aim-at-paused is a share: between 0 and 1")
    reports = []
    passed_in_a_row = 0
    started = time.monotonic()
    for i in range(args.runs):
        seed = args.seed + i
        tmp = Path(tempfile.mkdtemp(prefix=f"nemesis-{seed}-"))
        nemesis = Nemesis(
            tmp,
            seed=seed,
            duration_s=args.duration,
            tasks=args.tasks,
            latency_ms=args.latency_ms,
            settle_s=args.settle,
            aim_at_paused=args.aim_at_paused,
        )
        try:
            report = nemesis.run()
        except Exception as exc:  # the cluster did not start: a failed run, logs kept
            report = nemesis.report
            report.stuck += 1
            report.problems.append(f"run aborted: {exc}"[:2000])
        d = report.to_dict()
        if report.passed:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            d["logs"] = str(tmp)  # node logs kept for the failing run
        reports.append(d)
        print(json.dumps(d), file=sys.stderr, flush=True)
        if report.passed:
            passed_in_a_row += 1
        elif not args.keep_going:
            break
    summary = {
        "runs": len(reports),
        "passed_in_a_row": passed_in_a_row,
        "all_passed": all(r["passed"] for r in reports) and len(reports) == args.runs,
        "faults": sum(len(r["faults"]) for r in reports),
        "tasks": sum(r["tasks"] for r in reports),
        "client_retries": sum(r["client_retries"] for r in reports),
        "submits_to_paused": sum(r["submits_to_paused"] for r in reports),
        "seeds": [r["seed"] for r in reports],
        "wall_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps({"summary": summary, "runs": reports}), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "runs": reports}, indent=1))
    return 0 if summary["all_passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
