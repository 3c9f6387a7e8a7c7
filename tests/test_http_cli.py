"""`kowalski-node submit | status | peers` end to end against the in-process API server.

The CLI's `main()` runs its own `trio.run`, so it is called from a worker thread while
the server runs in the test's event loop.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from kowalski_node import cli
from tests.http_fakes import OTHER_ID, SELF_ID, FakeNodeService, serve_fake

TOKEN = "cli-test-token-0123456789abcdef"


async def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    with trio.fail_after(30):
        code = await trio.to_thread.run_sync(cli.main, argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def _no_ambient_api(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KOWALSKI_API", raising=False)
    monkeypatch.delenv("KOWALSKI_API_TOKEN", raising=False)
    monkeypatch.setenv("KOWALSKI_HOME", str(tmp_path / "home"))


async def test_submit_prints_the_task_id_and_is_idempotent(
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake = FakeNodeService()
    async with serve_fake(fake) as ep:
        argv = ["submit", "Count the lines", "--api", ep.url, "--idempotency-key", "job-1"]
        code, out, err = await run_cli(argv, capsys)
        assert code == 0 and err == ""
        task_id = out.strip()
        assert task_id in fake.tasks
        code, out, err = await run_cli(argv, capsys)
        assert code == 0 and out.strip() == task_id
        assert "already submitted" in err and "not run again" in err
        assert len(fake.tasks) == 1

        code, out, _ = await run_cli(["submit", "again", "--api", ep.url, "--json"], capsys)
        accepted = json.loads(out)
        assert code == 0 and accepted["created"] is True and accepted["status"] == "queued"


async def test_submit_wait_prints_the_answer_and_progress(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    fake = FakeNodeService(auto_steps=2, step_delay=0.02)
    context = tmp_path / "ctx.json"
    context.write_text(json.dumps({"rows": [1, 2, 3]}))
    async with serve_fake(fake) as ep:
        argv = ["submit", "Sum", "--api", ep.url, "-c", str(context), "--wait", "-n", "5"]
        code, out, err = await run_cli(argv, capsys)
        assert code == 0, err
        assert out == "answer to: Sum\n"
        assert "iteration 1/5" in err and "2 device(s)" in err
        sub = fake.submissions[0]
        assert sub.context == {"rows": [1, 2, 3]} and sub.rlm == {"max_iterations": 5}

        code, out, err = await run_cli([*argv[:-2], "--json", "--quiet"], capsys)
        view = json.loads(out)
        assert code == 0 and err == ""
        assert view["status"] == "done" and view["result"]["content"] == "answer to: Sum"
        assert view["leader"] == OTHER_ID and view["commits"] == 1


async def test_submit_wait_reports_a_failed_task(capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeNodeService()
    async with serve_fake(fake) as ep:

        async def fail_soon() -> None:
            while not fake.order:
                await trio.sleep(0.01)
            fake.fail(fake.order[0], "no device has model 'huge'")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fail_soon)
            code, out, err = await run_cli(
                ["submit", "x", "--api", ep.url, "--wait", "--quiet"], capsys
            )
        assert code == 1 and out == ""
        assert "failed: no device has model 'huge'" in err


async def test_submit_bad_input_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    fake = FakeNodeService()
    async with serve_fake(fake) as ep:
        missing = tmp_path / "nope.txt"
        code, _, err = await run_cli(["submit", "x", "--api", ep.url, "-c", str(missing)], capsys)
        assert code == 1 and "--context-file" in err and "nope.txt" in err
        code, _, err = await run_cli(["submit", "x", "--api", ep.url, "--priority", "5000"], capsys)
        assert code == 1 and "priority" in err and "HTTP 400" in err
    assert fake.tasks == {}


async def test_token_from_flag_or_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeNodeService()
    async with serve_fake(fake, token=TOKEN) as ep:
        code, _, err = await run_cli(["submit", "x", "--api", ep.url], capsys)
        assert code == 1 and "missing bearer token" in err
        code, _, _ = await run_cli(["submit", "x", "--api", ep.url, "--token", TOKEN], capsys)
        assert code == 0
        monkeypatch.setenv("KOWALSKI_API_TOKEN", TOKEN)
        monkeypatch.setenv("KOWALSKI_API", ep.url)
        code, out, _ = await run_cli(["peers", "--json"], capsys)
        assert code == 0 and len(json.loads(out)["peers"]) == 2


async def test_status_table_and_one_task(capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeNodeService()
    async with serve_fake(fake) as ep:
        code, out, _ = await run_cli(["submit", "first task", "--api", ep.url], capsys)
        first = out.strip()
        code, out, _ = await run_cli(["submit", "second task", "--api", ep.url], capsys)
        second = out.strip()
        fake.start(first)
        fake.progress(first, 3)
        fake.finish(first, "forty-two")

        code, out, _ = await run_cli(["status", "--api", ep.url], capsys)
        assert code == 0
        assert SELF_ID in out and "1 done" in out and "1 queued" in out
        rows = {
            line.split()[0]: line for line in out.splitlines() if line.strip().startswith("task-")
        }
        assert set(rows) == {first, second}
        assert (
            "done" in rows[first] and OTHER_ID[-6:] in rows[first] and "first task" in rows[first]
        )
        assert "queued" in rows[second]

        code, out, _ = await run_cli(
            ["status", "--api", ep.url, "--state", "queued", "--json"], capsys
        )
        body = json.loads(out)
        assert [t["task_id"] for t in body["tasks"]] == [second]
        assert body["node"]["peer_id"] == SELF_ID

        code, out, _ = await run_cli(["status", "--api", ep.url, "--task", first], capsys)
        assert code == 0
        assert "who did what" in out and "leased" in out and "committed" in out
        assert "forty-two" in out and OTHER_ID in out

        code, out, _ = await run_cli(["status", "--api", ep.url, "--task", first, "--json"], capsys)
        assert json.loads(out)["result"]["content"] == "forty-two"
        assert json.loads(out)["result"]["stop_reason"] == "final"
        assert json.loads(out)["result"]["model"]  # never null

        code, out, _ = await run_cli(["status", "--api", ep.url, "--json"], capsys)
        listed = {t["task_id"]: t for t in json.loads(out)["tasks"]}
        assert listed[first]["stop_reason"] == "final" and listed[first]["model"]
        assert "stop_reason" not in listed[second]  # queued: no outcome yet

        code, _, err = await run_cli(["status", "--api", ep.url, "--task", "task-zzz"], capsys)
        assert code == 1 and "no task task-zzz" in err


async def test_peers_table(capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeNodeService()
    async with serve_fake(fake) as ep:
        code, out, _ = await run_cli(["peers", "--api", ep.url], capsys)
        assert code == 0
        lines = out.splitlines()
        assert "PEER" in lines[0] and "TOK/S" in lines[0]
        me = next(line for line in lines if "(self)" in line)
        other = next(line for line in lines if "suspect" in line)
        assert "desktop" in me and "19.5/32.0 GB" in me and "30.2" in me
        assert "laptop" in other and "1.4 ms" in other and "javascript" in other
        code, out, _ = await run_cli(["peers", "--api", ep.url, "--full-ids"], capsys)
        assert OTHER_ID in out


def test_no_node_running_is_a_clear_error_in_a_real_process(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "KOWALSKI_HOME": str(tmp_path)}
    env.pop("KOWALSKI_API", None)
    proc = subprocess.run(
        [sys.executable, "-m", "kowalski_node.cli", "status", "--api", f"http://127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 1
    assert f"no kowalski node API is reachable at http://127.0.0.1:{port}" in proc.stderr
    assert "kowalski-node start" in proc.stderr
    assert "Traceback" not in proc.stderr


async def test_a_broken_config_is_reported_not_ignored(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text("[node.api]\nprot = 1\n")
    code, _, err = await run_cli(["peers"], capsys)
    assert code == 1 and "node.api.prot: unknown key" in err and "port" in err
