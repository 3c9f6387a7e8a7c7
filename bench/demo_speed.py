"""How fast the demo task is answered: `kowalski-node run` (cold, then warm) and the demo.

The task is the demo's own (commands/demo.py): how many ERROR lines a generated
120-line service log holds; the script knows the true count, so every timing comes with
whether the answer was right. Goals (issue 9): `run` warm under 20 s, the demo's answer
under 30 s after set-up, on a 2-core machine.

    python bench/demo_speed.py                 # run twice, then the demo
    python bench/demo_speed.py --skip-demo

One JSON object on stdout: engine, model, threads, and for each run its wall seconds,
answer and correctness; for the demo, the seconds from submission to answer.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kowalski_node.commands.demo import DEFAULT_MODEL, DEFAULT_PROMPT, answer_matches, demo_log


def run_once(log_path: Path, backend: str, model: str, timeout: float) -> dict[str, Any]:
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "kowalski_node.cli", "run", DEFAULT_PROMPT,
         "--context-file", str(log_path), "--backend", backend, "--model", model,
         "--json", "--quiet"],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    try:
        result = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return {"seconds": round(seconds, 1), "error": proc.stderr.strip()[-300:]}
    return {
        "seconds": round(seconds, 1), "answer": str(result.get("content", ""))[:100],
        "stop_reason": result.get("stop_reason"), "iterations": result.get("iterations"),
        "model_ms": round(float(result.get("timings", {}).get("model_ms", 0.0))),
    }  # fmt: skip


def demo_once(backend: str, model: str, timeout: float) -> dict[str, Any]:
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "kowalski_node.cli", "demo", "--backend", backend,
         "--model", model, "--timeout", str(timeout)],
        capture_output=True, text=True, timeout=timeout + 120, check=False,
    )  # fmt: skip
    answered = re.search(r"answered ([\d.]+) s after submission", proc.stdout)
    formed = re.search(r"mesh formed: .*\(([\d.]+) s after the first start", proc.stdout)
    return {
        "exit_code": proc.returncode,
        "answer_s": float(answered.group(1)) if answered else None,
        "mesh_formed_s": float(formed.group(1)) if formed else None,
        "total_s": round(time.perf_counter() - started, 1),
        "right": "answer was RIGHT" in proc.stdout,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="llamacpp")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--runs", type=int, default=2, help="`run` invocations (first is cold)")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--skip-demo", action="store_true")
    args = parser.parse_args()
    from kowalski_node.config import load_settings
    from kowalski_node.llm.llamacpp_backend import batch_threads, resolve_threads

    settings = load_settings(overrides={"llm.backend": args.backend})
    text, expected = demo_log()
    report: dict[str, Any] = {
        "engine": args.backend, "model": args.model, "expected": expected,
        "threads": resolve_threads(settings.llm.llamacpp_threads) if args.backend == "llamacpp" else None,
        "prefill_threads": batch_threads(settings.llm.llamacpp_batch_threads,
                                         resolve_threads(settings.llm.llamacpp_threads)),
        "llamacpp_nice": settings.llm.llamacpp_nice,
        "prefix_cache": settings.llm.llamacpp_prefix_cache,
        "cpus": os.cpu_count(), "loadavg_before": os.getloadavg()[0],
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "service.log"
        log_path.write_text(text, encoding="utf-8")
        runs = []
        for i in range(args.runs):
            row = run_once(log_path, args.backend, args.model, args.timeout)
            row["right"] = answer_matches(str(row.get("answer", "")), expected)
            runs.append(row)
            print(f"run {i + 1}: {row}", file=sys.stderr, flush=True)
        report["run"] = runs
    if not args.skip_demo:
        report["demo"] = demo_once(args.backend, args.model, args.timeout)
        print(f"demo: {report['demo']}", file=sys.stderr, flush=True)
    report["loadavg_after"] = os.getloadavg()[0]
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
