"""A time budget holds: the final-answer turn is reserved inside it, not added after it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from kowalski_node import KowalskiRLM
from kowalski_node.runtime.task_setup import split_time_budget


def test_split_reserves_the_final_turn_inside_the_budget() -> None:
    assert split_time_budget(None) == (None, 30.0)
    assert split_time_budget(90.0) == (67.5, 22.5)  # the case: 90 s, was 120 s
    assert split_time_budget(600.0) == (570.0, 30.0)
    loop, final = split_time_budget(2.0)
    assert loop is not None and loop + final == pytest.approx(2.0)


def test_a_run_that_never_answers_ends_within_its_budget(tmp_path: Path) -> None:
    turn = "Still looking.\n```python\nprint('looking')\n```"
    script = tmp_path / "slow.json"
    script.write_text(json.dumps({"responses": [turn] * 200, "latency_ms": 2000}))
    rlm = (
        KowalskiRLM.new()
        .with_backend(f"scripted:{script}")
        .with_time_budget(4.0)
        .with_max_iterations(200)
        .with_trajectory_dir(tmp_path / "traj")
        .build()
    )
    started = time.monotonic()
    result = rlm.execute_sync("Loop forever", "context")
    took = time.monotonic() - started
    assert result.stop_reason == "time_budget", result
    # within the budget plus the interpreter's own start-up and scheduling noise
    assert took < 4.0 + 1.2, took  # without the reserve: about 6 s
