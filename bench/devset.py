"""Score kowalski-node's RLM loop and the bare model on the development set.

The items (bench/_devset_items.py) are generated from seeds, each with one exact answer:
needle-in-a-haystack at several lengths, counting in logs, aggregation over CSV, and
OOLONG-style labelling and counting. 8 are for tuning prompts and guards ("dev"), 4 are
held out and only reported.

All modes use the same backend and model. The RLM mode runs `run_rlm` with the node's
own settings (the sandboxed REPL, the backend's default limits). The bare mode asks the
model once, with the context cut to what fits its window, for the value only. The rlms
mode runs the reference library (`rlms`, pinned below) on the same llama.cpp server:
its own prompts and loop, greedy, with the same iteration and time limits. It lives in
its own virtual environment, bench/.rlms-venv, made on first use (pip, about 2 minutes);
see bench/_rlms_driver.py.

    nice -n 10 python bench/devset.py --split dev          # tune on these
    nice -n 10 python bench/devset.py --split heldout      # report only
    python bench/devset.py --split all --json out.json
    python bench/devset.py --split all --modes rlms     # the reference, same model

Needs the model pulled (`kowalski-node models pull qwen2.5-coder-0.5b-instruct`); without
it the JSON says so and nothing runs. Progress (one line per item and mode) goes to
stderr; stdout gets one JSON object: the scores per mode and split with engine, model and
threads, and every row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _devset_items import Item, is_correct, items

BARE_SYSTEM = "Answer the question about the text. Reply with the value only, no explanation."
RLMS_REQUIREMENT = "rlms==0.1.3"  # the reference release the compatibility work follows
RLMS_VENV = Path(__file__).resolve().parent / ".rlms-venv"
RLMS_DRIVER = Path(__file__).resolve().parent / "_rlms_driver.py"


def rlms_python(venv: Path) -> Path:
    """The reference library's interpreter, installing it into `venv` on first use."""
    python = venv / "bin" / "python"
    if python.exists():
        return python
    print(f"installing {RLMS_REQUIREMENT} into {venv} (first use)", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", RLMS_REQUIREMENT], check=True, timeout=900
    )
    return python


def run_reference(
    python: Path,
    item: Item,
    endpoint: tuple[str, str],
    limits: tuple[int, float, int],
) -> dict[str, Any]:
    """One item through the reference `rlms` (a child process in its own venv)."""
    base_url, api_key = endpoint
    max_iterations, budget, max_tokens = limits
    job = {
        "context": item.context, "query": item.query, "base_url": base_url,
        "api_key": api_key, "model": "local", "max_iterations": max_iterations,
        "max_timeout": budget, "max_tokens": max_tokens,
    }  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "PYTHON"))}
    done = subprocess.run(
        [str(python), str(RLMS_DRIVER)], input=json.dumps(job), capture_output=True,
        text=True, timeout=budget + 120, env=env,
    )  # fmt: skip
    if done.returncode != 0 or not done.stdout.strip():
        return {"answer": "", "error": f"driver exit {done.returncode}: {done.stderr[-300:]}"}
    return dict(json.loads(done.stdout))


def bare_prompt(item: Item, max_chars: int) -> tuple[str, bool]:
    """The bare model's prompt: as much of the context as its window holds, then the query."""
    context = item.context
    cut = len(context) > max_chars
    if cut:
        context = context[:max_chars]
    note = " (cut to fit the model's window)" if cut else ""
    return f"Text{note}:\n{context}\n\nQuestion: {item.query}\nAnswer:", cut


