"""Submitting large contexts over HTTP: event-loop stalls, time to acknowledge, RSS growth.

    PYTHONPATH=$PWD .venv/bin/python bench/large_context.py [--sizes 20,50] [--nodes 3]

Starts real `kowalski-node start` processes on 127.0.0.1 (scripted backend: the task
reads `len(context)` in the REPL and answers it), submits one task per size (MB) at the
first node and waits for the answer. For each size it reports: the time until the HTTP
answer (the context is on the replicas by then), the time until the result, the owner's
RSS growth, and the longest event-loop lag any node logged while the task was submitted
and ran (the lag probe logs every wake-up >= 100 ms late as `event=loop_lag ms=N`; none
logged means every stall was under 100 ms).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kowalski_node.testing.node_cluster import NodeCluster, NodeProc, write_script

TURNS = ["```repl\nn = len(context)\nprint(n)\n```", "FINAL_VAR(n)"]
LAG_RE = re.compile(r"^ts=(\d+\.\d+) .*event=(loop_lag|slow_step) (?:task=(\S+) )?ms=(\d+)")


def lags_between(nodes: list[NodeProc], start: float, end: float) -> list[tuple[str, str, int]]:
    """(node, what, ms) for every lag/slow step a node logged in [start, end] (wall time)."""
    out = []
    for node in nodes:
        for line in node.log_path.read_text(errors="replace").splitlines():
            m = LAG_RE.match(line)
            if m and start <= float(m.group(1)) <= end:
                out.append((node.name, m.group(3) or m.group(2), int(m.group(4))))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="20,50", help="context sizes in MB, comma-separated")
    parser.add_argument("--nodes", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        script = write_script(tmp_path / "script.json", TURNS * 20)
        with NodeCluster(tmp_path) as cluster:
            nodes = cluster.start_mesh(args.nodes, backend=f"scripted:{script}")
            cluster.wait_converged(nodes, timeout=60)
            owner = nodes[0]
            time.sleep(2)
            print("| context | HTTP answer | result | owner RSS growth | worst logged lag |")
            print("|---|---|---|---|---|")
            for mb in (int(s) for s in args.sizes.split(",")):
                size = mb * 1_000_000
                context = ("kowalski large context line\n" * (size // 28 + 1))[:size]
                rss0 = psutil.Process(owner.pid).memory_info().rss
                wall0, t0 = time.time(), time.monotonic()
                acc = owner.post(
                    "/v1/tasks", {"prompt": f"length {mb}", "context": context}, timeout=600
                )
                acked = time.monotonic() - t0
                del context
                done = owner.wait_task(acc["task_id"], timeout=600)
                finished = time.monotonic() - t0
                rss1 = psutil.Process(owner.pid).memory_info().rss
                assert done["status"] == "done" and done["result"]["content"] == str(size), done
                time.sleep(1.5)
                lags = lags_between(nodes, wall0, time.time())
                worst = max(lags, key=lambda x: x[2]) if lags else None
                print(
                    f"| {mb} MB | {acked:.2f} s | {finished:.2f} s | {(rss1 - rss0) / 1e6:.0f} MB | "
                    + (f"{worst[2]} ms ({worst[0]}: {worst[1]})" if worst else "< 100 ms")
                    + " |",
                    flush=True,
                )
                for name, what, ms in sorted(lags, key=lambda x: -x[2])[:6]:
                    print(f"    {name} {what} {ms} ms")


if __name__ == "__main__":
    main()
