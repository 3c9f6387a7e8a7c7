"""Pipelined inference on real `kowalski-node start` processes on 127.0.0.1.

    nice -n 10 python bench/pipeline.py [--trials 3] [--tokens 64] [--long-prompt 1000]

Prints one JSON object:
- decode: greedy decode tok/s and time to first token through POST /v1/generate for one
  local stage (the model fits: `single`), a 2-stage and a 3-stage pipeline over 3 node
  processes (median of --trials, configurations interleaved), and the ratio to single;
- decode.<config>.step_overhead_ms / hop_overhead_ms: per decode step, the leader's wall
  time minus the stages' own compute (reported by each stage in its reply): what the
  hops cost (messages, codec, network, thread hand-offs), and that per stage;
- per_hop_ms_from_decode_rates: extra decode time per token per added stage boundary
  ((t2 - t1) and (t3 - t1) / 2, from the medians; noisy on a shared machine);
- long_prompt: time to first token for a --long-prompt-token prompt, 1 vs 3 stages
  (each hop carries the whole prompt's hidden states in one message);
- activation_bytes: the size of one hop's message for a decode step and for the prompt;
- failover (exact replay, the default) and failover_chunked_replay (`exact_replay: false`):
  with spare nodes up, a non-leader stage SIGKILLed mid-generation: the replay time
  (re-plan, load, replay of the prefix up to the next token, with its breakdown), whether
  the text equals the run without failure, and the number of failovers;
- engine_in_process: the plain `Engine` decode tok/s in this process, for reference.
The machine's load average is recorded: it is shared with other work.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from kowalski_node.testing.node_cluster import NodeCluster, NodeProc

PROMPT = "Count from one to forty, separated by commas."


def log(msg: str) -> None:
    sys.stderr.write(f"[pipeline] {msg}\n")
    sys.stderr.flush()


def generate(node: NodeProc, body: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    resp = httpx.post(node.api + "/v1/generate", json=body, timeout=timeout)
    if resp.status_code >= 400:
        raise RuntimeError(f"generate failed: {resp.status_code} {resp.text[:500]}")
    return dict(resp.json())


def body_for(
    tokens: int, sharding: str, stages: int | None, prompt: str = PROMPT
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "messages": [["user", prompt]],
        "max_tokens": tokens,
        "sharding": sharding,
    }
    if stages is not None:
        body["stages"] = stages
    return body


CONFIGS: dict[str, tuple[str, int | None]] = {
    "single": ("auto", None),
    "2-stage": ("pipeline", 2),
    "3-stage": ("pipeline", 3),
}


def failover_run(
    leader: NodeProc, nodes: list[NodeProc], tokens: int, exact: bool
) -> dict[str, Any]:
    """Kill a non-leader stage mid-generation; the replay time and whether the text held."""
    attempts: list[dict[str, Any]] = []
    fraction = 0.4
    for _ in range(3):
        base = generate(leader, body_for(tokens, "pipeline", 3))
        victim_id = next(s["peer"] for s in base["stages"] if s["peer"] != leader.peer_id)
        victim = next(n for n in nodes if n.peer_id == victim_id)
        t = base["timings"]
        produced = max(2, len(base["token_ids"]))  # the model may stop before `tokens`
        kill_at = fraction * (t["ttft_s"] + produced / max(0.1, t["decode_tok_s"]))
        result: dict[str, Any] = {}

        def run(into: dict[str, Any] = result) -> None:
            into.update(
                generate(leader, {**body_for(tokens, "pipeline", 3), "exact_replay": exact})
            )

        thread = threading.Thread(target=run)
        started = time.monotonic()
        thread.start()
        time.sleep(kill_at)
        victim.proc.kill()
        victim.proc.wait(30)
        killed_after = time.monotonic() - started
        thread.join(600)
        attempt = {
            "killed_after_s": round(killed_after, 2),
            "failovers": result.get("failovers"),
            "replay_s": [round(x, 3) for x in result.get("replays_s", [])],
            "same_text_as_without_failure": result.get("token_ids") == base["token_ids"],
            "tokens": len(base["token_ids"]),
            "stages_before": [f"{s['start']}-{s['end']}" for s in base["stages"]],
            "stages_after": [f"{s['start']}-{s['end']}" for s in result.get("stages", [])],
            "detail": result.get("failover_detail"),
        }
        attempts.append(attempt)
        log(f"failover attempt: {attempt}")
        if attempt["failovers"]:
            break
        fraction /= 2
        nodes = [n for n in nodes if n.alive()]
        if sum(1 for n in nodes if n.alive()) < 3:
            break
    return {"attempts": attempts, **attempts[-1]}


def engine_reference(tokens: int) -> float:
    from kowalski_node.llm.builtin import Engine, GenerationParams

    engine = Engine.load()
    result = engine.generate([("user", PROMPT)], GenerationParams(max_tokens=tokens))
    return round(result.tokens_out / result.decode_s, 2) if result.decode_s else 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--long-prompt", type=int, default=1000)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.trials, args.tokens, args.long_prompt = 1, 24, 300
    out: dict[str, Any] = {
        "host": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()},
        "settings": vars(args),
    }
    with tempfile.TemporaryDirectory(prefix="kw-pipe-") as tmp:
        env = {
            "KOWALSKI_HOME": os.environ.get(
                "KOWALSKI_HOME", str(Path.home() / ".cache/kowalski-node")
            )
        }
        with NodeCluster.as_a_user_would(
            Path(tmp),
            backend="builtin",
            env=env,
            extra_args=["--remote", "off"],
            measure_tokens="off",
        ) as cluster:
            nodes = cluster.start_mesh(["a", "b", "c"])
            cluster.wait_converged(timeout=60)
            leader = nodes[0]
            log("cluster up; warming every configuration (loads the stages)")
            reference: dict[str, list[int]] = {}
            for name, (sharding, stages) in CONFIGS.items():
                r = generate(leader, body_for(args.tokens, sharding, stages))
                reference[name] = r["token_ids"]
                if len(r["stages"]) != (stages or 1):
                    raise SystemExit(f"{name}: planned {len(r['stages'])} stages: {r['stages']}")
            out["same_tokens_all_configs"] = len({tuple(v) for v in reference.values()}) == 1
            samples: dict[str, dict[str, list[float]]] = {
                n: {
                    "decode_tok_s": [],
                    "ttft_s": [],
                    "ms_per_token": [],
                    "step_overhead_ms": [],
                    "hop_overhead_ms": [],
                }
                for n in CONFIGS
            }
            for trial in range(args.trials):
                for name, (sharding, stages) in CONFIGS.items():
                    r = generate(leader, body_for(args.tokens, sharding, stages))
                    t = r["timings"]
                    samples[name]["decode_tok_s"].append(t["decode_tok_s"])
                    samples[name]["ttft_s"].append(t["ttft_s"])
                    samples[name]["ms_per_token"].append(1000.0 / t["decode_tok_s"])
                    samples[name]["step_overhead_ms"].append(t["step_overhead_ms"])
                    samples[name]["hop_overhead_ms"].append(t["hop_overhead_ms"])
                    log(
                        f"trial {trial} {name}: {t['decode_tok_s']:.1f} tok/s ttft {t['ttft_s']:.3f}s"
                    )
            med = {
                n: {k: round(statistics.median(v), 3) for k, v in s.items()}
                for n, s in samples.items()
            }
            single = med["single"]["decode_tok_s"]
            for n in CONFIGS:
                med[n]["vs_single"] = round(med[n]["decode_tok_s"] / single, 3) if single else 0.0
            out["decode"] = med
            t1 = med["single"]["ms_per_token"]
            out["per_hop_ms_from_decode_rates"] = {
                "2-stage": round(med["2-stage"]["ms_per_token"] - t1, 2),
                "3-stage_per_boundary": round((med["3-stage"]["ms_per_token"] - t1) / 2, 2),
            }
            # a long prompt: one message per hop
            # "w<i>" words tokenize to about 3.7 tokens each with SmolLM2's BPE
            words = " ".join(f"w{i}" for i in range(max(1, round(args.long_prompt / 3.7))))
            long_body = body_for(1, "auto", None, prompt=words)
            first = generate(leader, long_body)
            n_prompt = first["tokens_in"]
            lp: dict[str, Any] = {"prompt_tokens": n_prompt}
            for name, (sharding, stages) in (
                ("single", CONFIGS["single"]),
                ("3-stage", CONFIGS["3-stage"]),
            ):
                r = generate(leader, {**body_for(1, sharding, stages, prompt=words)})
                lp[f"{name}_ttft_s"] = round(r["timings"]["ttft_s"], 3)
            out["long_prompt"] = lp
            out["activation_bytes"] = {
                "decode_step": 576 * 4,
                "prompt": n_prompt * 576 * 4,
                "note": "float32 rows of d_model=576 (SmolLM2), one msgpack bin per hop",
            }
            # failover: a 4th node joins as the spare, then a non-leader stage is SIGKILLed
            # at about 40 % of the time a run without failure takes (tried up to 3 times,
            # earlier each time, until the kill lands mid-generation)
            spares = [cluster.wait_ready(cluster.spawn(n, bootstrap=[leader.addr])) for n in "de"]
            cluster.wait_converged([*nodes, *spares], timeout=60)
            live = [*nodes, *spares]
            out["failover"] = failover_run(leader, live, args.tokens, exact=True)
            live = [n for n in live if n.alive()]
            out["failover_chunked_replay"] = failover_run(leader, live, args.tokens, exact=False)
    out["engine_in_process_decode_tok_s"] = engine_reference(args.tokens)
    out["host"]["loadavg_end"] = os.getloadavg()
    out["git"] = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
