"""The real-process nemesis, short: 5 nodes, a client that retries the same key at other
nodes, random SIGKILL/restart and SIGSTOP/SIGCONT (tests/nemesis.py; long runs:
bench/nemesis.py). Asserts lost = wrong = duplicate = stuck = 0; the seed is printed."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.nemesis import Nemesis


def test_nemesis_short(tmp_path: Path) -> None:
    seed = int(os.environ.get("KOWALSKI_NEMESIS_SEED", "7"))
    report = Nemesis(
        tmp_path, seed=seed, duration_s=20.0, tasks=10, settle_s=90.0, aim_at_paused=1.0
    ).run()
    summary = json.dumps(report.to_dict(), indent=1)
    print(summary)
    assert report.accepted == report.tasks, summary
    assert report.faults, "the nemesis injected no fault"
    # Seed 7 pauses node b for ~4 s at ~3 s and kills e twice: keys sent there must have
    # been retried at other nodes, the path that once committed a key twice.
    assert report.client_retries >= 1, summary
    assert (report.lost, report.wrong, report.duplicate, report.stuck, report.failed) == (
        0,
        0,
        0,
        0,
        0,
    ), f"seed {seed}: {summary}"
