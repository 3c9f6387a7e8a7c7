"""A real-process nemesis: 5 `kowalski-node start` processes, a retrying client, faults.

Used by tests/test_nemesis_process.py (short) and bench/nemesis.py (long, many runs).

* **Cluster**: 5 nodes on 127.0.0.1, scripted backend. Every task computes a distinct,
  checkable answer from its context ``k`` over three REPL turns: ``k*k``, then
  ``+ 1000*k``, then ``+ 7``, so a lost REPL state, a replay gone wrong or a result
  committed for another task shows up as a wrong number.
* **Client**: submits tasks with their own idempotency keys, round-robin over the nodes.
  On a timeout, a connection error or a retryable refusal (503) it retries *the same
  key at another node*, as any client would. It polls by resubmitting the key at a
  random node, which must answer with the stored result once the task is done.
* **Nemesis**: at random intervals, one node at a time is SIGKILLed (restarted a few
  seconds later on the same data dir) or SIGSTOPped (SIGCONT a few seconds later).
  Only one node is faulty at a time: the promise is "survives any one device".
* **Checks** at the end, after healing everything: every task the client saw accepted is
  done at every node, with the right answer (lost = wrong = stuck = 0); no node holds
  a different result or more than one commit for it (duplicate = 0).

Everything is seeded (the fault schedule, the client's choices) and the seed is in the
report; the processes' own timing is not, so a seed reproduces the schedule, not the
interleaving.
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from kowalski_node.testing.node_cluster import NodeCluster, NodeProc, write_script

TURNS = [
    "```repl\nk = int(context)\nacc = k * k\nprint(acc)\n```",
    "```repl\nacc = acc + 1000 * k\nprint(acc)\n```",
    "```repl\nacc = acc + 7\nprint(acc)\n```",
    "FINAL_VAR(acc)",
]
NAMES = ("a", "b", "c", "d", "e")


def expected(k: int) -> str:
    return str(k * k + 1000 * k + 7)


@dataclass
class TaskTrack:
    k: int
    key: str
    task_id: str = ""
    accepted_at: float = 0.0
    done_at: float = 0.0
    submits: int = 0
    retries: int = 0
    result: str | None = None
    status: str = ""
    error: str = ""


@dataclass
class NemesisReport:
    seed: int
    nodes: int
    duration_s: float
    tasks: int
    accepted: int = 0
    done: int = 0
    lost: int = 0
    wrong: int = 0
    duplicate: int = 0
    stuck: int = 0
    failed: int = 0
    client_retries: int = 0
    """Submissions of a key at another node after an attempt got no answer."""
    submits_to_paused: int = 0
    """New keys first sent to a SIGSTOPped node (then retried elsewhere on timeout)."""
    faults: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    latency_p50_s: float | None = None
    latency_p99_s: float | None = None
    wall_s: float = 0.0

    @property
    def passed(self) -> bool:
        return self.lost == self.wrong == self.duplicate == self.stuck == self.failed == 0

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["passed"] = self.passed
        return d


class Nemesis:
    """One run: start the cluster, submit under faults, heal, check."""

    def __init__(
        self,
        tmp: Path,
        *,
        seed: int,
        duration_s: float = 30.0,
        tasks: int = 20,
        latency_ms: int = 250,
        fault_gap_s: tuple[float, float] = (2.0, 5.0),
        fault_len_s: tuple[float, float] = (2.0, 5.0),
        client_timeout_s: float = 3.0,
        settle_s: float = 120.0,
        aim_at_paused: float = 0.5,
    ) -> None:
        self.tmp = tmp
        self.seed = seed
        self.rng = random.Random(seed)
        self.duration_s = duration_s
        self.n_tasks = tasks
        self.latency_ms = latency_ms
        self.fault_gap_s = fault_gap_s
        self.fault_len_s = fault_len_s
        self.client_timeout_s = client_timeout_s
        self.settle_s = settle_s
        self.aim_at_paused = aim_at_paused
        """Share of new keys sent first to the node SIGSTOPped at the time, if any."""
        self.lock = threading.Lock()
        self.procs: dict[str, NodeProc] = {}
        self.faulty: str | None = None
        self.paused = ""
        """The node SIGSTOPped now, if any."""
        self.stop = threading.Event()
        self.report = NemesisReport(seed, len(NAMES), duration_s, tasks)
        self.tracks = [TaskTrack(k, f"nemesis-{seed}-{k}") for k in range(tasks)]
        self.t0 = 0.0
        self.backend = ""

    # ------------------------------------------------------------------ helpers

    def _now(self) -> float:
        return round(time.monotonic() - self.t0, 3)

    def _api(self, name: str) -> str:
        with self.lock:
            return self.procs[name].api

    def _submit_once(self, name: str, track: TaskTrack) -> dict[str, Any] | None:
        """POST the task's key at one node; None when the client must retry elsewhere."""
        body = {"prompt": f"nemesis task {track.k}", "context": str(track.k)}
        body["idempotency_key"] = track.key
        try:
            resp = httpx.post(
                self._api(name) + "/v1/tasks", json=body, timeout=self.client_timeout_s
            )
        except (httpx.HTTPError, OSError):
            return None
        if resp.status_code in (502, 503, 504):
            return None
        if resp.status_code >= 400:
            self.report.problems.append(
                f"{track.key} at {name}: HTTP {resp.status_code} {resp.text[:200]}"
            )
            return None
        return dict(resp.json())

    def _pick(self, rng: random.Random, avoid: str = "") -> str:
        names = [n for n in NAMES if n != avoid]
        return rng.choice(names)

    # ------------------------------------------------------------------ client

    def _client(self) -> None:
        rng = random.Random(self.seed * 7919 + 1)
        gap = self.duration_s * 0.7 / max(1, self.n_tasks)
        pending = list(self.tracks)
        next_submit = 0
        deadline = time.monotonic() + self.duration_s + self.settle_s
        node_i = 0
        while pending and time.monotonic() < deadline and not self.stop.is_set():
            if next_submit < len(self.tracks) and time.monotonic() - self.t0 >= next_submit * gap:
                track = self.tracks[next_submit]
                next_submit += 1
                name = NAMES[node_i % len(NAMES)]
                node_i += 1
                with self.lock:
                    paused = self.paused
                if paused and rng.random() < self.aim_at_paused:
                    # What broke before: a node frozen with the request in its socket,
                    # the client retrying the key elsewhere, the frozen node handling it
                    # on SIGCONT. Aim new keys at a paused node to meet that often.
                    name = paused
                    self.report.submits_to_paused += 1
                self._poll(track, name, rng)
                continue
            for track in list(pending[: max(1, next_submit)]):
                if track.k >= next_submit:
                    continue
                if track.status == "done":
                    pending.remove(track)
                    continue
                self._poll(track, self._pick(rng), rng)
                if track.status == "done":
                    pending.remove(track)
            time.sleep(0.2)

    def _poll(self, track: TaskTrack, name: str, rng: random.Random) -> None:
        """Submit (or resubmit) the key; on failure retry it at other nodes, bounded."""
        tried = name
        for attempt in range(len(NAMES)):
            track.submits += 1
            if attempt:
                track.retries += 1  # the same key again, at another node
            got = self._submit_once(tried, track)
            if got is not None:
                if not track.accepted_at:
                    track.accepted_at = time.monotonic()
                    track.task_id = str(got.get("task_id", ""))
                elif got.get("task_id") != track.task_id:
                    self.report.problems.append(
                        f"{track.key}: task id {got.get('task_id')} at {tried}, "
                        f"first {track.task_id}"
                    )
                status = str(got.get("status", ""))
                track.status = status
                if status in ("done", "failed"):
                    result = got.get("result") or {}
                    track.result = result.get("content") if isinstance(result, dict) else None
                    track.error = str(got.get("error") or "")[:300]
                    track.done_at = time.monotonic()
                return
            tried = self._pick(rng, avoid=tried)
            time.sleep(0.05)

    # ------------------------------------------------------------------ nemesis

    def _nemesis(self, cluster: NodeCluster) -> None:
        rng = random.Random(self.seed)
        end = self.t0 + self.duration_s
        while not self.stop.is_set() and time.monotonic() < end:
            if self.stop.wait(rng.uniform(*self.fault_gap_s)):
                return
            if time.monotonic() >= end:
                return
            name = rng.choice(NAMES)
            kind = rng.choice(("kill", "pause"))
            length = rng.uniform(*self.fault_len_s)
            with self.lock:
                node = self.procs[name]
                self.faulty = name
            self.report.faults.append(
                {"at": self._now(), "kind": kind, "node": name, "for_s": round(length, 2)}
            )
            if kind == "kill":
                node.kill()
                self.stop.wait(length)
                try:
                    new = cluster.restart(node, backend=self.backend)
                except Exception as exc:  # a node that cannot come back is a finding
                    self.report.problems.append(f"restart of {name} failed: {exc}"[:500])
                    self.report.stuck += 1
                    return
                with self.lock:
                    self.procs[name] = new
            else:
                node.pause()
                with self.lock:
                    self.paused = name
                self.stop.wait(length)
                with self.lock:
                    self.paused = ""
                node.resume()
            with self.lock:
                self.faulty = None

    # ------------------------------------------------------------------ run

    def run(self) -> NemesisReport:
        started = time.monotonic()
        script = write_script(self.tmp / "script.json", TURNS, latency_ms={"root": self.latency_ms})
        self.backend = f"scripted:{script}"
        with NodeCluster(self.tmp) as cluster:
            nodes = cluster.start_mesh(len(NAMES), names=list(NAMES), backend=self.backend)
            cluster.wait_converged(nodes, timeout=120)
            self.procs = {n.name: n for n in nodes}
            self.t0 = time.monotonic()
            client = threading.Thread(target=self._client, name="nemesis-client")
            chaos = threading.Thread(target=self._nemesis, args=(cluster,), name="nemesis")
            client.start()
            chaos.start()
            chaos.join(self.duration_s + 60)
            client.join(self.duration_s + self.settle_s + 30)
            self.stop.set()
            self._check()
        self.report.wall_s = round(time.monotonic() - started, 1)
        return self.report

    def _check(self) -> None:
        r = self.report
        r.client_retries = sum(t.retries for t in self.tracks)
        accepted = [t for t in self.tracks if t.accepted_at]
        r.accepted = len(accepted)
        latencies = sorted(t.done_at - t.accepted_at for t in accepted if t.done_at)
        if latencies:
            r.latency_p50_s = round(latencies[len(latencies) // 2], 3)
            r.latency_p99_s = round(
                latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 3
            )
        with self.lock:
            procs = dict(self.procs)
        for t in self.tracks:
            if not t.accepted_at:
                r.lost += 1
                r.problems.append(f"{t.key}: never accepted by any node")
                continue
            if t.status == "failed":
                r.failed += 1
                r.problems.append(f"{t.key}: failed: {t.error}")
                continue
            if t.status != "done":
                r.stuck += 1
                r.problems.append(f"{t.key}: still {t.status!r} after settling")
                continue
            r.done += 1
            if t.result != expected(t.k):
                r.wrong += 1
                r.problems.append(f"{t.key}: result {t.result!r}, expected {expected(t.k)}")
            self._check_everywhere(t, procs)

    def _check_everywhere(self, t: TaskTrack, procs: dict[str, NodeProc]) -> None:
        """Every node answers the key with the one stored result; none holds two commits."""
        r = self.report
        results: dict[str, str | None] = {}
        for name, proc in procs.items():
            got: dict[str, Any] | None = None
            for _ in range(40):
                got = self._submit_once(name, t)
                if got is not None and got.get("status") == "done":
                    break
                time.sleep(0.25)
            if got is None or got.get("status") != "done":
                r.stuck += 1
                r.problems.append(f"{t.key}: node {name} answers {json.dumps(got)[:200]}")
                continue
            result = got.get("result") or {}
            results[name] = result.get("content") if isinstance(result, dict) else None
            try:
                view = httpx.get(f"{proc.api}/v1/tasks/{t.task_id}", timeout=5).json()
            except (httpx.HTTPError, ValueError):
                continue
            if isinstance(view, dict) and int(view.get("commits", 0) or 0) > 1:
                r.duplicate += 1
                r.problems.append(f"{t.key}: {name} counts {view.get('commits')} commits")
        if len(set(results.values())) > 1:
            r.duplicate += 1
            r.problems.append(f"{t.key}: nodes disagree on the result: {results}")
