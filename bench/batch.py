"""Batch throughput of `KowalskiRLM.execute_batch` on this device, with the real sandbox.

    python bench/batch.py [--tasks 100] [--parallel 8] [--pool-sizes 2 8] [--repeats 3]
                          [--kinds trivial code] [--modes cold warm]

A scripted backend answers instantly, so what is measured is the API, the RLM loop, the
trajectory files and the sandbox, not a model:
- trivial: the model answers `FINAL(42)` at once (no code, so no sandbox worker is needed);
- code: one small ```repl block (`sum(range(100))`), then `FINAL_VAR(x)`; every task takes
  its own sandbox worker, as isolation requires (a worker serves one task and dies with it).

Modes: cold = a plain `execute_batch` (the batch opens its own pool, started only when a
task runs code, with up to `BATCH_POOL_MAX` warm workers), warm = inside `async with rlm`
(a pool of `sandbox.pool_size` is already running). Prints one JSON object:
per kind, mode and pool size, tasks/s (median of repeats), p50/p95 task latency, and the
CPU time (this process + its children) per task; plus the machine's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from kowalski_node import BatchConfig, KowalskiRLM, Task
from kowalski_node.api import BATCH_POOL_MAX

SCRIPTS: dict[str, dict[str, Any]] = {
    "trivial": {"responses": ["FINAL(42)"]},
    "code": {"responses": ["```repl\nx = sum(range(100))\nprint(x)\n```", "FINAL_VAR(x)"]},
}
EXPECTED = {"trivial": "42", "code": "4950"}


def _cpu_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * q))], 2)


async def one_batch(
    rlm: KowalskiRLM, kind: str, n: int, warm: bool
) -> tuple[float, list[float], float]:
    """(tasks/s, per-task latency ms, CPU s per task) for one batch of `n` tasks."""
    latencies: list[float] = []
    starts: dict[str, float] = {}
    tasks = [Task(prompt="q", context="some context", task_id=f"b{i}") for i in range(n)]

    def on_progress(update: Any) -> None:
        if update.stage == "start":
            starts[update.task_id] = time.perf_counter()
        elif update.stage == "done" and update.task_id in starts:
            latencies.append((time.perf_counter() - starts[update.task_id]) * 1000.0)

    async def run() -> list[Any]:
        return await rlm.execute_batch(tasks, on_progress=on_progress)

    cpu0 = _cpu_s()
    started = time.perf_counter()
    if warm:
        async with rlm:
            await rlm.execute_batch([Task(prompt="q", context="c", task_id="warmup")])
            started, cpu0 = time.perf_counter(), _cpu_s()
            results = await run()
            elapsed, cpu = time.perf_counter() - started, _cpu_s() - cpu0
    else:
        results = await run()
        elapsed, cpu = time.perf_counter() - started, _cpu_s() - cpu0
    wrong = [r for r in results if r.content != EXPECTED[kind]]
    if wrong:
        raise SystemExit(f"{kind}: {len(wrong)} tasks gave a wrong result, e.g. {wrong[0]}")
    return n / elapsed, latencies, cpu / n


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in args.kinds:
        script = workdir / f"{kind}.json"
        script.write_text(json.dumps(SCRIPTS[kind]))
        for pool in args.pool_sizes:
            for mode in args.modes:
                rates: list[float] = []
                lat: list[float] = []
                cpu: list[float] = []
                for _ in range(args.repeats):
                    rlm = KowalskiRLM(
                        backend=f"scripted:{script}",
                        batch=BatchConfig(max_parallel_tasks=args.parallel),
                        overrides={
                            "paths.home": workdir / "home",
                            "sandbox.pool_size": pool,
                        },
                    )
                    rate, latencies, cpu_per_task = trio.run(
                        one_batch, rlm, kind, args.tasks, mode == "warm"
                    )
                    rlm.close_sync()
                    rates.append(rate)
                    lat.extend(latencies)
                    cpu.append(cpu_per_task)
                    print(f"{kind} {mode} pool={pool}: {rate:.1f} tasks/s", file=sys.stderr)
                # A plain batch keeps min(parallel, tasks, BATCH_POOL_MAX) workers warm when
                # that is more than sandbox.pool_size; `async with` uses sandbox.pool_size.
                batch_pool = min(args.parallel, args.tasks, BATCH_POOL_MAX)
                effective = pool if mode == "warm" else max(pool, batch_pool)
                out[f"{kind}/{mode}/pool{pool}"] = {
                    "effective_pool_size": effective,
                    "tasks_per_s": round(statistics.median(rates), 1),
                    "tasks_per_s_all": [round(r, 1) for r in rates],
                    "latency_ms": {"p50": _pct(lat, 0.5), "p95": _pct(lat, 0.95)},
                    "cpu_ms_per_task": round(statistics.median(cpu) * 1000.0, 1),
                }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--parallel", type=int, default=8, help="BatchConfig.max_parallel_tasks")
    parser.add_argument("--pool-sizes", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kinds", nargs="+", choices=sorted(SCRIPTS), default=["trivial", "code"])
    parser.add_argument("--modes", nargs="+", choices=["cold", "warm"], default=["cold", "warm"])
    args = parser.parse_args(argv)
    if args.tasks < 1 or args.parallel < 1 or args.repeats < 1 or min(args.pool_sizes) < 1:
        parser.error("--tasks, --parallel, --repeats and --pool-sizes must be >= 1")
    with tempfile.TemporaryDirectory(prefix="kowalski-batch-bench-") as tmp:
        results = measure(args, Path(tmp))
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_1m": round(os.getloadavg()[0], 2),
        },
        "tasks": args.tasks,
        "parallel": args.parallel,
        "results": results,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
