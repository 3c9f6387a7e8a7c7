"""Benchmark the builtin engine against llama.cpp (the `xllamacpp` wheel) on the same GGUF.

    python bench/engine.py [--model default] [--model PATH_OR_NAME ...] [--threads 1]
                           [--decode-tokens 64] [--prompt-tokens 128] [--repeats 3]
                           [--skip-cold] [--rlm-turn-tokens 0]

Prints one JSON object with, for each model:
- load_s: cold (empty cache: read GGUF, build the int8 codes; the float32 matrices that
  prefill multiplies with are built on the first prefill: `cold_first_prefill_s`), warm
  (memory-mapped cache), and a warm `Engine.load` including the tokenizer;
- builtin: prefill and decode tok/s (median of repeats) with the default kernels
  ("quantized": int8 decode, float32 BLAS prefill) and with "float32" everywhere, and the
  decode through a 2-stage split [0, n/2) + [n/2, n) in one process;
- llama_cpp: llama.cpp's own prompt and decode tok/s (server timings) for the same prompt
  ids, the same number of greedy tokens (`ignore_eos`) and the same thread count, and
  whether its first greedy token equals the builtin one;
- ratio: builtin / llama.cpp for prefill and decode.
BLAS and llama.cpp both get `--threads` threads. The model must be pulled first (or given
as a GGUF path); nothing is downloaded here.
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
from kowalski_node.llm.models import display_name, resolve_model_path


def _timed_load(path: Path, models_dir: Path | None, use_cache: bool, prefill: bool) -> float:
    """Seconds to load the whole model (and, with `prefill`, run one 8-token prefill)."""
    started = time.perf_counter()
    model = LlamaModel(
        WeightStore(path, models_dir=models_dir, use_cache=use_cache), blas_threads=None
    )
    if prefill:
        model.forward(list(range(8)), None, 0)
    return time.perf_counter() - started


def measure_loads(path: Path, skip_cold: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not skip_cold:
        with tempfile.TemporaryDirectory(prefix="kowalski-bench-") as tmp:
            out["cold_s"] = round(_timed_load(path, Path(tmp), True, False), 3)
            out["cold_first_prefill_s"] = round(_timed_load(path, Path(tmp), True, True), 3)
            out["warm_s"] = round(_timed_load(path, Path(tmp), True, False), 3)
            out["warm_with_prefill_s"] = round(_timed_load(path, Path(tmp), True, True), 3)
    _timed_load(path, None, True, True)  # make sure the default cache exists
    out["warm_default_cache_s"] = round(_timed_load(path, None, True, False), 3)
    return out


def prompt_ids(engine: Engine, n: int) -> list[int]:
    text = "The quick brown fox jumps over the lazy dog. " * (n // 5 + 2)
    ids = engine.encode_chat([("user", text)])
    return ids[:n]


def bench_builtin(
    model: LlamaModel, ids: list[int], n_decode: int, repeats: int, split: int | None
) -> dict[str, Any]:
    n_layers = model.config.n_layers
    ranges = [(0, n_layers)] if split is None else [(0, split), (split, n_layers)]

    def forward(tokens: list[int], cache: Any, position: int) -> np.ndarray:
        h = model.embed(tokens)
        for a, b in ranges:
            h = model.run_layers(h, a, b, cache, position)
        float32 = len(tokens) > model.quant_max_rows  # as Engine does after a prefill
        return model.head(h[-1:], float32=float32)[0]

    warm = model.new_cache(capacity=len(ids) + 2)  # first use: page in, load compiled kernels
    forward([int(np.argmax(forward(ids, warm, 0)))], warm, len(ids))
    prefill, decode = [], []
    first = -1
    for _ in range(repeats):
        cache = model.new_cache(capacity=len(ids) + n_decode)
        started = time.perf_counter()
        logits = forward(ids, cache, 0)
        prefill.append(len(ids) / (time.perf_counter() - started))
        assert logits.dtype == np.float32
        first = int(np.argmax(logits))
        started = time.perf_counter()
        for pos in range(len(ids), len(ids) + n_decode):
            logits = forward([int(np.argmax(logits))], cache, pos)
        decode.append(n_decode / (time.perf_counter() - started))
    return {
        "kernels": model.kernels,
        "prefill_tok_s": round(statistics.median(prefill), 1),
        "decode_tok_s": round(statistics.median(decode), 1),
        "first_token": first,
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
    path: Path, ids: list[int], n_decode: int, repeats: int, threads: int
) -> dict[str, Any] | str:
    """llama.cpp's own timings (in-process server of the `xllamacpp` wheel, on loopback)."""
    try:
        import xllamacpp
    except ImportError:
        return "not installed (pip install xllamacpp)"
    import urllib.request

    try:
        params = xllamacpp.CommonParams()
        params.model.path = str(path)
        params.n_ctx = len(ids) + n_decode + 16
        params.n_parallel = 1
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
        params.no_extra_bufts = True  # the AMX repack path crashed here (design brief §3)
        params.warmup = False
        started = time.perf_counter()
        server = xllamacpp.Server(params)
        load_s = time.perf_counter() - started
        address = str(server.listening_address)
        prefill, decode = [], []
        first = -1
        for _ in range(repeats):
            body = {
                "prompt": ids,
                "n_predict": n_decode,
                "temperature": 0.0,
                "top_k": 1,
                "ignore_eos": True,
                "return_tokens": True,
                "cache_prompt": False,
            }
            request = urllib.request.Request(
                address + "/completion",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=600) as reply:
                result = json.loads(reply.read())
            timings = result["timings"]
            prefill.append(float(timings["prompt_per_second"]))
            decode.append(float(timings["predicted_per_second"]))
            first = int(result["tokens"][0])
        del server
        return {
            "version": xllamacpp.__version__,
            "load_s": round(load_s, 3),
            "threads": threads,
            "prefill_tok_s": round(statistics.median(prefill), 1),
            "decode_tok_s": round(statistics.median(decode), 1),
            "first_token": first,
        }
    except Exception as exc:  # report, don't crash the benchmark
        return f"error: {type(exc).__name__}: {exc}"


