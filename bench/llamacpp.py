"""llama.cpp backend figures: load, prefill and decode tok/s per thread count, and prefix reuse.

    python bench/llamacpp.py                          # both models, threads 1 and the default
    python bench/llamacpp.py --threads 1,2 --models qwen --repeats 3 --json out.json

For each model and thread count it starts a fresh in-process server (the same
`start_server` the backend uses) and measures, with llama.cpp's own timings:
- load: `xllamacpp.Server(...)` wall time (the GGUF is usually in the page cache);
- prefill: a ~PROMPT-token chat prompt with `cache_prompt` off (median of --repeats);
- decode: --decode tokens with `ignore_eos` (median of --repeats);
- reuse: an RLM-like second turn (turn 1 + its answer + a short user message): tokens
  reused, tokens prefilled and prefill time, against the cold prefill of the same prompt.

Run it under `nice` on a shared machine and report the load average it prints.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kowalski_node.llm.base import ChatMessage, LlmRequest
from kowalski_node.llm.llamacpp_backend import (
    ServerConfig,
    build_payload,
    default_threads,
    run_completion,
    start_server,
    usable_cores,
)
from kowalski_node.llm.models import find_spec, resolve_model_path

MODELS = {"smollm2": "smollm2-135m-instruct", "qwen": "qwen2.5-coder-0.5b-instruct"}


def system_prompt(words: int) -> str:
    """Deterministic filler that tokenizes to roughly `words` * 1.3 tokens."""
    vocab = ("context", "lines", "count", "python", "answer", "value", "print", "block")
    body = " ".join(vocab[(i * 7) % len(vocab)] for i in range(words))
    return "You are a careful assistant. Notes: " + body


def request(messages: list[tuple[str, str]], max_tokens: int, **extra: Any) -> dict[str, Any]:
    req = LlmRequest(
        tuple(ChatMessage(role, text) for role, text in messages),  # type: ignore[arg-type]
        max_tokens=max_tokens,
    )
    payload = build_payload(req)
    payload.update(extra)
    return payload


def call(server: Any, payload: dict[str, Any]) -> dict[str, Any]:
    out = run_completion(server, payload, threading.Event())
    if out.error:
        raise RuntimeError(out.error)
    return {
        "prompt_tokens": out.tokens_in,
        "reused_tokens": out.reused_tokens,
        "completion_tokens": out.tokens_out,
        "prefill_s": out.prefill_s,
        "decode_s": out.decode_s,
        "text": out.text,
    }


def bench_one(
    path: Path, threads: int, prompt_words: int, decode_tokens: int, repeats: int
) -> dict[str, Any]:
    config = ServerConfig(path=path, threads=threads, context_tokens=8192, parallel=1)
    started = time.perf_counter()
    server = start_server(config)
    load_s = time.perf_counter() - started
    system = system_prompt(prompt_words)
    user = "How many lines of the context contain ERROR? Write one python block."
    cold = [
        call(server, request([("system", system), ("user", user)], 1, cache_prompt=False))
        for _ in range(repeats)
    ]
    prompt_tokens = cold[0]["prompt_tokens"]
    prefill_s = statistics.median(c["prefill_s"] for c in cold)
    decode = [
        call(
            server,
            request([("user", "Tell me about the sea.")], decode_tokens, ignore_eos=True),
        )
        for _ in range(repeats)
    ]
    decode_s = statistics.median(d["decode_s"] for d in decode)
    decode_n = decode[0]["completion_tokens"]
    # Turn 1 fills the slot; turn 2 extends it the way an RLM root turn does.
    turn1 = call(server, request([("system", system), ("user", user)], 48))
    turn2_messages = [
        ("system", system),
        ("user", user),
        ("assistant", turn1["text"]),
        ("user", "Output:\n31\nIf that is the answer, reply FINAL(31)."),
    ]
    turn2 = call(server, request(turn2_messages, 8))
    cold2 = call(server, request(turn2_messages, 1, cache_prompt=False))
    del server
    return {
        "threads": threads,
        "load_s": round(load_s, 2),
        "prefill_prompt_tokens": prompt_tokens,
        "prefill_tok_s": round(prompt_tokens / prefill_s, 1),
        "decode_tokens": decode_n,
        "decode_tok_s": round(decode_n / decode_s, 1),
        "turn2_prompt_tokens": turn2["prompt_tokens"],
        "turn2_reused_tokens": turn2["reused_tokens"],
        "turn2_prefill_s": round(turn2["prefill_s"], 3),
        "turn2_cold_prefill_s": round(cold2["prefill_s"], 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="smollm2,qwen", help="comma list: smollm2, qwen")
    parser.add_argument(
        "--threads", default=None, help="comma list (default: 1 and the default count)"
    )
    parser.add_argument("--prompt-words", type=int, default=400, help="~1.3 tokens per word")
    parser.add_argument("--decode", type=int, default=64, help="decode tokens per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)
    if args.threads:
        thread_counts = [int(t) for t in args.threads.split(",")]
    else:
        thread_counts = sorted({1, default_threads()})
    env = {
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "default_threads": default_threads(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "nice": os.nice(0),
    }
    print(json.dumps(env), flush=True)
    results = []
    for key in args.models.split(","):
        name = MODELS[key.strip()]
        spec = find_spec(name)
        assert spec is not None
        path = resolve_model_path(name)
        for threads in thread_counts:
            row = {"model": name, "quant": spec.quantization} | bench_one(
                path, threads, args.prompt_words, args.decode, args.repeats
            )
            print(json.dumps(row), flush=True)
            results.append(row)
            if args.json:  # written after every row, so a run cut short keeps what it measured
                args.json.write_text(json.dumps({"env": env, "results": results}, indent=2))
    env["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps({"loadavg_end": env["loadavg_end"]}))
    if args.json:
        args.json.write_text(json.dumps({"env": env, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
