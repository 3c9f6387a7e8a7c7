"""`kowalski-node status [--task ID]`: this node, its tasks, and who leads each of them.

Without `--task`: a header for the node and a table of recent tasks (leader, epoch,
state, executions, commits). With `--task`: one task in full, including which peer did
what. `--json` prints the API's views; finished tasks also carry `stop_reason` and `model`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from typing import Any, TextIO

import trio
from rich.console import Console
from rich.table import Table

from kowalski_node.client import add_api_arguments, client_from_args
from kowalski_node.errors import ConfigError, KowalskiError
from kowalski_node.runtime.service import NodeStatus, TaskStatus, TaskView


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", "-t", metavar="ID", help="show one task in full")
    parser.add_argument("--limit", type=int, default=50, help="tasks to list (1..1000)")
    parser.add_argument(
        "--state", choices=[s.value for s in TaskStatus], help="only tasks in this state"
    )
    parser.add_argument("--json", action="store_true", help="print JSON on stdout")
    add_api_arguments(parser)


def short_peer(peer_id: str | None) -> str:
    """The tail of a libp2p peer id: enough to tell peers apart (the heads are all alike)."""
    if not peer_id:
        return "-"
    return peer_id if len(peer_id) <= 12 else "…" + peer_id[-10:]


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    minutes, sec = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def console_for(out: TextIO) -> Console:
    """Rich output; wide enough when piped that ids are not cut."""
    tty = hasattr(out, "isatty") and out.isatty()
    return Console(file=out, width=None if tty else 200, highlight=False, soft_wrap=False)


def _counts(by_status: dict[str, int]) -> str:
    parts = [f"{n} {name}" for name, n in sorted(by_status.items()) if n]
    return ", ".join(parts) or "none"


def render_node(status: NodeStatus, console: Console) -> None:
    console.print(
        f"node [bold]{status.peer_id}[/bold]  api {status.api_addr or '-'}  "
        f"up {format_duration(status.uptime_s)}"
    )
    if status.listen_addrs:
        console.print("listening on " + ", ".join(status.listen_addrs))
    peers = ", ".join(f"{n} {s}" for s, n in sorted(status.peers_by_state.items()) if n)
    console.print(
        f"peers: {peers or 'none'}  tasks: {_counts(status.tasks_by_status)}  "
        f"queue {status.queue_depth}  executions {status.executions_total}  "
        f"commits {status.commits_total}  failovers {status.failovers_total}"
    )


def render_tasks(
    tasks: list[TaskView],
    console: Console,
    now: float,
    outcomes: dict[str, dict[str, str]] | None = None,
) -> None:
    if not tasks:
        console.print("no tasks")
        return
    table = Table(show_edge=False, header_style="bold")
    for name, justify in (
        ("TASK", "left"),
        ("STATE", "left"),
        ("LEADER", "left"),
        ("EPOCH", "right"),
        ("EXEC", "right"),
        ("COMMITS", "right"),
        ("ITER", "right"),
        ("AGE", "right"),
        ("STOP", "left"),
        ("MODEL", "left"),
        ("PROMPT", "left"),
    ):
        table.add_column(name, justify=justify, no_wrap=name != "PROMPT")  # type: ignore[arg-type]
    for t in tasks:
        table.add_row(
            t.task_id,
            t.status.value,
            short_peer(t.leader),
            str(t.epoch),
            str(t.executions),
            str(t.commits),
            f"{t.iteration}/{t.max_iterations}" if t.max_iterations else str(t.iteration),
            format_duration(now - t.created_at),
            (outcomes or {}).get(t.task_id, {}).get("stop_reason", "-"),
            (outcomes or {}).get(t.task_id, {}).get("model", "-"),
            t.prompt_preview[:60],
        )
    console.print(table)


def render_task(t: TaskView, console: Console) -> None:
    rows = [
        ("task", t.task_id),
        ("state", t.status.value),
        ("prompt", t.prompt_preview),
        ("owner", t.owner or "-"),
        ("leader", t.leader or "-"),
        ("epoch", str(t.epoch)),
        ("replicas", ", ".join(short_peer(r) for r in t.replicas) or "-"),
        ("executions", str(t.executions)),
        ("commits", str(t.commits)),
        ("failovers", str(t.failovers)),
        ("iteration", f"{t.iteration}/{t.max_iterations}"),
        ("idempotency key", t.idempotency_key or "-"),
    ]
    if t.finished_at is not None:
        rows.append(("took", format_duration(t.finished_at - t.created_at)))
    if t.result is not None:
        rows.append(("stop reason", t.result.stop_reason))
        rows.append(("model", f"{t.result.model} ({t.result.backend})"))
    for key, value in rows:
        console.print(f"{key:>16}  {value}", markup=False)
    if t.error:
        console.print(f"{'error':>16}  {t.error}", markup=False)
    if t.history:
        table = Table(title="who did what", show_edge=False, header_style="bold")
        for name in ("AT", "PEER", "ACTION", "EPOCH", "DETAIL"):
            table.add_column(name, no_wrap=name != "DETAIL")
        start = t.history[0].at
        for h in t.history:
            table.add_row(
                f"+{h.at - start:.3f}s",
                short_peer(h.peer),
                h.action,
                "-" if h.epoch is None else str(h.epoch),
                h.detail,
            )
        console.print(table)
    if t.result is not None:
        console.print("answer:", style="bold")
        console.print(t.result.content, markup=False)


async def _status(args: argparse.Namespace, out: TextIO) -> int:
    async with client_from_args(args) as node:
        if args.task:
            view = await node.get_task(args.task)
            if args.json:
                print(view.model_dump_json(), file=out)
            else:
                render_task(view, console_for(out))
            return 0
        status = await node.status()
        tasks = await node.list_tasks(args.limit, args.state)
        outcomes = await _outcomes(node, tasks)
    if args.json:
        payload = {
            "node": status.model_dump(mode="json"),
            "tasks": [
                {
                    **t.model_dump(mode="json", exclude={"result", "history"}),
                    **outcomes.get(t.task_id, {}),
                }
                for t in tasks
            ],
        }
        print(json.dumps(payload), file=out)
        return 0
    console = console_for(out)
    render_node(status, console)
    render_tasks(tasks, console, time.time(), outcomes)
    return 0


async def _outcomes(node: Any, tasks: list[TaskView]) -> dict[str, dict[str, str]]:
    """stop_reason and model of each finished task (the list view leaves results out)."""
    found: dict[str, dict[str, str]] = {}

    async def one(task_id: str) -> None:
        with contextlib.suppress(KowalskiError):
            view = await node.get_task(task_id)
            if view.result is not None:
                found[task_id] = {
                    "stop_reason": view.result.stop_reason,
                    "model": view.result.model,
                }

    async with trio.open_nursery() as nursery:
        for t in tasks:
            if t.status.final:
                nursery.start_soon(one, t.task_id)
    return found


def main(args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= 1000:
        raise ConfigError("--limit must be between 1 and 1000")
    return trio.run(_status, args, sys.stdout)
