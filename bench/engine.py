"""Benchmark the builtin NumPy engine (and llama.cpp, when `llama_cpp` is importable).

    python bench/engine.py [--model default] [--decode-tokens 64] [--prompt-tokens 128]
                           [--repeats 3] [--skip-cold] [--blas-threads 1]
                           [--rlm-turn-tokens 128]

Prints one JSON object:
- load_s: cold (empty float32 cache: read GGUF, dequantise, write cache), warm (cache hit,
  memory-mapped), uncached (dequantise without writing a cache), and a warm `Engine.load`
  including the tokenizer;
- builtin: prefill and decode tok/s (median of repeats), also through a 2-stage split
  [0, n/2) + [n/2, n) in one process (the pipeline's arithmetic without the network);
- rlm_turns: two root turns of an RLM conversation through `BuiltinBackend.complete` under
  trio, with the real RLM system prompt (what `kowalski-node run` does): turn 1 prefills the
  whole prompt, turn 2 reuses its keys from the prefix cache and prefills only the new
  message (`reused_tokens`);
- blas: the BLAS library and the thread count used (`--blas-threads`, default 1 as in the
  engine; 0 = one per core);
- llama_cpp: the same figures from llama-cpp-python on the same GGUF, or "not installed".
The model must be pulled first (`kowalski-node models pull`); nothing is downloaded here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from kowalski_node.llm.builtin import BuiltinBackend, Engine, LlamaModel
from kowalski_node.llm.builtin.threads import apply_blas_threads, blas_thread_info
from kowalski_node.llm.builtin.weights import WeightStore
from kowalski_node.llm.models import resolve_model_path


def _timed_load(path: Path, models_dir: Path | None, use_cache: bool) -> float:
    started = time.perf_counter()
    LlamaModel(WeightStore(path, models_dir=models_dir, use_cache=use_cache), blas_threads=None)
    return time.perf_counter() - started


def measure_loads(path: Path, skip_cold: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not skip_cold:
        with tempfile.TemporaryDirectory(prefix="kowalski-bench-") as tmp:
            out["cold_s"] = round(_timed_load(path, Path(tmp), True), 3)
            out["warm_s"] = round(_timed_load(path, Path(tmp), True), 3)
        out["uncached_s"] = round(_timed_load(path, None, False), 3)
    _timed_load(path, None, True)  # make sure the default cache exists
    out["warm_default_cache_s"] = round(_timed_load(path, None, True), 3)
    return out


def prompt_ids(engine: Engine, n: int) -> list[int]:
    text = "The quick brown fox jumps over the lazy dog. " * (n // 5 + 2)
    ids = engine.encode_chat([("user", text)])
    return ids[:n]


def bench_builtin(
    model: LlamaModel, ids: list[int], n_decode: int, repeats: int, split: int | None
) -> dict[str, float]:
    n_layers = model.config.n_layers
    ranges = [(0, n_layers)] if split is None else [(0, split), (split, n_layers)]

    def forward(tokens: list[int], cache: Any, position: int) -> np.ndarray:
        h = model.embed(tokens)
        for a, b in ranges:
            h = model.run_layers(h, a, b, cache, position)
        return model.head(h[-1:])[0]

    prefill, decode = [], []
    for _ in range(repeats):
        cache = model.new_cache(capacity=len(ids) + n_decode)
        started = time.perf_counter()
        logits = forward(ids, cache, 0)
        prefill.append(len(ids) / (time.perf_counter() - started))
        assert logits.dtype == np.float32
        started = time.perf_counter()
        for pos in range(len(ids), len(ids) + n_decode):
            logits = forward([int(np.argmax(logits))], cache, pos)
        decode.append(n_decode / (time.perf_counter() - started))
    return {
        "prefill_tok_s": round(statistics.median(prefill), 1),
        "decode_tok_s": round(statistics.median(decode), 1),
    }


def bench_rlm_turns(engine: Engine, max_tokens: int) -> dict[str, Any]:
    """Two root turns of a real RLM conversation through the async backend."""
    import trio

    from kowalski_node.llm.base import ChatMessage, LlmRequest
    from kowalski_node.rlm.prompts import context_metadata, first_user_message, system_prompt

    context = "2024-05-01 INFO request ok\n" * 400
    meta = context_metadata(context)
    messages = [
        ChatMessage("system", system_prompt(meta, max_output_chars=8000, sub_chars=8000)),
        ChatMessage("user", first_user_message("How many lines are there?", meta)),
    ]
    backend = BuiltinBackend(engine=engine, blas_threads=None)
    turns: list[dict[str, Any]] = []

    async def run() -> None:
        for turn in range(2):
            request = LlmRequest(
                messages=tuple(messages), max_tokens=max_tokens, purpose="root", sequence=turn
            )
            started = time.perf_counter()
            response = await backend.complete(request)
            extra = response.extra
            turns.append(
                {
                    "tokens_in": response.tokens_in,
                    "reused_tokens": extra.get("reused_tokens"),
                    "tokens_out": response.tokens_out,
                    "prefill_s": extra.get("prefill_s"),
                    "decode_tok_s": extra.get("decode_tok_s"),
                    "wall_s": round(time.perf_counter() - started, 2),
                }
            )
            messages.append(ChatMessage("assistant", response.text))
            messages.append(ChatMessage("user", "Block 1 output:\n400\n\nGo on."))

    trio.run(run)
    return {"max_tokens": max_tokens, "turns": turns}


def bench_llama_cpp(
    path: Path, ids: list[int], n_decode: int, repeats: int, our_top: int
) -> dict[str, Any] | str:
    try:
        import llama_cpp
        from llama_cpp import Llama
    except ImportError:
        return "not installed"
    try:
        started = time.perf_counter()
        llm = Llama(
            model_path=str(path),
            n_ctx=len(ids) + n_decode + 8,
            n_threads=os.cpu_count(),
            verbose=False,
        )
        load_s = time.perf_counter() - started
        n_vocab = llm.n_vocab()

        def last_logits() -> np.ndarray:
            # llm.scores is only filled with logits_all=True (which would also slow the
            # prefill down); read the last position's logits from the context instead.
            ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
            return np.ctypeslib.as_array(ptr, shape=(n_vocab,))

        prefill, decode = [], []
        top = -1
        for _ in range(repeats):
            llm.reset()
            started = time.perf_counter()
            llm.eval(ids)
            prefill.append(len(ids) / (time.perf_counter() - started))
            top = int(np.argmax(last_logits()))
            token = top
            started = time.perf_counter()
            for _ in range(n_decode):
                llm.eval([token])
                token = int(np.argmax(last_logits()))
            decode.append(n_decode / (time.perf_counter() - started))
        return {
            "load_s": round(load_s, 3),
            "threads": os.cpu_count(),
            "prefill_tok_s": round(statistics.median(prefill), 1),
            "decode_tok_s": round(statistics.median(decode), 1),
            "top_token_after_prompt": top,
            "same_top_token_as_builtin": top == our_top,
        }
    except Exception as exc:  # report, don't crash the benchmark
        return f"error: {type(exc).__name__}: {exc}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="registry name or GGUF path")
    parser.add_argument("--models-dir", default=None)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--skip-cold",
        action="store_true",
        help="skip the cold-cache load (writes ~540 MB to a temp dir)",
    )
    parser.add_argument(
        "--blas-threads", type=int, default=1, help="BLAS threads (0 = one per core)"
    )
    parser.add_argument(
        "--rlm-turn-tokens", type=int, default=128, help="tokens per RLM turn (0: skip)"
    )
    args = parser.parse_args(argv)
    apply_blas_threads(args.blas_threads)

    path = resolve_model_path(args.model, args.models_dir)
    loads = measure_loads(path, args.skip_cold)
    started = time.perf_counter()
    engine = Engine.load(path, models_dir=args.models_dir, blas_threads=args.blas_threads)
    loads["warm_engine_with_tokenizer_s"] = round(time.perf_counter() - started, 3)
    ids = prompt_ids(engine, args.prompt_tokens)
    model = engine.model
    forward_top = int(np.argmax(model.forward(ids, None, 0)[-1]))
    single = bench_builtin(model, ids, args.decode_tokens, args.repeats, None)
    halves = bench_builtin(model, ids, args.decode_tokens, args.repeats, model.config.n_layers // 2)
    report = {
        "benchmark": "engine",
        "model": engine.name,
        "gguf": str(path),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "platform": platform.platform(),
        },
        "prompt_tokens": len(ids),
        "decode_tokens": args.decode_tokens,
        "repeats": args.repeats,
        "load_s": loads,
        "blas": blas_thread_info(),
        "builtin": {**single, "two_stage_split": halves},
        "rlm_turns": bench_rlm_turns(engine, args.rlm_turn_tokens)
        if args.rlm_turn_tokens
        else None,
        "llama_cpp": bench_llama_cpp(path, ids, args.decode_tokens, args.repeats, forward_top),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
