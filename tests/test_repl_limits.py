"""Every sandbox limit, enforced for real, and hostile code: clear error, worker replaced,
node alive, nothing left running (each `sandbox()` checks that on exit)."""

from __future__ import annotations

import functools
import os
import socket
import sys
import time
from pathlib import Path

import psutil
import pytest
import trio

from kowalski_node.errors import SandboxError
from tests.repl_support import IS_ROOT, require_enforced, run, sandbox, sandbox_processes

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox tests need Linux")


# ---------------------------------------------------------------- wall time


async def test_infinite_loop_is_interrupted_and_the_namespace_survives() -> None:
    async with sandbox() as ex:
        await ex.open_session("s", "ctx")
        await run(ex, "kept = 'yes'")
        started = time.monotonic()
        result = await run(ex, "while True:\n    pass", timeout_s=0.5)
        assert result.error_kind == "timeout"
        assert "wall-clock limit of 0.5 s" in (result.error or "")
        assert time.monotonic() - started < 3.0
        after = await run(ex, "print(kept)")
        assert after.stdout == "yes\n" and not after.namespace_rebuilt  # same worker


async def test_code_that_ignores_the_interrupt_is_killed_and_the_namespace_rebuilt() -> None:
    async with sandbox() as ex:
        await ex.open_session("s", "ctx")
        await run(ex, "kept = [1, 2, 3]")
        # Swallows the soft interrupt; then a C loop that never checks for signals.
        stubborn = (
            "import time, itertools\n"
            "try:\n    time.sleep(60)\nexcept BaseException:\n    pass\n"
            "any(itertools.repeat(0))"
        )
        started = time.monotonic()
        result = await run(ex, stubborn, timeout_s=0.5)
        assert result.error_kind == "timeout"
        assert "killed" in (result.error or "")
        assert time.monotonic() - started < 4.0
        after = await run(ex, "print(sum(kept))")
        assert after.stdout == "6\n"
        assert after.namespace_rebuilt
        assert any("replaying 1 block" in n for n in after.notes)


async def test_print_flood_is_capped_and_stopped() -> None:
    async with sandbox(max_output_bytes=64 * 1024) as ex:
        await ex.open_session("s", "ctx")
        result = await run(ex, "while True:\n    print('spam' * 50)", timeout_s=0.5)
        assert result.error_kind == "timeout"
        assert len(result.stdout.encode()) < 64 * 1024 + 200
        assert "output truncated" in result.stdout
        # Also through fd 1 directly (C code, os.write), which RLIMIT_FSIZE bounds.
        raw = await run(ex, "import os\nfor _ in range(2000):\n    os.write(1, b'x' * 1000)")
        assert raw.ok and "output truncated" in raw.stdout


# ---------------------------------------------------------------- CPU


async def test_cpu_limit_per_block() -> None:
    async with sandbox(cpu_s=1) as ex:
        await ex.open_session("s", "ctx")
        started = time.monotonic()
        result = await run(ex, "n = 0\nwhile True:\n    n += 1", timeout_s=20)
        assert result.error_kind == "timeout"
        assert "CPU-time limit" in (result.error or "")
        assert time.monotonic() - started < 10.0


async def test_cpu_hard_limit_kills_a_worker_that_ignores_sigxcpu() -> None:
    async with sandbox(cpu_s=1, cpu_total_s=2) as ex:
        await ex.open_session("s", "ctx")
        result = await run(
            ex,
            "while True:\n    try:\n        while True:\n            sum(range(1000))\n"
            "    except BaseException:\n        pass",
            timeout_s=20,
        )
        assert result.error_kind == "killed"
        assert "SIGKILL" in (result.error or "")
        assert (await run(ex, "print('alive')")).stdout == "alive\n"


# ---------------------------------------------------------------- memory


