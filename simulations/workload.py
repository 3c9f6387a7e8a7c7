"""Scripted RLM tasks: each task's steps (model time, REPL jobs, batched sub-calls) are drawn
once at submission and travel in its payload, so every execution of the task — first run or
a resume after failover — replays the same script, and the result is a pure function of it.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

import msgpack

from simulations.scenario import WorkloadSpec

Step = tuple[float, tuple[float, ...], tuple[float, ...]]
"""(model seconds on a desktop, REPL job seconds..., sub-call seconds...)."""


def make_script(rng: random.Random, spec: WorkloadSpec, serial: int) -> bytes:
    steps = []
    for _ in range(max(1, int(spec.steps.sample(rng)))):
        llm = round(spec.llm.sample(rng), 6)
        repl = [
            round(spec.repl_time.sample(rng), 6) for _ in range(int(spec.repl_jobs.sample(rng)))
        ]
        subs = [
            round(spec.subcall_time.sample(rng), 6) for _ in range(int(spec.subcalls.sample(rng)))
        ]
        steps.append([llm, repl, subs])
    body: dict[str, object] = {"n": serial, "s": steps}
    context = round(spec.context_mb.sample(rng), 3)
    if context > 0:
        body["c"] = context  # MB of context, held as a blob (see engine._fetch_context)
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def context_mb(payload: bytes) -> float:
    """The task's context size in MB (0: it has none)."""
    obj = msgpack.unpackb(payload, raw=False)
    return float(obj.get("c", 0.0))


def parse_script(payload: bytes) -> list[Step]:
    obj = msgpack.unpackb(payload, raw=False)
    return [
        (float(s[0]), tuple(float(x) for x in s[1]), tuple(float(x) for x in s[2]))
        for s in obj["s"]
    ]


def expected_result(payload: bytes) -> bytes:
    """What a correct run of this script commits."""
    return b"ok:" + hashlib.blake2b(payload, digest_size=12).hexdigest().encode()


@dataclass(slots=True)
class Job:
    kind: str
    """'llm' (local), 'repl' or 'sub'."""
    work: float
    target: str = ""
    tried: list[str] = field(default_factory=list)
    done: bool = False


@dataclass(slots=True)
class RunState:
    """A leader's run of one task (volatile: lost with the process)."""

    task_id: str
    epoch: int
    script: list[Step]
    payload: bytes
    step: int
    """Steps completed (and checkpointed)."""
    segments: list[list[Job]] = field(default_factory=list)
    segment: int = 0
    outstanding: int = 0
    token: int = 0
    waiting_ack: bool = False
