"""`kowalski-node generate --prompt TEXT`: one pipelined generation through a running node.

The node behind `--api` leads: it plans layer ranges over live peers (or runs one local
stage when the model fits its memory cap), streams hidden states stage to stage, and fails
over by replay if a stage dies. stdout carries the text (with `--json`: the whole result,
stages and timings included); errors go to stderr with exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import trio

from kowalski_node.client import add_api_arguments, client_from_args
from kowalski_node.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", "-p", required=True, help="the user message ('-': stdin)")
    parser.add_argument("--system", help="a system message before the prompt")
    parser.add_argument("--raw", action="store_true", help="send the prompt without the template")
    parser.add_argument("--model", "-m", help="model name (default: the node's default model)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument(
        "--sharding",
        choices=("auto", "pipeline", "tensor"),
        help="auto: split only when the model does not fit the node's cap (default: the "
        "node's inference.sharding); pipeline: always split; tensor: refused",
    )
    parser.add_argument("--stages", type=int, help="at most this many pipeline stages")
    parser.add_argument("--json", action="store_true", help="print the whole result as JSON")
    add_api_arguments(parser)
    parser.set_defaults(api_timeout=600.0)


def build_body(args: argparse.Namespace, prompt: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "stop": args.stop,
    }
    if args.raw:
        body["prompt"] = prompt
    else:
        messages = [["system", args.system]] if args.system else []
        body["messages"] = [*messages, ["user", prompt]]
    for key in ("model", "seed", "sharding", "stages"):
        value = getattr(args, key)
        if value is not None:
            body[key] = value
    return body


def main(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise ConfigError("the prompt is empty")
    if args.max_tokens < 0:
        raise ConfigError("--max-tokens must be >= 0")
    return trio.run(_generate, args, build_body(args, prompt))


async def _generate(args: argparse.Namespace, body: dict[str, Any]) -> int:
    async with client_from_args(args) as client:
        resp = await client._request("POST", "/v1/generate", json=body)
    result = resp.json()
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        sys.stdout.write(result["text"] + "\n")
        stages = ", ".join(f"{s['peer'][-8:]}[{s['start']},{s['end']})" for s in result["stages"])
        t = result["timings"]
        sys.stderr.write(
            f"stages: {stages}; tokens {result['tokens_out']}; failovers {result['failovers']}; "
            f"ttft {t['ttft_s']:.2f} s; decode {t['decode_tok_s']:.1f} tok/s\n"
        )
    return 0
