"""The pure cores stay pure: importing them loads no event loop, socket, storage or HTTP
library, and their source reads no clock and no global random (docs/cores.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import kowalski_node

PURE = ("rlm", "membership", "capabilities", "election", "tasks", "placement", "coordination")
PURE_MODULES = ("glue", "wire")  # single-module cores and the glue between them
IMPURE_MODULES = {"trio", "socket", "sqlite3", "httpx", "asyncio", "subprocess"}
ROOT = Path(kowalski_node.__file__).parent
# Files inside a core package that are its I/O edge on purpose, and why.
EDGES = {
    "capabilities/probe.py",  # reads this machine's resources (psutil) for the advert
}


def test_importing_the_cores_loads_no_io_library() -> None:
    code = (
        "import sys\n"
        + "".join(f"import kowalski_node.{p}\n" for p in (*PURE, *PURE_MODULES))
        + f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(IMPURE_MODULES)!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_core_sources_read_no_clock_and_no_global_random() -> None:
    offenders: list[str] = []
    paths = [p for package in PURE for p in sorted((ROOT / package).glob("*.py"))]
    paths += [ROOT / f"{module}.py" for module in PURE_MODULES]
    for path in paths:
        rel = path.relative_to(ROOT).as_posix()
        if rel in EDGES:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                )
                for name in names:
                    if name.split(".")[0] in IMPURE_MODULES | {"time"}:
                        offenders.append(f"{rel}:{node.lineno} imports {name}")
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "random"
                and node.attr != "Random"
            ):
                offenders.append(f"{rel}:{node.lineno} uses random.{node.attr}")
    assert offenders == []
