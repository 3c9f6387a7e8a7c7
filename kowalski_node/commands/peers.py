"""`kowalski-node peers`: the cluster as the local node sees it, one row per member."""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

import trio
from rich.table import Table

from kowalski_node.client import add_api_arguments, client_from_args
from kowalski_node.commands.status import console_for, short_peer
from kowalski_node.runtime.service import PeerList, PeerView

STATE_STYLE = {"alive": "green", "suspect": "yellow", "dead": "red", "left": "dim"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON on stdout")
    parser.add_argument("--full-ids", action="store_true", help="do not shorten peer ids")
    add_api_arguments(parser)


def _num(value: float | int | None, fmt: str = "{:.0f}", suffix: str = "") -> str:
    return "-" if value is None else fmt.format(value) + suffix


def _ram(p: PeerView) -> str:
    if p.ram_total_mb is None:
        return "-"
    total = p.ram_total_mb / 1024
    if p.ram_free_mb is None:
        return f"{total:.1f} GB"
    return f"{p.ram_free_mb / 1024:.1f}/{total:.1f} GB"


def render_peers(peers: list[PeerView], out: TextIO, full_ids: bool = False) -> None:
    console = console_for(out)
    if not peers:
        console.print("no peers known")
        return
    table = Table(show_edge=False, header_style="bold")
    for name in (
        "PEER",
        "STATE",
        "CLASS",
        "CORES",
        "RAM FREE/TOTAL",
        "LOAD",
        "TOK/S",
        "LATENCY",
        "TASKS",
        "MODELS",
        "LANGUAGES",
    ):
        table.add_column(name, no_wrap=name not in ("MODELS", "LANGUAGES"))
    order = {"alive": 0, "suspect": 1, "dead": 2, "left": 3}
    for p in sorted(peers, key=lambda p: (not p.is_self, order.get(p.state, 9), p.peer_id)):
        peer = p.peer_id if full_ids else short_peer(p.peer_id)
        style = STATE_STYLE.get(p.state, "")
        table.add_row(
            peer + (" (self)" if p.is_self else ""),
            f"[{style}]{p.state}[/{style}]" if style else p.state,
            p.device_class,
            _num(p.cores),
            _ram(p),
            _num(p.cpu_load_pct, suffix="%"),
            _num(p.tokens_per_s, "{:.1f}"),
            _num(p.latency_ms, "{:.1f}", " ms"),
            str(p.active_tasks),
            ", ".join(p.models) or "-",
            ", ".join(p.languages) or "-",
        )
    console.print(table)


async def _peers(args: argparse.Namespace, out: TextIO) -> int:
    async with client_from_args(args) as node:
        peers = await node.peers()
    if args.json:
        print(PeerList(peers=peers).model_dump_json(), file=out)
    else:
        render_peers(peers, out, args.full_ids)
    return 0


def main(args: argparse.Namespace) -> int:
    return trio.run(_peers, args, sys.stdout)
