"""Sandbox speed: a 100-line program on a warm worker, and session-open times.

    python bench/sandbox.py [--runs 200] [--opens 20]

Prints one JSON object:
- exec_ms: node-side round trip of `execute()` for the 100-line program (p50/p95/mean),
  and worker_ms: the time the worker itself spent running it;
- open_warm_ms: `open_session` when a pre-started worker is waiting in the pool;
- open_cold_ms: `open_session` with an empty pool (start a worker, confine it, bind);
- start_ms: `start()` of a fresh executor (first worker's hello, capabilities known);
- trivial_ms: round trip of a one-line block (the sandbox's own per-block overhead);
- inprocess_ms: the same 100-line program with plain `exec` in this process, unsandboxed
  (what the single-process RLM libraries do), for comparison.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import trio

from kowalski_node.repl.base import ExecRequest, SubCallResult
from kowalski_node.repl.executor import SubprocessReplExecutor


def hundred_line_program() -> str:
    """100 lines of ordinary RLM-style code: string work, loops, a function, a dict."""
    lines = [
        "words = context.split()",
        "counts = {}",
        "def norm(w):",
        "    return w.strip('.,;:').lower()",
    ]
    for i in range(94):
        if i % 3 == 0:
            lines.append(
                f"for w in words[{i}:{i + 20}]: counts[norm(w)] = counts.get(norm(w), 0) + 1"
            )
        elif i % 3 == 1:
            lines.append(f"chunk_{i} = ' '.join(words[{i}:{i + 5}]).upper()")
        else:
            lines.append(f"total_{i} = sum(len(w) for w in words[:{i + 10}])")
    lines.append("top = sorted(counts.items(), key=lambda kv: -kv[1])[:5]")
    lines.append("print(len(words), top[:2])")
    assert len(lines) == 100, len(lines)
    return "\n".join(lines)


def stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50": round(statistics.median(ordered), 3),
        "p95": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))], 3),
        "mean": round(statistics.fmean(ordered), 3),
        "n": len(ordered),
    }


async def no_sub_calls(prompts: list[str], model: str | None) -> list[SubCallResult]:
    return [SubCallResult(error="not used") for _ in prompts]


async def bench(runs: int, opens: int) -> dict[str, Any]:
    context = " ".join(f"Word{i % 97}, text." for i in range(2000))
    program = hundred_line_program()

    t0 = time.perf_counter()
    executor = SubprocessReplExecutor(pool_size=1)
    caps = await executor.start()
    start_ms = (time.perf_counter() - t0) * 1000.0
    try:
        await executor.open_session("bench", context)
        for _ in range(5):  # warm-up
            await executor.execute(ExecRequest("bench", program), no_sub_calls)
        exec_ms: list[float] = []
        worker_ms: list[float] = []
        for _ in range(runs):
            t = time.perf_counter()
            result = await executor.execute(ExecRequest("bench", program), no_sub_calls)
            exec_ms.append((time.perf_counter() - t) * 1000.0)
            worker_ms.append(result.exec_ms)
            assert result.ok, result.error

        trivial_ms: list[float] = []
        for _ in range(runs):
            t = time.perf_counter()
            await executor.execute(ExecRequest("bench", "x = 1"), no_sub_calls)
            trivial_ms.append((time.perf_counter() - t) * 1000.0)

        warm: list[float] = []
        for i in range(opens):
            await trio.sleep(0.3)  # let the refilled pool worker finish booting
            t = time.perf_counter()
            await executor.open_session(f"warm{i}", context)
            warm.append((time.perf_counter() - t) * 1000.0)
            await executor.close_session(f"warm{i}")
    finally:
        await executor.aclose()

    cold: list[float] = []
    cold_executor = SubprocessReplExecutor(pool_size=1)
    await cold_executor.start()
    try:
        for i in range(opens):
            for worker in list(cold_executor._idle):  # empty the pool: every open is cold
                cold_executor._idle.remove(worker)
                await worker.kill()
            t = time.perf_counter()
            await cold_executor.open_session(f"cold{i}", context)
            cold.append((time.perf_counter() - t) * 1000.0)
            await cold_executor.close_session(f"cold{i}")
    finally:
        await cold_executor.aclose()

    inprocess_ms: list[float] = []
    namespace: dict[str, Any] = {"context": context, "print": lambda *a, **k: None}
    for _ in range(runs):
        t = time.perf_counter()
        exec(compile(program, "<bench>", "exec"), namespace)
        inprocess_ms.append((time.perf_counter() - t) * 1000.0)

    return {
        "benchmark": "sandbox",
        "program_lines": 100,
        "exec_ms": stats(exec_ms),
        "worker_ms": stats(worker_ms),
        "trivial_ms": stats(trivial_ms),
        "inprocess_ms": stats(inprocess_ms),
        "open_warm_ms": stats(warm),
        "open_cold_ms": stats(cold),
        "start_ms": round(start_ms, 3),
        "enforced_missing": caps.missing(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--opens", type=int, default=20)
    args = parser.parse_args()
    print(json.dumps(trio.run(bench, args.runs, args.opens)))


if __name__ == "__main__":
    main()
