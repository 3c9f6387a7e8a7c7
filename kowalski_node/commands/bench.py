"""`kowalski-node bench`: run the benchmark scripts in bench/ and print one JSON object.

Each script in bench/ (see bench/README.md) prints one JSON object on stdout; this
command runs them one after another in fresh processes (a script's imports or threads
cannot skew the next one) and prints {"<script>": <its JSON>, ...} plus how long each
took. `--quick` passes each script its short settings. A script that fails, or prints
something that is not JSON, is reported under its name with its exit code and the end
of its stderr; the others still run. Benchmarks live in a source checkout: the command
looks for bench/ next to the installed package, or takes `--bench-dir`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kowalski_node.errors import ConfigError

# Short settings per script for --quick (a few minutes in all on a small machine).
QUICK_ARGS: dict[str, list[str]] = {
    "engine": ["--repeats", "1", "--decode-tokens", "16", "--prompt-tokens", "64", "--skip-cold"],
    "rlm_loop": ["--tasks", "5", "--iterations", "10"],
    "sandbox": ["--runs", "50", "--opens", "5"],
    "transport": ["--blob-mb", "64", "--rounds", "200", "--connects", "5", "--no-mdns"],
    "mesh": ["--quick"],
    "devset": ["--only", "csv-sum-60", "--modes", "rlm"],
    "demo_speed": ["--runs", "1", "--skip-demo"],
    "pipeline": ["--quick"],
    "nemesis": ["--runs", "1", "--duration", "20", "--tasks", "8"],
    "failover": ["--samples", "2"],
    "sim_sweep": [
        *("--duration", "120", "--seeds", "1"),
        *("--scenarios", "baseline", "churn-25pct", "leader-kill", "owner-kill"),
    ],
    "ledger_memory": ["--tasks", "1000"],
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "scripts", nargs="*", metavar="NAME", help="scripts to run (default: all in bench/)"
    )
    parser.add_argument("--quick", action="store_true", help="short settings for every script")
    parser.add_argument("--bench-dir", type=Path, help="where the scripts are (default: ./bench)")
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds one script may run (1800)"
    )
    parser.add_argument("--out", type=Path, help="also write the JSON to this file")


def find_bench_dir(explicit: Path | None) -> Path:
    candidates = [explicit] if explicit is not None else [
        Path.cwd() / "bench",
        Path(__file__).resolve().parents[2] / "bench",
    ]  # fmt: skip
    for candidate in candidates:
        if candidate is not None and (candidate / "README.md").is_file():
            return candidate
    raise ConfigError(
        "bench/ not found: run `kowalski-node bench` from a source checkout of kowalski-node "
        "or pass --bench-dir"
    )


def run_script(path: Path, args: list[str], timeout: float) -> dict[str, Any]:
    started = time.monotonic()
    try:
        proc = subprocess.run(  # noqa: S603 - our own interpreter and bench script, no shell
            [sys.executable, str(path), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=path.parent.parent,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {timeout:.0f} s"}
    took = round(time.monotonic() - started, 1)
    if proc.returncode != 0:
        return {
            "error": f"exit code {proc.returncode}",
            "stderr_tail": proc.stderr[-2000:],
            "s": took,
        }
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return {"error": "output is not one JSON object", "stdout_tail": proc.stdout[-2000:]}
    return {"result": report, "s": took}


def main(args: argparse.Namespace) -> int:
    bench_dir = find_bench_dir(args.bench_dir)
    available = sorted(p.stem for p in bench_dir.glob("*.py") if not p.name.startswith("_"))
    wanted = args.scripts or available
    unknown = [name for name in wanted if name not in available]
    if unknown:
        raise ConfigError(f"unknown benchmark(s) {unknown}; available: {', '.join(available)}")
    report: dict[str, Any] = {"bench_dir": str(bench_dir), "quick": bool(args.quick)}
    failed = 0
    for name in wanted:
        extra = QUICK_ARGS.get(name, []) if args.quick else []
        print(f"[bench] {name} {' '.join(extra)}".rstrip(), file=sys.stderr, flush=True)
        outcome = run_script(bench_dir / f"{name}.py", extra, args.timeout)
        if "error" in outcome:
            failed += 1
            report[name] = outcome
        else:
            report[name] = outcome["result"]
            report.setdefault("seconds", {})[name] = outcome["s"]
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 1 if failed else 0
