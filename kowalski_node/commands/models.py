"""`kowalski-node models pull|list`: fetch the embedded default model and show what is on disk."""

from __future__ import annotations

import argparse
import json
import time

from kowalski_node.llm import models


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir", default=None, help="models directory (default $KOWALSKI_HOME/models)"
    )
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION")
    pull = sub.add_parser(
        "pull", help="download and verify a model (default: SmolLM2-135M-Instruct)"
    )
    pull.add_argument("name", nargs="?", default=models.DEFAULT_MODEL, help="model name or alias")
    pull.add_argument("--force", action="store_true", help="download again even if present")
    pull.add_argument(
        "--warm-cache",
        action="store_true",
        help="also build the float32 weight cache so the first load is fast",
    )
    lst = sub.add_parser("list", help="show known models and their local state")
    lst.add_argument(
        "--verify", action="store_true", help="re-hash files instead of trusting markers"
    )
    lst.add_argument("--json", action="store_true", help="print JSON")
    for action in (pull, lst):  # `models list --dir D` works as well as `models --dir D list`
        action.add_argument("--dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def _pull(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    result = models.pull(args.name, args.dir, force=args.force)
    verb = "downloaded and verified" if result.downloaded else "already present and verified"
    print(f"{result.name}: {verb} ({time.perf_counter() - start:.1f} s)\n  {result.path}")
    if args.warm_cache:
        from kowalski_node.llm.builtin.weights import warm_weight_cache

        start = time.perf_counter()
        cache_dir = warm_weight_cache(result.path, models_dir=args.dir)
        print(f"  float32 weight cache ready ({time.perf_counter() - start:.1f} s): {cache_dir}")
    return 0


def _list(args: argparse.Namespace) -> int:
    infos = models.list_models(args.dir, verify=args.verify)
    if args.json:
        rows = [
            {
                "name": i.name,
                "path": str(i.path),
                "present": i.present,
                "size_bytes": i.size_bytes,
                "sha_ok": i.sha_ok,
                "weight_cache": i.weight_cache,
            }
            for i in infos
        ]
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'NAME':<24} {'SIZE':>9}  {'SHA':<8} {'F32 CACHE':<9}  PATH")
    for i in infos:
        sha = "-" if i.sha_ok is None else ("ok" if i.sha_ok else "BAD")
        size = _human(i.size_bytes) if i.present else "missing"
        cache = "yes" if i.weight_cache else "no"
        print(f"{i.name:<24} {size:>9}  {sha:<8} {cache:<9}  {i.path}")
    if not any(i.present for i in infos):
        print("\nno models pulled yet: run `kowalski-node models pull`")
    return 0


def main(args: argparse.Namespace) -> int:
    if args.models_command == "pull":
        return _pull(args)
    if args.models_command in (None, "list"):
        if args.models_command is None:
            args.verify, args.json = False, False
        return _list(args)
    raise AssertionError(f"unhandled models action {args.models_command!r}")