async def test_memory_bomb_gets_a_memory_error_and_a_fresh_worker() -> None:
    async with sandbox(memory_mb=256) as ex:
        require = ex.capabilities
        assert require is not None and require.limits["memory"].enforced
        await ex.open_session("s", "ctx")
        await run(ex, "kept = 'still here'")
        result = await run(ex, "hog = []\nwhile True:\n    hog.append(bytearray(16 * 1024 * 1024))")
        assert result.error_kind == "memory"
        assert "256 MiB" in (result.error or "")
        one_shot = await run(ex, "big = bytearray(1024 * 1024 * 1024)")
        assert one_shot.error_kind == "memory"
        after = await run(ex, "print(kept)\nprint('hog' in dir())")
        assert after.stdout == "still here\nFalse\n"
        assert after.namespace_rebuilt


# ---------------------------------------------------------------- processes


async def test_fork_bomb_is_contained() -> None:
    async with sandbox(max_procs=16) as ex:
        await ex.open_session("s", "ctx")
        result = await run(ex, "import os\nwhile True:\n    os.fork()", timeout_s=3)
        assert result.error_kind in ("exception", "timeout", "killed")
        assert (
            "Resource temporarily unavailable" in (result.error or "")
            or result.error_kind != "exception"
        )
        stubborn = await run(
            ex, "import os\nwhile True:\n    try:\n        os.fork()\n    except BaseException:\n        pass",
            timeout_s=1,
        )  # fmt: skip
        assert stubborn.error_kind in ("timeout", "killed")
        assert (await run(ex, "print('alive')")).stdout == "alive\n"


async def test_process_limit_counts_children() -> None:
    async with sandbox(max_procs=8) as ex:
        require_enforced(ex, "processes")
        await ex.open_session("s", "ctx")
        result = await run(
            ex,
            "import subprocess\nprocs, error = [], None\n"
            "for _ in range(20):\n"
            "    try:\n        procs.append(subprocess.Popen(['sleep', '30']))\n"
            "    except OSError as exc:\n        error = exc\n        break\n"
            "print(len(procs), type(error).__name__)",
        )
        started, error = result.stdout.split()
        assert int(started) < 8 and error == "BlockingIOError"


async def test_shell_fork_bomb_is_contained() -> None:
    async with sandbox(max_procs=16) as ex:
        if "shell" not in ex.languages:
            pytest.skip("no shell")
        await ex.open_session("s", "ctx")
        # The bomb backgrounds itself, so the block "succeeds" at once; the sweep after the
        # block (or the timeout) must still remove every process it made.
        result = await run(ex, ":(){ :|:& };:", language="bash", timeout_s=2)
        assert result.error_kind in (None, "timeout", "exception")
        assert (await run(ex, "echo alive", language="sh")).stdout == "alive\n"
        if IS_ROOT:
            # the sweep's last kills may still be landing: wait (bounded) until they have
            base = ex.config.sandbox_uid_base

            def confined() -> list[psutil.Process]:
                return [p for p in sandbox_processes(base) if p.uids().real >= base]

            left = confined()
            with trio.move_on_after(5):
                while len(left) > 2:
                    await trio.sleep(0.02)
                    left = confined()
            assert len(left) <= 2  # the session's worker and the idle one


async def test_background_processes_do_not_outlive_their_block() -> None:
    async with sandbox() as ex:
        await ex.open_session("s", "ctx")
        result = await run(
            ex,
            "import subprocess, os\n"
            "p = subprocess.Popen(['sleep', '60'], start_new_session=True)\n"
            "if os.fork() == 0:\n    os.setsid()\n    import time\n    time.sleep(60)\n",
        )
        assert result.ok, result.error
        if IS_ROOT:
            uid = int((await run(ex, "import os\nprint(os.getuid())")).stdout)
            alive = [
                p for p in sandbox_processes(ex.config.sandbox_uid_base) if p.uids().real == uid
            ]
            assert len(alive) == 1, "only the worker itself may run between blocks"


# ---------------------------------------------------------------- files


async def test_file_size_limit() -> None:
    async with sandbox(file_size_mb=1) as ex:
        await ex.open_session("s", "ctx")
        result = await run(
            ex, "with open('big.bin', 'wb') as f:\n    f.write(b'x' * (2 * 1024 * 1024))"
        )
        assert result.error_kind == "exception"
        assert "File too large" in (result.error or "")
        small = await run(
            ex,
            "open('small.bin', 'wb').write(b'x' * 1000)\nimport os\nos.path.getsize('small.bin')",
        )
        assert small.stdout == "1000\n"


