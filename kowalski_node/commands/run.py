"""`kowalski-node run PROMPT`: one RLM task on this device, with live progress on stderr.

stdout carries only the answer (or, with `--json`, one JSON object), so the command
composes in pipelines; progress goes to stderr as a live `rich` display on a terminal
and as plain lines otherwise (CI logs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import trio

from kowalski_node.config import Settings, load_settings
from kowalski_node.errors import ConfigError

CONTEXT_FORMATS = ("auto", "text", "json", "bytes")


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """The prompt and the context file (`run` and `submit` share them; see `load_context`)."""
    parser.add_argument("prompt", help="the task; '-' reads it from stdin")
    parser.add_argument("--context-file", "-c", type=Path, help="file loaded as `context`")
    parser.add_argument(
        "--context-format",
        choices=CONTEXT_FORMATS,
        default="auto",
        help="how to load the context file: auto (.json parsed, else UTF-8 text, else bytes)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_task_arguments(parser)
    parser.add_argument(
        "--backend",
        "-b",
        help="llamacpp | builtin | ollama | openai | scripted:PATH (default llm.backend: llamacpp)",
    )
    parser.add_argument("--model", "-m", help="root model (default llm.model)")
    parser.add_argument("--sub-backend", help="backend for llm_query sub-calls")
    parser.add_argument("--sub-model", help="model for llm_query sub-calls")
    parser.add_argument("--max-iterations", "-n", type=int, help="root-model turns")
    parser.add_argument("--max-depth", type=int, help="recursion depth of sub-calls")
    parser.add_argument("--max-tokens", type=int, help="output cap of one root-model turn")
    parser.add_argument("--block-timeout", type=float, help="seconds per code block")
    parser.add_argument("--time-budget", type=float, help="seconds for the whole task")
    parser.add_argument("--token-budget", type=int, help="tokens for the whole task")
    parser.add_argument(
        "--system-prompt-file",
        type=Path,
        help="custom root system prompt (rlms' custom_system_prompt; may use {context_type})",
    )
    parser.add_argument(
        "--worked-examples", type=int, choices=range(5), help="worked examples in the prompt (0-4)"
    )
    parser.add_argument("--trajectory-dir", type=Path, help="where the JSONL trajectory goes")
    parser.add_argument("--task-id", help="task id (default: generated)")
    parser.add_argument("--config", type=Path, help="TOML config (default $KOWALSKI_CONFIG)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Flags override env and file; flags not given leave lower layers alone."""
    overrides: dict[str, Any] = {
        "llm.backend": args.backend,
        "llm.model": args.model,
        "llm.sub_backend": args.sub_backend,
        "llm.sub_model": args.sub_model,
        "rlm.max_iterations": args.max_iterations,
        "rlm.max_depth": args.max_depth,
        "llm.max_tokens": args.max_tokens,
        "rlm.block_timeout_s": args.block_timeout,
        "rlm.time_budget_s": args.time_budget,
        "rlm.token_budget": args.token_budget,
        "paths.trajectories": args.trajectory_dir,
        "rlm.system_prompt": _read_prompt_file(args.system_prompt_file),
        "rlm.worked_examples": args.worked_examples,
    }
    return load_settings(args.config, overrides=overrides)


