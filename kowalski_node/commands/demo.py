"""`kowalski-node demo [PROMPT]`: a local 3-node mesh answers one task, then goes away.

It creates a temporary cluster (one cluster key, three data dirs), starts three
`kowalski-node start` processes on 127.0.0.1 (each prints its first lines), waits until
they all see each other, submits the task at node c through its HTTP API, follows it,
prints the answer and which peer did what (owner, leader, REPL peers, sub-call peers,
epoch, executions and commits), then stops every node with SIGTERM. Nothing is left
running, also on Ctrl-C or errors.

The default task has one exact answer: how many ERROR lines a generated service log
holds. The demo counts them itself, prints the expected answer next to the model's and
says whether the model was right. Exit code: 0 when the answer is right (or, for your own
prompt or context, when the task finished), 2 when the task finished with a wrong answer,
1 when the mesh or the task failed.

The default model is the embedded code model Qwen2.5-Coder-0.5B-Instruct on llama.cpp
(`kowalski-node models pull qwen2.5-coder-0.5b-instruct` first). `--model
smollm2-135m-instruct` is the tiny option (it rarely writes working code);
`--backend scripted:PATH` replays a script instead (deterministic, fast).
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kowalski_node.errors import ConfigError

DEFAULT_PROMPT = "How many ERROR lines are in the log?"
DEFAULT_BACKEND = "llamacpp"
DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
DEMO_LOG_LINES = 120
DEMO_LOG_SEED = 2026
TASK_LIMITS = {"max_iterations": 4, "time_budget_s": 150.0, "block_timeout_s": 15.0}
NODE_ENV = {"KOWALSKI_LLM__MAX_TOKENS": "192", "KOWALSKI_LLM__SUB_MAX_TOKENS": "96"}
FINAL = ("done", "failed", "cancelled")
EXIT_RIGHT, EXIT_FAILED, EXIT_WRONG = 0, 1, 2


def demo_log(lines: int = DEMO_LOG_LINES, seed: int = DEMO_LOG_SEED) -> tuple[str, int]:
    """A service log with a known number of ERROR lines: (text, that number)."""
    rng = random.Random(seed)
    levels = ["INFO"] * 6 + ["WARN"] * 2 + ["ERROR"] * 2
    messages = {"INFO": "request ok", "WARN": "slow response", "ERROR": "request failed"}
    out: list[str] = []
    errors = 0
    for i in range(lines):
        level = rng.choice(levels)
        errors += level == "ERROR"
        service = rng.choice(("api", "auth", "billing"))
        out.append(
            f"2026-12-06 09:{i // 60:02d}:{i % 60:02d} {level} service={service} "
            f"id={rng.randint(10000, 99999)} {messages[level]}"
        )
    return "\n".join(out) + "\n", errors


def answer_matches(answer: str, expected: int) -> bool:
    """Right when the answer's only number is the expected count ("31", "There are 31.")."""
    import re

    numbers = re.findall(r"-?\d+", answer.replace(",", ""))
    return numbers == [str(expected)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, help="the task's prompt")
    parser.add_argument(
        "--backend",
        default=DEFAULT_BACKEND,
        help="llamacpp (default), builtin (NumPy engine) or scripted:PATH",
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"pulled model for llamacpp/builtin ({DEFAULT_MODEL}; smollm2-135m-instruct is tiny)",
    )
    parser.add_argument("--context-file", type=Path, help="text file to use as the task's context")
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary data dirs and logs afterwards"
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait for the answer (300)"
    )


def _check_backend(spec: str, model: str | None) -> None:
    """Fail early, with the fix, when the model or script is missing."""
    from kowalski_node.llm.factory import parse_backend_spec

    parsed = parse_backend_spec(spec)
    if parsed.kind in ("llamacpp", "builtin"):
        from kowalski_node.config import load_settings
        from kowalski_node.llm.models import resolve_model_path

        settings = load_settings()
        resolve_model_path(parsed.arg or model or settings.llm.model, settings.paths.models_dir)
    elif parsed.kind == "scripted":
        path = Path(str(parsed.arg)).expanduser()
        if not path.is_file():
            raise ConfigError(f"script {path} does not exist")
    else:
        raise ConfigError(
            f"the demo runs the embedded engines (llamacpp, builtin) or a script, not "
            f"{parsed.kind!r} (use `kowalski-node start --backend ...` for other backends)"
        )


def main(args: argparse.Namespace) -> int:
    from kowalski_node.errors import ModelNotFound

    try:
        _check_backend(args.backend, args.model)
    except ModelNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(
            f"The demo needs the embedded model: run `kowalski-node models pull {args.model}` "
            "once (./scripts/setup.sh does).",
            file=sys.stderr,
        )
        return EXIT_FAILED
    context, expected = demo_log()
    if args.context_file is not None:
        try:
            context = args.context_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read --context-file: {exc}") from None
    own_task = args.context_file is not None or args.prompt != DEFAULT_PROMPT
    root = Path(tempfile.mkdtemp(prefix="kowalski-demo-"))
    try:
        return _run(args, context, None if own_task else expected, root)
    except KeyboardInterrupt:
        print("\ninterrupted: every node was stopped", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"data dirs and logs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _run(args: argparse.Namespace, context: str, expected: int | None, root: Path) -> int:
    from kowalski_node.testing.node_cluster import ClusterError, NodeCluster

    model = "" if args.backend.startswith("scripted") else f", model {args.model}"
    print(f"starting a local 3-node mesh on 127.0.0.1 (backend {args.backend}{model})")
    env = dict(NODE_ENV)
    if not args.backend.startswith("scripted"):
        env["KOWALSKI_LLM__MODEL"] = args.model
    cluster = NodeCluster.as_a_user_would(root, backend=args.backend, env=env, echo=print)
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
        lines = context.count("\n")
        print(f'submitting at node c: "{args.prompt}" (context: a {lines}-line log)')
        submitted = time.monotonic()
        accepted = c.post(
            "/v1/tasks", {"prompt": args.prompt, "context": context, "rlm": TASK_LIMITS}
        )
        view = _follow(c, accepted["task_id"], names, args.timeout)
        took = time.monotonic() - submitted
        _report(view, names)
        if view.get("status") != "done":
            return EXIT_FAILED
        answer = str((view.get("result") or {}).get("content", ""))
        print(f"\nanswered {took:.1f} s after submission")
        if expected is None:
            return EXIT_RIGHT
        right = answer_matches(answer, expected)
        print(f"expected answer: {expected} (counted by the demo itself)")
        print(f"the model's answer was {'RIGHT' if right else 'WRONG'}")
        return EXIT_RIGHT if right else EXIT_WRONG
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
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