async def test_private_workdir_is_writable_private_and_removed(tmp_path: Path) -> None:
    async with sandbox(base_dir=str(tmp_path)) as ex:
        await ex.open_session("s", "ctx")
        result = await run(ex, "import os\nopen('mine.txt', 'w').write('data')\nprint(os.getcwd())")
        assert result.ok, result.error
        workdir = Path(result.stdout.strip())
        assert workdir.name.startswith("kowalski-repl-")
        assert (await run(ex, "print(open('mine.txt').read())")).stdout == "data\n"
        caps = ex.capabilities
        assert caps is not None
        if caps.limits["workdir"].enforced and "tmpfs" in caps.limits["workdir"].how:
            assert not (workdir / "mine.txt").exists(), (
                "the workdir must not be visible to the host"
            )
        await ex.close_session("s")
        assert not workdir.exists()
        assert not list(tmp_path.glob("kowalski-repl-*"))


async def test_writes_outside_the_workdir_fail(tmp_path: Path) -> None:
    target = tmp_path / "escape.txt"
    async with sandbox() as ex:
        require_fs = ex.capabilities
        assert require_fs is not None
        if not require_fs.limits["filesystem"].enforced:
            pytest.skip(f"filesystem not confined here: {require_fs.limits['filesystem'].how}")
        await ex.open_session("s", "ctx")
        for path in (
            str(target),
            "/etc/kowalski-escape",
            "/var/tmp/escape",
            os.getcwd() + "/escape",
        ):
            result = await run(ex, f"open({path!r}, 'w').write('x')")
            assert result.error_kind == "exception", path
            assert any(
                s in (result.error or "")
                for s in ("Read-only", "Permission denied", "No such file")
            ), result.error
        shell = await run(ex, f"echo x > {target}", language="sh")
        assert not shell.ok
    assert not target.exists()
    assert not Path("/etc/kowalski-escape").exists()


# ---------------------------------------------------------------- network


async def test_network_connections_fail() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    try:
        async with sandbox() as ex:
            caps = ex.capabilities
            assert caps is not None
            if not caps.limits["network"].enforced:
                assert "no network namespace" in caps.limits["network"].how
                pytest.skip(caps.limits["network"].how)
            await ex.open_session("s", "ctx")
            result = await run(
                ex,
                f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)",
            )
            assert result.error_kind == "exception"
            assert "unreachable" in (result.error or "") or "refused" in (result.error or "")
            with pytest.raises(OSError):
                listener.accept()  # nothing ever reached the host's loopback
    finally:
        listener.close()


# ---------------------------------------------------------------- attacks on the node


async def test_killing_the_node_from_the_sandbox_fails() -> None:
    async with sandbox() as ex:
        await ex.open_session("s", "ctx")
        result = await run(ex, f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)")
        assert result.error_kind == "exception"
        assert "ProcessLookupError" in (result.error or "") or "PermissionError" in (
            result.error or ""
        )
        await run(ex, "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)")
        await run(ex, "import os, signal\nos.kill(0, signal.SIGKILL)")
        assert (await run(ex, "print('alive')")).stdout == "alive\n"


async def test_closing_the_protocol_pipe_replaces_the_worker() -> None:
    async with sandbox() as ex:
        await ex.open_session("s", "ctx")
        await run(ex, "kept = 5")
        result = await run(
            ex,
            "import os\nfor fd in range(3, 256):\n    try:\n        os.close(fd)\n    except OSError:\n        pass",
        )
        assert result.error_kind == "killed"
        assert "worker" in (result.error or "")
        after = await run(ex, "print(kept)")
        assert after.stdout == "5\n" and after.namespace_rebuilt


