"""`kowalski-node run` end to end in a subprocess (no TTY, as in CI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = {
    "responses": [
        "Look first.\n```repl\nprint(len(context.split()))\n```",
        "```repl\nsummary = llm_query('Summarise: ' + context)\nprint(summary)\n```",
        "FINAL_VAR(summary)",
    ],
    "sub_responses": ["three words here"],
}


def run_cli(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("KOWALSKI_", "OLLAMA_", "OPENAI_"))
    }
    full_env["KOWALSKI_HOME"] = str(tmp_path / "home")
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "kowalski_node.cli", "run", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def write_script(tmp_path: Path) -> Path:
    path = tmp_path / "script.json"
    path.write_text(json.dumps(SCRIPT), encoding="utf-8")
    return path


def test_run_json_prints_one_object(tmp_path: Path) -> None:
    script = write_script(tmp_path)
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("alpha beta gamma", encoding="utf-8")
    proc = run_cli(
        tmp_path, "Summarise it", "--backend", f"scripted:{script}", "--context-file", str(ctx),
        "--json", "--max-iterations", "5", "--task-id", "cli-1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    data = json.loads(lines[0])
    assert data["task_id"] == "cli-1" and data["content"] == "three words here"
    assert data["iterations"] == 3 and data["stop_reason"] == "final"
    assert [b["language"] for b in data["blocks"]] == ["python", "python"]
    assert data["blocks"][0]["output"].strip() == "3"
    assert all(isinstance(b["exec_ms"], float | int) and b["error"] is None for b in data["blocks"])
    assert data["tokens"]["total"] > 0 and "elapsed_ms" in data["timings"]
    # progress went to stderr as plain lines (no TTY)
    assert "iteration 1/5" in proc.stderr and "done" in proc.stderr
    trajectory = Path(data["trajectory_path"])
    assert trajectory.is_file() and trajectory.parent == tmp_path / "home" / "trajectories"


def test_run_text_mode_prints_the_answer_only(tmp_path: Path) -> None:
    script = write_script(tmp_path)
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("a b c", encoding="utf-8")
    proc = run_cli(tmp_path, "Summarise", "-c", str(ctx), "--backend", f"scripted:{script}", "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "three words here\n"
    assert "iteration" not in proc.stderr


def test_run_missing_builtin_model_says_how_to_pull(tmp_path: Path) -> None:
    proc = run_cli(tmp_path, "hello", "--backend", "builtin")
    assert proc.returncode == 1
    assert "kowalski-node models pull" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            (),
            {"KOWALSKI_RLM__MAX_ITERATIONS": "0"},
            "rlm.max_iterations: Input should be greater than 0",
        ),
        (("--backend", "gpt"), {}, "unknown backend 'gpt'"),
        (
            ("--max-iterations", "-2"),
            {},
            "rlm.max_iterations: Input should be greater than 0 (from override)",
        ),
        (("--context-file", "/nonexistent/ctx.txt"), {}, "--context-file /nonexistent/ctx.txt"),
        (("--config", "/nonexistent/k.toml"), {}, "config file /nonexistent/k.toml does not exist"),
    ],
)
def test_run_bad_input_is_a_clear_error(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    proc = run_cli(tmp_path, "hello", *args, env=env)
    assert proc.returncode == 1
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_run_in_process_with_fake_repl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command's own logic (flags, display, JSON), independent of the sandbox."""
    from rlm_fake_repl import FakeRepl

    import kowalski_node.api as api
    from kowalski_node.cli import main

    async def fake_factory(settings: object) -> FakeRepl:
        return FakeRepl()

    monkeypatch.setattr(api, "open_sandbox_repl", fake_factory)
    for key in list(os.environ):
        if key.startswith("KOWALSKI_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("KOWALSKI_HOME", str(tmp_path / "home"))
    script = write_script(tmp_path)
    ctx = tmp_path / "ctx.json"
    ctx.write_text(json.dumps("one two three"), encoding="utf-8")  # .json: parsed as JSON
    code = main(
        ["run", "Summarise", "-b", f"scripted:{script}", "-c", str(ctx), "--json", "-n", "4"]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)
    assert data["content"] == "three words here" and data["backend"] == "scripted"
    assert data["model"] == "scripted" and data["stop_reason"] == "final"
    assert "iteration 3/4" in err


def test_live_display_renders_updates() -> None:
    """The terminal view (rich) renders before, during and after a task."""
    import io

    from rich.console import Console

    from kowalski_node.api import ProgressUpdate
    from kowalski_node.commands.run import _Display

    display = _Display(io.StringIO(), live=False, quiet=False, label="tiny")
    console = Console(file=io.StringIO(), width=100)
    console.print(display)
    display.update(ProgressUpdate("t", "model_response", 2, 5, tokens_in=7, model_latency_ms=12.0))
    display.update(ProgressUpdate("t", "exec_done", 2, 5, exec_ms=3.5, sub_calls=2))
    console.print(display)
    display.update(ProgressUpdate("t", "done", 2, 5, elapsed_ms=1500.0))
    console.print(display)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "starting" in text and "2/5" in text and "1 run, last 3.5 ms" in text
    assert "12 ms" in text and "sub-calls" in text and "1.5 s" in text
    plain = display.stream.getvalue()  # type: ignore[attr-defined]
    assert plain.count("\n") == 3 and "last block 3.5 ms" in plain


def test_ctrl_c_interrupts_cleanly(tmp_path: Path) -> None:
    """SIGINT mid-block: exit 130, "interrupted", and no sandbox process left behind."""
    import signal
    import time

    import psutil

    script = tmp_path / "slow.json"
    script.write_text(
        json.dumps({"responses": ["```repl\nimport time\ntime.sleep(60)\n```", "FINAL(x)"]}),
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("KOWALSKI_")}
    env["KOWALSKI_HOME"] = str(tmp_path / "home")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kowalski_node.cli", "run", "slow", "-b", f"scripted:{script}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if "model_response" in line or not line:
                break
        # The sandbox starts when the block is about to run, just after the model's reply.
        children: list[psutil.Process] = []
        while time.monotonic() < deadline and not children:
            time.sleep(0.05)
            children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "the sandbox workers should be running"
        time.sleep(0.3)  # let the block start sleeping
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        assert time.monotonic() - started < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert "interrupted" in err and "Traceback" not in err
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, f"left behind: {alive}"
