"""The sandbox shows nothing of the host but its runtime, its workdir and its inputs.

Files are planted in several host locations (/srv, /opt, /etc, the node's home, /var/tmp,
another checkout under the checkout's parent, this checkout itself, a node data dir passed
as `hide_paths`); code must neither list nor read any of them, from Python or from a shell,
and `/` must list only allow-listed entries. A planted directory passed as `expose_paths`
is the positive control: it is readable (read-only), so the checks can fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import kowalski_node
from kowalski_node.repl import confine
from tests.repl_support import IS_ROOT, run, sandbox

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox tests need Linux")

CHECKOUT = Path(kowalski_node.__file__).resolve().parents[1]
TOKEN = secrets.token_hex(6)
SECRET = f"planted-secret-{TOKEN}"


@contextlib.contextmanager
def planted_files() -> Iterator[dict[str, Path]]:
    """One secret file per host location we can write to; all removed afterwards."""
    made: list[Path] = []
    files: dict[str, Path] = {}

    def plant(label: str, directory: Path, make_dir: bool = True) -> None:
        try:
            if make_dir:
                directory.mkdir(parents=True, exist_ok=False)
                made.append(directory)
            target = directory / f"kowalski-plant-{TOKEN}.txt"
            target.write_text(SECRET)
            target.chmod(0o644)
            if not make_dir:
                made.append(target)
            files[label] = target
        except OSError:
            pass  # a location this user cannot write to: nothing to plant there

    plant("srv", Path("/srv") / f"kowalski-plant-{TOKEN}")
    plant("opt", Path("/opt") / f"kowalski-plant-{TOKEN}")
    plant("etc", Path("/etc"), make_dir=False)
    plant("home", Path.home() / f"kowalski-plant-{TOKEN}")
    plant("var_tmp", Path("/var/tmp") / f"kowalski-plant-{TOKEN}")
    other_checkout = CHECKOUT.parent / f"kowalski-plant-checkout-{TOKEN}"
    plant("other_checkout", other_checkout)
    if "other_checkout" in files:
        (other_checkout / ".git").mkdir()
        (other_checkout / "pyproject.toml").write_text("[project]\nname = 'other'\n")
    plant("this_checkout", CHECKOUT, make_dir=False)
    plant("node_data", Path("/var/lib") / f"kowalski-plant-data-{TOKEN}")
    plant("exposed", Path("/var/lib") / f"kowalski-plant-exposed-{TOKEN}")
    for path in made:
        if path.is_dir():
            path.chmod(0o755)
    try:
        yield files
    finally:
        for path in reversed(made):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


PROBE = """
import json, os
report = {}
for label, path in PLANTED.items():
    entry = {"exists": os.path.lexists(path)}
    try:
        entry["read"] = open(path).read()
    except OSError as exc:
        entry["read_error"] = type(exc).__name__
    try:
        entry["listed"] = os.path.basename(path) in os.listdir(os.path.dirname(path))
    except OSError as exc:
        entry["list_error"] = type(exc).__name__
    report[label] = entry
