"""Measure discovery and failure detection with real `kowalski-node start` processes.

    python -m tests.node_measure --nodes 3 --trials 5

Discovery: node 0 starts; the others start together, bootstrapping through it. For each
later node, the time from its `event=node_started` log line to its `event=member_up` line
for the last other member (node start → all peers known; process start-up, ~1 s of
imports, is reported separately).

Detection: one node (not the bootstrap node) is SIGKILLed, or SIGSTOPped; for each
survivor, the time from the signal to its `event=member_down` line for that peer.

All timestamps are wall-clock values from the same host (log `ts=` fields).
"""

from __future__ import annotations

import argparse
import re
import signal
import statistics
import tempfile
import time
from pathlib import Path

from kowalski_node.testing.node_cluster import NodeCluster, NodeProc

_TS = re.compile(r"^ts=(\d+\.\d+) ")


def _events(node: NodeProc, event: str) -> list[tuple[float, str]]:
    out = []
    for line in node.log_path.read_text(errors="replace").splitlines():
        if f"event={event} " not in line and not line.endswith(f"event={event}"):
            continue
        m = _TS.match(line)
        if m:
            out.append((float(m.group(1)), line))
    return out


def _last_start(node: NodeProc) -> float:
    return _events(node, "node_started")[-1][0]


def discovery_ms(cluster: NodeCluster, nodes: list[NodeProc]) -> list[float]:
    ids = {n.peer_id for n in nodes}
    out = []
    for node in nodes[1:]:
        started = _last_start(node)
        seen: dict[str, float] = {}
        for ts, line in _events(node, "member_up"):
            if ts < started:
                continue
            m = re.search(r"peer=(\S+)", line)
            if m and m.group(1) in ids:
                seen.setdefault(m.group(1), ts)
        others = ids - {node.peer_id}
        if others <= set(seen):
            out.append((max(seen[p] for p in others) - started) * 1000.0)
    return out


def detection_ms(
    survivors: list[NodeProc], victim: NodeProc, at: float, timeout: float = 10.0
) -> list[float]:
    deadline = time.time() + timeout
    found: dict[str, float] = {}
    while time.time() < deadline and len(found) < len(survivors):
        for node in survivors:
            if node.name in found:
                continue
            for ts, line in _events(node, "member_down"):
                if ts >= at and f"peer={victim.peer_id}" in line:
                    found[node.name] = (ts - at) * 1000.0
                    break
        time.sleep(0.05)
    return list(found.values())


def _summary(name: str, values: list[float]) -> str:
    if not values:
        return f"{name}: no samples"
    values = sorted(values)
    p50 = statistics.median(values)
    return (
        f"{name}: n={len(values)} p50={p50:.0f} ms max={values[-1]:.0f} ms "
        f"mean={statistics.fmean(values):.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--fault", choices=("kill", "stop"), default="kill")
    args = parser.parse_args()
    disc: list[float] = []
    detect: list[float] = []
    startup: list[float] = []
    script = None
    for trial in range(args.trials):
        with tempfile.TemporaryDirectory() as tmp_s:
            tmp = Path(tmp_s)
            script = tmp / "s.json"
            script.write_text('{"responses": ["FINAL(1)"]}')
            with NodeCluster(tmp) as cluster:
                nodes = cluster.start_mesh(args.nodes, backend=f"scripted:{script}")
                cluster.wait_converged(nodes, timeout=30)
                startup.extend(n.started_in_s * 1000 for n in nodes)
                disc.extend(discovery_ms(cluster, nodes))
                time.sleep(1.0)
                victim = nodes[-1]
                at = time.time()
                if args.fault == "kill":
                    victim.kill()
                else:
                    victim.proc.send_signal(signal.SIGSTOP)
                detect.extend(detection_ms(nodes[:-1], victim, at))
                if args.fault == "stop":
                    victim.proc.send_signal(signal.SIGCONT)
        print(f"trial {trial + 1}/{args.trials} done", flush=True)
    print(_summary("process start -> ready", startup))
    print(_summary("node start -> all peers known", disc))
    print(_summary(f"{args.fault} -> member_down at each survivor", detect))


if __name__ == "__main__":
    main()
