"""kowalski-node: run Recursive Language Model tasks on this device or across your own devices.

Start with `kowalski-node run "question" --context-file notes.txt` on one machine, or
`kowalski-node init` then `kowalski-node start` on each device of a cluster
(docs/operations.md). `kowalski-node COMMAND --help` explains each command.
"""

# Each subcommand lives in kowalski_node/commands/<name>.py with `add_arguments(parser)`
# and `main(args) -> int`; a module is imported only when its command runs, so
# `kowalski-node run` never pays for importing libp2p.

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from kowalski_node.errors import KowalskiError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("kowalski_node.commands.run", "answer one task on this device"),
    "models": ("kowalski_node.commands.models", "download, list or remove local models"),
    "trace": ("kowalski_node.commands.trace", "show a recorded task trajectory (JSONL) readably"),
    "init": ("kowalski_node.commands.init", "set up this device: identity and cluster key"),
    "start": ("kowalski_node.commands.start", "run this device as a cluster node"),
    "submit": ("kowalski_node.commands.submit", "send a task to the cluster through a node"),
    "generate": ("kowalski_node.commands.generate", "generate text, pipelined across peers"),
    "status": ("kowalski_node.commands.status", "show the node's tasks and who runs them"),
    "peers": ("kowalski_node.commands.peers", "show the devices in the cluster"),
    "demo": ("kowalski_node.commands.demo", "start a local 3-node cluster and answer a task"),
    "bench": ("kowalski_node.commands.bench", "run the benchmarks"),
}

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
EXIT_USAGE = 2


def version() -> str:
    """The installed distribution's version (the package's own when not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("kowalski-node")
    except PackageNotFoundError:
        from kowalski_node import __version__

        return __version__


def _log_level(text: str) -> str:
    value = text.strip().upper()
    if value not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a log level (choose from {', '.join(LOG_LEVELS).lower()})"
        )
    return value


class _OneLineErrors(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one `error:` line plus a hint, exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"error: {message} (see `{self.prog} --help`)\n")


def _global_options(*, top: bool) -> _OneLineErrors:
    """Options every command accepts, before or after the command name.

    On subcommands the default is SUPPRESS, so `--log-level` given before the command
    is not overwritten by the subparser's default.
    """
    parent = _OneLineErrors(add_help=False)
    parent.add_argument(
        "--log-level",
        type=_log_level,
        default="WARNING" if top else argparse.SUPPRESS,
        metavar="LEVEL",
        help="how much to log on stderr: debug, info, warning (default), error",
    )
    return parent


def _available() -> dict[str, tuple[str, str]]:
    """Only commands whose module exists are offered."""
    found: dict[str, tuple[str, str]] = {}
    for name, (module, help_text) in COMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            found[name] = (module, help_text)
    return found


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    doc = (__doc__ or "").strip()
    parser = _OneLineErrors(
        prog="kowalski-node",
        description=doc.splitlines()[0],
        epilog="\n".join(doc.splitlines()[2:]),
        parents=[_global_options(top=True)],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kowalski-node {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineErrors)
    modules: dict[str, str] = {}
    for name, (module, help_text) in _available().items():
        cmd = sub.add_parser(
            name, help=help_text, description=help_text, parents=[_global_options(top=False)]
        )
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
    # httpx logs every request at INFO: `demo --log-level info` drowned in status polls.
    if logging.getLogger().level > logging.DEBUG:
        for chatty in ("httpx", "httpcore"):
            logging.getLogger(chatty).setLevel(logging.WARNING)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(importlib.import_module(modules[args.command]).main(args) or 0)
    except KowalskiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an unexpected environment: one line unless debugging
        if str(args.log_level).upper() == "DEBUG":
            raise
        print(
            f"error: unexpected {type(exc).__name__}: {exc} ({_save_traceback(exc)})",
            file=sys.stderr,
        )
        return 1


def _save_traceback(exc: BaseException) -> str:
    """Where the crash's full traceback went: a node that died after hours must leave
    more than one line behind, and re-running it with --log-level debug may not crash."""
    import tempfile
    import time
    import traceback

    path = Path(tempfile.gettempdir()) / f"kowalski-node-crash-{time.time():.0f}-{os.getpid()}.txt"
    try:
        path.write_text("".join(traceback.format_exception(exc)), encoding="utf-8")
    except OSError:
        return "run with --log-level debug for the traceback"
    return f"traceback in {path}"


if __name__ == "__main__":
    sys.exit(main())
