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

One adaptation, and only one: llama.cpp's chat endpoint refuses a message list that ends
in two assistant messages (HTTP 400), which rlms 0.1.3 sends when it asks for a default
answer after its last turn wrote no code (`_default_answer` appends an assistant message
to a history that already ends in one). OpenAI's API accepts that list, so the driver
joins consecutive messages of one role before they are sent, instead of letting every
such item end in an error.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from importlib.metadata import version
from typing import Any


def join_same_role(messages: Any) -> Any:
    """Consecutive messages of one role as one message (see the module docstring)."""
    if not isinstance(messages, list):
        return messages
    joined: list[dict[str, Any]] = []
    for message in messages:
        last = joined[-1] if joined else None
        if last is not None and last.get("role") == message.get("role"):
            last["content"] = f"{last.get('content') or ''}\n\n{message.get('content') or ''}"
        else:
            joined.append(dict(message))
    return joined


def patch_client() -> None:
    from rlm.clients.openai import OpenAIClient

    plain, asynchronous = OpenAIClient.completion, OpenAIClient.acompletion

    def completion(self: Any, prompt: Any, model: str | None = None) -> str:
        return plain(self, join_same_role(prompt), model)

    async def acompletion(self: Any, prompt: Any, model: str | None = None) -> str:
        return await asynchronous(self, join_same_role(prompt), model)

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