def _read_prompt_file(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        text = path.expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--system-prompt-file {path}: {exc}") from None
    if not text.strip():
        raise ConfigError(f"--system-prompt-file {path} is empty")
    return text


def load_context(path: Path | None, fmt: str) -> Any:
    """The --context-file as str, parsed JSON or bytes (`run` and `submit` share it)."""
    if path is None:
        return None
    try:
        raw = path.expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(f"--context-file {path}: {exc.strerror or exc}") from None
    if fmt == "bytes":
        return raw
    if fmt == "json" or (fmt == "auto" and path.suffix.lower() == ".json"):
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--context-file {path} is not valid JSON: {exc}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        if fmt == "text":
            raise ConfigError(f"--context-file {path} is not UTF-8 text") from None
        return raw


def preflight(settings: Settings) -> None:
    """Fail before any work when the builtin model is not pulled or Ollama has no model name."""
    from kowalski_node.llm.factory import resolve_models

    root_spec, root_model, sub_spec, sub_model = resolve_models(settings)
    for role, spec, model in (("", root_spec, root_model), ("sub_", sub_spec, sub_model)):
        if spec.kind in ("builtin", "llamacpp"):
            from kowalski_node.llm.models import resolve_model_path

            resolve_model_path(model, settings.paths.models_dir)
        elif spec.kind == "ollama" and not model:
            flag = "--model" if not role else "--sub-model"
            raise ConfigError(
                f"llm.{role}model: the ollama backend needs a model: pass {flag} or write "
                f"`ollama:MODEL` (e.g. ollama:llama3.2); `ollama list` shows what is pulled"
            )


def main(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    settings = settings_from_args(args)
    context = load_context(args.context_file, args.context_format)
    preflight(settings)
    try:
        return trio.run(_run, args, settings, prompt, context)
    except BaseExceptionGroup as group:
        from kowalski_node.api import plain_exception

        raise plain_exception(group) from None


async def _run(args: argparse.Namespace, settings: Settings, prompt: str, context: Any) -> int:
    from kowalski_node.api import ExecutionResult, KowalskiRLM

    display = _make_display(sys.stderr, quiet=args.quiet, settings=settings)
    rlm = KowalskiRLM(settings=settings)
    try:
        with display:
            try:
                result: ExecutionResult = await rlm.execute(
                    prompt, context, task_id=args.task_id, on_progress=display.update
                )
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
    finally:
        with trio.CancelScope(shield=True):
            await rlm.aclose()
    _print_result(result, settings, as_json=args.json, out=sys.stdout, err=sys.stderr)
    return 0 if result.ok else 1


def _print_result(
    result: Any, settings: Settings, *, as_json: bool, out: TextIO, err: TextIO
) -> None:
    if as_json:
        data = result.to_dict()  # carries the model that answered and the stop reason
        out.write(json.dumps(data, ensure_ascii=False) + "\n")
    else:
        out.write(result.content + ("" if result.content.endswith("\n") else "\n"))
    out.flush()
    if result.error:
        err.write(f"error: {result.error}\n")
    elif result.stop_reason != "final":
        err.write(
            f"note: the run ended on {result.stop_reason} (model {result.model}); "
            "the answer may be partial\n"
        )
    if result.trajectory_path and not as_json:
        err.write(f"trajectory: {result.trajectory_path}\n")


class _Display:
    """Progress renderer: a live `rich` panel on a terminal, plain lines elsewhere.

    The live view re-renders four times a second from the latest update, so the elapsed
    time keeps moving while a slow model call is in flight.
    """

    def __init__(self, stream: TextIO, *, live: bool, quiet: bool, label: str) -> None:
        self.stream = stream
        self.quiet = quiet
        self.label = label
        self._live: Any = None
        self._use_live = live and not quiet
        self.last: Any = None
        self.last_exec_ms: float | None = None
        self.last_model_ms: float | None = None
        self.blocks = 0
        self._stage_since = time.monotonic()
        self._started = time.monotonic()

    def __enter__(self) -> _Display:
        if self._use_live:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(
                self,
                console=Console(file=self.stream),
                auto_refresh=True,
                refresh_per_second=4,
                transient=False,
            )
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.refresh()
            self._live.__exit__(None, None, None)
            self._live = None

    def line(self) -> str:
        """One status line from the latest update (also what CI logs get)."""
        u = self.last
        if u is None:
            return f"[{self.label}] starting ({time.monotonic() - self._started:.1f} s)"
        parts = [
            f"[{self.label}] iteration {u.iteration}/{u.max_iterations}",
            f"tokens {u.tokens_in} in / {u.tokens_out} out",
        ]
        if self.last_exec_ms is not None:
            parts.append(f"last block {self.last_exec_ms:.1f} ms")
        if self.last_model_ms is not None:
            avg = f" (avg {u.avg_latency_ms:.0f})" if u.avg_latency_ms is not None else ""
            parts.append(f"model {self.last_model_ms:.0f} ms{avg}")
        parts.append(f"{u.elapsed_ms / 1000:.1f} s")
        parts.append(u.stage)
        return " | ".join(parts)

    def __rich__(self) -> Any:
        from rich.table import Table

        u = self.last
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold cyan", justify="right")
        table.add_column()
        waiting = time.monotonic() - self._stage_since
        if u is None:
            table.add_row("model", self.label)
            table.add_row("stage", f"starting ({waiting:.1f} s)")
            return table
        elapsed = u.elapsed_ms / 1000 + (0.0 if u.done else waiting)
        model = "-" if self.last_model_ms is None else f"{self.last_model_ms:.0f} ms"
        if u.avg_latency_ms is not None:
            model += f" (avg {u.avg_latency_ms:.0f} ms)"
        table.add_row("model", self.label)
        table.add_row("iteration", f"{u.iteration}/{u.max_iterations}")
        table.add_row("stage", f"{u.stage} ({waiting:.1f} s)" if not u.done else "done")
        table.add_row("tokens", f"{u.tokens_in} in / {u.tokens_out} out")
        last_block = "-" if self.last_exec_ms is None else f"{self.last_exec_ms:.1f} ms"
        table.add_row("blocks", f"{self.blocks} run, last {last_block}")
        table.add_row("model latency", model)
        if u.sub_calls:
            table.add_row("sub-calls", str(u.sub_calls))
        table.add_row("elapsed", f"{elapsed:.1f} s")
        return table

    def update(self, update: Any) -> None:
        if self.last is None or update.stage != self.last.stage:
            self._stage_since = time.monotonic()
        self.last = update
        if update.exec_ms is not None:
            self.last_exec_ms = float(update.exec_ms)
            self.blocks += 1
        if update.model_latency_ms is not None:
            self.last_model_ms = float(update.model_latency_ms)
        if self.quiet:
            return
        if self._live is not None:
            self._live.refresh()
        elif update.stage in PLAIN_STAGES:
            self.stream.write(self.line() + "\n")
            self.stream.flush()


# Stages worth a line in a non-interactive log (one per model call, block and the end).
PLAIN_STAGES = ("model_call", "model_response", "exec_done", "finalizing", "done")


def _make_display(stream: TextIO, *, quiet: bool, settings: Settings) -> _Display:
    label = settings.llm.backend if settings.llm.model is None else settings.llm.model
    live = hasattr(stream, "isatty") and stream.isatty()
    return _Display(stream, live=live, quiet=quiet, label=label)
