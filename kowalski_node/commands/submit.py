"""`kowalski-node submit PROMPT`: hand a task to the local node over its HTTP API.

stdout carries only the task id, or with `--wait` the answer (with `--json`: one JSON
object), so the command composes in scripts; progress and notes go to stderr.
Exit status: 0 when accepted (or, with `--wait`, answered), 1 when the task failed,
was cancelled or did not finish within `--timeout`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

import trio

from kowalski_node.client import add_api_arguments, client_from_args
from kowalski_node.commands.run import add_task_arguments, load_context
from kowalski_node.errors import ConfigError
from kowalski_node.rlm.types import ProgressEvent
from kowalski_node.runtime.service import TaskStatus, TaskView


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_task_arguments(parser)
    parser.add_argument("--idempotency-key", "-k", help="resubmitting the same key never reruns")
    parser.add_argument("--task-id", help="choose the task id (also an idempotency key)")
    parser.add_argument("--model", "-m", help="root model (default: the node's)")
    parser.add_argument("--sub-model", help="model for llm_query sub-calls")
    parser.add_argument("--max-iterations", "-n", type=int, help="root-model turns")
    parser.add_argument("--priority", type=int, default=0, help="higher runs first (-1000..1000)")
    parser.add_argument("--wait", "-w", action="store_true", help="wait and print the answer")
    parser.add_argument(
        "--timeout", type=float, default=None, metavar="S", help="with --wait: give up after S s"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    add_api_arguments(parser)


def read_prompt(prompt: str, stdin: TextIO) -> str:
    text = stdin.read() if prompt == "-" else prompt
    if not text.strip():
        raise ConfigError("the prompt is empty")
    return text


def _progress_printer(err: TextIO) -> Any:
    def show(update: ProgressEvent) -> None:
        parts = [f"iteration {update.iteration}/{update.max_iterations}", update.stage]
        parts.append(f"tokens {update.tokens_in + update.tokens_out}")
        if update.active_devices:
            parts.append(f"{update.active_devices} device(s)")
        if update.avg_latency_ms is not None:
            parts.append(f"avg {update.avg_latency_ms:.0f} ms")
        if update.peer:
            parts.append(f"on {update.peer[-8:]}")
        print("  " + " · ".join(parts), file=err, flush=True)

    return show


def stop_line(view: TaskView) -> str:
    """Why the run stopped and which model answered, for people (stderr)."""
    r = view.result
    if r is None:
        return f"stopped: {view.status.value}"
    note = "" if r.stop_reason == "final" else " (the answer may be partial)"
    return (
        f"stopped: {r.stop_reason}{note} · model {r.model} ({r.backend}) · "
        f"{r.iterations} iteration(s)"
    )


def _finish(view: TaskView, as_json: bool, out: TextIO, err: TextIO, quiet: bool = False) -> int:
    if as_json:
        print(view.model_dump_json(), file=out)
    elif view.status == TaskStatus.DONE and view.result is not None:
        print(view.result.content, file=out)
        if not quiet:
            print(stop_line(view), file=err)
    if view.status == TaskStatus.DONE:
        return 0
    if not as_json:
        print(
            f"task {view.task_id} {view.status.value}: {view.error or 'no result'}",
            file=err,
        )
    return 1


async def _submit(
    args: argparse.Namespace, prompt: str, context: Any, out: TextIO, err: TextIO
) -> int:
    rlm = {"max_iterations": args.max_iterations} if args.max_iterations is not None else None
    async with client_from_args(args) as node:
        accepted = await node.submit(
            prompt,
            context,
            task_id=args.task_id,
            idempotency_key=args.idempotency_key,
            model=args.model,
            sub_model=args.sub_model,
            rlm=rlm,
            priority=args.priority,
        )
        if not accepted.created and not args.quiet:
            print(
                f"already submitted as {accepted.task_id} ({accepted.status.value}); not run again",
                file=err,
            )
        if not args.wait:
            print(accepted.model_dump_json() if args.json else accepted.task_id, file=out)
            return 0
        if not args.quiet and not args.json:
            print(f"task {accepted.task_id} accepted; waiting", file=err, flush=True)
        on_progress = None if args.quiet else _progress_printer(err)
        view = await node.wait(accepted.task_id, args.timeout, on_progress=on_progress)
        return _finish(view, args.json, out, err, args.quiet)


def main(args: argparse.Namespace) -> int:
    if args.timeout is not None and args.timeout <= 0:
        raise ConfigError("--timeout must be > 0")
    prompt = read_prompt(args.prompt, sys.stdin)
    context = load_context(args.context_file, args.context_format)
    return trio.run(_submit, args, prompt, context, sys.stdout, sys.stderr)
