"""Mesh benchmarks: real `kowalski-node start` processes (and peer processes) on 127.0.0.1.

    python bench/mesh.py [--quick] [--only NAME ...] [--trials 3] [--failovers 5]
                         [--tasks 6000] [--batch 1000] [--subcall-backend auto|builtin|scripted]

Prints one JSON object with a section per measurement:
- discovery_ms: 3 nodes (one first, two bootstrapping through it); for each later node,
  its `node_started` log line -> `member_up` of the last other member (p50/max);
- failover_ms: a task's leader (not its owner) is SIGKILLed mid-task; `detection` = kill ->
  the owner's `member_down`, `resumed` = kill -> the new leader's `run_started` at epoch 2
  (p50/p99 over --failovers runs; the killed node is restarted between runs);
- submit: --tasks trivial tasks (scripted `FINAL(ok)`) POSTed in batches of --batch to all
  3 nodes at once: `accepted_per_s` (all accepted) and `completed_per_s` (all committed);
- remote_repl_ms: the 100-line program of bench/sandbox.py as one block on a peer's
  sandbox through RemoteReplExecutor (round trip at the leader), vs the same sandbox
  called locally, and the bare transport round trip;
- subcalls: a batch of sub-calls through FanoutBackend to 1 peer process and to 2 (each
  pinned to one core, one request at a time): prompts/s and the speed-up. The builtin
  engine when the model is pulled (`auto`), else the scripted backend with latency.
Timestamps from logs are wall-clock values of the same host.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import trio

from kowalski_node.testing.node_cluster import NodeCluster, NodeProc

_TS = re.compile(r"^ts=(\d+\.\d+) ")
SECTIONS = ("discovery", "failover", "submit", "remote_repl", "subcalls")


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return round(ordered[k], 2)


def _summary(values: list[float]) -> dict[str, Any]:
    return {
        "p50": _pct(values, 0.5),
        "p99": _pct(values, 0.99),
        "max": round(max(values), 2) if values else None,
        "n": len(values),
    }


def _events(node: NodeProc, event: str, after: float = 0.0) -> list[tuple[float, str]]:
    out = []
    try:
        text = node.log_path.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        if f"event={event} " not in line and not line.endswith(f"event={event}"):
            continue
        m = _TS.match(line)
        if m and float(m.group(1)) >= after:
            out.append((float(m.group(1)), line))
    return out


def _write_script(path: Path, responses: list[Any], **extra: Any) -> str:
    path.write_text(json.dumps({"responses": responses, **extra}), encoding="utf-8")
    return f"scripted:{path}"


# --------------------------------------------------------------------------- discovery


def bench_discovery(root: Path, trials: int) -> dict[str, Any]:
    samples: list[float] = []
    backend = _write_script(root / "d.json", ["FINAL(ok)"])
    for trial in range(trials):
        with NodeCluster.as_a_user_would(root / f"disc{trial}", backend=backend) as cluster:
            nodes = cluster.start_mesh(["a", "b", "c"])
            cluster.wait_converged(nodes)
            ids = {n.peer_id for n in nodes}
            for node in nodes[1:]:
                started = _events(node, "node_started")[-1][0]
                seen: dict[str, float] = {}
                for ts, line in _events(node, "member_up", started):
                    m = re.search(r"peer=(\S+)", line)
                    if m and m.group(1) in ids:
                        seen.setdefault(m.group(1), ts)
                others = ids - {node.peer_id}
                if others <= set(seen):
                    samples.append((max(seen[p] for p in others) - started) * 1000.0)
    return {
        "what": "node_started -> member_up of the last other member (3 nodes, loopback)",
        **_summary(samples),
        "samples": [round(s, 1) for s in samples],
    }


# --------------------------------------------------------------------------- failover


LONG_TURNS = [
    "```repl\nacc = [len(context)]\nprint(acc)\n```",
    "```repl\nacc.append(acc[-1] + 1)\nprint(acc)\n```",
    "```repl\nacc.append(acc[-1] + 1)\nprint(acc)\n```",
    "```repl\nacc.append(acc[-1] + 1)\nprint(acc)\n```",
    "```repl\nacc.append(acc[-1] + 1)\nprint(acc)\n```",
    "FINAL_VAR(acc)",
]


def _led_elsewhere(owner: NodeProc, tag: str) -> dict[str, Any]:
    for i in range(20):
        acc = owner.post("/v1/tasks", {"prompt": f"{tag} {i}", "context": "abc"})
        deadline = time.monotonic() + 10
        view: dict[str, Any] = {}
        while time.monotonic() < deadline:
            view = owner.get(f"/v1/tasks/{acc['task_id']}")
            if view.get("leader"):
                break
            time.sleep(0.01)
        if view.get("leader") and view["leader"] != owner.peer_id:
            return view
    raise RuntimeError("no task was led away from its owner in 20 tries")


def bench_failover(root: Path, runs: int) -> dict[str, Any]:
    backend = _write_script(root / "f.json", LONG_TURNS, latency_ms={"root": 500})
    detection: list[float] = []
    resumed: list[float] = []
    with NodeCluster.as_a_user_would(root / "failover", backend=backend) as cluster:
        nodes = cluster.start_mesh(["a", "b", "c"])
        cluster.wait_converged(nodes)
        for run in range(runs):
            owner = cluster.nodes["c"]
            view = _led_elsewhere(owner, f"failover {run}")
            task_id = view["task_id"]
            victim = next(n for n in cluster.nodes.values() if n.peer_id == view["leader"])
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                if owner.get(f"/v1/tasks/{task_id}").get("iteration", 0) >= 1:
                    break
                time.sleep(0.02)
            killed_at = time.time()
            victim.proc.kill()
            victim.proc.wait(10)
            deadline = time.monotonic() + 30
            new_leader: NodeProc | None = None
            while time.monotonic() < deadline and new_leader is None:
                for node in cluster.nodes.values():
                    if node is victim:
                        continue
                    hits = [
                        ts
                        for ts, line in _events(node, "run_started", killed_at)
                        if f"task={task_id} " in line and "epoch=1 " not in line
                    ]
                    if hits:
                        resumed.append((hits[0] - killed_at) * 1000.0)
                        new_leader = node
                        break
                time.sleep(0.02)
            downs = [
                ts
                for ts, line in _events(owner, "member_down", killed_at)
                if f"peer={victim.peer_id}" in line
            ]
            if downs:
                detection.append((downs[0] - killed_at) * 1000.0)
            done_by = time.monotonic() + 60
            while time.monotonic() < done_by:
                if owner.get(f"/v1/tasks/{task_id}")["status"] in ("done", "failed"):
                    break
                time.sleep(0.05)
            final = owner.get(f"/v1/tasks/{task_id}")
            if final["status"] != "done" or final["commits"] != 1:
                raise RuntimeError(f"failover run {run} did not commit once: {final}")
            restarted = cluster.restart(victim.name, bootstrap=[owner.addr])
            cluster.wait_converged([*(n for n in cluster.nodes.values() if n.alive())])
            del restarted
    return {
        "what": "SIGKILL of a task's leader mid-task; detection at the owner, resumed at "
        "the new leader (epoch 2); every task committed exactly once",
        "detection": _summary(detection),
        "resumed": _summary(resumed),
        "samples_resumed": [round(s, 1) for s in resumed],
    }


# --------------------------------------------------------------------------- submit


def bench_submit(root: Path, tasks: int, batch: int) -> dict[str, Any]:
    import httpx

    backend = _write_script(root / "s.json", ["FINAL(ok)"])
    with NodeCluster.as_a_user_would(root / "submit", backend=backend) as cluster:
        nodes = cluster.start_mesh(["a", "b", "c"])
        cluster.wait_converged(nodes)
        before = sum(n.get("/v1/status")["commits_total"] for n in nodes)
        share = [tasks // 3 + (1 if i < tasks % 3 else 0) for i in range(3)]
        spans: list[tuple[float, float]] = []
        errors: list[str] = []

        def client(node: NodeProc, count: int) -> None:
            body_cache: dict[int, bytes] = {}
            with httpx.Client(base_url=node.api, timeout=120) as http:
                started = time.monotonic()
                sent = 0
                while sent < count:
                    n = min(batch, count - sent)
                    body = body_cache.get(n)
                    if body is None:
                        body = json.dumps(
                            {"tasks": [{"prompt": "trivial"} for _ in range(n)]}
                        ).encode()
                        body_cache[n] = body
                    resp = http.post(
                        "/v1/tasks/batch",
                        content=body,
                        headers={"content-type": "application/json"},
                    )
                    if resp.status_code >= 400:
                        errors.append(f"{node.name}: {resp.status_code} {resp.text[:200]}")
                        return
                    sent += n
                spans.append((started, time.monotonic()))

        t0 = time.monotonic()
        threads = [
            threading.Thread(target=client, args=(n, c)) for n, c in zip(nodes, share, strict=True)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        if errors:
            raise RuntimeError("; ".join(errors))
        accepted_s = max(e for _, e in spans) - min(s for s, _ in spans)
        deadline = time.monotonic() + 600
        committed = 0
        while time.monotonic() < deadline:
            committed = sum(n.get("/v1/status")["commits_total"] for n in nodes) - before
            if committed >= tasks:
                break
            time.sleep(0.2)
        completed_s = time.monotonic() - t0
    return {
        "what": f"{tasks} trivial tasks in batches of {batch}, POSTed to 3 nodes at once",
        "tasks": tasks,
        "accepted_per_s": round(tasks / accepted_s, 1),
        "accepted_s": round(accepted_s, 3),
        "completed": committed,
        "completed_per_s": round(committed / completed_s, 1),
        "completed_s": round(completed_s, 3),
    }


# --------------------------------------------------------------------------- remote REPL


async def _remote_repl(runs: int) -> dict[str, Any]:
    from sandbox import hundred_line_program  # bench/sandbox.py

    from kowalski_node.adapters.libp2p import protocol_ids
    from kowalski_node.adapters.libp2p.transport import Libp2pTransport, TransportConfig
    from kowalski_node.capabilities.profile import DeviceProfile
    from kowalski_node.identity import ClusterKey, NodeIdentity
    from kowalski_node.remote import RemoteReplExecutor, SchedulerChooser, register_repl_service
    from kowalski_node.repl.base import ExecRequest, SubCallResult
    from kowalski_node.repl.executor import SubprocessReplExecutor

    async def no_subs(prompts: list[str], model: str | None) -> list[SubCallResult]:
        return [SubCallResult(text="")] * len(prompts)

    key = ClusterKey.generate()
    cfg = TransportConfig()
    leader = Libp2pTransport(NodeIdentity.generate(), key, cfg)
    peer = Libp2pTransport(NodeIdentity.generate(), key, cfg)
    program = hundred_line_program()
    context = " ".join(f"Word{i % 97}, text." for i in range(2000))  # as bench/sandbox.py

    def prof(pid: str, load: float) -> DeviceProfile:
        return DeviceProfile(pid, 1, cores=2, ram_total=8 << 30, ram_free=6 << 30,
                             cpu_load=load, repl_languages=("python",))  # fmt: skip

    async with leader.running(), peer.running(), SubprocessReplExecutor(pool_size=1) as sandbox:
        register_repl_service(peer, sandbox)

        async def echo(req: Any) -> Any:
            return req.payload

        peer.register_handler(protocol_ids.TASK, echo)
        await leader.connect(peer.listen_addrs[0])
        profiles = {
            leader.peer_id: prof(leader.peer_id, 0.99),
            peer.peer_id: prof(peer.peer_id, 0.0),
        }
        chooser = SchedulerChooser(
            leader.peer_id, lambda: profiles, lambda: [leader.peer_id, peer.peer_id]
        )
        remote = RemoteReplExecutor(leader, chooser, sandbox)
        await remote.open_session("bench", context)
        assert remote.session_peer("bench") == peer.peer_id
        remote_ms, local_ms, worker_ms, rtt_ms = [], [], [], []
        for _ in range(5):  # warm-up
            await remote.execute(ExecRequest("bench", program), no_subs)
        for _ in range(runs):
            t = time.perf_counter()
            result = await remote.execute(ExecRequest("bench", program), no_subs)
            remote_ms.append((time.perf_counter() - t) * 1000)
            worker_ms.append(result.exec_ms)
            if not result.ok:
                raise RuntimeError(f"the benchmark block failed: {result.error}")
        await sandbox.open_session("local", context)
        for _ in range(runs):
            t = time.perf_counter()
            await sandbox.execute(ExecRequest("local", program), no_subs)
            local_ms.append((time.perf_counter() - t) * 1000)
        for _ in range(runs):
            t = time.perf_counter()
            await leader.request(peer.peer_id, protocol_ids.TASK, "echo", {"x": 1})
            rtt_ms.append((time.perf_counter() - t) * 1000)
        await remote.aclose()
    return {
        "what": "100-line block (bench/sandbox.py) on a peer's warm sandbox, at the leader",
        "remote_p50": _pct(remote_ms, 0.5),
        "remote_p95": _pct(remote_ms, 0.95),
        "local_p50": _pct(local_ms, 0.5),
        "worker_p50": _pct(worker_ms, 0.5),
        "transport_rtt_p50": _pct(rtt_ms, 0.5),
        "runs": runs,
    }


# --------------------------------------------------------------------------- sub-calls


def _serve_llm(args: argparse.Namespace) -> int:
    """Child mode: one peer that serves llm.batch on one core until stdin closes."""
    if args.core is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.core})

    async def serve() -> None:
        from kowalski_node.adapters.libp2p.transport import Libp2pTransport, TransportConfig
        from kowalski_node.config import load_settings
        from kowalski_node.identity import NodeIdentity, load_cluster_key
        from kowalski_node.llm.factory import make_backend
        from kowalski_node.remote import register_llm_service

        backend = make_backend(args.serve_llm, load_settings())
        key = load_cluster_key(Path(args.key_dir))
        transport = Libp2pTransport(NodeIdentity.generate(), key, TransportConfig())
        async with transport.running():
            register_llm_service(transport, backend)
            print(f"addr={transport.listen_addrs[0]}", flush=True)
            await trio.to_thread.run_sync(sys.stdin.read)  # until the parent closes stdin
        await backend.aclose()

    trio.run(serve)
    return 0


async def _subcalls(
    backend_spec: str, key_dir: Path, prompts: int, max_tokens: int
) -> dict[str, Any]:
    from kowalski_node.adapters.libp2p.transport import Libp2pTransport, TransportConfig
    from kowalski_node.capabilities.profile import DeviceProfile
    from kowalski_node.identity import NodeIdentity, load_cluster_key
    from kowalski_node.llm.base import ChatMessage, LlmRequest, LlmResponse
    from kowalski_node.remote import FanoutBackend, FanoutConfig, SchedulerChooser

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0, 1]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--serve-llm",
                backend_spec,
                "--key-dir",
                str(key_dir),
                "--core",
                str(cores[i % len(cores)]),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    try:
        addrs = []
        for proc in procs:
            assert proc.stdout is not None
            line = await trio.to_thread.run_sync(proc.stdout.readline)
            if not line.startswith("addr="):
                raise RuntimeError(f"sub-call peer did not start: {line!r}")
            addrs.append(line.strip().split("=", 1)[1])
        leader = Libp2pTransport(
            NodeIdentity.generate(), load_cluster_key(key_dir), TransportConfig()
        )
        async with leader.running():
            peers = [await leader.connect(a) for a in addrs]
            kind = backend_spec.split(":", 1)[0]
            profiles = {
                p: DeviceProfile(
                    p, 1, cores=1, ram_total=8 << 30, ram_free=6 << 30, backends=(kind,)
                )
                for p in peers
            }

            def requests(offset: int) -> list[LlmRequest]:
                return [
                    LlmRequest(
                        messages=(
                            ChatMessage("user", f"Write one short sentence about the number {i}."),
                        ),
                        max_tokens=max_tokens,
                        task_id="bench",
                        purpose="sub",
                        sequence=i,
                    )
                    for i in range(offset, offset + prompts)
                ]

            out: dict[str, Any] = {}
            for label, alive in (("one_peer", peers[:1]), ("two_peers", peers)):
                chooser = SchedulerChooser(leader.peer_id, lambda: profiles, lambda a=alive: a)
                fan = FanoutBackend(leader, chooser, _NoLocal(), FanoutConfig(include_local=False))
                warm = await fan.complete_many(requests(0)[: len(alive)] * 1)  # load models
                if not all(isinstance(w, LlmResponse) for w in warm):
                    raise RuntimeError(f"warm-up failed: {warm}")
                t = time.perf_counter()
                results = await fan.complete_many(requests(0))
                elapsed = time.perf_counter() - t
                bad = [r for r in results if not isinstance(r, LlmResponse)]
                if bad:
                    raise RuntimeError(f"sub-calls failed: {bad[:2]}")
                out[label] = {
                    "prompts_per_s": round(prompts / elapsed, 3),
                    "seconds": round(elapsed, 3),
                    "per_peer": dict(fan.per_peer),
                }
            out["speedup"] = round(
                out["two_peers"]["prompts_per_s"] / out["one_peer"]["prompts_per_s"], 3
            )
            for label in ("one_peer", "two_peers"):
                out[label]["per_peer"] = sorted(out[label]["per_peer"].values())
            return out
    finally:
        for proc in procs:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


class _NoLocal:
    """The fan-out bench measures peers only; a local call would be a bug."""

    name = "none"

    async def complete(self, request: Any) -> Any:
        raise RuntimeError("local backend used in the peers-only benchmark")

    def stream(self, request: Any) -> Any:
        raise RuntimeError("not used")

    async def list_models(self) -> list[str]:
        return []

    async def aclose(self) -> None:
        return None


def bench_subcalls(root: Path, mode: str, prompts: int, max_tokens: int) -> dict[str, Any]:
    from kowalski_node.identity import ClusterKey, save_cluster_key

    spec = "builtin"
    note = "builtin engine (SmolLM2-135M), one request at a time per peer, one core each"
    if mode in ("auto", "builtin"):
        from kowalski_node.config import load_settings
        from kowalski_node.errors import ModelNotFound
        from kowalski_node.llm.models import resolve_model_path

        settings = load_settings()
        try:
            resolve_model_path(settings.llm.model, settings.paths.models_dir)
        except ModelNotFound:
            if mode == "builtin":
                raise
            mode = "scripted"
    if mode == "scripted":
        spec = _write_script(
            root / "sub.json", ["x"], sub_responses=[f"answer {i}" for i in range(prompts)],
            latency_ms={"sub": 200},
        )  # fmt: skip
        note = "scripted backend, 200 ms per sub-call, one at a time per peer"
    key_dir = root / "subkey"
    key_dir.mkdir(parents=True, exist_ok=True)
    save_cluster_key(key_dir, ClusterKey.generate(), overwrite=True)
    result = trio.run(_subcalls, spec, key_dir, prompts, max_tokens)
    return {"what": note, "prompts": prompts, "max_tokens": max_tokens, **result}


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer trials and tasks")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--trials", type=int, default=3, help="discovery trials")
    parser.add_argument("--failovers", type=int, default=5, help="failover runs")
    parser.add_argument("--tasks", type=int, default=6000, help="trivial tasks submitted")
    parser.add_argument("--batch", type=int, default=1000, help="tasks per batch request")
    parser.add_argument("--repl-runs", type=int, default=100)
    parser.add_argument(
        "--subcall-backend", choices=("auto", "builtin", "scripted"), default="auto"
    )
    parser.add_argument("--subcall-prompts", type=int, default=12)
    parser.add_argument("--subcall-tokens", type=int, default=16)
    parser.add_argument("--serve-llm", help=argparse.SUPPRESS)
    parser.add_argument("--key-dir", help=argparse.SUPPRESS)
    parser.add_argument("--core", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_llm:
        return _serve_llm(args)
    if args.quick:
        args.trials, args.failovers, args.tasks = 1, 2, 1500
        args.repl_runs, args.subcall_prompts = 30, 6
    sections = args.only or list(SECTIONS)
    root = Path(tempfile.mkdtemp(prefix="kowalski-bench-mesh-"))
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "command": " ".join(["python", "bench/mesh.py", *sys.argv[1:]]),
    }
    try:
        for section in sections:
            started = time.monotonic()
            try:
                if section == "discovery":
                    report[section] = bench_discovery(root, args.trials)
                elif section == "failover":
                    report[section] = bench_failover(root, args.failovers)
                elif section == "submit":
                    report[section] = bench_submit(root, args.tasks, args.batch)
                elif section == "remote_repl":
                    report[section] = trio.run(_remote_repl, args.repl_runs)
                elif section == "subcalls":
                    report[section] = bench_subcalls(
                        root, args.subcall_backend, args.subcall_prompts, args.subcall_tokens
                    )
            except Exception as exc:  # one failing section must not hide the others
                report[section] = {"error": f"{type(exc).__name__}: {exc}"}
            report.setdefault("section_s", {})[section] = round(time.monotonic() - started, 1)
            print(f"[bench/mesh] {section} done", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
