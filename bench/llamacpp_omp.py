"""Oversubscribed llama.cpp threads with libgomp's default wait policy and with PASSIVE.

    python bench/llamacpp_omp.py --threads 1,2 --model smollm2-135m-instruct

Each (policy, threads) pair runs in a fresh process, since libgomp reads OMP_WAIT_POLICY
when it loads, and decodes --tokens tokens three times (decode tok/s per run). A pair that
does not finish within --timeout seconds is reported as slower than the rate that would
have finished. "default" is libgomp's own policy (threads spin a while before sleeping);
the backend sets PASSIVE unless the environment already names a policy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, os, sys, threading
import kowalski_node.llm.llamacpp_backend as lcpp
from kowalski_node.llm.base import ChatMessage, LlmRequest
from kowalski_node.llm.models import resolve_model_path
model, threads, tokens, policy = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
os.environ.pop("OMP_WAIT_POLICY", None)
lcpp.OMP_WAIT_POLICY_DEFAULT = "" if policy == "default" else policy
config = lcpp.ServerConfig(
    path=resolve_model_path(model), threads=threads, context_tokens=2048, parallel=1
)
server = lcpp.start_server(config)
rates = []
for _ in range(3):
    request = LlmRequest((ChatMessage("user", "Tell me about the sea."),), max_tokens=tokens)
    payload = lcpp.build_payload(request)
    payload["ignore_eos"] = True
    out = lcpp.run_completion(server, payload, threading.Event())
    rates.append(round(out.tokens_out / out.decode_s, 1))
print(json.dumps({"policy_seen": os.environ.get("OMP_WAIT_POLICY"), "rates": rates}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    print(json.dumps({"loadavg_start": [round(x, 2) for x in os.getloadavg()]}), flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for threads in [int(t) for t in args.threads.split(",")]:
        for policy in ("default", "PASSIVE"):
            cmd = [sys.executable, "-c", CHILD, args.model, str(threads), str(args.tokens), policy]
            row: dict[str, object] = {"threads": threads, "omp_wait_policy": policy}
            try:
                done = subprocess.run(
                    cmd, env=env, capture_output=True, text=True, timeout=args.timeout, check=True
                )
                row |= json.loads(done.stdout.strip().splitlines()[-1])
            except subprocess.TimeoutExpired:
                row["rates"] = f"< {args.tokens * 3 / args.timeout:.1f} tok/s (timed out)"
            print(json.dumps(row), flush=True)
    print(json.dumps({"loadavg_end": [round(x, 2) for x in os.getloadavg()]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