async def run_all(args: argparse.Namespace) -> dict[str, Any]:
    from kowalski_node.api import open_sandbox_repl, rlm_config_from
    from kowalski_node.config import load_settings
    from kowalski_node.llm.base import ChatMessage, LlmRequest
    from kowalski_node.llm.factory import make_backends
    from kowalski_node.runtime.rlm_runner import run_rlm

    overrides: dict[str, Any] = {"llm.backend": args.backend, "llm.model": args.model}
    if args.max_iterations:
        overrides["rlm.max_iterations"] = args.max_iterations
    if args.time_budget:
        overrides["rlm.time_budget_s"] = args.time_budget
    settings = load_settings(overrides=overrides)
    backends = make_backends(settings)
    config = rlm_config_from(settings, backends)
    threads = getattr(backends.root, "threads", None)
    window = settings.llm.llamacpp_context_tokens // max(1, settings.llm.llamacpp_parallel)
    # Qwen's tokenizer splits digits one by one: logs and CSVs run near 2 characters per
    # token, so 2 per token keeps the prompt inside the window (room left for the answer).
    bare_chars = max(1000, (window - 300) * 2)
    selected = [
        i for i in items(None if args.split == "all" else args.split)
        if not args.only or any(name in i.name for name in args.only)
    ]  # fmt: skip
    rows: list[dict[str, Any]] = []
    repl = await open_sandbox_repl(settings) if "rlm" in args.modes else None
    reference: tuple[Path, tuple[str, str]] | None = None
    if "rlms" in args.modes:
        reference = (rlms_python(args.rlms_venv), _endpoint(backends.root))
    try:
        for item in selected:
            for mode in args.modes:
                started = time.perf_counter()
                error = None
                answer = ""
                detail: dict[str, Any] = {}
                try:
                    if mode == "rlm":
                        assert repl is not None
                        result = await run_rlm(
                            item.query, item.context, root=backends.root, sub=backends.sub,
                            repl=repl, config=config, task_id=f"devset-{item.name}",
                            trajectory_dir=args.trajectories,
                        )  # fmt: skip
                        answer = result.content
                        detail = {
                            "stop_reason": result.stop_reason, "final_via": result.final_via,
                            "iterations": result.iterations, "blocks": len(result.blocks),
                            "tokens_in": result.tokens_in, "tokens_out": result.tokens_out,
                        }  # fmt: skip
                    elif mode == "rlms":
                        assert reference is not None
                        got = await trio.to_thread.run_sync(
                            run_reference, reference[0], item, reference[1],
                            (config.max_iterations, config.time_budget_s, config.max_tokens),
                        )  # fmt: skip
                        answer, error = str(got.get("answer") or ""), got.get("error")
                        detail = {
                            "iterations": got.get("iterations"),
                            "rlms_version": got.get("rlms_version"),
                        }
                    else:
                        prompt, cut = bare_prompt(item, bare_chars)
                        request = LlmRequest(
                            messages=(ChatMessage("system", BARE_SYSTEM), ChatMessage("user", prompt)),
                            model=backends.root_model, max_tokens=32, temperature=0.0,
                            task_id=f"bare-{item.name}", purpose="root",
                        )  # fmt: skip
                        response = await backends.root.complete(request)
                        answer = response.text.strip()
                        detail = {"context_cut": cut, "tokens_in": response.tokens_in}
                except Exception as exc:  # one failing item must not end the benchmark
                    error = f"{type(exc).__name__}: {exc}"
                seconds = time.perf_counter() - started
                ok = is_correct(answer, item.answer)
                row = {
                    "item": item.name, "family": item.family, "split": item.split, "mode": mode,
                    "chars": item.chars, "expected": item.answer, "answer": answer[:200],
                    "correct": ok, "seconds": round(seconds, 1), "error": error, **detail,
                }  # fmt: skip
                rows.append(row)
                mark = "ok " if ok else "BAD"
                print(
                    f"{mark} {mode:4} {item.name:22} {seconds:6.1f}s expected={item.answer!r} "
                    f"got={answer[:60]!r}" + (f" error={error[:80]}" if error else ""),
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        if repl is not None:
            await repl.aclose()
        await backends.aclose()
    summary: dict[str, Any] = {
        "backend": args.backend, "model": args.model, "threads": threads,
        "window_tokens": window, "bare_context_chars": bare_chars,
        "max_iterations": config.max_iterations, "time_budget_s": config.time_budget_s,
    }  # fmt: skip
    for mode in args.modes:
        for split in sorted({r["split"] for r in rows}):
            mine = [r for r in rows if r["mode"] == mode and r["split"] == split]
            summary[f"{mode}/{split}"] = {
                "correct": sum(r["correct"] for r in mine), "of": len(mine),
                "mean_s": round(sum(r["seconds"] for r in mine) / max(1, len(mine)), 1),
            }  # fmt: skip
    return {"summary": summary, "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=("dev", "heldout", "all"), default="dev")
    parser.add_argument(
        "--modes", nargs="+", choices=("rlm", "bare", "rlms"), default=["rlm", "bare"]
    )
    parser.add_argument("--rlms-venv", type=Path, default=RLMS_VENV, help="the reference's venv")
    parser.add_argument("--only", nargs="*", help="item names containing any of these")
    parser.add_argument("--backend", default="llamacpp")
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--max-iterations", type=int)
    parser.add_argument("--time-budget", type=float)
    parser.add_argument("--trajectories", type=Path, help="where RLM trajectories go")
    parser.add_argument("--json", type=Path, help="write the rows and summary here")
    parser.add_argument("--list", action="store_true", help="list the items and exit")
    args = parser.parse_args()
    if args.list:
        for item in items():
            print(
                f"{item.split:8} {item.name:20} {item.chars:7,} chars  {item.answer!r:14} {item.query}"
            )
        return 0
    missing = _missing_model(args.backend, args.model)
    if missing:
        print(json.dumps({"skipped": missing}))
        return 0
    report = trio.run(run_all, args)
    print(json.dumps(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return 0


def _endpoint(root: Any) -> tuple[str, str]:
    """The llama.cpp server the root backend uses: its loopback URL and key."""
    from kowalski_node.llm.llamacpp_backend import LlamaCppBackend, load_shared

    if not isinstance(root, LlamaCppBackend):
        raise SystemExit("--modes rlms needs --backend llamacpp (the same server for both)")
    loaded = load_shared(root.server_config())
    return str(loaded.server.listening_address).rstrip("/") + "/v1", loaded.api_key


def _missing_model(backend: str, model: str) -> str | None:
    if backend not in ("llamacpp", "builtin"):
        return None
    from kowalski_node.config import load_settings
    from kowalski_node.errors import ModelNotFound
    from kowalski_node.llm.models import resolve_model_path

    try:
        resolve_model_path(model, load_settings().paths.models_dir)
    except ModelNotFound as exc:
        return f"{exc} (run `kowalski-node models pull {model}`)"
    return None


if __name__ == "__main__":
    raise SystemExit(main())
