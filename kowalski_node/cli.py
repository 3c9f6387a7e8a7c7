"""`kowalski-node` command line: a thin dispatcher over `kowalski_node.commands.*`.

Each subcommand lives in its own module exposing `add_arguments(parser)` and
`main(args) -> int`. Modules are imported only when their command runs, so
`kowalski-node run` never pays for importing libp2p.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence

from kowalski_node.errors import KowalskiError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("kowalski_node.commands.run", "run one RLM task on this device"),
    "models": ("kowalski_node.commands.models", "pull or list local models"),
    "trace": ("kowalski_node.commands.trace", "render a task trajectory (JSONL) readably"),
    "init": ("kowalski_node.commands.init", "create a node identity and cluster key"),
    "start": ("kowalski_node.commands.start", "start the mesh node on this device"),
    "submit": ("kowalski_node.commands.submit", "submit a task through the local node"),
    "generate": ("kowalski_node.commands.generate", "generate text, pipelined across peers"),
    "status": ("kowalski_node.commands.status", "show tasks and their leaders"),
    "peers": ("kowalski_node.commands.peers", "show the cluster's peers"),
    "demo": ("kowalski_node.commands.demo", "start a local 3-node mesh and answer a task"),
    "bench": ("kowalski_node.commands.bench", "run the benchmark suite"),
}


def _available() -> dict[str, tuple[str, str]]:
    """Only commands whose module exists are offered."""
    found: dict[str, tuple[str, str]] = {}
    for name, (module, help_text) in COMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            found[name] = (module, help_text)
    return found


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    parser = argparse.ArgumentParser(prog="kowalski-node", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules: dict[str, str] = {}
    for name, (module, help_text) in _available().items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(cmd)
        modules[name] = module
    return parser, modules


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    parser, modules = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    if not args.command:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(modules[args.command]).main(args) or 0)
    except KowalskiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
