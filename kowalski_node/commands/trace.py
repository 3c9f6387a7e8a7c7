"""`kowalski-node trace FILE`: render an RLM trajectory (JSONL) readably, or pass it through as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kowalski_node.runtime.trajectory import read_trajectory

_CLIP = 2000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "file", help="trajectory file written by a task (<trajectory_dir>/<task_id>.jsonl)"
    )
    parser.add_argument(
        "--json", action="store_true", help="print the records as JSON lines, unchanged"
    )
    parser.add_argument(
        "--full", action="store_true", help="do not shorten long prompts and outputs"
    )
    parser.add_argument(
        "--system", action="store_true", help="show the system prompt (hidden by default)"
    )


def main(args: argparse.Namespace) -> int:
    records = read_trajectory(args.file)
    if args.json:
        for record in records:
            sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        return 0
    render(records, full=bool(args.full), show_system=bool(args.system))
    return 0


def render(records: list[dict[str, Any]], *, full: bool = False, show_system: bool = False) -> None:
    from rich.console import Console, Group
    from rich.panel import Panel
    from rich.rule import Rule
    from rich.syntax import Syntax
    from rich.table import Table
    from rich.text import Text

    console = Console()

    def clip(text: Any) -> str:
        value = "" if text is None else str(text)
        if full or len(value) <= _CLIP:
            return value
        return value[:_CLIP] + f"\n... [{len(value) - _CLIP:,} more characters; --full shows all]"

    for record in records:
        kind = record.get("type")
        t = f"{float(record.get('t_ms', 0.0)) / 1000:.2f}s"
        if kind == "task_start":
            meta = record.get("context_meta", {})
            config = record.get("config", {})
            body = Table.grid(padding=(0, 2))
            body.add_row("task", str(record.get("task_id")))
            body.add_row("prompt", clip(record.get("prompt")))
            body.add_row(
                "context",
                f"{meta.get('type')} · {meta.get('total_length', 0):,} {meta.get('unit', '')}",
            )
            chunks = meta.get("chunks")
            if chunks:
                body.add_row(
                    "chunks",
                    f"{chunks.get('count')} (min {chunks.get('min')}, max {chunks.get('max')})",
                )
            body.add_row(
                "limits",
                f"iterations {config.get('max_iterations')} · depth {config.get('max_depth')} · "
                f"block timeout {config.get('block_timeout_s')} s · time {config.get('time_budget_s')} s · "
                f"tokens {config.get('token_budget')} · errors {config.get('max_errors')}",
            )
            if record.get("depth"):
                body.add_row("depth", str(record["depth"]))
            console.print(Panel(body, title="RLM task", border_style="cyan"))
        elif kind == "model_request":
            for role, content in record.get("new_messages", []):
                if role == "system" and not show_system:
                    console.print(
                        Text(
                            f"[{t}] system prompt: {len(content):,} characters (--system shows it)",
                            style="dim",
                        )
                    )
                    continue
                title = f"{role} → model (turn {record.get('sequence')})"
                if record.get("final_ask"):
                    title += " · final answer requested"
                console.print(Panel(Text(clip(content)), title=title, border_style="blue"))
        elif kind == "model_response":
            title = (
                f"model turn {record.get('sequence')} · {record.get('tokens_in')} in / "
                f"{record.get('tokens_out')} out · {float(record.get('latency_ms', 0)):.0f} ms · "
                f"{record.get('backend')}:{record.get('model')}"
            )
            # The raw reply, fences and tags included: which blocks ran depends on them.
            console.print(
                Panel(Text(clip(record.get("text"))), title=title, border_style="magenta")
            )
        elif kind == "model_error":
            console.print(
                Panel(Text(str(record.get("error")), style="red"), title=f"[{t}] model error")
            )
        elif kind == "block":
            parts: list[Any] = [
                Syntax(clip(record.get("code")), _lexer(record.get("language")), word_wrap=True)
            ]
            output = record.get("output") or ""
            parts.append(Rule("output", style="dim"))
            parts.append(
                Text(
                    clip(output) if output.strip() else "(no output)",
                    style="white" if output else "dim",
                )
            )
            if record.get("error"):
                parts.append(
                    Text(f"{record.get('error_kind')}: {clip(record.get('error'))}", style="red")
                )
            subs = record.get("sub_calls") or []
            if subs:
                table = Table("seq", "prompt", "answer", "ms", show_lines=False, expand=True)
                for sub in subs:
                    answer = (
                        sub.get("text")
                        if sub.get("error") is None
                        else f"[red]error: {sub.get('error')}[/red]"
                    )
                    table.add_row(
                        str(sub.get("sequence")),
                        _one_line(sub.get("prompt"), 60),
                        _one_line(answer, 60),
                        f"{float(sub.get('latency_ms', 0)):.0f}",
                    )
                parts.append(table)
            style = "green" if not record.get("error") else "red"
            title = (
                f"block {int(record.get('index', 0)) + 1} · {record.get('language')} · "
                f"{float(record.get('exec_ms', 0)):.1f} ms"
            )
            console.print(Panel(Group(*parts), title=title, border_style=style))
        elif kind == "final":
            timings = record.get("timings", {})
            tokens = record.get("tokens", {})
            summary = Group(
                Text(clip(record.get("content")) or "(no answer)", style="bold"),
                Text(
                    f"stop: {record.get('stop_reason')} via {record.get('final_via')} · "
                    f"iterations {record.get('iterations')} · tokens {tokens.get('in')} in / "
                    f"{tokens.get('out')} out · sub-calls {record.get('sub_calls')} · "
                    f"{float(timings.get('elapsed_ms', 0)) / 1000:.2f} s",
                    style="dim",
                ),
                *([Text(f"error: {record['error']}", style="red")] if record.get("error") else []),
            )
            console.print(
                Panel(
                    summary,
                    title="final answer",
                    border_style="green" if record.get("stop_reason") == "final" else "yellow",
                )
            )
        elif kind == "limit":
            console.print(
                Text(
                    f"[{t}] limit reached: {record.get('reason')}; asking once for a final answer",
                    style="yellow",
                )
            )
        elif kind == "final_var":
            ok = "resolved" if record.get("ok") else "missing"
            console.print(Text(f"[{t}] FINAL_VAR({record.get('name')}): {ok}", style="dim"))
        elif kind == "cancelled":
            console.print(
                Text(f"[{t}] cancelled (graceful={record.get('graceful')})", style="yellow")
            )
        elif kind == "resumed":
            console.print(
                Text(
                    f"[{t}] resumed from a checkpoint at iteration {record.get('iteration')} "
                    f"(root turn {record.get('root_sequence')}, sub-call {record.get('sub_sequence')})",
                    style="cyan",
                )
            )
        elif kind == "replay":
            console.print(
                Text(
                    f"REPL rebuilt by replaying {record.get('blocks')} block(s) in {record.get('ms')} ms",
                    style="dim",
                )
            )
        else:
            console.print(
                Text(
                    f"[{t}] {kind}: {_one_line(json.dumps(record, default=str), 120)}", style="dim"
                )
            )


def _lexer(language: Any) -> str:
    return {"shell": "bash", "unknown": "text"}.get(str(language), str(language or "text"))


def _one_line(value: Any, limit: int) -> str:
    text = " ".join(str(value or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
