"""`kowalski-node bench` and `kowalski-node demo`: the parts that need no cluster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kowalski_node.cli import main as cli_main
from kowalski_node.commands.demo import _clip, answer_matches, demo_log


def _bench_dir(tmp_path: Path) -> Path:
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "README.md").write_text("# benchmarks\n")
    (bench / "good.py").write_text(
        "import json, sys\nprint(json.dumps({'answer': 42, 'args': sys.argv[1:]}))\n"
    )
    (bench / "broken.py").write_text("import sys\nprint('oops', file=sys.stderr)\nsys.exit(3)\n")
    (bench / "chatty.py").write_text("print('not json')\n")
    return bench


def test_bench_runs_every_script_and_reports_failures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _bench_dir(tmp_path)
    out = tmp_path / "report.json"
    code = cli_main(["bench", "--bench-dir", str(bench), "--out", str(out)])
    report = json.loads(capsys.readouterr().out)
    assert code == 1  # two scripts failed
    assert report["good"] == {"answer": 42, "args": []}
    assert report["broken"]["error"] == "exit code 3" and "oops" in report["broken"]["stderr_tail"]
    assert report["chatty"]["error"] == "output is not one JSON object"
    assert json.loads(out.read_text()) == report


def test_bench_runs_chosen_scripts_only_and_rejects_unknown_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _bench_dir(tmp_path)
    assert cli_main(["bench", "good", "--bench-dir", str(bench)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"bench_dir", "quick", "good", "seconds"}
    assert cli_main(["bench", "nope", "--bench-dir", str(bench)]) == 1
    assert "unknown benchmark" in capsys.readouterr().err


def test_bench_without_a_checkout_says_where_to_run_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["bench", "--bench-dir", str(tmp_path)]) == 1
    assert "source checkout" in capsys.readouterr().err


def test_demo_without_the_model_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KOWALSKI_HOME", str(tmp_path / "empty-home"))
    monkeypatch.delenv("KOWALSKI_CONFIG", raising=False)
    assert cli_main(["demo"]) == 1
    err = capsys.readouterr().err
    assert "kowalski-node models pull" in err


def test_demo_rejects_backends_it_cannot_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["demo", "--backend", "ollama"]) == 1
    assert "embedded engines (llamacpp, builtin) or a script" in capsys.readouterr().err
    assert cli_main(["demo", "--backend", f"scripted:{tmp_path / 'missing.json'}"]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_long_rambling_answers_are_clipped() -> None:
    text = "start\n" + "```\n" * 200 + "\n".join(f"line {i}" for i in range(40))
    clipped = _clip(text)
    assert clipped.count("```") == 1  # repeated lines collapsed
    assert clipped.count("\n") <= 16 and "answer cut" in clipped
    assert _clip("short answer") == "  short answer"


def test_demo_task_has_an_exact_answer_the_demo_counts_itself() -> None:
    log, errors = demo_log()
    assert errors == sum(" ERROR " in line for line in log.splitlines()) and errors > 0
    assert demo_log() == (log, errors)  # the same task every time
    assert answer_matches(str(errors), errors)
    assert answer_matches(f"There are {errors} ERROR lines.", errors)
    assert not answer_matches(f"{errors + 1}", errors)
    assert not answer_matches(f"{errors} of {len(log.splitlines())}", errors)  # two numbers
    assert not answer_matches("", errors)
