"""Run one development-set item through the reference `rlms` library (bench/devset.py).

Runs inside bench/.rlms-venv (its own virtual environment: rlms pins openai>=2.14,
anthropic, google-genai and portkey, none of which kowalski-node needs). Reads one JSON
object on stdin and writes one on stdout, so the two environments share nothing but text:

    in:  {"context", "query", "base_url", "api_key", "model", "max_iterations", "max_timeout",
          "max_tokens"}
    out: {"answer", "seconds", "error", "iterations", "rlms_version"}

rlms runs the model's code with `exec` in this process (its "local" environment, no
sandbox). That is acceptable here only because the contexts are the bench's own
generated text.

One adaptation, and only one. When rlms runs out of turns it asks for a default answer
(`_default_answer`): it appends its request ("Please provide a final answer ...") to the
history as an *assistant* message and calls the model. OpenAI's API answers that with a
new assistant message. llama.cpp instead continues a trailing assistant message as a
prefill (it returns the request text itself, and the model usually ends there), and
refuses a list that ends in two assistant messages (HTTP 400, when the last turn wrote no
code). So the driver sends a trailing assistant message as a user message; nothing else
rlms sends ends in one, and nothing else is changed.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from importlib.metadata import version
from typing import Any


def final_request_as_user(messages: Any) -> Any:
    """`messages` with rlms's trailing assistant message sent as a user message."""
    if isinstance(messages, list) and messages and messages[-1].get("role") == "assistant":
        return [*messages[:-1], {**messages[-1], "role": "user"}]
    return messages


def patch_client() -> None:
    from rlm.clients.openai import OpenAIClient

    plain, asynchronous = OpenAIClient.completion, OpenAIClient.acompletion

    def completion(self: Any, prompt: Any, model: str | None = None) -> str:
        return plain(self, final_request_as_user(prompt), model)

    async def acompletion(self: Any, prompt: Any, model: str | None = None) -> str:
        return await asynchronous(self, final_request_as_user(prompt), model)

    OpenAIClient.completion = completion
    OpenAIClient.acompletion = acompletion


def main() -> int:
    job: dict[str, Any] = json.load(sys.stdin)
    from rlm import RLM

    patch_client()

    started = time.perf_counter()
    out: dict[str, Any] = {"answer": "", "error": None, "iterations": None}
    out["rlms_version"] = version("rlms")
    chatter = io.StringIO()  # rlms prints; stdout must carry only our JSON
    try:
        with contextlib.redirect_stdout(chatter):
            rlm = RLM(
                backend="openai",
                backend_kwargs={
                    "model_name": job["model"],
                    "base_url": job["base_url"],
                    "api_key": job["api_key"],
                },
                environment="local",
                max_iterations=int(job["max_iterations"]),
                max_timeout=float(job["max_timeout"]),
                # greedy, and the same per-reply token cap as the kowalski-node run (rlms
                # sends max_tokens as max_completion_tokens; n_predict is llama.cpp's own)
                sampling_args={
                    "temperature": 0.0,
                    "max_tokens": int(job["max_tokens"]),
                    "extra_body": {"n_predict": int(job["max_tokens"])},
                },
            )
            result = rlm.completion(prompt=job["context"], root_prompt=job["query"])
        out["answer"] = str(result.response or "")
        out["error"] = result.error
        meta = result.metadata or {}
        iterations = meta.get("iterations") if isinstance(meta, dict) else None
        if isinstance(iterations, list):
            out["iterations"] = len(iterations)
    except Exception as exc:  # one item's failure is a row, not a crash
        out["error"] = f"{type(exc).__name__}: {exc}"[:500]
    out["seconds"] = round(time.perf_counter() - started, 1)
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