async def test_garbage_on_the_protocol_pipe_replaces_the_worker() -> None:
    async with sandbox() as ex:
        await ex.open_session("s", "ctx")
        result = await run(
            ex,
            "import os\nfor fd in range(3, 256):\n    try:\n        os.write(fd, b'\\xff' * 64)\n"
            "    except OSError:\n        pass\nimport time\ntime.sleep(1)",
        )
        assert result.error_kind == "killed"
        assert "protocol" in (result.error or "")
        assert (await run(ex, "print(1)")).stdout == "1\n"


async def test_worker_exit_is_reported() -> None:
    async with sandbox() as ex:
        await ex.open_session("s", "ctx")
        result = await run(ex, "import os\nos._exit(7)")
        assert result.error_kind == "killed"
        assert "status 7" in (result.error or "")
        assert (await run(ex, "print(2)")).stdout == "2\n"


async def test_worker_dying_between_blocks_is_rebuilt() -> None:
    async with sandbox() as ex:
        await ex.open_session("s", "ctx")
        started = await run(
            ex,
            "kept = 9\nimport os, threading, time\n"
            "threading.Thread(target=lambda: (time.sleep(0.2), os._exit(1)), daemon=True).start()",
        )
        assert started.ok
        worker = ex._session("s").worker
        assert worker is not None
        with trio.fail_after(10):
            await worker.process.wait()  # the thread's os._exit, 0.2 s after the block
        after = await run(ex, "print(kept)")
        assert after.stdout == "9\n"
        assert after.namespace_rebuilt
        assert any("died since the previous block" in n for n in after.notes)


# ---------------------------------------------------------------- capabilities and shutdown


async def test_without_namespaces_the_report_says_what_is_missing() -> None:
    async with sandbox(use_namespaces=False) as ex:
        caps = ex.capabilities
        assert caps is not None
        assert "network" in caps.missing()
        assert "no network namespace" in caps.limits["network"].how
        await ex.open_session("s", "ctx")
        assert (await run(ex, "print(6 * 7)")).stdout == "42\n"
    with pytest.raises(SandboxError, match="network"):
        async with sandbox(use_namespaces=False, require=frozenset({"network"})):
            pass


async def test_shutdown_leaves_nothing_behind() -> None:
    async with sandbox(pool_size=2) as ex:
        for sid in ("a", "b", "c"):
            await ex.open_session(sid, sid)
        async with trio.open_nursery() as nursery:
            for sid in ("a", "b"):
                code = "import subprocess\n_ = subprocess.Popen(['sleep', '60'])"
                nursery.start_soon(functools.partial(run, ex, code, session=sid))
        uid_base = ex.config.sandbox_uid_base
        assert sandbox_processes(uid_base)  # workers are really running
        await ex.aclose()
        assert ex.session_ids() == []
    # `sandbox()` asserted on exit that no process of any of these workers remains.
    assert not sandbox_processes(uid_base)


@pytest.mark.skipif(not IS_ROOT, reason="needs root to start a worker as another user")
async def test_unprivileged_node_uses_user_namespaces() -> None:
    import shutil
    import subprocess

    if shutil.which("setpriv") is None:
        pytest.skip("setpriv not installed")
    launcher = ("setpriv", "--reuid=4242", "--regid=4242", "--clear-groups", "--")
    probe = subprocess.run(
        [*launcher, sys.executable, "-I", "-c", "import msgpack, kowalski_node.repl.worker"],
        capture_output=True,
    )
    if probe.returncode != 0:
        pytest.skip("the interpreter is not usable by an unprivileged user here")
    async with sandbox(launcher=launcher) as ex:
        caps = ex.capabilities
        assert caps is not None
        assert "nested user namespace" in caps.limits["privileges"].how
        await ex.open_session("s", "ctx")
        result = await run(
            ex,
            "import os, subprocess\nprint(os.getuid())\n"
            "r = subprocess.run(['mount', '-o', 'remount,rw', '/'], capture_output=True)\nprint(r.returncode != 0)",
        )
        assert result.stdout.split() == ["65534", "True"]
        escape = await run(ex, "open('/etc/kowalski-escape', 'w')")
        assert escape.error_kind == "exception"
        net = await run(ex, "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)")
        assert "unreachable" in (net.error or "")
