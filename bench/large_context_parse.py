"""Event-loop lag while a worker thread parses, hashes and stores a 20 / 50 MB task body.

    PYTHONPATH=$PWD .venv/bin/python bench/large_context_parse.py

Compares pydantic's one-call parse of the whole body (what the HTTP API did) with the
sliced parse it does now (`parse_large_submission`), then the fingerprint and the file
write of the context; each runs in a worker thread while a lag probe sleeps 5 ms at a
time on the trio loop and records how late it wakes (a long C call in the thread holds
the GIL, and so the loop).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import trio

from kowalski_node.adapters.http.app import parse_large_submission
from kowalski_node.runtime.context_blob import write_context_file
from kowalski_node.runtime.loopwatch import LoopLagProbe
from kowalski_node.runtime.service import TaskSubmission


async def measure(name: str, fn: Any, *a: Any) -> Any:
    probe = LoopLagProbe(0.005)
    async with trio.open_nursery() as n:
        n.start_soon(probe.run)
        await trio.sleep(0.05)
        t = time.perf_counter()
        r = await trio.to_thread.run_sync(fn, *a)
        d = time.perf_counter() - t
        await trio.sleep(0.02)
        n.cancel_scope.cancel()
    print(f"{name}: took {d * 1000:.0f} ms, worst loop lag {probe.worst_ms:.0f} ms", flush=True)
    return r


async def main() -> None:
    for mb in (20, 50):
        ctx = ("kowalski large context line é\n" * (mb * 1_000_000 // 30 + 1))[: mb * 1_000_000]
        body = json.dumps({"prompt": "p", "context": ctx}).encode()
        del ctx
        await measure(f"{mb} MB pydantic parse (before)", TaskSubmission.model_validate_json, body)
        sub = await measure(f"{mb} MB sliced parse (now)", parse_large_submission, body)
        await measure(f"{mb} MB fingerprint", sub.fingerprint)
        await measure(f"{mb} MB write file", write_context_file, sub.context, Path("/tmp/lt_ctx"))


if __name__ == "__main__":
    trio.run(main)
