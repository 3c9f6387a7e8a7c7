"""Every ```python snippet in README.md and docs/api.md runs as written.

Each snippet runs in its own interpreter, in a directory holding the files the snippets
open (app.log, notes.txt). The model is a scripted backend chosen through the
environment (`KOWALSKI_LLM__BACKEND`), exactly as a user's config would choose one, so
no model download is needed; `KOWALSKI_API` points at a closed port, so
`device_filter="all"` falls back to this device as documented.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/api.md")
FENCE = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def snippets() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        text = (ROOT / doc).read_text(encoding="utf-8")
        for number, match in enumerate(FENCE.finditer(text), start=1):
            line = text[: match.start()].count("\n") + 1
            found.append((f"{doc}:{line}#{number}", match.group(1)))
    return found


SNIPPETS = snippets()


def test_the_docs_have_snippets() -> None:
    assert len([s for s in SNIPPETS if s[0].startswith("README")]) >= 1
    assert len([s for s in SNIPPETS if s[0].startswith("docs/api.md")]) >= 5


@pytest.mark.parametrize(("where", "code"), SNIPPETS, ids=[s[0] for s in SNIPPETS])
def test_snippet_runs_as_written(tmp_path: Path, where: str, code: str) -> None:
    script = tmp_path / "script.json"
    script.write_text(json.dumps({"responses": ['FINAL("42")']}))
    (tmp_path / "app.log").write_text("ok\nERROR timeout\nok\nWARN timeout again\n")
    (tmp_path / "notes.txt").write_text("Three notes. About the cluster. And its models.\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "KOWALSKI_HOME": str(tmp_path / "home"),
        "KOWALSKI_LLM__BACKEND": f"scripted:{script}",
        "KOWALSKI_API": f"127.0.0.1:{closed_port}",
    }
    env.pop("KOWALSKI_CONFIG", None)
    snippet = tmp_path / "snippet.py"
    snippet.write_text(code, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(snippet)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"{where} failed:\n{code}\n--- stderr ---\n{proc.stderr[-3000:]}"
    if "print(" in code:
        assert proc.stdout.strip(), f"{where} printed nothing"
        assert "42" in proc.stdout, proc.stdout
