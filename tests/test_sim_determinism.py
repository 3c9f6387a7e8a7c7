"""Same seed, same history byte for byte (also across PYTHONHASHSEED); the CLI writes its outputs."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from simulations.cli import main

ARGS = ["run", "leader-kill", "--nodes", "16", "--duration", "20", "--seed", "7"]


def _history_hash(out: Path) -> str:
    (hist,) = out.glob("*.history.log")
    return hashlib.sha256(hist.read_bytes()).hexdigest()


def test_same_seed_same_history_file(tmp_path: Path) -> None:
    assert main([*ARGS, "--out", str(tmp_path / "a"), "--no-plot"]) == 0
    assert main([*ARGS, "--out", str(tmp_path / "b"), "--no-plot"]) == 0
    assert _history_hash(tmp_path / "a") == _history_hash(tmp_path / "b")
    assert main([*ARGS[:-1], "8", "--out", str(tmp_path / "c"), "--no-plot"]) == 0
    assert _history_hash(tmp_path / "c") != _history_hash(tmp_path / "a")


def test_history_does_not_depend_on_string_hashing(tmp_path: Path) -> None:
    assert main([*ARGS, "--out", str(tmp_path / "a"), "--no-plot"]) == 0
    env = dict(os.environ, PYTHONHASHSEED="12345")
    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [sys.executable, "-m", "simulations", *ARGS, "--out", str(tmp_path / "b"), "--no-plot"],
        cwd=root,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert _history_hash(tmp_path / "a") == _history_hash(tmp_path / "b")


def test_report_json_and_png(tmp_path: Path) -> None:
    assert (
        main(["run", "baseline", "--nodes", "12", "--duration", "15", "--out", str(tmp_path)]) == 0
    )
    (report_path,) = tmp_path.glob("*.json")
    report = json.loads(report_path.read_text())
    assert report["passed"] is True and report["history_sha256"] == _history_hash(tmp_path)
    for key in ("tasks", "failover_s", "detection_all_s", "membership", "dissemination", "checks"):
        assert key in report
    (png,) = tmp_path.glob("*.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_bad_scenario_name_is_a_clear_error(capsys: object) -> None:
    assert main(["run", "no-such-scenario"]) == 2
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    assert "no scenario 'no-such-scenario'" in err and "baseline" in err
