"""`kowalski-node trace FILE`: readable rendering, JSON passthrough, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rlm_fake_repl import FakeRepl

from kowalski_node.cli import main as cli_main
from kowalski_node.llm.scripted import ScriptedBackend
from kowalski_node.runtime.rlm_runner import run_rlm

DATA = Path(__file__).parent / "data"


@pytest.fixture
async def trajectory(tmp_path: Path) -> Path:
    context = ["Oslo 120", "Bergen 340", "Trondheim 90", "Oslo 300", "Trondheim 90"]
    context = [
        f"Branch report {i}\nCity: {c.split()[0]}\nUnits sold: {c.split()[1]}"
        for i, c in enumerate(context)
    ]
    result = await run_rlm(
        "Which city sold the most units?", context, root=ScriptedBackend.from_file(DATA / "rlm_sales.json"),
        repl=FakeRepl(), task_id="trace-me", trajectory_dir=tmp_path,
    )  # fmt: skip
    assert result.trajectory_path is not None
    return Path(result.trajectory_path)


async def test_trace_renders_every_step(
    trajectory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["trace", str(trajectory)]) == 0
    out = capsys.readouterr().out
    for needle in ("RLM task", "Which city sold the most units?", "model turn 0", "block 3",
                   "llm_query_batched", "overloaded", "FINAL_VAR(result): resolved",
                   "Oslo sold the most units (420)", "stop: final via FINAL_VAR"):  # fmt: skip
        assert needle in out, needle
    assert "```repl" in out  # replies are shown raw: the fence tag decides what runs
    assert "You answer a query about a context" not in out  # system prompt hidden by default
    assert cli_main(["trace", "--system", str(trajectory)]) == 0
    assert "You answer a query about a context" in capsys.readouterr().out


async def test_trace_json_passthrough(trajectory: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["trace", "--json", str(trajectory)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines] == [
        json.loads(line) for line in trajectory.read_text().splitlines()
    ]


def test_trace_missing_and_bad_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["trace", str(tmp_path / "missing.jsonl")]) == 1
    assert "trajectory file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"type": "task_start"}\nnot json\n')
    assert cli_main(["trace", str(bad)]) == 1
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert cli_main(["trace", str(empty)]) == 1
    assert "no trajectory records" in capsys.readouterr().err
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text("[1, 2]\n")
    assert cli_main(["trace", str(wrong)]) == 1
    assert "not a trajectory record" in capsys.readouterr().err