report["/"] = sorted(os.listdir("/"))
report["/etc"] = sorted(os.listdir("/etc"))
report["/usr"] = sorted(os.listdir("/usr"))
print(json.dumps(report))
"""


def allowed_top_level() -> set[str]:
    """What `/` may hold: the system dirs, the sandbox's own mounts, and the first
    component of each path the Python runtime lives under (and of links to it)."""
    allowed = {"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "dev", "etc", "proc", "tmp"}
    for path in (sys.prefix, sys.base_prefix, sys.executable, os.path.realpath(sys.prefix),
                 *[p for p in sys.path if "site-packages" in p]):  # fmt: skip
        allowed.add(Path(path).parts[1])
        allowed.add(Path(os.path.realpath(path)).parts[1])
    return allowed


async def test_planted_host_files_are_neither_listed_nor_read() -> None:
    with planted_files() as files:
        assert {"etc", "this_checkout", "exposed"} <= set(files), files
        hidden = {k: str(v) for k, v in files.items() if k != "exposed"}
        exposed_dir = str(files["exposed"].parent)
        async with sandbox(
            hide_paths=(str(files["node_data"].parent),) if "node_data" in files else (),
            expose_paths=(exposed_dir,),
        ) as ex:
            caps = ex.capabilities
            assert caps is not None
            if not caps.limits["host_files"].enforced:
                pytest.skip(f"no private root here: {caps.limits['host_files'].how}")
            await ex.open_session("s", "ctx")
            planted = {**hidden, "exposed": str(files["exposed"])}
            result = await run(ex, f"PLANTED = {planted!r}\n{PROBE}")
            assert result.ok, result.error
            report = json.loads(result.stdout)

            for label in hidden:
                entry = report[label]
                assert entry["exists"] is False, (label, entry)
                assert "read" not in entry, (label, entry)
                assert entry.get("listed") is not True, (label, entry)
            # The positive control: the same probe sees an exposed file.
            assert report["exposed"] == {"exists": True, "read": SECRET, "listed": True}

            top = set(report["/"])
            allowed = allowed_top_level() | {"var"}  # /var/lib/<exposed>
            assert top <= allowed, sorted(top - allowed)
            for never in ("srv", "opt", "home", "boot", "mnt", "media", "run", "sys"):
                if never not in allowed:
                    assert never not in top, never
            assert report["/etc"] == ["group", "hostname", "hosts", "ld.so.cache", "passwd"]
            assert "local" not in report["/usr"] or sys.base_prefix.startswith("/usr/local")

            # This checkout (and the node's source) is not there at all.
            source = await run(
                ex, f"import os\nprint(os.path.exists({str(CHECKOUT / 'pyproject.toml')!r}))"
            )
            assert source.stdout == "False\n"

            # Shell blocks see the same root.
            paths = " ".join(hidden.values())
            shell = await run(ex, f"cat {paths} 2>&1; ls / ; ls /etc", language="sh")
            assert SECRET not in shell.stdout
            assert sorted(shell.stdout.split()[-11:]) != []  # the listing ran
            assert "srv" not in shell.stdout.split()

            # The exposed path is read-only.
            write = await run(ex, f"open({str(files['exposed'])!r}, 'w').write('x')")
            assert write.error_kind == "exception" and "Read-only" in (write.error or "")
        assert files["exposed"].read_text() == SECRET


async def test_the_runtime_still_works_inside() -> None:
    async with sandbox() as ex:
        caps = ex.capabilities
        assert caps is not None
        if not caps.limits["host_files"].enforced:
            pytest.skip(f"no private root here: {caps.limits['host_files'].how}")
        await ex.open_session("s", "ctx")
        code = (
            "import numpy, json, sqlite3, subprocess, sys, os, tempfile, multiprocessing\n"
            "print(int(numpy.arange(10).sum()))\n"
            "print(subprocess.run([sys.executable, '-c', 'print(7)'], capture_output=True, text=True).stdout.strip())\n"
            "print(os.getcwd() == os.environ['HOME'])\n"
            "with tempfile.NamedTemporaryFile(dir='/tmp') as f: f.write(b'x'); print('tmp ok')\n"
            "print(multiprocessing.Lock().acquire())\n"
            "print(sorted(os.listdir('/dev')))"
        )
        result = await run(ex, code, timeout_s=20)
        assert result.ok, (result.error, result.stderr)
        lines = result.stdout.splitlines()
        assert lines[:5] == ["45", "7", "True", "tmp ok", "True"], result.stdout
        assert json.loads(lines[5].replace("'", '"')) == sorted(
            ["fd", "full", "null", "random", "shm", "stderr", "stdin", "stdout", "urandom", "zero"]
        )
        shell = await run(ex, "echo hi | tr a-z A-Z; id -u", language="sh")
        assert shell.stdout.split()[0] == "HI", shell.stderr


async def test_without_namespaces_host_files_are_reported_as_visible() -> None:
    async with sandbox(use_namespaces=False) as ex:
        caps = ex.capabilities
        assert caps is not None
        report = caps.limits["host_files"]
        assert not report.enforced
        assert "NOT hidden" in report.how and "/etc" in report.how
        assert "host_files" in caps.missing()


def test_allowed_paths_cover_the_runtime_and_not_the_checkout() -> None:
    paths = confine.allowed_paths({"expose_paths": ["/nonexistent-kowalski"]})
    assert sys.base_prefix in paths
    assert any("site-packages" in p for p in paths)
    assert "/nonexistent-kowalski" not in paths  # missing paths are skipped
    assert not any(str(CHECKOUT) == p for p in paths)
    assert not any(p in ("/", "/etc", "/opt", "/srv", "/home", "/root", "/work") for p in paths)


def test_symlinks_on_the_way_are_reported(tmp_path: Path) -> None:
    real = tmp_path / "real" / "venv"
    real.mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    links, resolved = confine._resolve_links(str(tmp_path / "link" / "venv"))
    assert resolved == str(real.resolve())
    assert (str(tmp_path / "link"), str(tmp_path / "real")) in links


@pytest.mark.skipif(not IS_ROOT, reason="needs root to start a worker as another user")
async def test_unprivileged_node_gets_the_same_private_root() -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv not installed")
    launcher = ("setpriv", "--reuid=4242", "--regid=4242", "--clear-groups", "--")
    with planted_files() as files:
        async with sandbox(launcher=launcher) as ex:
            caps = ex.capabilities
            assert caps is not None
            if not caps.limits["host_files"].enforced:
                pytest.skip(
                    f"no private root for a non-root node here: {caps.limits['host_files'].how}"
                )
            await ex.open_session("s", "ctx")
            planted = {k: str(v) for k, v in files.items()}
            result = await run(ex, f"PLANTED = {planted!r}\n{PROBE}")
            assert result.ok, result.error
            report = json.loads(result.stdout)
            for label in planted:
                assert report[label]["exists"] is False, (label, report[label])
            assert set(report["/"]) <= allowed_top_level()


def test_node_settings_carry_expose_paths(tmp_path: Path) -> None:
    from kowalski_node.config import load_settings
    from kowalski_node.runtime.task_setup import sandbox_config_from

    settings = load_settings(
        env={"KOWALSKI_HOME": str(tmp_path), "KOWALSKI_SANDBOX__EXPOSE_PATHS": "/srv/data,/opt/ref"}
    )
    config = sandbox_config_from(settings)
    assert config.expose_paths == ("/srv/data", "/opt/ref")
    assert str(tmp_path) in config.hide_paths  # the node's home stays hidden
