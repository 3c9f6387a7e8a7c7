"""Benchmark the RLM loop's own overhead per iteration, excluding the model and the code.

    python bench/rlm_loop.py [--tasks 30] [--iterations 20] [--sandbox]

The root model is the scripted backend with zero latency, and blocks run on an
executor that returns at once (or, with --sandbox, the real subprocess REPL when it
is installed). Per iteration we take the wall time from one root-model call to the
next and subtract the model's reported latency and the block's exec_ms: what is left
is parsing, prompt building, state-machine steps, progress events and trio scheduling.

Prints one JSON object:
- runner: overhead ms per iteration (p50/p95/mean/max) through `run_rlm`, bare, then with
  a JSONL trajectory, then with a checkpoint hook that msgpack-encodes every snapshot
  (what the mesh does after every step);
- machine: microseconds per iteration for the pure state machine alone (no trio);
- snapshot: size and encode time of a snapshot after the last iteration.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

import msgpack
import trio

from kowalski_node.llm.base import LlmResponse
from kowalski_node.llm.scripted import ScriptedBackend
from kowalski_node.repl.base import ExecRequest, ExecResult, SubCallHandler
from kowalski_node.rlm import ProgressEvent, RlmConfig
from kowalski_node.rlm.effects import Final, NeedExec, NeedLlm
from kowalski_node.rlm.machine import RlmMachine
from kowalski_node.rlm.prompts import context_metadata
from kowalski_node.runtime.rlm_runner import run_rlm

CONTEXT = [
    f"Section {i}: " + "The quick brown fox jumps over the lazy dog. " * 40 for i in range(50)
]
TURN = (
    "Let me look at the next part of the context and keep a running summary.\n"
    "```repl\nchunk = context[{i}]\nnotes.append(chunk[:80])\nprint(len(chunk), chunk[:200])\n```"
)
OUTPUT = "1810 Section: " + "The quick brown fox jumps over the lazy dog. " * 4


class InstantRepl:
    """Returns a fixed output at once: the cost of running code is not what we measure."""

    languages: tuple[str, ...] = ("python",)

    async def open_session(self, session_id: str, context: Any) -> None:
        return None

    async def execute(self, request: ExecRequest, sub_calls: SubCallHandler) -> ExecResult:
        started = time.perf_counter()
        final = "done" if "FINAL" in request.code else None
        return ExecResult(
            stdout=OUTPUT, final_answer=final, exec_ms=(time.perf_counter() - started) * 1000.0
        )

    async def close_session(self, session_id: str) -> None:
        return None

    async def aclose(self) -> None:
        return None


def script(iterations: int) -> list[str]:
    return [TURN.format(i=i % len(CONTEXT)) for i in range(iterations - 1)] + ["Done.\nFINAL(done)"]


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "p50": round(pick(0.50), 4),
        "p95": round(pick(0.95), 4),
        "mean": round(statistics.fmean(ordered), 4),
        "max": round(ordered[-1], 4),
        "samples": len(ordered),
    }


async def runner_overhead(
    tasks: int, iterations: int, repl: Any, *, trajectory: bool, checkpoint: bool
) -> list[float]:
    samples: list[float] = []
    backend = ScriptedBackend(script(iterations))
    config = RlmConfig(max_iterations=iterations + 1)
    with tempfile.TemporaryDirectory(prefix="kowalski-bench-rlm-") as tmp:
        for task in range(tasks):
            marks: list[tuple[str, float, ProgressEvent]] = []

            def on_progress(
                event: ProgressEvent, marks: list[tuple[str, float, ProgressEvent]] = marks
            ) -> None:
                marks.append((event.stage, time.perf_counter(), event))

            hook = None
            if checkpoint:

                def hook(snapshot: dict[str, Any]) -> None:
                    msgpack.packb(snapshot)

            await run_rlm(
                "Summarise the context.", CONTEXT, root=backend, repl=repl, config=config,
                task_id=f"bench-{task}", on_progress=on_progress, on_checkpoint=hook,
                trajectory_dir=tmp if trajectory else None,
            )  # fmt: skip
            calls = [(t, e) for stage, t, e in marks if stage == "model_call"]
            responses = [e for stage, _, e in marks if stage == "model_response"]
            execs = [e for stage, _, e in marks if stage == "exec_done"]
            for i in range(len(calls) - 1):
                wall_ms = (calls[i + 1][0] - calls[i][0]) * 1000.0
                model_ms = responses[i].model_latency_ms or 0.0
                exec_ms = (execs[i].exec_ms or 0.0) if i < len(execs) else 0.0
                samples.append(wall_ms - model_ms - exec_ms)
    return samples


def machine_overhead(tasks: int, iterations: int) -> tuple[list[float], dict[str, Any]]:
    replies = script(iterations)
    samples: list[float] = []
    snapshot_info: dict[str, Any] = {}
    meta = context_metadata(CONTEXT)
    for task in range(tasks):
        machine = RlmMachine(task_id=f"m{task}", prompt="Summarise the context.", context_meta=meta,
                             config=RlmConfig(max_iterations=iterations + 1))  # fmt: skip
        effects = machine.start(0.0)
        now = 0.0
        while True:
            llm = next(e for e in effects if isinstance(e, NeedLlm))
            now += 1.0
            started = time.perf_counter()
            text = replies[llm.request.sequence]
            effects = machine.on_llm_response(
                llm.call_id, LlmResponse(text, "m", "b", 100, 50, 0.0), now
            )
            if any(isinstance(e, Final) for e in effects):
                break
            ex = next(e for e in effects if isinstance(e, NeedExec))
            effects = machine.on_exec_result(
                ex.call_id, ExecResult(stdout=OUTPUT, exec_ms=0.0), now
            )
            samples.append((time.perf_counter() - started) * 1e6)
        if task == tasks - 1:
            started = time.perf_counter()
            packed = msgpack.packb(machine.snapshot())
            encode_ms = (time.perf_counter() - started) * 1000.0
            snapshot_info = {
                "bytes": len(packed),
                "encode_ms": round(encode_ms, 3),
                "at_iteration": machine.iteration,
            }
    return samples, snapshot_info


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    repl: Any = InstantRepl()
    executor = "instant (in-process, returns at once)"
    if args.sandbox:
        try:
            from kowalski_node.repl import SubprocessReplExecutor
        except ImportError:
            executor = "instant (--sandbox asked, but kowalski_node.repl.SubprocessReplExecutor is missing)"
        else:
            repl = SubprocessReplExecutor()
            executor = "SubprocessReplExecutor (exec_ms subtracted)"
    await runner_overhead(2, args.iterations, repl, trajectory=False, checkpoint=False)  # warm-up
    bare = await runner_overhead(
        args.tasks, args.iterations, repl, trajectory=False, checkpoint=False
    )
    traj = await runner_overhead(
        args.tasks, args.iterations, repl, trajectory=True, checkpoint=False
    )
    ckpt = await runner_overhead(
        args.tasks, args.iterations, repl, trajectory=True, checkpoint=True
    )
    if args.sandbox and hasattr(repl, "aclose"):
        await repl.aclose()
    machine_us, snapshot = machine_overhead(args.tasks, args.iterations)
    return {
        "bench": "rlm_loop",
        "what": "RLM loop overhead per iteration, excluding model latency and block exec time",
        "command": " ".join(["python", *sys.argv]),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "tasks": args.tasks,
        "iterations_per_task": args.iterations,
        "executor": executor,
        "runner_overhead_ms": {
            "bare": percentiles(bare),
            "with_trajectory": percentiles(traj),
            "with_trajectory_and_checkpoint": percentiles(ckpt),
        },
        "machine_us_per_iteration": percentiles(machine_us),
        "snapshot": snapshot,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=30)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument(
        "--sandbox", action="store_true", help="run blocks in the real subprocess REPL"
    )
    args = parser.parse_args()
    if args.tasks < 1 or args.iterations < 2:
        parser.error("--tasks must be >= 1 and --iterations >= 2")
    print(json.dumps(trio.run(main_async, args), indent=2))


if __name__ == "__main__":
    main()