def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    path = resolve_model_path(name, args.models_dir)
    loads = measure_loads(path, args.skip_cold)
    started = time.perf_counter()
    engine = Engine.load(path, models_dir=args.models_dir, blas_threads=args.threads)
    loads["warm_engine_with_tokenizer_s"] = round(time.perf_counter() - started, 3)
    ids = prompt_ids(engine, args.prompt_tokens)
    model = engine.model
    results: dict[str, Any] = {
        "model": display_name(path, args.models_dir),
        "gguf": str(path),
        "architecture": model.config.architecture,
        "prompt_tokens": len(ids),
        "load_s": loads,
    }
    quantized = bench_builtin(model, ids, args.decode_tokens, args.repeats, None)
    halves = bench_builtin(model, ids, args.decode_tokens, args.repeats, model.config.n_layers // 2)
    float32_model = LlamaModel(model.store, blas_threads=None, kernels="float32")
    float32 = bench_builtin(float32_model, ids, args.decode_tokens, args.repeats, None)
    del float32_model
    results["builtin"] = {**quantized, "two_stage_split": halves, "float32_kernels": float32}
    llama = bench_llama_cpp(path, ids, args.decode_tokens, args.repeats, args.threads)
    results["llama_cpp"] = llama
    if isinstance(llama, dict):
        results["ratio_builtin_over_llama_cpp"] = {
            "prefill": round(quantized["prefill_tok_s"] / llama["prefill_tok_s"], 2),
            "decode": round(quantized["decode_tok_s"] / llama["decode_tok_s"], 2),
            "decode_float32_kernels": round(float32["decode_tok_s"] / llama["decode_tok_s"], 2),
            "same_first_token": quantized["first_token"] == llama["first_token"],
        }
    if args.rlm_turn_tokens:
        results["rlm_turns"] = bench_rlm_turns(engine, args.rlm_turn_tokens)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", action="append", help="registry name or GGUF path (repeatable; default: default)"
    )
    parser.add_argument("--models-dir", default=None)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--skip-cold", action="store_true", help="skip the cold-cache loads (write to a temp dir)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="BLAS threads and llama.cpp threads (same count)"
    )
    parser.add_argument(
        "--rlm-turn-tokens", type=int, default=0, help="tokens per RLM turn (0: skip)"
    )
    args = parser.parse_args(argv)
    apply_blas_threads(args.threads)
    report: dict[str, Any] = {
        "benchmark": "engine",
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_at_start": [round(x, 1) for x in os.getloadavg()],
            "python": platform.python_version(),
            "numpy": np.__version__,
            "platform": platform.platform(),
        },
        "threads": args.threads,
        "blas": blas_thread_info(),
        "decode_tokens": args.decode_tokens,
        "repeats": args.repeats,
        "models": [bench_model(name, args) for name in (args.model or ["default"])],
    }
    report["machine"]["load_average_at_end"] = [round(x, 1) for x in os.getloadavg()]
    report["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
